"""`mer compare`, `mer calibrate`, `mer plot KIND`, `mer report KIND`, `mer demo`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mer.cli.common import (
    add_output_args,
    emit,
    input_file,
    note,
    output_dir,
    output_file,
    positive_int,
    slot_count,
    str_list,
)
from mer.errors import BadInput
from mer.guard import check_input
from mer.summary import RunSummary, read_token_table


def load_summary(path: Path) -> RunSummary:
    """A run summary from its JSON (--summary / --json output) or a per-token parquet."""
    if not path.exists():
        raise BadInput(f"{path}: no such file (give a summary .json or a per-token .parquet).")
    check_input(path, "run summary")
    if path.suffix == ".parquet":
        _, summary = read_token_table(path)
        if summary is None:
            raise BadInput(
                f"{path}: per-token parquet without a 'mer.summary' entry; was it written by mer?"
            )
        return summary
    return RunSummary.load(path)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="hold a simulated and a measured run side by side")
    p.add_argument(
        "sim",
        type=input_file,
        help="simulated run: summary JSON (mer simulate --summary) or per-token parquet",
    )
    p.add_argument(
        "run",
        type=input_file,
        help="measured run: summary JSON (mer run --summary) or per-token parquet",
    )
    add_output_args(p, parquet=False)
    p.add_argument(
        "-o",
        "--output",
        type=output_file,
        default=None,
        help="also write the comparison as JSON here",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("calibrate", help="fit a hardware profile to a measured run")
    p.add_argument("run", type=input_file, help="measured run summary (JSON or per-token parquet)")
    p.add_argument(
        "--hardware", required=True, help="the profile to start from (bundled name or JSON path)"
    )
    p.add_argument(
        "-o",
        "--output",
        type=output_file,
        required=True,
        help="write the calibrated profile here (JSON)",
    )
    p.add_argument(
        "--sim",
        type=input_file,
        default=None,
        help="the prediction made with --hardware for this run (summary JSON or per-token "
        "parquet): refused unless it is the same experiment on that profile",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("plot", help="figures (PNG and SVG) from traces, curves, sweeps and runs")
    psub = p.add_subparsers(dest="plot_kind", metavar="KIND")
    p.set_defaults(func=lambda a, p=p: p.print_help() or 2)

    q = psub.add_parser("mrc", help="miss-ratio curves (from `mer mrc -o`), OPT as the ceiling")
    q.add_argument("mrc", type=input_file)
    q.add_argument(
        "--no-claim", action="store_true", help="do not mark the public engine's claimed point"
    )
    _plot_common(q, cmd_plot_mrc)

    q = psub.add_parser(
        "sweep", help="tokens/s vs cache size per policy/predictor, with bandwidth bounds"
    )
    q.add_argument("sweep", type=input_file, help="results of `mer sweep -o`")
    q.add_argument(
        "--hardware", default=None, help="profile for the SSD and memory-bandwidth bounds"
    )
    q.add_argument(
        "--shape", default=None, help="model shape for the bounds (default: from the sweep)"
    )
    q.add_argument(
        "--mrc",
        type=input_file,
        default=None,
        help="miss-ratio curves: draws the SSD bound at OPT's miss rate",
    )
    _plot_common(q, cmd_plot_sweep)

    q = psub.add_parser(
        "io-share", help="I/O wait stacked with compute per configuration (from a sweep)"
    )
    q.add_argument("sweep", type=input_file)
    _plot_common(q, cmd_plot_io_share)

    q = psub.add_parser(
        "predicted-vs-measured", help="scatter with the identity line + latency distributions"
    )
    q.add_argument(
        "--pair",
        nargs=2,
        action="append",
        type=input_file,
        required=True,
        metavar=("SIM", "RUN"),
        help="a simulated and a measured run (per-token parquet for the latency panel); repeatable",
    )
    _plot_common(q, cmd_plot_pvm)

    q = psub.add_parser(
        "layer-hits", help="per-layer hit rates of a trace for some policies (no prefetch)"
    )
    q.add_argument("trace", type=input_file)
    q.add_argument("--policies", type=str_list, default=["lru", "opt"])
    q.add_argument("--cache-slots", type=slot_count, default=64)
    q.add_argument("--scope", choices=("global", "per-layer"), default="global")
    _plot_common(q, cmd_plot_layer_hits)

    q = psub.add_parser("popularity", help="expert-popularity heatmap (layer x expert) of a trace")
    q.add_argument("trace", type=input_file)
    _plot_common(q, cmd_plot_popularity)

    q = psub.add_parser(
        "repetition", help="consecutive-token repetition per layer beside the Mixtral paper"
    )
    q.add_argument("trace", type=input_file)
    _plot_common(q, cmd_plot_repetition)

    p = sub.add_parser("report", help="self-contained Markdown + HTML reports")
    rsub = p.add_subparsers(dest="report_kind", metavar="KIND")
    p.set_defaults(func=lambda a, p=p: p.print_help() or 2)
    q = rsub.add_parser(
        "claim-check", help="what the public engine's 97.46%% / 21 TPS claim is made of"
    )
    q.add_argument(
        "--trace",
        type=input_file,
        action="append",
        default=[],
        help="more real traces to hold the claim against (the bundled one is always used)",
    )
    q.add_argument(
        "--hardware",
        default="seed-g2-standard-32",
        help="profile for the whole-model tokens/s estimate (default: derived from the engine's own run)",
    )
    q.add_argument("-o", "--output", type=output_dir, required=True, help="output directory")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_report_claim)
    q = rsub.add_parser("run", help="a sweep + run + compare report with its figures")
    q.add_argument("--trace", type=input_file, required=True)
    q.add_argument("--sweep", type=input_file, default=None)
    q.add_argument("--mrc", type=input_file, default=None)
    q.add_argument(
        "--sim",
        type=input_file,
        default=None,
        help="simulated winner (per-token parquet or summary)",
    )
    q.add_argument(
        "--run",
        type=input_file,
        default=None,
        help="measured winner (per-token parquet or summary)",
    )
    q.add_argument("--hardware", default=None)
    q.add_argument("-o", "--output", type=output_dir, required=True, help="output directory")
    q.set_defaults(func=cmd_report_run)

    p = sub.add_parser(
        "demo", help="the whole pipeline on the bundled real trace, report in out/demo/"
    )
    p.add_argument(
        "-o",
        "--output",
        type=output_dir,
        default=output_dir("out/demo"),
        help="output directory (default out/demo)",
    )
    p.add_argument(
        "--shape",
        default="mixtral-small",
        help="scaled expert shape for the real run (default mixtral-small)",
    )
    p.add_argument(
        "--tokens",
        type=positive_int,
        default=96,
        help="the trace window (first N tokens) the sweep predicts and the real engine runs",
    )
    p.add_argument("--quick", action="store_true", help="smaller sweep and run (for tests)")
    p.set_defaults(func=cmd_demo)


def _plot_common(q: argparse.ArgumentParser, func: Any) -> None:
    q.add_argument(
        "-o",
        "--output",
        type=output_file,
        required=True,
        help="output path (.png and .svg are written)",
    )
    q.add_argument("--title", default=None, help="figure title (default names the trace and model)")
    q.set_defaults(func=func)


# -- compare / calibrate -------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from mer.analysis.compare import compare

    c = compare(load_summary(args.sim), load_summary(args.run))
    if args.output:
        from mer.atomic import write_json_atomic

        write_json_atomic(args.output, c.to_dict())
    emit(args, c.to_dict(), c.format_text())
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mer.analysis.calibrate import calibrate
    from mer.sim.hardware import load_profile

    run = load_summary(args.run)
    profile = load_profile(args.hardware)
    if args.sim is not None:
        from mer.analysis.compare import check_same_experiment

        sim = load_summary(args.sim)
        check_same_experiment(sim, run, f"the simulation {args.sim} and the run {args.run}")
        if sim.hardware != profile.name:
            raise BadInput(
                f"the simulation {args.sim} used hardware {sim.hardware!r}, not --hardware "
                f"{args.hardware} ({profile.name!r}); calibrate the profile it was made with."
            )
    cal = calibrate(run, profile)
    cal.profile.save(args.output)
    emit(args, cal.to_dict(), cal.format_text() + f"\nwrote {args.output}")
    return 0


# -- plots ---------------------------------------------------------------------------


def _read_parquet(path: Path, what: str) -> Any:
    import pandas as pd

    check_input(path, what)
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise BadInput(f"{what} {path}: not a parquet file ({exc}).") from None


def _source_name(df: Any, path: Path) -> str:
    """What a results table is of, for a default title: its trace and model columns
    when it has them, else the file name."""
    parts = []
    for col in ("trace", "model"):
        if col in df.columns and df[col].nunique() == 1:
            parts.append(Path(str(df[col].iloc[0])).name)
    if not parts:
        return path.name
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def _done(paths: list[Path]) -> int:
    for p in paths:
        print(p)
    return 0


def cmd_plot_mrc(args: argparse.Namespace) -> int:
    from mer.analysis.plots import SEED_CLAIM, plot_mrc

    df = _read_parquet(args.mrc, "miss-ratio curves")
    need = {"policy", "scope", "cache_slots", "hit_rate"}
    if not need <= set(df.columns):
        raise BadInput(
            f"{args.mrc}: not a miss-ratio-curve table (needs columns {sorted(need)}); write one with `mer mrc -o`."
        )
    title = args.title or f"Miss-ratio curves (no prefetch): {_source_name(df, args.mrc)}"
    return _done(
        plot_mrc(df, args.output, title=title, claim=None if args.no_claim else SEED_CLAIM)
    )


def cmd_plot_sweep(args: argparse.Namespace) -> int:
    from mer.analysis.bounds import tokens_per_s_bounds
    from mer.analysis.plots import plot_sweep_tokens_per_s

    if args.hardware:  # asked for by name: a bad one is an error, not a missing bound
        from mer.sim.hardware import load_profile

        load_profile(args.hardware)
    if args.shape:
        from mer.shapes import get_shape

        get_shape(args.shape)
    df = _read_parquet(args.sweep, "sweep results")
    _require_cols(df, args.sweep, {"policy", "predictor", "cache_slots", "tokens_per_s"})
    bounds: dict[str, float] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    hw = args.hardware or (str(df["hardware"].iloc[0]) if "hardware" in df.columns else None)
    shape = args.shape or (str(df["shape"].iloc[0]) if "shape" in df.columns else None)
    if hw and shape:
        mrc = _read_parquet(args.mrc, "miss-ratio curves") if args.mrc else None
        layers = int(df["layers"].iloc[0]) if "layers" in df.columns else 32
        top_k = int(df["top_k"].iloc[0]) if "top_k" in df.columns else 2
        try:
            bounds, curves = tokens_per_s_bounds(shape, hw, mrc, layers, top_k)
        except BadInput as exc:
            note(f"mer: bounds not drawn: {exc}")
    title = (
        args.title
        or f"Simulated tokens/s: {_source_name(df, args.sweep)}, shape {shape}, hardware {hw}"
    )
    return _done(
        plot_sweep_tokens_per_s(df, args.output, title=title, bounds=bounds, curves=curves)
    )


def _require_cols(df: Any, path: Path, need: set[str]) -> None:
    if not need <= set(df.columns):
        raise BadInput(
            f"{path}: missing columns {sorted(need - set(df.columns))}; is it the right kind of file?"
        )


def cmd_plot_io_share(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_io_share

    df = _read_parquet(args.sweep, "sweep results")
    _require_cols(
        df,
        args.sweep,
        {
            "policy",
            "predictor",
            "cache_slots",
            "tokens",
            "io_wait_s",
            "compute_s",
            "dense_s",
            "tokens_per_s",
        },
    )
    hw = str(df["hardware"].iloc[0]) if "hardware" in df.columns else "hardware not recorded"
    title = args.title or f"Where a token's time goes: {_source_name(df, args.sweep)}, {hw}"
    return _done(plot_io_share(df, args.output, title=title))


def cmd_plot_pvm(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_predicted_vs_measured

    pairs = []
    token_times = None
    for sim_path, run_path in args.pair:
        pairs.append((load_summary(sim_path).to_dict(), load_summary(run_path).to_dict()))
        if token_times is None and sim_path.suffix == ".parquet" and run_path.suffix == ".parquet":
            s_df, _ = read_token_table(sim_path)
            r_df, _ = read_token_table(run_path)
            token_times = (s_df["time_s"].to_numpy(), r_df["time_s"].to_numpy())
    s0 = pairs[0][0]
    title = (
        args.title
        or f"Predicted ({s0['hardware']}) vs measured ({pairs[0][1]['hardware']}): {s0['trace']}, {s0['model']}"
    )
    return _done(
        plot_predicted_vs_measured(pairs, args.output, title=title, token_times=token_times)
    )


def cmd_plot_layer_hits(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_layer_hit_rates
    from mer.core import Replay, ReplayConfig, replay_counts
    from mer.traces.format import read_trace

    trace = read_trace(args.trace)
    rates = {}
    for policy in args.policies:
        stats = replay_counts(
            Replay.from_trace(
                trace, ReplayConfig(policy=policy, cache_slots=args.cache_slots, scope=args.scope)
            )
        )
        lookups = stats.hits + stats.misses
        rates[f"{policy} ({args.scope}, {args.cache_slots} slots)"] = (
            stats.hits / lookups.clip(min=1)
        ).tolist()
    title = args.title or f"Per-layer hit rate: {trace.name} ({trace.meta.model}), no prefetch"
    return _done(plot_layer_hit_rates(rates, args.output, title=title))


def cmd_plot_popularity(args: argparse.Namespace) -> int:
    import numpy as np

    from mer.analysis.plots import plot_popularity_heatmap
    from mer.traces.format import read_trace
    from mer.traces.stats import trace_stats

    trace = read_trace(args.trace)
    stats = trace_stats(trace, matrices=False)
    shares = np.array([layer["popularity"] for layer in stats["layers"]])
    title = (
        args.title
        or f"Expert popularity: {trace.name} ({trace.meta.model}, {trace.n_tokens} tokens)"
    )
    return _done(plot_popularity_heatmap(shares, args.output, title=title))


def cmd_plot_repetition(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_repetition
    from mer.traces.format import read_trace
    from mer.traces.stats import trace_stats

    trace = read_trace(args.trace)
    stats = trace_stats(trace, matrices=False)
    first = [layer["repetition"]["first"] for layer in stats["layers"]]
    fos = [layer["repetition"]["first_or_second"] for layer in stats["layers"]]
    title = (
        args.title
        or f"Consecutive-token repetition: {trace.name} ({trace.meta.model}) vs Mixtral paper, Table 5"
    )
    if not stats.get("rank_order_known", True):
        title += "\n(ranks not recorded by this source: 'first choice' is the smaller expert id)"
    return _done(
        plot_repetition(first, fos, args.output, title=title, baseline=stats["random_baseline"])
    )


# -- reports -------------------------------------------------------------------------


def cmd_report_claim(args: argparse.Namespace) -> int:
    from mer.analysis.claim_report import write_claim_report

    result = write_claim_report(args.output, extra_traces=args.trace, hardware=args.hardware)
    emit(
        args,
        result,
        f"claim-check report: {result['markdown']}\n                    {result['html']}",
    )
    return 0


def cmd_report_run(args: argparse.Namespace) -> int:
    from mer.analysis.run_report import write_run_report

    result = write_run_report(
        args.output,
        trace=args.trace,
        sweep=args.sweep,
        mrc=args.mrc,
        sim=args.sim,
        run=args.run,
        hardware=args.hardware,
    )
    print(
        json.dumps(result)
        if getattr(args, "json", False)
        else f"report: {result['markdown']}\n        {result['html']}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mer.analysis.demo import run_demo

    run_demo(args.output, shape=args.shape, tokens=args.tokens, quick=args.quick)
    return 0
