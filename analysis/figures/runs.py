"""Runs held against their predictions, and the per-layer view of a cache.

Predicted against measured is a y = x plot from zero, with ±10% and ±25%
bands: a point's distance from the diagonal is its error, and an axis that
starts at zero keeps a 0.05-point hit-rate difference looking like what it is.
Each run pair is one legend entry (its policy's colour and marker; hollow
without prefetch), so labels never pile up on the points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from mer.analysis import style
from mer.analysis.style import HIT_RATE, TOKENS_PER_S, LegendEntry, Written

#: Relative error bands drawn around y = x (inner darker).
BANDS = (0.10, 0.25)


def policy_point(ax: Any, x: float, y: float, policy: str, *, hollow: bool) -> Line2D:
    """One predicted-vs-measured point in its policy's marker and colour (hollow: no prefetch)."""
    st = style.policy_style(policy)
    (pt,) = ax.plot(
        [x],
        [y],
        ls="none",
        marker=st.marker or "o",
        ms=5,
        mew=1.0,
        color=st.color,
        mfc="white" if hollow else st.color,
        zorder=4,
    )
    return cast(Line2D, pt)


def pair_label(summary: Mapping[str, Any]) -> str:
    scope = f" ({summary['scope']})" if summary.get("scope") else ""
    return f"{summary['policy']}{scope} / {summary['predictor']} / {summary['cache_slots']} slots"


def _rel(p: float, m: float) -> str:
    return f"{(p - m) / m * 100:+.0f}%" if m else "n/a"


def _identity_panel(ax: Any, predicted: np.ndarray, measured: np.ndarray, hi: float) -> None:
    xs = np.linspace(0, hi, 50)
    for band, shade in zip(sorted(BANDS, reverse=True), ("0.93", "0.85"), strict=True):
        a = ax.fill_between(xs, xs * (1 - band), xs * (1 + band), color=shade, lw=0, zorder=0.5)
        style.tag_series(a, band=f"{band:.0%}")
    (line,) = ax.plot([0, hi], [0, hi], color="0.35", lw=0.8, ls=(0, (4, 2)), zorder=1)
    style.tag_series(line, guide="identity")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    style.grid(ax)


@style.styled
def plot_predicted_vs_measured(
    pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
    out: str | Path,
    *,
    title: str,
    token_times: Any = None,
) -> Written:
    """Predicted (y) against measured (x) tokens/s and hit rate, one point per run pair.

    Both axes start at zero. `token_times` is accepted for compatibility and
    ignored: latency distributions are their own figure (`plot_token_latency`).
    """
    del token_times
    fig, axes = style.figure(1, 2, width="full", height=3.0)
    entries: list[LegendEntry] = []
    for ax, metric in zip(axes[0], (TOKENS_PER_S, HIT_RATE), strict=True):
        p = np.array([metric.values([s[metric.column]])[0] for s, _ in pairs])
        m = np.array([metric.values([r[metric.column]])[0] for _, r in pairs])
        hi = metric.scale * 1.0 if metric is HIT_RATE else float(max(p.max(), m.max())) * 1.12
        _identity_panel(ax, p, m, hi or 1.0)
        for i, ((s, _), pi, mi) in enumerate(zip(pairs, p, m, strict=True)):
            a = policy_point(ax, mi, pi, str(s["policy"]), hollow=str(s["predictor"]) == "none")
            style.tag_series(a, policy=str(s["policy"]), pair=str(i))
        ax.set_xlabel(f"measured {metric.label}")
        ax.set_ylabel(f"predicted {metric.label}")
        ax.set_title(metric.name)
    for i, (s, r) in enumerate(pairs):
        st = style.policy_style(str(s["policy"]))
        hollow = str(s["predictor"]) == "none"
        text = (
            f"{pair_label(s)}: tokens/s {_rel(s['tokens_per_s'], r['tokens_per_s'])}, "
            f"hit rate {(s['hit_rate'] - r['hit_rate']) * 100:+.2f} points"
        )
        entries.append(
            LegendEntry(
                "pair",
                str(i),
                text,
                Line2D(
                    [],
                    [],
                    ls="none",
                    marker=st.marker or "o",
                    ms=5,
                    color=st.color,
                    mfc="white" if hollow else st.color,
                ),
                covers=(("policy", str(s["policy"])),),
            )
        )
    entries += [
        LegendEntry(
            "guide",
            "identity",
            "y = x: perfect prediction",
            Line2D([], [], color="0.35", lw=0.8, ls=(0, (4, 2))),
        ),
        *[
            LegendEntry("band", f"{b:.0%}", f"within ±{b:.0%}", Patch(color=c, lw=0))
            for b, c in zip(sorted(BANDS), ("0.85", "0.93"), strict=True)
        ],
    ]
    style.legend(fig, entries, ncol=2)
    style.title(fig, title)
    return style.save(fig, out)


@style.styled
def plot_token_latency(
    runs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    out: str | Path,
    *,
    title: str,
) -> Written:
    """Per-token latency distributions, predicted against measured, one panel per run pair.

    `runs`: (label, predicted seconds, measured seconds). Cumulative
    distributions; the time axis is logarithmic when the two are far apart.
    """
    fig, axes = style.figure(len(runs), 1, height=0.4 + 1.5 * len(runs), sharex=True)
    allv = np.concatenate([np.concatenate([p, m]) for _, p, m in runs]) * 1e3
    allv = allv[allv > 0]
    log = allv.size > 0 and allv.max() / allv.min() > 20
    looks = {"measured": style.MEASURED, "predicted": style.PREDICTED}
    for ax, (label, pred, meas) in zip(axes[:, 0], runs, strict=True):
        for name, vals in (("measured", meas), ("predicted", pred)):
            v = np.sort(np.asarray(vals, dtype=float)) * 1e3
            if not v.size:
                continue
            color, ls = looks[name]
            (a,) = ax.step(
                v, np.arange(1, v.size + 1) / v.size * 100, where="post", color=color, ls=ls, lw=1.1
            )
            style.tag_series(a, run=name)
            ax.text(
                0.98,
                0.05 + (0.12 if name == "measured" else 0),
                f"{name} p50 {np.median(v):.3g} ms",
                transform=ax.transAxes,
                ha="right",
                fontsize=6.5,
                color=color,
            )
        ax.set_title(label)
        ax.set_ylim(0, 102)
        style.grid(ax)
    if log:
        style.log_axis(axes[-1, 0], "x")
    axes[-1, 0].set_xlabel("token latency (ms, all layers)")
    style.ylabel(fig, axes, "tokens at or below (% of tokens)")
    entries = [
        LegendEntry("run", n, n, Line2D([], [], color=c, ls=ls, lw=1.1))
        for n, (c, ls) in looks.items()
    ]
    style.legend(fig, entries, ncol=2)
    style.title(fig, title)
    return style.save(fig, out)


@style.styled
def plot_layer_hit_rates(
    per_layer: Mapping[str, Sequence[float]],
    out: str | Path,
    *,
    title: str,
    policies: Mapping[str, str] | None = None,
) -> Written:
    """Hit rate per layer for a few named replays; the legend gives each one's mean.

    `policies`: label -> policy, for the colours (default: the label's first word).
    """
    fig, axes = style.figure(height=2.3)
    ax = axes[0, 0]
    entries = []
    for name, rates in per_layer.items():
        policy = (policies or {}).get(name) or name.split(" ", 1)[0].split("/", 1)[0]
        r = np.asarray(rates, dtype=float) * 100
        if policy == "opt":
            style.draw_opt(ax, np.arange(len(r)), r, limit=100.0, shade=False, keys={"run": name})
        else:
            style.draw_policy_curve(ax, np.arange(len(r)), r, policy, keys={"run": name})
        e = style.policy_entry(policy, f"{name}: mean {r.mean():.1f}%" if r.size else name)
        entries.append(LegendEntry("run", name, e.text, e.handle, covers=(("policy", policy),)))
    ax.set_xlabel(style.LAYER)
    ax.set_ylabel(HIT_RATE.label)
    ax.set_ylim(0, 102)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    style.grid(ax)
    style.legend(fig, entries, ncol=1)
    style.title(fig, title)
    return style.save(fig, out)
