"""Hit rate (or miss ratio) against cache size: one trace's curves, or several overlaid.

A curve is drawn exactly where it was computed: `mer mrc` gives LRU and OPT at
every size (lines), replayed policies at the sizes asked for (points, unless
those were every size too). Policies whose curves are identical at every
computed size are named together in the legend rather than one hiding the
other. Each cache scope is its own panel, stacked, at one column's width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, MultipleLocator

from mer.analysis import style
from mer.analysis.style import HIT_RATE, LegendEntry, Metric, Written
from mer.errors import BadInput

#: The public engine's headline claim: 97.46% hit rate at 256 slots.
SEED_CLAIM = {
    "cache_slots": 256,
    "hit_rate": 0.9746,
    "label": "public claim (97.46%, 256)",
}
#: Curves closer than this (percentage points, at every size) are said to lie on top of each other.
NEAR_POINTS = 1.0
#: ... and all curves of a panel closer than this are said to be one band.
ALL_NEAR_POINTS = 2.0
#: The gap-closed panel stops here (a tiny LRU->OPT gap makes the share explode).
GAP_FLOOR = -100.0
CLAIM_COLOR = "#E31A1C"
SCOPE_TITLES = {
    "global": "global cache (one pool for all layers)",
    "per-layer": "per-layer cache (slots split evenly over the layers)",
}


def _identical_groups(part: pd.DataFrame, policies: Sequence[str]) -> dict[str, str]:
    """policy -> the earlier policy it equals at every computed size (same sizes, same hits)."""
    key_col = "hits" if "hits" in part.columns else "hit_rate"
    seen: dict[tuple[Any, ...], str] = {}
    same: dict[str, str] = {}
    for p in policies:
        d = part[part["policy"] == p].sort_values("cache_slots")
        sig = (tuple(d["cache_slots"].tolist()), tuple(np.round(d[key_col].to_numpy(), 9)))
        if sig in seen:
            same[p] = seen[sig]
        else:
            seen[sig] = p
    return same


def _closeness(part: pd.DataFrame, policies: Sequence[str], metric: Metric) -> str | None:
    """A sentence for the panel when curves lie on top of each other (within 1 point)."""
    curves = {
        p: pd.Series(
            metric.values(part.loc[part["policy"] == p, metric.column]),
            index=part.loc[part["policy"] == p, "cache_slots"].to_numpy(),
        )
        for p in policies
    }
    if len(curves) < 2:
        return None

    def gap(a: str, b: str) -> float:
        both = curves[a].index.intersection(curves[b].index)
        return float((curves[a][both] - curves[b][both]).abs().max()) if len(both) else np.inf

    names = list(curves)
    worst = max(gap(a, b) for i, a in enumerate(names) for b in names[i + 1 :])
    if worst <= ALL_NEAR_POINTS:
        return f"all {len(names)} policies within {worst:.1f} points of each other at every size"
    # the largest group whose members all lie within ALL_NEAR_POINTS of each other
    group: list[str] = []
    for seed in names:
        g = [seed]
        for other in names:
            if other != seed and all(gap(other, m) <= ALL_NEAR_POINTS for m in g):
                g.append(other)
        if len(g) > len(group):
            group = g
    if len(group) >= 3:
        spread = max(gap(a, b) for i, a in enumerate(group) for b in group[i + 1 :])
        return f"{', '.join(sorted(group))} within {spread:.1f} points of each other at every size"
    close = sorted(
        (gap(a, b), a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if 0 < gap(a, b) <= NEAR_POINTS
    )[:2]
    return (
        "; ".join(f"{a} and {b} within {g:.1f} points" for g, a, b in close)
        + (" at every size" if close else "")
        or None
    )


def _x_ticks(ax: Any, xmax: int) -> None:
    if xmax >= 16 and xmax % 8 == 0:
        ax.xaxis.set_major_locator(MultipleLocator(xmax // 8))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))


@style.styled
def plot_mrc(
    curves: pd.DataFrame | Sequence[tuple[str, pd.DataFrame]],
    out: str | Path,
    *,
    title: str,
    scopes: Sequence[str] | None = None,
    metric: Metric = HIT_RATE,
    policies: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
    claim: dict[str, Any] | None = None,
    bytes_per_expert: int | None = None,
    show_gap: bool | None = None,
) -> Written:
    """Curves per policy, OPT as the ceiling, one panel per scope (stacked).

    `curves`: one `mer mrc` table, or (label, table) pairs to overlay (traces,
    runs, machines): then the colour and marker still name the policy and the
    line style (and marker fill) names the source. `policies` / `sizes`
    restrict what is drawn; `claim` marks a published point when it lies
    inside the sizes drawn.
    """
    sources = [("", curves)] if isinstance(curves, pd.DataFrame) else list(curves)
    overlay = len(sources) > 1
    frames = []
    for label, df in sources:
        d = df
        if policies is not None:
            d = d[d["policy"].isin(list(policies))]
        if sizes is not None:
            d = d[d["cache_slots"].isin(list(sizes))]
        frames.append((label, d))
    present = set().union(*(set(d["scope"]) for _, d in frames))
    panels = [s for s in (scopes or style_scopes(present)) if s in present]
    if not panels:
        raise BadInput(
            "nothing to draw: no rows left for the scopes, policies and sizes asked for."
        )
    above = not metric.invert  # the side of OPT no policy reaches
    # the share of the LRU->OPT gap closed (when `mer mrc` wrote it): a row under each scope
    gap = (
        show_gap is not False
        and not metric.invert
        and all("gap_closed" in d.columns and d["gap_closed"].notna().any() for _, d in frames)
    )
    ratios = [1.95, 1.15] * len(panels) if gap else [1.95] * len(panels)
    fig, grid = style.figure(
        len(ratios),
        1,
        height=0.55 + sum(ratios) + (0.35 if bytes_per_expert else 0),
        sharex=True,
        gridspec_kw={"height_ratios": ratios},
    )
    axes = grid[0::2] if gap else grid
    gap_axes = grid[1::2] if gap else None
    xmax = max(int(d["cache_slots"].max()) for _, d in frames if len(d))
    all_policies = style.policy_order(set().union(*(set(d["policy"]) for _, d in frames)))
    notes: list[str] = []
    same_as: dict[str, str] = {}  # policy -> the policy it equals at every size
    lined: set[str] = set()  # policies drawn as a line somewhere (else points only)
    drawn_policies: set[str] = set()
    shaded = False
    claimed = False
    for ax, scope in zip(axes[:, 0], panels, strict=True):
        for i, (label, d) in enumerate(frames):
            part = d[d["scope"] == scope]
            here = [p for p in all_policies if p in set(part["policy"])]
            same = {} if overlay else _identical_groups(part, [p for p in here if p != "opt"])
            same_as.update(same)
            ls = style.source_linestyle(i) if overlay else "-"
            fill = style.SOURCE_FILLS[i % len(style.SOURCE_FILLS)] if overlay else "full"
            keys = {"source": label} if overlay else {}
            for p in here:
                c = part[part["policy"] == p]
                x = c["cache_slots"].to_numpy()
                y = metric.values(c[metric.column])
                drawn_policies.add(p)
                if p == "opt":
                    shaded |= not overlay and len(x) > 1 and bool(np.any(np.diff(np.sort(x)) == 1))
                    style.draw_opt(
                        ax,
                        x,
                        y,
                        limit=metric.scale if above else 0.0,
                        above=above,
                        linestyle=ls,
                        shade=not overlay,
                        keys=keys,
                    )
                    continue
                artists = style.draw_policy_curve(
                    ax, x, y, p, linestyle=ls, fill="none" if p in same else fill, keys=keys
                )
                if any(a.get_linestyle() not in ("None", "none", "") for a in artists):
                    lined.add(p)
        if not overlay:
            part = frames[0][1][frames[0][1]["scope"] == scope]
            said = _closeness(
                part, [p for p in all_policies if p != "opt" and p in set(part["policy"])], metric
            )
            if said:
                _panel_note(ax, said, bottom=above)
                notes.append(f"{SCOPE_TITLES.get(scope, scope)}: {said}")
        if claim is not None:
            cx, cy = claim["cache_slots"], metric.values([claim["hit_rate"]])[0]
            if cx <= xmax:
                star = ax.scatter(
                    [cx],
                    [cy],
                    marker="*",
                    s=60,
                    color=CLAIM_COLOR,
                    edgecolor="white",
                    lw=0.4,
                    zorder=7,
                )
                style.tag_series(star, claim="published")
                claimed = True
            elif scope == panels[0]:
                notes.append(
                    f"the published point ({claim['label']}) lies at {cx} slots, "
                    f"beyond the sizes drawn (up to {xmax})"
                )
        ax.set_title(SCOPE_TITLES.get(scope, f"scope: {scope}"))
        ax.set_ylabel(metric.label)
        ax.set_ylim(0, metric.scale * 1.02)
        ax.set_xlim(0, xmax * 1.02)
        _x_ticks(ax, xmax)
        style.grid(ax)
        if bytes_per_expert and ax is axes[0, 0]:
            b = float(bytes_per_expert)
            sec = ax.secondary_xaxis(
                "top", functions=(lambda s, b=b: s * b / 2**30, lambda g, b=b: g * 2**30 / b)
            )
            sec.set_xlabel("cache size (GiB of q4_0 experts)")
    if gap_axes is not None:
        cut = [
            _gap_panel(g, frames, sc, all_policies, overlay)
            for g, sc in zip(gap_axes[:, 0], panels, strict=True)
        ]
        if any(cut):
            notes.append(
                f"gap closed below {GAP_FLOOR:.0f}% (sizes where LRU and OPT nearly agree, so "
                "the gap is tiny) is cut off"
            )
    grid[-1, 0].set_xlabel(style.CACHE_SLOTS)

    entries: list[LegendEntry] = []
    if shaded:
        entries.append(style.unreachable_entry(above))
    if claimed and claim is not None:
        entries.append(
            LegendEntry(
                "claim",
                "published",
                claim["label"],
                Line2D([], [], ls="none", marker="*", ms=7, color=CLAIM_COLOR),
            )
        )
    for p in sorted(drawn_policies, key=lambda q: (q != "opt", q)):
        if p not in drawn_policies:
            continue
        line: dict[str, Any] = {} if p in lined or p == "opt" else {"ls": "none"}
        if p in same_as:
            entries.append(
                style.policy_entry(p, f"{p} (= {same_as[p]} at every size)", mfc="none", **line)
            )
        else:
            entries.append(style.policy_entry(p, **line))
    sources_col: list[LegendEntry] = []
    if overlay:
        sources_col.append(style.header_entry("source (line style, marker fill)"))
        for i, (label, _) in enumerate(frames):
            hollow = style.SOURCE_FILLS[i % len(style.SOURCE_FILLS)] == "none"
            sources_col.append(
                LegendEntry(
                    "source",
                    label,
                    label,
                    Line2D(
                        [],
                        [],
                        color="0.3",
                        ls=style.source_linestyle(i),
                        marker="o",
                        mfc="white" if hollow else "0.3",
                        ms=3.2,
                    ),
                )
            )
    if same_as:
        pairs = ", ".join(f"{p} = {q}" for p, q in same_as.items())
        notes.append(f"identical curves ({pairs}): the later is drawn hollow over the earlier")
    footer = [n for n in notes if n.startswith(("the published point", "gap closed below"))]
    if overlay:
        style.legend_columns(fig, [entries, sources_col], notes=footer)
    else:
        style.legend(fig, entries, ncol=3, notes=footer)
    style.title(fig, title)
    return style.save(fig, out, notes=notes)


def _gap_panel(
    ax: Any,
    frames: list[tuple[str, pd.DataFrame]],
    scope: str,
    policies: Sequence[str],
    overlay: bool,
) -> bool:
    """Each policy's share of the LRU->OPT gap closed at each size: LRU is 0, OPT 100.
    Returns whether some values fall below the panel's floor (and are cut off)."""
    lo = 0.0
    for i, (label, d) in enumerate(frames):
        part = d[(d["scope"] == scope) & d["gap_closed"].notna()]
        ls = style.source_linestyle(i) if overlay else "-"
        fill = style.SOURCE_FILLS[i % len(style.SOURCE_FILLS)] if overlay else "full"
        keys = {"source": label} if overlay else {}
        for p in policies:
            c = part[part["policy"] == p]
            if c.empty:
                continue
            y = c["gap_closed"].to_numpy(dtype=float) * 100
            lo = min(lo, float(np.nanmin(y)))
            style.draw_policy_curve(
                ax, c["cache_slots"].to_numpy(), y, p, linestyle=ls, fill=fill, keys=keys
            )
    ax.set_ylim(max(GAP_FLOOR, min(-10.0, lo * 1.1)), 105)
    ax.set_title("LRU→OPT gap closed (LRU 0%, OPT 100%)")
    ax.set_ylabel("gap closed (%)")
    style.grid(ax)
    return lo < GAP_FLOOR


def _panel_note(ax: Any, text: str, *, bottom: bool) -> None:
    """A sentence inside a panel, in the corner curves of this kind leave empty."""
    ax.text(
        0.98,
        0.03 if bottom else 0.97,
        style.wrap(text, 44),
        transform=ax.transAxes,
        ha="right",
        va="bottom" if bottom else "top",
        fontsize=6.5,
        color="0.25",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
        zorder=8,
    )


def style_scopes(present: set[str]) -> list[str]:
    return [s for s in ("global", "per-layer") if s in present] + sorted(
        present - {"global", "per-layer"}
    )
