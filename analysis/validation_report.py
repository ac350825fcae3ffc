"""The figure and the Markdown section of a validation (`mer validate`, the demo, reports).

The figure: predicted against measured tokens/s per held-out configuration, log
axes, the identity line and a ±5% band; each point's horizontal bar is the
measured spread of its repeats (min to max), so a point whose bar crosses the
identity line is a prediction inside the noise. Hollow grey markers are the
same predictions before calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from mer.analysis import style
from mer.analysis.plots import wrap_title
from mer.analysis.report import md_table

BAND = 0.05


@style.styled
def plot_validation(table: pd.DataFrame, summary: dict[str, Any], out: str | Path) -> list[Path]:
    fig, axes = style.figure(width="column", height=3.8)
    ax = axes[0, 0]
    tps = table[table["metric"] == "tokens/s"]
    cal = tps[tps["stage"] == "calibrated"]
    unc = tps[tps["stage"] == "uncalibrated"]
    vals = np.concatenate(
        [
            tps["predicted"].to_numpy(),
            tps["measured_min"].to_numpy(),
            tps["measured_max"].to_numpy(),
        ]
    ).astype(float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    lo, hi = (float(vals.min()) / 1.3, float(vals.max()) * 1.3) if vals.size else (0.1, 10.0)
    xs = np.geomspace(lo, hi, 60)
    ax.fill_between(
        xs, xs * (1 - BAND), xs * (1 + BAND), color="0.88", lw=0, label=f"within ±{BAND:.0%}"
    )
    ax.plot(xs, xs, color="0.35", lw=1, ls="--", label="y = x (perfect prediction)")
    if len(unc):
        ax.scatter(
            unc["measured"],
            unc["predicted"],
            s=34,
            facecolors="none",
            edgecolors="0.55",
            lw=1.0,
            zorder=3,
            label="before calibration (probe only)",
        )
    for r in cast(list[dict[str, Any]], cal.to_dict("records")):
        m, p = float(r["measured"]), float(r["predicted"])
        color = style.policy_color(str(r["policy"]))
        ax.errorbar(
            [m],
            [p],
            xerr=[[m - float(r["measured_min"])], [float(r["measured_max"]) - m]],
            fmt="o",
            ms=6,
            color=color,
            ecolor=color,
            elinewidth=1.2,
            capsize=3,
            zorder=4,
        )
        ax.annotate(
            str(r["config"]),
            (m, p),
            fontsize=6.5,
            xytext=(5, 4),
            textcoords="offset points",
        )
    ax.errorbar(
        [], [], xerr=[], fmt="o", color="0.2", capsize=3, label="calibrated (bar: measured min-max)"
    )
    style.log_axis(ax, "x")
    style.log_axis(ax, "y")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("measured tokens/s (median of repeats)")
    ax.set_ylabel("predicted tokens/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    t = summary.get("targets", {}).get("tokens/s median abs. error", {})
    med = t.get("value")
    title = (
        f"Held-out validation: {summary.get('trace', '')}, {summary.get('tokens', '')} tokens, "
        f"{summary.get('repeats', '')} runs each; {summary.get('machine', '')}"
    )
    if med is not None:
        title += f"\nmedian abs. error of tokens/s {med * 100:.1f}% (calibrated)"
    ax.set_title(wrap_title(title, 80), fontsize=9)
    return style.save(fig, out)


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{v * 100:.1f}%"


def markdown_section(table: pd.DataFrame, summary: dict[str, Any], fig_dir: str) -> str:
    """The validation as a report section (its figure under `fig_dir`)."""
    md = ["## Held-out validation: predicted vs measured, repeated real runs", ""]
    cfgs = summary.get("configs", [])
    cal = summary.get("calibration", {}).get("config", {})
    md += [
        f"Calibrated once on `{cal.get('policy')}` {cal.get('cache_slots')} slots "
        f"{cal.get('scope')} (predictor {cal.get('predictor')}), then {len(cfgs)} other "
        f"configurations predicted and run for real {summary.get('repeats')} times each "
        f"({summary.get('tokens')} tokens per run) on {summary.get('machine')}. A prediction "
        "counts as right when it lies inside the measured spread (min to max of the repeats). "
        f"Drift check: {len(summary.get('drift_events', []))} recalibration(s) "
        f"(threshold {summary.get('drift_threshold', 0) * 100:.0f}% on the pulse).",
        "",
        f"![predicted vs measured tokens/s]({fig_dir}/validation-tokens-per-s.png)",
        "",
    ]
    tps = table[(table["metric"] == "tokens/s")]
    c = tps[tps["stage"] == "calibrated"].set_index("config")
    u = tps[tps["stage"] == "uncalibrated"].set_index("config")
    io = table[(table["metric"] == "I/O wait share") & (table["stage"] == "calibrated")].set_index(
        "config"
    )
    rows = []
    for cfg in cfgs:
        n = cfg["name"]
        if n not in c.index:
            continue
        r = c.loc[n]
        rows.append(
            [
                n,
                str(r["bound"]),
                float(r["measured"]),
                f"{float(r['measured_min']):.3g}-{float(r['measured_max']):.3g}",
                _pct(float(r["spread"])),
                float(r["predicted"]),
                _pct(float(r["rel_error"])),
                "yes" if bool(r["within_spread"]) else "no",
                _pct(float(u.loc[n, "rel_error"])) if n in u.index else "-",
                _pct(float(io.loc[n, "measured"])) if n in io.index else "-",
            ]
        )
    if rows:
        md += [
            md_table(
                [
                    "configuration",
                    "bound",
                    "measured tokens/s",
                    "range",
                    "spread",
                    "predicted",
                    "error",
                    "inside spread",
                    "error before calibration",
                    "I/O share",
                ],
                rows,
            ),
            "",
        ]
    stages = summary.get("stages", {})
    metric_rows = []
    for metric in stages.get("calibrated", {}):
        a = stages["calibrated"][metric]
        b = stages.get("uncalibrated", {}).get(metric, {})
        metric_rows.append(
            [
                metric,
                _pct(b.get("median")),
                _pct(a.get("median")),
                _pct(a.get("worst")),
                f"{a.get('within_spread', 0)}/{a.get('configs', 0)}",
                _pct(a.get("median_spread")),
            ]
        )
    if metric_rows:
        md += [
            "Every metric, over the held-out configurations:",
            "",
            md_table(
                [
                    "metric",
                    "median abs. error before calibration",
                    "median abs. error",
                    "worst abs. error",
                    "inside spread",
                    "median measured spread",
                ],
                metric_rows,
            ),
            "",
        ]
    trows = []
    for name, t in summary.get("targets", {}).items():
        v = t.get("value")
        if name.startswith("ranking"):
            shown = f"Kendall tau {v:.2f}" if v is not None else "-"
        else:
            shown = _pct(v) if v is not None else ""
        trows.append(
            [
                name,
                shown,
                _pct(t.get("target")) if t.get("target") is not None else "",
                "met" if t.get("met") else f"not met{_short(t)}",
            ]
        )
    if trows:
        md += ["Targets:", "", md_table(["target", "value", "limit", "verdict"], trows), ""]
    rk = summary.get("ranking", {}).get("calibrated", {})
    swaps = rk.get("swapped_pairs", [])
    if swaps:
        md.append(
            "Pairs the prediction orders differently from the measurement: "
            + "; ".join(
                f"{s['measured_faster']} measured faster than {s['predicted_faster']}"
                + (" (within the measured spread)" if s["within_noise"] else "")
                for s in swaps
            )
            + "."
        )
        md.append("")
    elif rk:
        md += ["The ranking by predicted tokens/s equals the measured ranking.", ""]
    return "\n".join(md) + "\n"


def _short(t: dict[str, Any]) -> str:
    s = t.get("short_by")
    return f" (short by {s * 100:.1f} points)" if s else ""
