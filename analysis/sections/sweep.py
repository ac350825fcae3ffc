"""Section: the simulated sweep, what wins and what bounds it."""

from __future__ import annotations

import contextlib

import pandas as pd

from mer.analysis.plots import io_share_spread, plot_io_share, plot_sweep_tokens_per_s
from mer.analysis.report import frame_rows
from mer.analysis.sections import Section, Study, section, tokens_window
from mer.analysis.sections.curves import tuning_sentences
from mer.errors import BadInput

#: Columns of the sweep's top table, in order (labels in report.COLUMN_LABELS).
SWEEP_COLUMNS = [
    "policy",
    "scope",
    "predictor",
    "cache_slots",
    "hit_rate",
    "tokens_per_s",
    "io_wait_share",
]
TOP = 12


def sweep_reading(res: pd.DataFrame) -> list[str]:
    """One sentence on what bounds the winner, from the sweep's own columns."""
    ranked = res.sort_values("tokens_per_s", ascending=False)
    best = float(ranked["tokens_per_s"].iloc[0])
    top5 = ranked["tokens_per_s"].head(5).astype(float)
    spread = (best - float(top5.min())) / best if best else 0.0
    out = f"The 5 fastest configurations are within {spread * 100:.1f}% of each other."
    if "bound_compute_tokens_per_s" in res.columns:
        bound = float(ranked["bound_compute_tokens_per_s"].iloc[0])
        if bound > 0:
            share = best / bound
            out += (
                f" The fastest reaches {share * 100:.0f}% of the compute bound (every lookup a hit)"
            )
            out += (
                ": on this machine the expert FFN, not the SSD, decides tokens/s, so the policy matters little here."
                if share > 0.9
                else ": the remaining gap is I/O the policy and predictor did not hide."
            )
    return [out]


def sweep_window(res: pd.DataFrame, study: Study) -> str:
    tokens = int(res["tokens"].max()) if "tokens" in res.columns else study.trace.n_tokens
    return tokens_window(tokens, study.trace.n_tokens)


@section(order=30, key="sweep")
def sweep_section(study: Study) -> Section | None:
    res = study.sweep
    if res is None:
        return None
    tr = study.trace
    sec = Section("The sweep (simulated)", window=sweep_window(res, study))
    top = res.sort_values("tokens_per_s", ascending=False).head(TOP)
    # beside the hit rate, where the sweep computed them: steady state and gap closed
    extra = [c for c in ("warm_hit_rate", "gap_closed") if c in top.columns]
    header, rows = frame_rows(top, SWEEP_COLUMNS + [c for c in extra if top[c].notna().any()])
    sec.table(header, rows, lead=f"{len(res)} configurations; the {min(TOP, len(res))} fastest:")
    sec.text(*sweep_reading(res))
    sec.text(*tuning_sentences(res))
    hw = study.inputs.hardware or (
        str(res["hardware"].iloc[0]) if "hardware" in res.columns else None
    )
    shape = str(res["shape"].iloc[0]) if "shape" in res.columns else None
    bounds: dict[str, float] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    machine = hw
    if hw and shape:
        from mer.analysis.bounds import tokens_per_s_bounds
        from mer.sim.hardware import load_profile

        with contextlib.suppress(BadInput):
            machine = load_profile(hw).name
            bounds, curves = tokens_per_s_bounds(shape, hw, study.mrc, tr.n_layers, tr.top_k)
    fig = plot_sweep_tokens_per_s(
        res,
        study.figure_path("sweep-tokens-per-s"),
        title=f"Simulated tokens/s: {tr.name}, expert shape {shape}, machine {machine}",
        bounds=bounds,
        curves=curves,
    )
    best = res.sort_values("tokens_per_s", ascending=False).iloc[0]
    sec.figure(
        fig,
        f"Read across a row of panels to see what prefetch adds, and up each panel to see what cache "
        f"buys; the best is {best['policy']} / {best['predictor']} at {int(best['cache_slots'])} slots, "
        f"{float(best['tokens_per_s']):.3g} tokens/s",
        "tokens/s vs cache size",
    )
    if {"io_wait_share", "tokens_per_s"} <= set(res.columns):
        differs, sentence = io_share_spread(res)
        if differs:
            sec.figure(
                plot_io_share(
                    res,
                    study.figure_path("io-share"),
                    title=f"Share of token time waiting for expert reads (simulated): {tr.name}, machine {machine}",
                ),
                "Look at how the I/O share falls as the cache grows and where prefetch hides it",
                "I/O share",
            )
            sec.text(sentence)
        else:
            sec.text(sentence)
    return sec
