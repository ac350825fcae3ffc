"""`mer simulate` and `mer sweep`: the simpy model on one configuration or a grid."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from mer.cli.common import (
    FinalWrites,
    add_output_args,
    add_replay_args,
    emit,
    input_file,
    input_path,
    int_list,
    int_range,
    note,
    output_file,
    replay_config_from_args,
    require_file,
    resolve_names,
    str_list,
)
from mer.cli.tuned_args import (
    add_tuned_arg,
    add_warmup_arg,
    load_tuned_files,
    provenance,
    provenance_lines,
    warmup_tokens,
)
from mer.errors import BadInput, RuntimeFailure

SEED_HARDWARE = "seed-g2-standard-32"
DEFAULT_HARDWARE = "nvme-desktop"


def _hardware_help() -> str:
    from mer.sim.hardware import bundled_profiles

    return (
        "hardware profile: a bundled name ("
        + ", ".join(bundled_profiles())
        + ") or a JSON file written by `mer probe` "
        f"(default {DEFAULT_HARDWARE}; {SEED_HARDWARE} with --mode seed)"
    )


def _shape_help() -> str:
    from mer.shapes import SHAPES

    return (
        "model shape for bytes per expert and dense size: "
        + ", ".join(SHAPES)
        + " (default: the shape matching the trace geometry: mixtral-8x7b for 32x8 top-2, "
        "seed-flat-256 for the flat 1x256 seed stream)"
    )


def _add_timing_args(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    if sweep:
        p.add_argument(
            "--hardware",
            type=str_list,
            default=None,
            help="comma-separated hardware profiles (names or JSON files); " + _hardware_help(),
        )
    else:
        p.add_argument("--hardware", default=None, help=_hardware_help())
    p.add_argument("--shape", default=None, help=_shape_help())
    p.add_argument(
        "--mode",
        choices=("model", "seed"),
        default="model",
        help="model: whole tokens with dense time and overlapped reads/FFNs; seed: the public "
        "engine's benchmark (one iteration = one layer step, no dense time, FFNs after the "
        "step's reads)",
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict hit rate and tokens/s of one configuration with the simpy model",
        description=(
            "Replay TRACE through the shared decision core against a hardware profile, on "
            "simpy's virtual clock: SSD reads split into chunks on parallel channels "
            "(foreground before prefetch), FFNs on compute workers. Prints the run summary "
            "laid out like the public engine's log (or --json); -o writes the per-token table."
        ),
    )
    p.add_argument("trace", type=input_file, help="trace parquet (trace format v1)")
    add_replay_args(p)
    _add_timing_args(p, sweep=False)
    add_warmup_arg(p)
    add_tuned_arg(p)
    p.add_argument(
        "--experts",
        type=input_path,
        default=None,
        help="the expert file `mer run` will use (GGUF or packed directory): the simulation "
        "takes its shape and its read plans (ranges per expert) from it, so the prediction "
        "and the run read the same bytes in the same chunks",
    )
    from mer.cli.run_cmd import _size
    from mer.engine.io import MAX_QUEUE_DEPTH

    p.add_argument(
        "--queue-depth",
        type=int_range(1, MAX_QUEUE_DEPTH),
        default=None,
        help="the run's reader queue depth (as `mer run --queue-depth`; default: the profile's)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=_size,
        default=None,
        help="the run's reader chunk size (as `mer run --chunk-bytes`; default: the profile's)",
    )
    p.add_argument(
        "--engine",
        choices=("fast", "simpy"),
        default="fast",
        help="fast: the analytic SSD/compute solution (default); simpy: one simpy process "
        "per chunk and FFN (the literal model, slow, for checking)",
    )
    add_output_args(p)
    p.add_argument(
        "--summary", type=output_file, default=None, help="also write the summary JSON to this file"
    )
    p.set_defaults(func=cmd_simulate)

    s = sub.add_parser(
        "sweep",
        help="simulate a grid of configurations in parallel and name the winner",
        description=(
            "Every combination of --policies x --cache-slots x --predictors x --scopes x "
            "--hardware, simulated in parallel processes (or on a Dask cluster). Results are "
            "rewritten atomically to -o after each configuration; rerunning the same command "
            "resumes, skipping configurations already present."
        ),
    )
    s.add_argument("trace", type=input_file, help="trace parquet (trace format v1)")
    s.add_argument(
        "--policies",
        type=str_list,
        default=["lru"],
        help="comma-separated eviction policies (package.module:ClassName loads your own)",
    )
    s.add_argument(
        "--cache-slots",
        type=int_list,
        default=[64],
        help="comma-separated total slot counts (e.g. 16,32,64)",
    )
    s.add_argument(
        "--predictors",
        type=str_list,
        default=["none"],
        help="comma-separated predictors (package.module:ClassName loads your own)",
    )
    s.add_argument(
        "--scopes",
        type=str_list,
        default=["global"],
        help="comma-separated scopes: global, per-layer",
    )
    add_replay_args(s, sweep=True)
    _add_timing_args(s, sweep=True)
    s.add_argument(
        "-o",
        "--output",
        type=output_file,
        required=True,
        help="results parquet (one row per config; rows of other sweeps in it are kept)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    s.add_argument(
        "--jobs",
        type=int_range(1, 256),
        default=None,
        help="parallel worker processes (default 2)",
    )
    s.add_argument("--backend", choices=("local", "dask"), default="local", help="where to run")
    s.add_argument("--scheduler", default=None, help="dask scheduler address (--backend dask)")
    s.add_argument(
        "--best",
        choices=("tokens_per_s", "hit_rate", "tokens_per_s_per_gib"),
        default="tokens_per_s",
        help="objective that names the winner (default tokens_per_s)",
    )
    s.add_argument(
        "--experts",
        default="EXPERTS.gguf",
        help="the expert file the winner will run on: named in the printed `mer run` command "
        "and, when it exists, the shape every configuration is simulated with",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_warmup_arg(s)
    add_tuned_arg(s)
    s.set_defaults(func=cmd_sweep)


def _load(trace_path: Path) -> Any:
    from mer.traces.format import read_trace

    require_file(trace_path, "trace")
    return read_trace(trace_path)


def shape_for(args: argparse.Namespace, trace: Any) -> Any:
    """The model shape of a simulation: from --experts (the file the run will read), else
    --shape, else the shape matching the trace's geometry. Both given must agree."""
    from mer.shapes import get_shape
    from mer.sim.model import default_shape_for

    experts = getattr(args, "experts", None)
    if experts is not None:
        from mer.engine.executor import check_geometry
        from mer.engine.store import ExpertStore

        store = ExpertStore.open(experts)
        check_geometry(trace, store, str(args.trace), str(experts))
        if args.shape and get_shape(args.shape) != store.shape:
            raise BadInput(
                f"--shape {args.shape} disagrees with the expert file {experts}, which is "
                f"{store.shape.name}; drop --shape (the file decides) or use a file of that shape."
            )
        return store.shape
    return get_shape(args.shape or default_shape_for(trace.n_layers, trace.n_experts, trace.top_k))


def note_measured_shape(hw: Any, shape: str) -> None:
    """Say so when a profile's FFN throughput was measured on experts of another shape:
    bytes/s does not carry over (smaller matrices run at a lower rate)."""
    measured = (hw.extra or {}).get("measured_shape")
    if measured and measured != shape:
        note(
            f"note: hardware profile {hw.name!r} measured the expert FFN on {measured} experts; "
            f"this simulation uses {shape} experts, whose throughput may differ. For a "
            f"prediction of this shape, probe it: `mer probe --shape {shape}` (or --experts FILE)."
        )


def cmd_simulate(args: argparse.Namespace) -> int:
    from mer.sim.hardware import load_profile
    from mer.sim.model import SimOptions, simulate
    from mer.summary import trace_digest, write_token_table

    trace = _load(args.trace)
    shape = shape_for(args, trace)
    tuned = load_tuned_files(args.tuned)
    extra_params = {}
    if tuned:
        if set(tuned) != {args.policy}:
            raise BadInput(
                f"--tuned is for policy {', '.join(sorted(tuned))}; this run's --policy is "
                f"{args.policy}: pass --policy {next(iter(tuned))}, or drop --tuned."
            )
        extra_params = {"policy_params": {**tuned[args.policy].params, **dict(args.policy_param)}}
    config = replay_config_from_args(args, shape.bytes_per_expert, **extra_params)
    hw = load_profile(args.hardware or (SEED_HARDWARE if args.mode == "seed" else DEFAULT_HARDWARE))
    note_measured_shape(hw, shape.name)
    if (shape.n_layers, shape.n_experts) != (trace.n_layers, trace.n_experts):
        note(
            f"note: shape {shape.name} is {shape.n_layers}x{shape.n_experts}, the trace "
            f"{trace.n_layers}x{trace.n_experts}; only its bytes per expert and dense size are used."
        )
    ranges = key_bytes = None
    if args.experts is not None:
        from mer.engine.store import ExpertStore, read_bytes_by_key, typical_read_ranges

        store = ExpertStore.open(args.experts)
        ranges, key_bytes = typical_read_ranges(store), read_bytes_by_key(store)
    res = simulate(
        trace,
        config,
        hw,
        SimOptions(
            mode=args.mode,
            engine=args.engine,
            shape=shape,
            warmup_tokens=warmup_tokens(args.warmup, res_tokens(trace, config)),
            read_ranges=ranges,
            key_read_bytes=key_bytes,
            queue_depth=args.queue_depth,
            chunk_bytes=args.chunk_bytes,
        ),
        trace_path=str(args.trace),
        trace_digest=trace_digest(trace),
    )
    summary = res.summary
    lead = int(summary.config.get("prefetch_lead", 1) or 1)
    if config.predictor != "none" and lead > config.pipeline_depth:
        note(
            f"note: --prefetch-lead {lead} is beyond --pipeline-depth {config.pipeline_depth}: "
            "nothing was prefetched. Raise --pipeline-depth, or give a smaller lead (with "
            "small, latency-bound reads a lead of 1 and more --prefetch-inflight pay)."
        )
    summary.extra["tuned"] = provenance(
        trace, [config.policy], {config.policy: config.policy_params}, tuned
    )[config.policy]
    if not summary.extra.get("cache_fits_ram", True):
        note(
            f"warning: {config.cache_slots} slots need {summary.extra['cache_bytes'] / 2**30:.1f} "
            f"GiB, more than the profile's RAM ({hw.memory.ram_bytes / 2**30:.1f} GiB)."
        )
    writes = FinalWrites()
    writes.add(args.output, lambda p: write_token_table(res.tokens, p, summary), "per-token table")
    writes.add(args.summary, summary.save, "summary")
    writes.run()
    emit(args, summary.to_dict(), summary.format_text())
    return writes.finish()


def res_tokens(trace: Any, config: Any) -> int:
    """Tokens a replay of `config` runs (after --phase and --tokens)."""
    n = trace.select_phase(config.phase).n_tokens
    return min(n, config.tokens) if config.tokens else n


def cmd_sweep(args: argparse.Namespace) -> int:
    from mer.core import policy_names, predictor_names
    from mer.sim.hardware import load_profile
    from mer.sim.model import default_shape_for
    from mer.sim.sweep import SweepSpec, best_row, check_names, default_jobs, run_command, run_sweep
    from mer.summary import trace_digest

    trace = _load(args.trace)
    check_names("policy", resolve_names("policy", args.policies), policy_names())
    check_names("predictor", resolve_names("predictor", args.predictors), predictor_names())
    check_names("scope", args.scopes, ("global", "per-layer"))
    hardware = args.hardware or [SEED_HARDWARE if args.mode == "seed" else DEFAULT_HARDWARE]
    shape_name = args.shape
    if Path(args.experts).exists():  # the file the winner will run on decides the shape
        from mer.shapes import SHAPES

        shape = shape_for(
            argparse.Namespace(**{**vars(args), "experts": Path(args.experts)}), trace
        )
        if shape.name not in SHAPES:
            raise BadInput(
                f"the expert file {args.experts} has shape {shape.name}, which a sweep cannot "
                f"name; pass --shape with a registered shape ({', '.join(SHAPES)})."
            )
        shape_name = shape.name
    elif args.shape:
        from mer.shapes import get_shape

        get_shape(args.shape)
    for hw in hardware:
        profile = load_profile(hw)  # fail early, with the profile's own message
        note_measured_shape(
            profile, shape_name or default_shape_for(trace.n_layers, trace.n_experts, trace.top_k)
        )
    if trace.n_tokens == 0:
        raise BadInput(f"{args.trace}: the trace has no tokens.")
    from mer.core.replay import check_cache_fits_keys

    base_config = replay_config_from_args(args)
    for slots in args.cache_slots:
        check_cache_fits_keys(
            replace(base_config, cache_slots=slots), trace.n_layers, trace.n_experts
        )
    base = base_config.to_dict()
    base["warmup_tokens"] = args.warmup
    tuned = load_tuned_files(args.tuned)
    for t in tuned.values():
        if t.policy not in args.policies:
            args.policies = [*args.policies, t.policy]
    spec = SweepSpec(
        trace=str(args.trace),
        policies=args.policies,
        cache_slots=args.cache_slots,
        predictors=args.predictors,
        scopes=args.scopes,
        hardware=hardware,
        mode=args.mode,
        shape=shape_name,
        base=base,
        policy_params={p: dict(t.params) for p, t in tuned.items()},
    )
    outcome = run_sweep(
        spec,
        args.output,
        trace_digest=trace_digest(trace),
        jobs=args.jobs or default_jobs(),
        backend=args.backend,
        scheduler=args.scheduler,
        progress=not args.no_progress and not args.json,
    )
    params = {p: dict(t.params) for p, t in tuned.items()}
    prov = provenance(trace, list(args.policies), params, tuned)
    if len(outcome.results):
        from mer.sim.sweep import annotate, write_results

        outcome.results = annotate(outcome.results, trace, prov)
        write_results(outcome.results, args.output)
    df = outcome.grid()  # --best and the summary speak of this grid only
    for h, msg in outcome.failed:
        note(f"config {h} failed: {msg}")
    best = best_row(df, args.best) if len(df) else None
    command = run_command(best, args.experts) if best else None
    online = None
    if best and best.get("offline"):
        try:
            online = best_row(df, args.best, online=True)
        except RuntimeFailure:
            online = None
    out: dict[str, Any] = {
        "results": str(args.output),
        "configs": len(df),
        "ran": outcome.ran,
        "skipped": outcome.skipped,
        "failed": [{"config_hash": h, "error": m} for h, m in outcome.failed],
        "objective": args.best,
        "best": best,
        "command": command,
        "best_online": online,
        "command_online": run_command(online, args.experts) if online else None,
    }
    lines = [
        f"sweep of {args.trace}: {len(df)} configurations in {args.output} "
        f"({outcome.ran} run now, {outcome.skipped} already done, {len(outcome.failed)} failed)"
    ]
    if len(df):
        cols = [
            "policy",
            "scope",
            "predictor",
            "cache_slots",
            "hardware",
            "hit_rate",
            "gap_closed",
            "warm_hit_rate",
            "tokens_per_s",
            "io_wait_share",
            "tokens_per_s_per_gib",
        ]
        top = df.sort_values(args.best, ascending=False, kind="stable").head(10)
        lines.append(f"top 10 by {args.best}:")
        lines.append(top[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if best:
        lines.append(
            f"winner ({args.best}): policy {best['policy']} ({best['scope']}), "
            f"{int(best['cache_slots'])} slots, predictor {best['predictor']}, hardware "
            f"{best['hardware']}: hit rate {best['hit_rate'] * 100:.2f}%, "
            f"{best['tokens_per_s']:.3f} tokens/s"
        )
        lines.append(f"run it for real:\n  {command}")
    if online:
        lines.append(
            f"(the winner reads the trace's future: an upper bound) best online configuration: "
            f"policy {online['policy']} ({online['scope']}), {int(online['cache_slots'])} slots, "
            f"predictor {online['predictor']}: hit rate {online['hit_rate'] * 100:.2f}%, "
            f"{online['tokens_per_s']:.3f} tokens/s\n  {run_command(online, args.experts)}"
        )
    out["tuned"] = prov
    lines += provenance_lines(prov)
    lines.append(
        "gap_closed: share of the LRU->OPT gap (prefetch off, same size and scope) the hit "
        "rate closes; warm_hit_rate: after the first "
        f"{int(df['warmup_tokens'].iloc[0]) if len(df) else 0} tokens."
    )
    emit(args, out, "\n".join(lines))
    return 1 if outcome.failed else 0
