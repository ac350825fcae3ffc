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
    int_list,
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
        "--trace",
        type=input_file,
        default=None,
        help="the run's trace: the SSD bandwidth is then fitted by simulating the run until "
        "its I/O wait matches (without it, from the median read alone)",
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

    q = psub.add_parser(
        "mrc",
        help="hit rate vs cache size, OPT as the ceiling; several inputs are overlaid",
        description=(
            "Hit rate (or miss ratio) against cache size per policy, OPT as the ceiling. Each "
            "input is a curve table (`mer mrc -o`) or a trace (its curves are computed here: "
            "LRU and OPT by default, which are exact at every size in one pass). Several inputs "
            "are overlaid: colour and marker name the policy, line style names the input "
            "(traces, runs or machines side by side; real against fitted synthetic)."
        ),
    )
    q.add_argument(
        "inputs",
        nargs="+",
        type=input_file,
        metavar="CURVES_OR_TRACE",
        help="`mer mrc -o` tables or traces",
    )
    q.add_argument(
        "--policies",
        type=str_list,
        default=None,
        help="only these policies (comma-separated); for traces, the policies to compute (default lru,opt)",
    )
    q.add_argument(
        "--sizes",
        type=int_list,
        default=None,
        help="only these cache sizes (comma-separated); drawn as points unless consecutive",
    )
    q.add_argument(
        "--labels",
        type=_label_list,
        default=None,
        help="one label per input, comma-separated (default: the file names)",
    )
    q.add_argument(
        "--scopes",
        type=str_list,
        default=None,
        help="panels: global, per-layer (default: those in the data; for traces, global)",
    )
    q.add_argument(
        "--metric",
        choices=("hit-rate", "miss-ratio"),
        default="hit-rate",
        help="what the y axis shows (default hit-rate)",
    )
    q.add_argument(
        "--claim",
        action="store_true",
        help="mark the public engine's claimed point (97.46%% at 256 slots)",
    )
    q.add_argument("--no-claim", action="store_true", help=argparse.SUPPRESS)  # the default now
    q.add_argument(
        "--shape",
        default=None,
        help="expert shape: adds a GiB axis for the cache size (e.g. mixtral-8x7b)",
    )
    _plot_common(q, cmd_plot_mrc)

    q = psub.add_parser(
        "sweep", help="tokens/s at each swept cache size per policy and predictor, with bounds"
    )
    q.add_argument(
        "sweep",
        nargs="+",
        type=input_file,
        help="results of `mer sweep -o` (several: overlaid, e.g. machines)",
    )
    q.add_argument(
        "--labels", type=_label_list, default=None, help="one label per sweep file when overlaying"
    )
    q.add_argument(
        "--hardware", default=None, help="profile for the compute, SSD and memory-bandwidth bounds"
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
        "io-share",
        help="I/O wait as a share of token time per swept configuration (only when it differs)",
    )
    q.add_argument("sweep", type=input_file, help="results of `mer sweep -o`")
    q.add_argument(
        "--force",
        action="store_true",
        help="draw it even when every configuration has the same share",
    )
    _plot_common(q, cmd_plot_io_share)

    q = psub.add_parser(
        "predicted-vs-measured", help="predicted against measured tokens/s and hit rate on y = x"
    )
    q.add_argument(
        "--pair",
        nargs=2,
        action="append",
        type=input_file,
        required=True,
        metavar=("SIM", "RUN"),
        help="a simulated and a measured run (summary JSON or per-token parquet); repeatable",
    )
    _plot_common(q, cmd_plot_pvm)

    q = psub.add_parser(
        "latency", help="per-token latency distributions, predicted against measured, per run pair"
    )
    q.add_argument(
        "--pair",
        nargs=2,
        action="append",
        type=input_file,
        required=True,
        metavar=("SIM", "RUN"),
        help="a simulated and a measured per-token table (`-o` of simulate and run); repeatable",
    )
    _plot_common(q, cmd_plot_latency)

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
    q = rsub.add_parser(
        "run",
        help="the study report: routing, curves, sweep, runs against predictions, calibration",
        description=(
            "A Markdown + HTML report with its figures (PNG, SVG, PDF). Every section appears "
            "when its inputs are given and states the token window its numbers come from."
        ),
    )
    q.add_argument("--trace", type=input_file, required=True)
    q.add_argument("--sweep", type=input_file, default=None, help="results of `mer sweep -o`")
    q.add_argument("--mrc", type=input_file, default=None, help="curves of `mer mrc -o`")
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
    q.add_argument(
        "--pair",
        nargs=2,
        action="append",
        type=input_file,
        default=[],
        metavar=("SIM", "RUN"),
        help="a simulated and a measured run of one configuration; repeatable (the first is the winner)",
    )
    q.add_argument(
        "--roles",
        type=_label_list,
        default=None,
        help="one role per --pair, comma-separated (e.g. 'winner,no prefetch')",
    )
    q.add_argument("--hardware", default=None, help="the profile the sweep and simulations used")
    q.add_argument(
        "--calibrated",
        type=input_file,
        default=None,
        help="the profile `mer calibrate` fitted to the first run",
    )
    q.add_argument(
        "--calibrated-sims",
        type=_label_list,
        default=None,
        help="per --pair, the same configuration simulated on the calibrated profile (comma-separated paths)",
    )
    q.add_argument(
        "--synthetic-mrc",
        type=input_file,
        default=None,
        help="curves of a fitted synthetic trace, overlaid on --mrc",
    )
    q.add_argument("-o", "--output", type=output_dir, required=True, help="output directory")
    q.add_argument("--json", action="store_true", help="print one JSON object")
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


def _label_list(text: str) -> list[str]:
    """'real, fitted synthetic' -> ['real', 'fitted synthetic'] (spaces inside labels kept)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _plot_common(q: argparse.ArgumentParser, func: Any) -> None:
    q.add_argument(
        "-o",
        "--output",
        type=output_file,
        required=True,
        help="output path; .png, .svg and .pdf are written (a .png/.svg/.pdf suffix is replaced)",
    )
    q.add_argument("--title", default=None, help="figure title (default names the trace and model)")
    q.set_defaults(func=func)


# -- compare / calibrate -------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from mer.analysis.compare import compare
    from mer.atomic import write_json_atomic
    from mer.guard import FinalWrites

    c = compare(load_summary(args.sim), load_summary(args.run))
    writes = FinalWrites()
    writes.add(args.output, lambda p: write_json_atomic(p, c.to_dict()), "comparison")
    writes.run()
    emit(args, c.to_dict(), c.format_text())
    return writes.finish()


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
    trace = None
    if args.trace is not None:
        from mer.traces.format import read_trace

        trace = read_trace(args.trace)
    from mer.guard import FinalWrites

    cal = calibrate(run, profile, trace=trace)
    writes = FinalWrites()
    writes.add(args.output, cal.profile.save, "calibrated profile")
    writes.run()
    wrote = f"\nwrote {args.output}" if writes.written else ""
    emit(args, cal.to_dict(), cal.format_text() + wrote)
    return writes.finish()


# -- plots ---------------------------------------------------------------------------


def _read(path: Path, accepted: tuple[str, ...], command: str) -> tuple[str, Any]:
    """(kind, frame) of a mer file `command` accepts; one message for any other file."""
    import pandas as pd

    from mer.analysis.inputs import require

    kind = require(path, accepted, command)
    if kind in ("mrc", "sweep"):
        try:
            return kind, pd.read_parquet(path)
        except Exception as exc:
            raise BadInput(f"{path}: not readable as parquet ({exc}).") from exc
    return kind, None


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


def _labels(paths: list[Path], given: list[str] | None) -> list[str]:
    if given is not None:
        if len(given) != len(paths):
            raise BadInput(
                f"--labels has {len(given)} label(s) for {len(paths)} input(s); give one per input, comma-separated."
            )
        return given
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    return names


def _done(paths: list[Path]) -> int:
    for p in paths:
        print(p)
    return 0


def _curves_of_trace(path: Path, args: argparse.Namespace) -> Any:
    """Curves for a trace given to `mer plot mrc`: the policies asked for (default LRU, OPT)."""
    import numpy as np

    from mer.sim.mrc import MRCRequest, compute_mrc
    from mer.traces.format import read_trace

    tr = read_trace(path)
    policies = list(dict.fromkeys([*(args.policies or ["lru"]), "opt"]))
    steps = tr.keys().reshape(-1, tr.top_k).astype(np.int32)
    req = MRCRequest(policies=policies, scopes=args.scopes or ["global"], sizes=args.sizes)
    note(f"mer: computing {', '.join(policies)} curves of {path} ...")
    return compute_mrc(steps, tr.n_layers, tr.n_experts, req)


def cmd_plot_mrc(args: argparse.Namespace) -> int:
    from mer.analysis.plots import SEED_CLAIM, plot_mrc
    from mer.analysis.style import METRICS

    sources = []
    for path in args.inputs:
        kind, df = _read(path, ("mrc", "trace"), "mer plot mrc")
        if kind == "trace":
            df = _curves_of_trace(path, args)
        sources.append((path, df))
    labels = _labels([p for p, _ in sources], args.labels)
    for s in args.scopes or []:
        if s not in ("global", "per-layer"):
            raise BadInput(f"unknown scope {s!r}; choose global or per-layer.")
    for (path, df), label in zip(sources, labels, strict=True):
        missing = set(args.policies or []) - set(df["policy"])
        if missing:
            raise BadInput(
                f"{path}: no curves for {', '.join(sorted(missing))} (it has {', '.join(sorted(set(df['policy'])))})."
            )
        if args.sizes:
            absent = sorted(set(args.sizes) - set(df["cache_slots"].astype(int)))
            if absent:
                raise BadInput(
                    f"{path} ({label}): no rows at cache sizes {absent[:8]}; compute them with `mer mrc --sizes`."
                )
    bpe = None
    if args.shape:
        from mer.shapes import get_shape

        bpe = get_shape(args.shape).bytes_per_expert
    metric = METRICS[args.metric]
    what = "Hit rate" if metric.name == "hit rate" else "Miss ratio"
    from mer.analysis.inputs import granularity_note, mrc_meta

    how = "".join(sorted({granularity_note(mrc_meta(p)) for p, _ in sources}))
    if args.title:
        title = args.title
    elif len(sources) == 1:
        title = (
            f"{what} vs cache size, no prefetch{how}: {_source_name(sources[0][1], sources[0][0])}"
        )
    else:
        title = f"{what} vs cache size, no prefetch{how}: " + " vs ".join(labels)
    frames = (
        sources[0][1]
        if len(sources) == 1
        else [(lab, df) for (_, df), lab in zip(sources, labels, strict=True)]
    )
    return _done(
        plot_mrc(
            frames,
            args.output,
            title=title,
            scopes=args.scopes,
            metric=metric,
            policies=args.policies,
            sizes=args.sizes,
            claim=SEED_CLAIM if args.claim else None,
            bytes_per_expert=bpe,
        )
    )


def cmd_plot_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from mer.analysis.bounds import tokens_per_s_bounds
    from mer.analysis.plots import plot_sweep_tokens_per_s

    if args.hardware:  # asked for by name: a bad one is an error, not a missing bound
        from mer.sim.hardware import load_profile

        load_profile(args.hardware)
    if args.shape:
        from mer.shapes import get_shape

        get_shape(args.shape)
    frames = [_read(p, ("sweep",), "mer plot sweep")[1] for p in args.sweep]
    labels = _labels(args.sweep, args.labels)
    if len(frames) > 1:
        df = pd.concat(
            [f.assign(source=lab) for f, lab in zip(frames, labels, strict=True)], ignore_index=True
        )
    else:
        df = frames[0]
    bounds: dict[str, float] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    hw = args.hardware or (
        str(df["hardware"].iloc[0])
        if "hardware" in df.columns and df["hardware"].nunique() == 1
        else None
    )
    shape = args.shape or (str(df["shape"].iloc[0]) if "shape" in df.columns else None)
    if hw and shape:
        mrc = _read(args.mrc, ("mrc",), "mer plot sweep --mrc")[1] if args.mrc else None
        layers = int(df["layers"].iloc[0]) if "layers" in df.columns else 32
        top_k = int(df["top_k"].iloc[0]) if "top_k" in df.columns else 2
        try:
            bounds, curves = tokens_per_s_bounds(shape, hw, mrc, layers, top_k)
        except BadInput as exc:
            note(f"mer: bounds not drawn: {exc}")
    title = args.title or (
        f"Simulated tokens/s: {_source_name(df, args.sweep[0])}, expert shape {shape}"
        + (f", machine {Path(hw).stem if hw.endswith('.json') else hw}" if hw else "")
    )
    return _done(
        plot_sweep_tokens_per_s(df, args.output, title=title, bounds=bounds, curves=curves)
    )


def cmd_plot_io_share(args: argparse.Namespace) -> int:
    from mer.analysis.plots import io_share_spread, plot_io_share

    _, df = _read(args.sweep, ("sweep",), "mer plot io-share")
    if "io_wait_share" not in df.columns:
        raise BadInput(f"{args.sweep}: no io_wait_share column; was it written by `mer sweep`?")
    differs, sentence = io_share_spread(df)
    if not differs and not args.force:
        note(f"mer: {sentence} No figure written (--force draws it anyway).")
        return 0
    hw = str(df["hardware"].iloc[0]) if "hardware" in df.columns else "hardware not recorded"
    title = (
        args.title
        or f"Share of token time waiting for expert reads: {_source_name(df, args.sweep)}, {hw}"
    )
    return _done(plot_io_share(df, args.output, title=title))


def _pairs(args: argparse.Namespace, command: str) -> list[tuple[Any, Any, Path, Path]]:
    from mer.analysis.inputs import require

    out = []
    for sim_path, run_path in args.pair:
        for p in (sim_path, run_path):
            require(p, ("summary", "tokens"), command)
        s, r = load_summary(sim_path), load_summary(run_path)
        if s.kind != "simulated" or r.kind != "measured":
            raise BadInput(
                f"--pair {sim_path} {run_path}: give the simulated run first and the measured one second "
                f"(got {s.kind} then {r.kind})."
            )
        out.append((s, r, sim_path, run_path))
    return out


def _window(s: Any) -> str:
    return f"first {s.tokens} tokens"


def cmd_plot_pvm(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_predicted_vs_measured

    pairs = _pairs(args, "mer plot predicted-vs-measured")
    s0, r0 = pairs[0][0], pairs[0][1]
    title = args.title or (
        f"Predicted ({s0.hardware}) vs measured ({r0.hardware}): {Path(s0.trace).name}, "
        f"expert shape {r0.shape}, {_window(r0)}"
    )
    return _done(
        plot_predicted_vs_measured(
            [(s.to_dict(), r.to_dict()) for s, r, _, _ in pairs], args.output, title=title
        )
    )


def cmd_plot_latency(args: argparse.Namespace) -> int:
    from mer.analysis.plots import pair_label, plot_token_latency

    runs = []
    pairs = _pairs(args, "mer plot latency")
    for _, r, sp, rp in pairs:
        if sp.suffix != ".parquet" or rp.suffix != ".parquet":
            raise BadInput(
                f"--pair {sp} {rp}: latency needs the per-token tables (`-o` of mer simulate and mer run), not summaries."
            )
        s_df, _ = read_token_table(sp)
        r_df, _ = read_token_table(rp)
        runs.append((pair_label(r.to_dict()), s_df["time_s"].to_numpy(), r_df["time_s"].to_numpy()))
    r0 = pairs[0][1]
    title = args.title or (
        f"Per-token latency, predicted vs measured: {Path(str(r0.trace)).name}, {_window(r0)}"
    )
    return _done(plot_token_latency(runs, args.output, title=title))


def _trace_arg(path: Path, command: str) -> Any:
    from mer.analysis.inputs import require
    from mer.traces.format import read_trace

    require(path, ("trace",), command)
    return read_trace(path)


def cmd_plot_layer_hits(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_layer_hit_rates
    from mer.core import Replay, ReplayConfig, replay_counts

    trace = _trace_arg(args.trace, "mer plot layer-hits")
    rates = {}
    policies = {}
    for policy in args.policies:
        stats = replay_counts(
            Replay.from_trace(
                trace, ReplayConfig(policy=policy, cache_slots=args.cache_slots, scope=args.scope)
            )
        )
        lookups = stats.hits + stats.misses
        label = f"{policy}, no prefetch"
        rates[label] = (stats.hits / lookups.clip(min=1)).tolist()
        policies[label] = policy
    title = args.title or (
        f"Per-layer hit rate without prefetch, {args.cache_slots} slots ({args.scope}): "
        f"{trace.name} ({trace.meta.model})"
    )
    return _done(plot_layer_hit_rates(rates, args.output, title=title, policies=policies))


def cmd_plot_popularity(args: argparse.Namespace) -> int:
    import numpy as np

    from mer.analysis.plots import plot_popularity_heatmap
    from mer.traces.stats import trace_stats

    trace = _trace_arg(args.trace, "mer plot popularity")
    stats = trace_stats(trace, matrices=False)
    shares = np.array([layer["popularity"] for layer in stats["layers"]])
    title = (
        args.title
        or f"Expert popularity: {trace.name} ({trace.meta.model}, {trace.n_tokens} tokens)"
    )
    return _done(plot_popularity_heatmap(shares, args.output, title=title))


def cmd_plot_repetition(args: argparse.Namespace) -> int:
    from mer.analysis.plots import plot_repetition
    from mer.traces.stats import trace_stats

    trace = _trace_arg(args.trace, "mer plot repetition")
    stats = trace_stats(trace, matrices=False)
    first = [layer["repetition"]["first"] for layer in stats["layers"]]
    fos = [layer["repetition"]["first_or_second"] for layer in stats["layers"]]
    title = (
        args.title
        or f"Consecutive-token repetition: {trace.name} ({trace.meta.model}) vs Mixtral paper, Table 5"
    )
    return _done(
        plot_repetition(
            first,
            fos,
            args.output,
            title=title,
            baseline=stats["random_baseline"],
            rank_known=bool(stats.get("rank_order_known", True)),
        )
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
    from mer.analysis.sections import RunPair

    roles = args.roles or []
    cal = [Path(c) for c in (args.calibrated_sims or [])]
    if roles and len(roles) != len(args.pair):
        raise BadInput(f"--roles has {len(roles)} role(s) for {len(args.pair)} --pair(s).")
    if cal and len(cal) != len(args.pair):
        raise BadInput(f"--calibrated-sims has {len(cal)} path(s) for {len(args.pair)} --pair(s).")
    pairs = [
        RunPair(sim, run, roles[i] if roles else "", cal[i] if cal else None)
        for i, (sim, run) in enumerate(args.pair)
    ]
    for path in [
        args.trace,
        args.sweep,
        args.mrc,
        args.sim,
        args.run,
        args.calibrated,
        args.synthetic_mrc,
        *cal,
    ]:
        if path is not None and not Path(path).exists():
            raise BadInput(f"{path}: no such file.")
    result = write_run_report(
        args.output,
        trace=args.trace,
        sweep=args.sweep,
        mrc=args.mrc,
        sim=args.sim,
        run=args.run,
        pairs=pairs,
        hardware=args.hardware,
        calibrated=args.calibrated,
        synthetic_mrc=args.synthetic_mrc,
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
