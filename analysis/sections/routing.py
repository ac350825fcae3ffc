"""Section: what the routing looks like (popularity, repetition), from the trace alone."""

from __future__ import annotations

import numpy as np

from mer.analysis.plots import plot_popularity_heatmap, plot_repetition
from mer.analysis.sections import Section, Study, section


@section(order=10, key="routing")
def routing(study: Study) -> Section:
    tr, st = study.trace, study.stats
    sec = Section("The routing", window=study.trace_window())
    rep = [layer["repetition"] for layer in st["layers"]]
    rank_known = bool(st.get("rank_order_known", True))
    fos = np.mean([r["first_or_second"] for r in rep]) * 100
    base = st["random_baseline"]["first_or_second"] * 100
    sec.text(
        f"{st['totals']['distinct_keys']} distinct layer-qualified experts are used. Consecutive "
        f"tokens reuse one of the previous token's experts more often than chance: {fos:.1f}% of "
        f"token pairs on average over layers (random routing: {base:.1f}%).",
        *[f"Note: {w}" for w in st.get("warnings", [])],
    )
    shares = np.array([layer["popularity"] for layer in st["layers"]])
    ratio = shares * tr.n_experts
    sec.figure(
        plot_popularity_heatmap(
            shares,
            study.figure_path("popularity"),
            title=f"Expert popularity: {tr.name} ({tr.meta.model})",
        ),
        f"Look for the dark cells: the hottest expert of a layer gets {ratio.max():.2f}x the uniform "
        f"share, the coldest {ratio.min():.2f}x; the colour scale spans exactly that range",
        "expert popularity",
    )
    sec.figure(
        plot_repetition(
            [r["first"] for r in rep],
            [r["first_or_second"] for r in rep],
            study.figure_path("repetition"),
            title=f"Consecutive-token repetition: {tr.name} vs the Mixtral paper (Table 5)",
            baseline=st["random_baseline"],
            rank_known=rank_known,
        ),
        "Compare the line with the dotted random-routing level: the gap is the reuse a cache "
        "can exploit; the diamonds are the paper's published ranges",
        "repetition per layer",
    )
    return sec
