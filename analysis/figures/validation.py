"""Held-out validation: predicted against measured tokens/s over repeated real runs.

Log axes (the configurations span an order of magnitude), the identity line and
a ±5% band (the target). Each configuration is one point in its policy's colour
and marker (hollow without prefetch, as in every run figure) at the median of its
real runs, with a horizontal bar from their fastest to their slowest: a point
whose bar reaches the diagonal is predicted inside the measured noise. Grey
rings are the same predictions before calibration, so the gain from
calibrating is the distance each point moved toward the diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mer.analysis import style
from mer.analysis.figures.runs import policy_point
from mer.analysis.style import LegendEntry, Written

#: The target band around y = x.
BAND = 0.05


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], df.to_dict("records"))


@style.styled
def plot_validation(
    table: pd.DataFrame, out: str | Path, *, title: str, summary: Mapping[str, Any] | None = None
) -> Written:
    """`table`: `mer validate`'s tidy table (rows of metric "tokens/s" are drawn: the
    summary's headline stage, the calibrated one by default, and before calibration)."""
    tps = table[table["metric"] == "tokens/s"]
    head = str((summary or {}).get("calibrated_stage", "calibrated"))
    cal = tps[tps["stage"] == head]
    unc = tps[tps["stage"] == "uncalibrated"]
    fig, axes = style.figure(1, 1, width="column", height=3.2)
    ax = axes[0][0]
    vals = np.concatenate(
        [
            tps["predicted"].to_numpy(float),
            tps["measured_min"].to_numpy(float),
            tps["measured_max"].to_numpy(float),
        ]
    )
    vals = vals[np.isfinite(vals) & (vals > 0)]
    lo, hi = (float(vals.min()) / 1.25, float(vals.max()) * 1.25) if vals.size else (0.1, 10.0)
    xs = np.geomspace(lo, hi, 60)
    band = ax.fill_between(xs, xs * (1 - BAND), xs * (1 + BAND), color="0.86", lw=0, zorder=0.5)
    style.tag_series(band, band=f"{BAND:.0%}")
    (line,) = ax.plot([lo, hi], [lo, hi], color="0.35", lw=0.8, ls=(0, (4, 2)), zorder=1)
    style.tag_series(line, guide="identity")
    entries: list[LegendEntry] = []
    if len(unc):
        (ring,) = ax.plot(
            unc["measured"].to_numpy(float),
            unc["predicted"].to_numpy(float),
            ls="none",
            marker="o",
            ms=4.5,
            mfc="none",
            mec="0.6",
            mew=0.8,
            zorder=2,
        )
        style.tag_series(ring, stage="uncalibrated")
    for r in _records(cal):
        m, p = float(r["measured"]), float(r["predicted"])
        st = style.policy_style(str(r["policy"]))
        hollow = str(r["predictor"]) == "none"
        name = str(r["config"])
        (bar,) = ax.plot(
            [float(r["measured_min"]), float(r["measured_max"])],
            [p, p],
            color=st.color,
            lw=1.0,
            solid_capstyle="butt",
            zorder=3,
        )
        style.tag_series(bar, policy=str(r["policy"]), config=name)
        pt = policy_point(ax, m, p, str(r["policy"]), hollow=hollow)
        style.tag_series(pt, policy=str(r["policy"]), config=name)
        err = (p - m) / m * 100 if m else float("nan")
        entries.append(
            LegendEntry(
                "config",
                name,
                f"{name}: {err:+.1f}%",
                Line2D(
                    [],
                    [],
                    ls="-",
                    lw=1.0,
                    marker=st.marker or "o",
                    ms=5,
                    color=st.color,
                    mfc="white" if hollow else st.color,
                ),
                covers=(("policy", str(r["policy"])),),
            )
        )
    if len(unc):
        entries.append(
            LegendEntry(
                "stage",
                "uncalibrated",
                "before calibration (probe only)",
                Line2D([], [], ls="none", marker="o", ms=4.5, mfc="none", mec="0.6", mew=0.8),
            )
        )
    entries += [
        LegendEntry(
            "guide",
            "identity",
            "y = x: perfect prediction",
            Line2D([], [], color="0.35", lw=0.8, ls=(0, (4, 2))),
        ),
        LegendEntry("band", f"{BAND:.0%}", f"within ±{BAND:.0%}", Patch(color="0.86", lw=0)),
    ]
    style.log_axis(ax, "x")
    style.log_axis(ax, "y")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("measured tokens/s (median of runs; bar: min-max)")
    ax.set_ylabel("predicted tokens/s (whole model)")
    style.grid(ax)
    notes = []
    if summary:
        t = summary.get("targets", {}).get("tokens/s median abs. error", {})
        if t.get("value") is not None:
            notes.append(
                f"median abs. error of tokens/s {t['value'] * 100:.1f}% after calibration, "
                f"over {len(cal)} held-out configurations, {summary.get('repeats', '?')} real "
                "runs each"
            )
    style.legend(fig, entries, ncol=2, notes=notes)
    style.title(fig, title)
    return style.save(fig, out, notes=notes)
