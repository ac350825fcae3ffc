"""What the routing looks like: expert popularity and consecutive-token repetition.

Popularity is a ratio to the uniform share on a diverging scale that runs
exactly from the coldest to the hottest cell (white = as often as random
routing), so the colour bar never promises a range the data do not reach.
Repetition plots the rank-free "first or second choice" always, and "first
choice" only when the trace recorded ranks (a trace of expert sets has no
first choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from mer.analysis import style
from mer.analysis.style import LegendEntry, Written

#: Mixtral paper (arXiv 2401.04088) Table 5, consecutive-token repetition, mid-range of the domains.
PAPER_REPETITION: dict[str, Any] = {
    "layers": [0, 15, 31],
    "first": [0.14, 0.26, 0.23],
    "first_or_second": [0.475, 0.645, 0.49],
    "first_range": [(0.14, 0.14), (0.24, 0.28), (0.20, 0.26)],
    "first_or_second_range": [(0.45, 0.50), (0.62, 0.67), (0.44, 0.54)],
}
#: Colours of this figure's series (not policies: kept apart from the policy palette).
FIRST_OR_SECOND = "#332288"
FIRST = "#117733"


@style.styled
def plot_popularity_heatmap(shares: np.ndarray, out: str | Path, *, title: str) -> Written:
    """Share of a layer's lookups per expert, as a ratio to the uniform share (layers x experts)."""
    shares = np.asarray(shares, dtype=float)
    n_layers, n_experts = shares.shape
    uniform = 1.0 / n_experts
    ratio = np.clip(shares / uniform, 1e-3, None)
    log2 = np.log2(ratio)
    lo, hi = float(np.nanmin(log2)), float(np.nanmax(log2))
    lo, hi = min(lo, -0.05), max(hi, 0.05)  # white (1x) stays inside the scale
    fig, axes = style.figure(height=min(6.0, 1.2 + 0.1 * n_layers))
    ax = axes[0, 0]
    im = ax.imshow(
        log2,
        aspect="auto",
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vmin=lo, vcenter=0.0, vmax=hi),
        interpolation="nearest",
    )
    style.tag_series(im, colorbar="popularity")
    ax.set_xlabel("expert (index within the layer)")
    ax.set_ylabel(style.LAYER)
    if n_experts <= 16:
        ax.set_xticks(range(n_experts))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8, steps=[1, 2, 4, 5, 10]))
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(
        f"lookups / uniform share (x; 1x = 1/{n_experts}; range {2**lo:.2f}x to {2**hi:.2f}x)"
    )
    # ticks at round ratios, never closer than 7% of the bar's length (the two halves of the
    # scale are stretched differently), and always the two ends: the data's exact range
    norm = im.norm
    kept = [lo, hi]
    for t in (1.0, 0.5, 2.0, 0.25, 1.5, 0.67, 4.0, 0.33, 1.25, 0.8, 3.0, 0.1, 8.0):
        v = float(np.log2(t))
        if lo < v < hi and all(abs(float(norm(v)) - float(norm(k))) > 0.07 for k in kept):
            kept.append(v)
    cb.set_ticks(sorted(kept))
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{2**v:.2g}x"))
    cb.minorticks_off()
    style.title(fig, title)
    return style.save(fig, out)


@style.styled
def plot_repetition(
    first: Sequence[float],
    first_or_second: Sequence[float],
    out: str | Path,
    *,
    title: str,
    baseline: dict[str, float] | None = None,
    rank_known: bool = True,
) -> Written:
    """Consecutive-token repetition per layer beside the Mixtral paper's Table 5.

    `baseline`: the random-routing shares (`first`, `first_or_second`) from
    traces.stats. `rank_known=False` (the trace recorded expert sets, not
    ranks) leaves out every "first choice" series: they would describe the
    smallest expert id, not the router's top choice.
    """
    layers = np.arange(len(first_or_second))
    fig, axes = style.figure(height=2.3)
    ax = axes[0, 0]
    series = [("first_or_second", first_or_second, FIRST_OR_SECOND, "first or second choice")]
    if rank_known:
        series.append(("first", first, FIRST, "first choice"))
    entries: list[LegendEntry] = []
    pr = PAPER_REPETITION
    for key, vals, color, name in series:
        v = np.asarray(vals, dtype=float) * 100
        style.draw_curve(ax, layers, v, color=color, marker="o", keys={"series": f"trace-{key}"})
        entries.append(
            LegendEntry(
                "series",
                f"trace-{key}",
                f"this trace: {name}",
                Line2D([], [], color=color, marker="o", ms=3),
            )
        )
        shown = [i for i, layer in enumerate(pr["layers"]) if layer < len(layers)]
        if shown:
            lo_hi = [pr[f"{key}_range"][i] for i in shown]
            mids = [(a + b) / 2 * 100 for a, b in lo_hi]
            err = [(b - a) / 2 * 100 for a, b in lo_hi]
            bars = ax.errorbar(
                [pr["layers"][i] for i in shown],
                mids,
                yerr=err,
                fmt="D",
                ms=4,
                color=color,
                mfc="white",
                capsize=2.5,
                lw=0.9,
                zorder=5,
            )
            for a in [bars.lines[0], *bars.lines[1], *bars.lines[2]]:
                style.tag_series(a, series=f"paper-{key}")
            entries.append(
                LegendEntry(
                    "series",
                    f"paper-{key}",
                    f"Mixtral paper: {name} (range)",
                    Line2D([], [], ls="none", marker="D", mfc="white", color=color),
                )
            )
        if baseline and key in baseline:
            b = baseline[key] * 100
            line = ax.axhline(b, color=color, ls=(0, (1, 1.5)), lw=0.9, zorder=1)
            style.tag_series(line, series=f"random-{key}")
            entries.append(
                LegendEntry(
                    "series",
                    f"random-{key}",
                    f"random routing: {name} ({b:.1f}%)",
                    Line2D([], [], color=color, ls=(0, (1, 1.5))),
                )
            )
    ax.set_xlabel(style.LAYER)
    ax.set_ylabel("repeated expert (% of token pairs)")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    style.grid(ax)
    notes = (
        []
        if rank_known
        else [
            "ranks not recorded by this trace: only the rank-free 'first or second choice' is drawn"
        ]
    )
    style.legend(fig, entries, ncol=1, notes=notes)
    style.title(fig, title)
    return style.save(fig, out, notes=notes)
