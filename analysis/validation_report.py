"""The validation as a report section: the study report's (`sections/validation.py`) and
the `validation.md` that `mer validate` writes beside its table, from one builder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mer.analysis.plots import plot_validation
from mer.analysis.report import signed
from mer.analysis.sections import FigureRef, Section
from mer.analysis.validation_pulse import COMPUTE_STAGE
from mer.analysis.validation_table import METRICS, PULSE_STAGE, TARGETS

FIGURE = "validation-tokens-per-s"


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{v * 100:.1f}"


def figure_title(summary: dict[str, Any]) -> str:
    return (
        f"Held-out validation: {summary.get('trace', '')}, {summary.get('tokens', '')} tokens "
        f"per run, on {summary.get('machine', '')}"
    )


def validation_section(table: pd.DataFrame, summary: dict[str, Any], fig_dir: Path) -> Section:
    """The section: what was done, the figure, per-configuration and per-metric tables,
    the targets with what they are short by, the pairs whose order the model swaps."""
    cfgs = summary.get("configs", [])
    cal = summary.get("calibration", {}).get("config", {})
    tokens = summary.get("tokens")
    longer = sorted({int(c["tokens"]) for c in cfgs if c.get("tokens")})
    window = f"first {tokens} tokens of the trace, every run" if tokens else None
    if window and longer:
        named = ", ".join(c["name"] for c in cfgs if c.get("tokens"))
        window += f" ({', '.join(map(str, longer))} for {named})"
    sec = Section("Held-out validation: predicted vs measured, repeated real runs", window=window)
    events = summary.get("drift_events", [])
    sec.text(
        f"The profile was calibrated once, on a run of `{cal.get('policy')}` "
        f"{cal.get('cache_slots')} slots {cal.get('scope')} (predictor {cal.get('predictor')}); "
        f"then {len(cfgs)} other configurations were predicted and each run for real "
        f"{summary.get('repeats')} times on {summary.get('machine')}. Errors are against the "
        "median of the runs; a prediction counts as right when it lies inside their spread "
        "(fastest to slowest run). Before every round a short pulse (FFN, dense block, a burst "
        f"of reads) was held against the one after calibration: {len(events)} round(s) drifted "
        f"by more than {summary.get('drift_threshold', 0) * 100:.0f}% and were recalibrated first."
        + (
            " Right before every run (and before and after each calibration run) a disk pulse "
            "read a few random experts from the expert file; the *pulse-scaled* prediction is "
            "the calibrated profile with its SSD bandwidth (and device latencies) scaled by "
            "that pulse's read rate over the calibration run's. The pulse is a probe of the "
            "machine at that moment, not a fit to the run it predicts; the fixed-calibration "
            "prediction is shown beside it."
            if summary.get("pulse_scale")
            else ""
        )
        + (
            " Right before and right after every held-out run a compute pulse timed the "
            "engine's own FFN, dense block and per-step work (a third of a second, every step "
            "resident, the probe's engine-step measurement); the *compute-pulse* prediction is "
            "the calibrated profile with those three figures from the pulse before the run. "
            "Its targets are the headline; the fixed calibration (the probe's compute figures) "
            "is shown beside it."
            if summary.get("compute_pulse")
            else ""
        )
        + (
            f" Rounds were added (from {summary.get('min_repeats')}, up to "
            f"{summary.get('max_repeats')}) while the median standard error of the measured "
            f"medians of tokens/s was above {summary.get('target_se', 0) * 100:.1f}%."
            if (summary.get("max_repeats") or 0) > (summary.get("min_repeats") or 0)
            else ""
        )
    )
    sec.figure(
        plot_validation(table, fig_dir / FIGURE, title=figure_title(summary), summary=summary),
        "Look at: how far each point sits from the diagonal next to how wide its bar (the "
        "measured spread) is, and how far the grey rings (before calibration) were",
    )
    tps = table[table["metric"] == "tokens/s"]
    c = tps[tps["stage"] == "calibrated"].set_index("config")
    u = tps[tps["stage"] == "uncalibrated"].set_index("config")
    # the stages predicted per run from a pulse right before it, beside the fixed calibration
    extras = [
        (st, tps[tps["stage"] == st].set_index("config"))
        for st in (COMPUTE_STAGE, PULSE_STAGE)
        if (tps["stage"] == st).any()
    ]
    io = table[(table["metric"] == "I/O wait share") & (table["stage"] == "calibrated")]
    io = io.set_index("config")
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
                _pct(float(io.loc[n, "measured"])) if n in io.index else "-",
                float(r["measured"]),
                f"{float(r['measured_min']):.3g} to {float(r['measured_max']):.3g}",
                _pct(float(r["spread"])),
                _pct(float(r["median_se"])),
                float(r["predicted"]),
                signed(float(r["rel_error"]) * 100),
                "yes" if bool(r["within_spread"]) else "no",
                signed(float(u.loc[n, "rel_error"]) * 100) if n in u.index else "-",
            ]
            + [
                cell
                for _, ps in extras
                for cell in (
                    [
                        signed(float(ps.loc[n, "rel_error"]) * 100),
                        "yes" if bool(ps.loc[n, "within_spread"]) else "no",
                    ]
                    if n in ps.index
                    else ["-", "-"]
                )
            ]
        )
    if rows:
        sec.table(
            [
                "configuration",
                "bound",
                "I/O wait (% of time)",
                "measured tokens/s (median)",
                "runs' range",
                "spread (%)",
                "SE of median (%)",
                "predicted tokens/s",
                "error, fixed calibration (%)" if extras else "error (%)",
                "inside spread",
                "error before calibration (%)",
            ]
            + [h for st, _ in extras for h in (f"{st} error (%)", f"{st} inside spread")],
            rows,
        )
    stages = summary.get("stages", {})
    metric_rows = []
    known = [m for m, _ in METRICS]
    present = stages.get("calibrated", {})
    for metric in sorted(present, key=lambda m: known.index(m) if m in known else len(known)):
        a = stages["calibrated"][metric]
        b = stages.get("uncalibrated", {}).get(metric, {})
        qs = [stages.get(st, {}).get(metric, {}) for st, _ in extras]
        metric_rows.append(
            [
                metric,
                _pct(b.get("median")),
                _pct(a.get("median")),
                _pct(a.get("worst")),
                f"{a.get('within_spread', 0)} of {a.get('configs', 0)}",
                f"{a.get('within_2se', 0)} of {a.get('configs', 0)}",
                _pct(a.get("median_spread")),
                _pct(a.get("median_se")),
            ]
            + [c for q in qs for c in (_pct(q.get("median")), _pct(q.get("worst")))]
        )
    if metric_rows:
        sec.table(
            [
                "metric",
                "median abs. error before calibration (%)",
                "median abs. error (%)",
                "worst abs. error (%)",
                "inside spread",
                "within 2 SE of the median",
                "median measured spread (%)",
                "median SE of the median (%)",
            ]
            + [
                h
                for st, _ in extras
                for h in (f"{st} median abs. error (%)", f"{st} worst abs. error (%)")
            ],
            metric_rows,
            lead="Every metric, over the held-out configurations:",
        )
    trows = []
    by_stage = summary.get("targets_by_stage", {})
    targets = by_stage.get("calibrated") or summary.get("targets", {})
    tps_x = [(st, by_stage.get(st, {})) for st, _ in extras]
    order = [*TARGETS, "counts equal with prefetch off", "ranking by tokens/s"]
    for name in sorted(targets, key=lambda n: order.index(n) if n in order else len(order)):
        t = targets[name]
        limit = f"{t['target'] * 100:g}%" if t.get("target") is not None else ""
        trows.append(
            [name, *_target_cells(name, t), limit]
            + [
                c
                for _, tp in tps_x
                for c in (_target_cells(name, tp[name]) if name in tp else ["", ""])
            ]
        )
    if trows:
        head = ["target", "value", "verdict", "limit"]
        if tps_x:
            head = ["target", "fixed calibration", "verdict", "limit"] + [
                h for st, _ in tps_x for h in (st, f"verdict ({st})")
            ]
        headline = summary.get("calibrated_stage", "calibrated")
        sec.table(head, trows, lead=f"Targets (the headline is the {headline} stage):")
    cps = summary.get("compute_pulse_stats", {})
    if cps.get("figures"):
        prow: list[list[object]] = []
        for k, label in (
            ("ffn_s", "FFN"),
            ("dense_s", "dense block"),
            ("step_s", "step"),
            ("token_compute_s", "compute per token, resident tokens"),
        ):
            f = cps["figures"].get(k, {})
            cells: list[object] = [label]
            prow.append(
                cells
                + [
                    "-" if f.get(x) is None else f"{f[x]:.2f}"
                    for x in ("r_before_run", "r_after_run", "r_before_after")
                ]
                + [
                    _pct(f.get("median_abs_run_vs_before")),
                    _pct(f.get("median_abs_after_vs_before")),
                ]
            )
        sec.table(
            [
                "figure",
                "r(log pulse before, log run)",
                "r(log pulse after, log run)",
                "r(before, after)",
                "run vs pulse before, median abs. (%)",
                "pulse after vs before, median abs. (%)",
            ],
            prow,
            lead="The compute pulses against the runs' own figures (FFN per expert, dense "
            "block and driver work per step, from each run's summary):",
        )
        cr = cps.get("compute_per_read_s", {})
        if cr.get("median") is not None:
            sec.text(
                "The runs' FFNs and dense blocks took longer than the pulse before them by "
                f"{cr['median'] * 1e6:.1f} us per read the run made (median over runs; "
                f"{cr['min'] * 1e6:.1f} to {cr['max'] * 1e6:.1f} us): compute in a step that "
                "reads is slower than compute with every expert resident, which the pulse "
                "(and the probe) time."
            )
        wr = cps.get("within_run_compute_change", {})
        if wr.get("median_abs") is not None:
            sec.text(
                "Within a run, its compute per token (FFNs and dense blocks; resident tokens "
                "where a run has enough) moved from the first half of its tokens to the second "
                f"by {_pct(wr['median_abs'])}% (median abs.; {signed(wr['min'] * 100)}% to "
                f"{signed(wr['max'] * 100)}%): no pulse taken outside a run sees that."
            )
    cw = summary.get("cpu_wait", {})
    if cw.get("median") is not None and cw.get("max"):
        sec.text(
            f"The runs' driver thread waited for a core {_pct(cw['median'])}% of its wall time "
            f"(median; {_pct(cw.get('min'))}% to {_pct(cw['max'])}%)"
            + (
                f", and that share correlates {cw['r_with_error']:.2f} with log(measured / "
                "predicted tokens/s) over the runs: the model's driver never waits for a core"
                if cw.get("r_with_error") is not None
                else ""
            )
            + "."
        )
    cts = summary.get("counts", {})
    if cts.get("prefetch_on_repeat_spread"):
        sec.text(
            "With prefetch on, whether a prefetch is used or late is a race between its read "
            "and its lookup, run anew in every repeat: the repeats of one configuration "
            f"differ among themselves by up to {_pct(cts['prefetch_on_repeat_spread'])}% "
            "of the prefetches issued."
        )
    rk = summary.get("ranking", {}).get(summary.get("calibrated_stage", "calibrated"), {})
    swaps = rk.get("swapped_pairs", [])
    if swaps:
        sec.text(
            "Pairs the prediction orders differently from the measurement: "
            + "; ".join(
                f"{s['measured_faster']} measured faster than {s['predicted_faster']}"
                + (" (within the measured spread)" if s["within_noise"] else "")
                for s in swaps
            )
            + "."
        )
    elif rk:
        sec.text("The ranking by predicted tokens/s equals the measured ranking.")
    return sec


def _target_cells(name: str, t: dict[str, Any]) -> list[str]:
    """A target's value and verdict, as two cells."""
    v = t.get("value")
    if name.startswith("ranking"):
        shown = f"Kendall tau {v:.2f}" if v is not None else "-"
    else:
        shown = f"{_pct(v)}%" if v is not None else ""
    short = t.get("short_by")
    verdict = (
        "met"
        if t.get("met")
        else "not met" + (f" (short by {short * 100:.1f} points)" if short else "")
    )
    return [shown, verdict]


def section_markdown(sec: Section, out_dir: Path) -> str:
    """One section as a stand-alone Markdown file in `out_dir` (figures relative to it)."""
    md = [f"# {sec.title}", ""]
    if sec.window:
        md += [f"*Token window: {sec.window}.*", ""]
    for block in sec.blocks:
        if isinstance(block, FigureRef):
            png = next((p for p in block.paths if p.suffix == ".png"), block.paths[0])
            rel = png.relative_to(out_dir) if png.is_relative_to(out_dir) else png
            md += [f"![{block.alt}]({rel.as_posix()})", f"*{block.caption}*", ""]
        else:
            md += [block, ""]
    return "\n".join(md) + "\n"
