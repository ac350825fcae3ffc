"""What a sweep answers: tokens/s (or I/O share) at each cache size, per policy and predictor.

A sweep computes a handful of cache sizes, so they are categories on the x
axis: each policy is a point at each size (side by side, never joined by a
line across sizes not computed), one panel per predictor. The compute, memory
and SSD bounds are drawn where they fall inside the data; a bound far above it
is named under the figure instead of squashing the data into a sliver.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from mer.analysis import style
from mer.analysis.style import IO_SHARE, TOKENS_PER_S, LegendEntry, Metric, Written

#: A bound is drawn when it is below this multiple of the largest value drawn.
BOUND_REACH = 1.35
#: I/O share is drawn only when configurations differ by more than this (fraction of time).
IO_SHARE_SPREAD = 0.02


#: Columns that, when they vary, split a policy's points into variants (marker fill).
VARIANT_COLUMNS = ("source", "hardware", "scope")


def _sources(results: pd.DataFrame) -> tuple[str | None, list[str]]:
    """The variants of each policy's points: the values of whichever of `VARIANT_COLUMNS`
    vary (sweep files overlaid, machines, cache scopes), joined, and their header."""
    cols = [c for c in VARIANT_COLUMNS if c in results.columns and results[c].nunique() > 1]
    if not cols:
        return None, []
    results["_variant"] = results[cols].astype(str).agg(" / ".join, axis=1)
    return " / ".join(cols), sorted(results["_variant"].unique())


def _predictors(results: pd.DataFrame) -> list[str]:
    return sorted(set(results["predictor"].astype(str)), key=lambda p: (p != "none", p))


def dot_panels(
    results: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    metric: Metric,
    hbounds: Mapping[str, float] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    allow_log: bool = True,
) -> Written:
    """One panel per predictor; x = the cache sizes computed; a point per policy (and source)."""
    d = results.copy()
    d["predictor"] = d["predictor"].astype(str)
    d["policy"] = d["policy"].astype(str)
    sizes = sorted(int(s) for s in d["cache_slots"].unique())
    pos = {s: i for i, s in enumerate(sizes)}
    predictors = _predictors(d)
    policies = style.policy_order(d["policy"])
    src_col, srcs = _sources(d)
    n_groups = len(policies) * max(1, len(srcs))
    width = 0.78
    step = width / n_groups

    values = metric.values(d[metric.column])
    top = float(np.nanmax(values)) if len(values) else 1.0
    bottom = float(np.nanmin(values)) if len(values) else 0.0
    notes: list[str] = []
    drawn_bounds: dict[str, tuple[str, float | list[float]]] = {}
    limit = top
    for name, value in (hbounds or {}).items():
        if value <= top * BOUND_REACH:
            drawn_bounds[name] = (style.bound_kind(name), float(value))
            limit = max(limit, value)
        else:
            notes.append(
                f"{name}: {value:.3g} {metric.name}, {value / top:.0f}x the fastest configuration"
            )
    for name, (xs, ys) in (curves or {}).items():
        at = dict(zip((round(x) for x in xs), (float(y) for y in ys), strict=False))
        here = [at.get(s, np.nan) for s in sizes]
        inside = [v if v <= top * BOUND_REACH else np.nan for v in here]
        if any(np.isfinite(v) for v in inside):
            drawn_bounds[name] = (style.bound_kind(name), inside)
            limit = max(limit, np.nanmax(inside))
        shown = [v for v in here if np.isfinite(v)]
        outside = [
            s
            for s, v, w in zip(sizes, here, inside, strict=True)
            if np.isfinite(v) and not np.isfinite(w)
        ]
        if outside and shown:
            lo = min(v for s, v in zip(sizes, here, strict=True) if s in outside)
            notes.append(
                f"{name} at {', '.join(map(str, outside))} slots: from {lo:.3g} {metric.name} up"
            )

    log = allow_log and bottom > 0 and limit / bottom > 30
    fig, axes = style.figure(
        len(predictors), 1, height=0.5 + 1.55 * len(predictors), sharex=True, sharey=True
    )
    for ax, predictor in zip(axes[:, 0], predictors, strict=True):
        part = d[d["predictor"] == predictor]
        g = 0
        for policy in policies:
            s = style.policy_style(policy)
            for j, src in enumerate(srcs or [None]):
                rows = part[part["policy"] == policy]
                if src is not None:
                    rows = rows[rows["_variant"] == src]
                offset = -width / 2 + step * (g + 0.5)
                g += 1
                if rows.empty:
                    continue
                xs = [pos[int(c)] + offset for c in rows["cache_slots"]]
                fill = (
                    style.SOURCE_FILLS[j % len(style.SOURCE_FILLS)] if src is not None else "full"
                )
                (a,) = ax.plot(
                    xs,
                    metric.values(rows[metric.column]),
                    ls="none",
                    marker=s.marker or "o",
                    color=s.color,
                    mfc=s.color if fill == "full" else "white",
                    ms=3.4,
                    mew=0.7,
                    zorder=3,
                )
                style.tag_series(a, policy=policy, **({"variant": src} if src is not None else {}))
        for kind, bval in drawn_bounds.values():
            if isinstance(bval, list):
                b = style.BOUND_STYLES[kind]
                for i, v in enumerate(bval):
                    if np.isfinite(v):
                        (seg,) = ax.plot(
                            [i - 0.45, i + 0.45],
                            [v, v],
                            color=b.color,
                            ls=b.linestyle,
                            lw=b.linewidth,
                            zorder=2,
                        )
                        style.tag_series(seg, bound=kind)
            else:
                style.draw_hline_bound(ax, bval, kind)
        ax.set_title(f"predictor: {predictor}" + (" (no prefetch)" if predictor == "none" else ""))
        style.grid(ax, "y")
        for i in range(1, len(sizes)):
            tag = ax.axvline(i - 0.5, color="0.85", lw=0.5, zorder=0)
            style.tag_decor(tag)
    label = metric.label[:-1] + "; log scale)" if log else metric.label
    style.ylabel(fig, axes, label)
    ax0 = axes[-1, 0]
    ax0.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax0.set_xlim(-0.5, len(sizes) - 0.5)
    ax0.set_xlabel(style.CACHE_SLOTS + ", as swept")
    if log:
        style.log_axis(ax0, "y")
    else:
        ax0.set_ylim(0, limit * 1.08 if limit > 0 else 1)

    pol = [style.policy_entry(p, ls="none") for p in policies]
    bounds = [style.bound_entry(kind, name) for name, (kind, _) in drawn_bounds.items()]
    variants: list[LegendEntry] = []
    if srcs:
        variants.append(style.header_entry(f"{src_col} (marker fill)"))
        for j, src in enumerate(srcs):
            hollow = style.SOURCE_FILLS[j % len(style.SOURCE_FILLS)] == "none"
            handle = Line2D(
                [], [], ls="none", marker="o", color="0.3", mfc="white" if hollow else "0.3"
            )
            variants.append(LegendEntry("variant", src, src, handle))
    footer = ["Not drawn, above the data: " + "; ".join(notes)] if notes else []
    if variants or bounds:
        half = (len(pol) + 1) // 2
        style.legend_columns(fig, [pol[:half], pol[half:], bounds, variants], notes=footer)
    else:
        style.legend(fig, pol, ncol=4, notes=footer)
    style.title(fig, title)
    return style.save(fig, out, notes=notes)


@style.styled
def plot_sweep_tokens_per_s(
    results: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    bounds: Mapping[str, float] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Written:
    """tokens/s at each swept cache size, per policy (colour, marker) and predictor (panel).

    `bounds`: horizontal bounds (compute, memory bandwidth); `curves`: bounds
    that depend on the cache size (the SSD bound at OPT's miss rate), read at
    the swept sizes. Each is drawn only where it falls inside the data.
    """
    return dot_panels(results, out, title=title, metric=TOKENS_PER_S, hbounds=bounds, curves=curves)


def io_share_spread(results: pd.DataFrame) -> tuple[bool, str]:
    """Whether the I/O share differs across configurations, and a sentence saying how much."""
    share = results["io_wait_share"].astype(float)
    lo, hi = float(share.min()), float(share.max())
    differs = hi - lo > IO_SHARE_SPREAD
    fastest = results.sort_values("tokens_per_s", ascending=False).iloc[0]
    sentence = (
        f"I/O wait is {lo * 100:.1f}% to {hi * 100:.1f}% of token time across the "
        f"{len(results)} configurations (the fastest, {fastest['policy']} / {fastest['predictor']} / "
        f"{int(fastest['cache_slots'])} slots: {float(fastest['io_wait_share']) * 100:.1f}%)"
    )
    if not differs:
        sentence += (
            f"; it differs by less than {IO_SHARE_SPREAD * 100:.0f} points, so it is not drawn."
        )
    else:
        sentence += "."
    return differs, sentence


@style.styled
def plot_io_share(results: pd.DataFrame, out: str | Path, *, title: str) -> Written:
    """I/O wait as a share of token time at each swept size, per policy and predictor.

    Draw it only when `io_share_spread` says the configurations differ: a figure
    of identical bars says less than its one sentence.
    """
    return dot_panels(results, out, title=title, metric=IO_SHARE, allow_log=False)
