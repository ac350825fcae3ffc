"""Sections: hit rate at every cache size (no prefetch), and real against fitted synthetic."""

from __future__ import annotations

from typing import Any

import pandas as pd

from mer.analysis.plots import plot_mrc
from mer.analysis.report import signed
from mer.analysis.sections import Section, Study, section, tokens_window

#: Cache sizes the hit-rate table shows (those the trace has).
SIZES_SHOWN = (16, 32, 64, 96, 128, 192, 256)


def curve_tokens(curves: pd.DataFrame, study: Study) -> int:
    """Tokens the curves were computed on (a curve's lookups over lookups per token)."""
    tr = study.trace
    row = curves.iloc[0]
    lookups = int(row["hits"] + row["misses"]) if {"hits", "misses"} <= set(curves.columns) else 0
    per_token = tr.n_layers * tr.top_k
    return lookups // per_token if lookups else tr.n_tokens


def _at(curves: pd.DataFrame, policy: str, scope: str, size: int) -> float | None:
    d = curves[
        (curves["policy"] == policy) & (curves["scope"] == scope) & (curves["cache_slots"] == size)
    ]
    return float(d["hit_rate"].iloc[0]) * 100 if len(d) else None


def _mid_size(curves: pd.DataFrame) -> int:
    n = int(curves["cache_slots"].max())
    return min((s for s in SIZES_SHOWN if s <= n), key=lambda s: abs(s - n / 4), default=n)


@section(order=20, key="curves")
def curves_section(study: Study) -> Section | None:
    curves = study.mrc
    if curves is None:
        return None
    tr = study.trace
    sec = Section(
        "Hit rate at every cache size (no prefetch)",
        window=tokens_window(curve_tokens(curves, study), tr.n_tokens),
    )
    exact = sorted(
        p
        for p, d in curves[curves["scope"] == "global"].groupby("policy")
        if d["cache_slots"].nunique()
        == int(d["cache_slots"].max()) - int(d["cache_slots"].min()) + 1
    )
    sec.text(
        "Each policy replays the trace from an empty cache at each size. Lines join sizes that "
        f"were all computed ({', '.join(exact) or 'none'} at every size); points stand alone where "
        "only some sizes were replayed, and nothing is drawn between them."
    )
    from mer.analysis.inputs import granularity_note, mrc_meta

    how = granularity_note(mrc_meta(study.inputs.mrc)) if study.inputs.mrc else ""
    if how:
        sec.text(
            "These curves replay lookup by lookup (`--granularity lookup`, libCacheSim's "
            "semantics), not step by step as the engine does."
        )
    mid = _mid_size(curves)
    title = f"Hit rate vs cache size, no prefetch{how}: {tr.name} ({tr.meta.model})"
    lru, opt = _at(curves, "lru", "global", mid), _at(curves, "opt", "global", mid)
    gap = (
        f": at {mid} slots LRU gets {lru:.1f}%, OPT {opt:.1f}%"
        if lru is not None and opt is not None
        else ""
    )
    if "global" in set(curves["scope"]):
        sec.figure(
            plot_mrc(curves, study.figure_path("mrc"), title=title, scopes=["global"]),
            f"Look at the distance from each policy to the black OPT ceiling{gap}",
            "hit rate vs cache size, global cache",
        )
    if "per-layer" in set(curves["scope"]):
        pl = _at(curves, "opt", "per-layer", mid)
        cost = (
            f": OPT loses {opt - pl:.1f} points at {mid} slots when the slots are split per layer"
            if pl is not None and opt is not None
            else ""
        )
        sec.figure(
            plot_mrc(curves, study.figure_path("mrc-per-layer"), title=title, scopes=["per-layer"]),
            f"Compare with the global cache{cost}",
            "hit rate vs cache size, per-layer cache",
        )
    sizes = [s for s in SIZES_SHOWN if s <= curves["cache_slots"].max()]
    g = curves[(curves["scope"] == "global") & (curves["cache_slots"].isin(sizes))]
    pivot = g.pivot_table(index="policy", columns="cache_slots", values="hit_rate")
    order = sorted(pivot.index, key=lambda p: (p != "opt", p))
    rows: list[list[Any]] = [
        [
            p,
            *[
                float(pivot.loc[p, s]) * 100
                if s in pivot.columns and pivot.loc[p, s] == pivot.loc[p, s]
                else float("nan")
                for s in sizes
            ],
        ]
        for p in order
    ]
    sec.table(
        ["policy", *[f"{s} slots" for s in sizes]],
        rows,
        lead="Hit rate (% of lookups), global cache:",
    )
    _gap_table(sec, g, sizes, order)
    return sec


def _gap_table(sec: Section, g: pd.DataFrame, sizes: list[int], order: list[str]) -> None:
    """Beside the hit rates: the share of the LRU->OPT gap each policy closes (cold and,
    where computed, in the steady state), and which traces tuned policies were fitted on."""
    if "gap_closed" not in g.columns or not g["gap_closed"].notna().any():
        return
    cols = [("gap_closed", "cold")]
    if "warm_gap_closed" in g.columns and g["warm_gap_closed"].notna().any():
        cols.append(("warm_gap_closed", "steady state"))
    sizes = [s for s in sizes if g.loc[g["cache_slots"] == s, "gap_closed"].notna().any()]
    rows: list[list[Any]] = []
    for p in order:
        if p in ("lru", "opt"):
            continue
        d = g[g["policy"] == p]
        for col, label in cols:
            at = dict(zip(d["cache_slots"].astype(int), d[col].astype(float), strict=True))
            rows.append(
                [p, label, *[round(at[s] * 100, 1) if s in at else float("nan") for s in sizes]]
            )
    if not rows:
        return
    sec.table(
        ["policy", "from", *[f"{s} slots" for s in sizes]],
        rows,
        lead="Share of the LRU->OPT gap closed (%), global cache (0: LRU, 100: OPT; negative: "
        "below LRU):",
    )
    sec.text(*tuning_sentences(g))


def tuning_sentences(df: pd.DataFrame) -> list[str]:
    """One sentence per tuned policy in a result table (`mer mrc`, `mer sweep`): the
    traces its parameters were fitted on, and whether this trace is held out."""
    if "tuned_on" not in df.columns:
        return []
    out = []
    tuned = df[df["tuned_on"].fillna("").astype(str) != ""].drop_duplicates("policy")
    for _, r in tuned.iterrows():
        held = bool(r.get("held_out", True))
        out.append(
            f"{r['policy']}'s parameters were fitted on {r['tuned_on']}: "
            + (
                "this trace is held out (not used for tuning)."
                if held
                else "this trace is one of them, so its figures here are in-sample."
            )
        )
    return out


@section(order=25, key="synthetic")
def synthetic_section(study: Study) -> Section | None:
    """The real curves against a fitted synthetic trace's: is the generator a stand-in?"""
    if study.inputs.synthetic_mrc is None or study.mrc is None:
        return None
    import pandas as pd

    real = study.mrc
    synth = pd.read_parquet(study.inputs.synthetic_mrc)
    policies = sorted(set(synth["policy"]) & set(real["policy"]), key=lambda p: (p != "opt", p))
    tr = study.trace
    n_synth = curve_tokens(synth, study)
    sec = Section(
        "Real routing against a fitted synthetic trace",
        window=f"real: {tokens_window(curve_tokens(real, study), tr.n_tokens)}; synthetic: {n_synth:,} generated tokens",
    )
    sec.text(
        "`mer trace synth fitted` learns the trace's per-layer popularity and transitions and "
        "generates new routing; if it were a faithful stand-in, its curves would lie on the real ones."
    )
    fig = plot_mrc(
        [(f"real ({tr.name})", real), ("fitted synthetic", synth)],
        study.figure_path("mrc-real-vs-synthetic"),
        title=f"Hit rate vs cache size, no prefetch: real routing vs fitted synthetic ({tr.meta.model})",
        scopes=["global"],
        policies=policies,
    )
    rows = []
    worst: tuple[float, int, str] = (0.0, 0, "")
    sizes = [
        s for s in SIZES_SHOWN if s <= min(real["cache_slots"].max(), synth["cache_slots"].max())
    ]
    for s in sizes:
        row: list[Any] = [s]
        for p in policies:
            a, b = _at(real, p, "global", s), _at(synth, p, "global", s)
            row += [a, b, signed(b - a, 2) if a is not None and b is not None else None]
            if a is not None and b is not None and abs(b - a) > abs(worst[0]):
                worst = (b - a, s, p)
        rows.append([float("nan") if v is None else v for v in row])
    header = ["cache (slots)"] + [
        f"{p} {what}"
        for p in policies
        for what in ("real (%)", "synthetic (%)", "difference (points)")
    ]
    where = (
        f": {worst[2]} differs most, by {worst[0]:+.1f} points at {worst[1]} slots"
        if worst[2]
        else ""
    )
    sec.figure(
        fig,
        f"Look at where the dashed (synthetic) curves leave the solid (real) ones{where}",
        "real vs synthetic curves",
    )
    sec.table(header, rows, lead="Hit rate, global cache:")
    return sec
