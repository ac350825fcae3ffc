"""`mer validate`: calibrate on one run, predict a held-out grid, run it for real, compare."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mer.cli.common import (
    add_trace_and_experts,
    emit,
    float_range,
    int_range,
    note,
    output_dir,
)


def register(sub: Any) -> None:
    from mer.cli.run_cmd import _size, add_arrangement_args
    from mer.engine.io import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, MAX_QUEUE_DEPTH

    p = sub.add_parser(
        "validate",
        help="calibrate once, then predict held-out configurations and run each for real, "
        "repeatedly: the simulator's out-of-sample error, with the measured spread",
        description=(
            "Start from a hardware profile (--hardware, or probe this machine), do one short "
            "calibration run of a configuration outside the grid and calibrate the profile on "
            "it, then predict every configuration of --grid with the profile before and after "
            "calibration and run each for real --repeats times (in rounds, rotated; a short "
            "pulse before each round recalibrates when the machine drifted by more than "
            "--drift). Writes OUT/validation.parquet (and .csv: one row per configuration, "
            "stage and metric: predicted, measured median, min, max, relative error, inside "
            "the spread), OUT/runs.parquet (every real run), OUT/summary.json (median and "
            "worst errors, targets, ranking), OUT/figures/validation-tokens-per-s.png and "
            "OUT/validation.md (with each median's standard error). A compute pulse (the "
            "engine's FFN, dense block and step, a third of a second) right before every run "
            "gives the compute figures that run is predicted with (the compute-pulse stage, "
            "whose targets are the headline; --no-compute-pulse for the fixed calibration's). "
            "--max-repeats adds rounds "
            "while those standard errors are above --target-se; --pulse-scale also predicts "
            "each run from a disk pulse taken right before it. Rerunning the same command in "
            "the same directory resumes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_trace_and_experts(
        p,
        "expert weights of the trace's geometry (`mer experts synth --shape mixtral-small`)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        help="profile to start from (bundled name or `mer probe` JSON); default: probe this "
        "machine first (quick probe on the expert file's disk)",
    )
    p.add_argument(
        "--grid",
        default="full",
        help="configurations to predict: full (12), quick (8, the demo's) or a JSON file "
        '{"calibration": {...}, "configs": [{"name": ..., "policy": ..., "cache_slots": ...}]}',
    )
    p.add_argument(
        "--tokens", type=int_range(1, 1 << 20), default=32, help="tokens per run (first N)"
    )
    p.add_argument(
        "--calibration-tokens",
        type=int_range(1, 1 << 20),
        default=None,
        help="tokens of the calibration run (default: 4 x --tokens, so that its own noise "
        "is small against the drift it follows)",
    )
    p.add_argument(
        "--repeats", type=int_range(1, 100), default=3, help="real runs per configuration"
    )
    p.add_argument(
        "--max-repeats",
        type=int_range(1, 100),
        default=None,
        help="keep adding rounds, up to this many, while the measured medians' standard "
        "error (median over configurations) is above --target-se (default: exactly --repeats)",
    )
    p.add_argument(
        "--target-se",
        type=float_range(1e-4, 0.99, what="a share such as 0.025"),
        default=0.025,
        help="with --max-repeats: stop adding rounds once the median standard error of the "
        "measured medians of tokens/s is at most this share",
    )
    p.add_argument(
        "--drift",
        type=float_range(1e-3, 10.0, what="a share such as 0.15"),
        default=0.15,
        help="recalibrate before a round when a pulse figure moved by more than this share",
    )
    p.add_argument(
        "--pulse-scale",
        action="store_true",
        help="before every run, read a pulse of random experts from the expert file and "
        "predict the run also with the calibrated SSD scaled by that pulse's read rate over "
        "the calibration run's (the pulse-scaled stage, reported beside the fixed "
        "calibration); on a shared VM disk the pulse predicted a run poorly (see the docs)",
    )
    p.add_argument(
        "--no-compute-pulse",
        action="store_true",
        help="do not time the engine's FFN, dense block and step right before and after "
        "every run, nor predict each run with the compute figures of the pulse before it; "
        "the targets are then the fixed calibration's (the previous behaviour)",
    )
    g = p.add_argument_group("engine (as `mer run`)")
    g.add_argument("--io", choices=("auto", "uring", "pread"), default="auto")
    g.add_argument("--queue-depth", type=int_range(1, MAX_QUEUE_DEPTH), default=DEFAULT_QUEUE_DEPTH)
    g.add_argument("--chunk-bytes", type=_size, default=DEFAULT_CHUNK_BYTES)
    g.add_argument("--threads", type=int_range(1, 1024), default=os.cpu_count() or 1)
    add_arrangement_args(g)
    p.add_argument(
        "-o", "--output", type=output_dir, required=True, help="directory for every result"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from mer.analysis.validate import EngineMachine, ValidateOptions, run_validation
    from mer.analysis.validation_grid import load_grid
    from mer.cli.run_cmd import huge_pages_from_args
    from mer.engine.executor import EngineConfig, check_geometry
    from mer.sim.hardware import load_profile
    from mer.summary import trace_digest
    from mer.traces.format import read_trace

    grid = load_grid(args.grid)
    opts = ValidateOptions(
        tokens=args.tokens,
        repeats=args.repeats,
        drift=args.drift,
        calibration_tokens=args.calibration_tokens,
        pulse_scale=args.pulse_scale,
        compute_pulse=not args.no_compute_pulse,
        max_repeats=args.max_repeats,
        target_se=args.target_se,
    ).check()
    trace = read_trace(args.trace)
    engine = EngineConfig(
        io=args.io,
        queue_depth=args.queue_depth,
        chunk_bytes=args.chunk_bytes,
        threads=args.threads,
        huge_pages=huge_pages_from_args(args),
        realtime=not args.no_realtime,
        progress=False,
    )
    machine = EngineMachine(
        trace, Path(args.trace), Path(args.experts), engine, digest=trace_digest(args.trace)
    )
    check_geometry(trace, machine.store, str(args.trace), str(args.experts))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    probed = out / "profile-probed.json"
    if args.hardware is not None:
        profile = load_profile(args.hardware)
    elif probed.exists() and (out / "state.json").exists():
        # an interrupted validation resumes only from the profile it started with
        note(
            f"resuming with the probe of the interrupted validation ({probed}); "
            "give another -o to probe again"
        )
        profile = load_profile(probed)
    else:
        from mer.engine.probe import ProbeConfig, run_probe, to_profile

        note(f"probing this machine (quick) on {Path(args.experts).resolve().parent}")
        cfg = ProbeConfig.quick(
            directory=Path(args.experts).resolve().parent,
            shape=machine.store.shape.name,
            io=args.io,
            threads=args.threads,
        )
        cfg.engine_chunk_bytes = args.chunk_bytes
        cfg.engine_queue_depth = args.queue_depth
        profile = to_profile(run_probe(cfg, log=note), "probe")
        profile.save(probed)
    res = run_validation(machine, trace, grid, profile, out, opts, log=note)
    emit(args, {**res.summary, "paths": res.paths}, format_text(res))
    return 0


def format_text(res: Any) -> str:
    s = res.summary
    t = res.table
    lines = [
        f"=== mer validate: {s.get('trace')} on {s.get('machine')} ===",
        f"{len(s.get('configs', []))} held-out configurations x {s.get('repeats')} runs of "
        f"{s.get('tokens')} tokens; calibration runs {s.get('recalibrations', 0) + 1} of "
        f"{s.get('calibration_tokens')} tokens",
        f"{'configuration':<28}{'measured t/s':>13}{'spread':>9}{'predicted':>11}{'error':>9}"
        f"{'inside':>8}{'before cal.':>12}",
    ]
    tps = t[t["metric"] == "tokens/s"]
    unc = tps[tps["stage"] == "uncalibrated"].set_index("config")
    head = str(s.get("calibrated_stage", "calibrated"))
    cal = tps[tps["stage"] == head].set_index("config")
    # The extra columns exist only when their stage ran; without it a column of "nan"
    # would read as a failure.
    extra = [
        (label, tps[tps["stage"] == st].set_index("config"))
        for label, st in (("fixed cal.", "calibrated"), ("pulse-scaled", "pulse-scaled"))
        if st != head and (tps["stage"] == st).any()
    ]
    for label, _ in extra:
        lines[-1] += f"{label:>13}"
    for name in cal.index:
        r = cal.loc[name]
        u = unc.loc[name, "rel_error"] if name in unc.index else float("nan")
        lines.append(
            f"{name:<28}{r['measured']:>13.3f}{r['spread'] * 100:>8.1f}%{r['predicted']:>11.3f}"
            f"{r['rel_error'] * 100:>+8.1f}%{'yes' if r['within_spread'] else 'no':>8}"
            f"{u * 100:>+11.1f}%"
            + "".join(
                f"{(df.loc[name, 'rel_error'] if name in df.index else float('nan')) * 100:>+12.1f}%"
                for _, df in extra
            )
        )
    lines.append(f"targets (held-out, {head}):")
    for name, tg in s.get("targets", {}).items():
        v = tg.get("value")
        shown = (
            "" if v is None else (f"{v:.2f}" if name.startswith("ranking") else f"{v * 100:.1f}%")
        )
        lim = "" if tg.get("target") is None else f" (<= {tg['target'] * 100:.0f}%)"
        lines.append(f"  {name:<40} {shown:>8}{lim:<10} {'met' if tg.get('met') else 'NOT met'}")
    for st, title in (
        ("calibrated", "the same, fixed calibration (compute figures of the probe):"),
        (
            "pulse-scaled",
            "the same, pulse-scaled (SSD scaled by a disk pulse right before each run):",
        ),
    ):
        pt = s.get("targets_by_stage", {}).get(st, {}) if st != head else {}
        if pt:
            lines.append(title)
        for name, tg in pt.items():
            v = tg.get("value")
            if v is None or name.startswith("counts"):
                continue
            shown = f"{v:.2f}" if name.startswith("ranking") else f"{v * 100:.1f}%"
            lines.append(f"  {name:<40} {shown:>8}{'':<10} {'met' if tg.get('met') else 'NOT met'}")
    cps = s.get("compute_pulse_stats", {})
    for k, f in cps.get("figures", {}).items():

        def _f(v: Any, pct: bool = False) -> str:
            return "-" if v is None else (f"{v * 100:.1f}%" if pct else f"{v:+.2f}")

        lines.append(
            f"compute pulse, {k}: r(before, run) {_f(f['r_before_run'])}, r(after, run) "
            f"{_f(f['r_after_run'])}, r(before, after) {_f(f['r_before_after'])}; run vs before "
            f"{_f(f['median_abs_run_vs_before'], True)}, after vs before "
            f"{_f(f['median_abs_after_vs_before'], True)} (median abs.)"
        )
    cr = cps.get("compute_per_read_s", {})
    if cr.get("median") is not None:
        lines.append(
            f"compute (FFN + dense) beyond the pulse's, per read: median {cr['median'] * 1e6:.1f} "
            f"us ({cr['min'] * 1e6:.1f} to {cr['max'] * 1e6:.1f} us)"
        )
    wr = cps.get("within_run_compute_change", {})
    if wr.get("median_abs") is not None:
        lines.append(
            f"compute per token, second half of a run over its first: median abs. "
            f"{wr['median_abs'] * 100:.1f}% ({wr['min'] * 100:+.1f}% to {wr['max'] * 100:+.1f}%)"
        )
    swaps = s.get("ranking", {}).get(head, {}).get("swapped_pairs", [])
    if len(swaps) > 8:
        lines.append(f"  {len(swaps)} pairs swapped; the first 8 (all in summary.json):")
    for sw in swaps[:8]:
        lines.append(
            f"  swapped: {sw['measured_faster']} measured faster than {sw['predicted_faster']}"
            + (" (within the measured spread)" if sw["within_noise"] else "")
        )
    lines.append(
        f"results: {res.paths.get('markdown')}, {res.paths.get('parquet', res.paths.get('validation_parquet'))}, {res.paths.get('figure')}"
    )
    return "\n".join(lines)
