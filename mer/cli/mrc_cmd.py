"""`mer mrc` (miss-ratio curves) and `mer predict-eval` (predictor precision/recall)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mer.cli.common import (
    FinalWrites,
    add_phase_arg,
    emit,
    input_file,
    int_list,
    int_range,
    note,
    output_file,
    positive_int,
    resolve_names,
    str_list,
)
from mer.cli.tuned_args import (
    add_tuned_arg,
    add_warmup_arg,
    held_out_columns,
    load_tuned_files,
    provenance_lines,
    warmup_tokens,
)
from mer.errors import BadInput


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mrc",
        help="miss-ratio curves: hit rate at every cache size, per policy and scope",
        description=(
            "Hit rate for every cache size from 1 slot to all experts (n_layers x n_experts), "
            "per eviction policy and cache scope, without prefetch, from an empty cache. "
            "LRU and OPT (Belady, the ceiling) come from exact one-pass stack algorithms; "
            "every other policy replays all sizes at once in one compiled pass over the "
            "trace (many caches side by side), split over --processes. --backend "
            "libcachesim runs libCacheSim's policies instead (optional extra, "
            "request by request). Writes a tidy parquet "
            "(policy, scope, cache_slots, hits, misses, hit_rate)."
        ),
    )
    p.add_argument("trace", type=input_file, help="trace file (.parquet, format v1)")
    p.add_argument(
        "-o", "--output", type=output_file, required=True, help="output curves (.parquet)"
    )
    p.add_argument(
        "--plot",
        type=output_file,
        default=None,
        help="also draw the curves here (PNG, SVG and PDF; the same figure as `mer plot mrc`)",
    )
    p.add_argument(
        "--policies",
        type=str_list,
        default=None,
        help="comma-separated policies (default: all registered; cotoken only where its "
        "compiled replay runs, since in Python it takes minutes, else when named here or "
        "given by --tuned; seed-lru-locality only on 1-layer traces; opt is always added "
        "as the ceiling)",
    )
    p.add_argument(
        "--scopes",
        type=str_list,
        default=["global", "per-layer"],
        help="comma-separated cache scopes: global, per-layer (default: both)",
    )
    p.add_argument(
        "--sizes",
        type=int_list,
        default=None,
        help="only these cache sizes, comma-separated (default: every size 1..all experts)",
    )
    p.add_argument(
        "--replay-step",
        type=positive_int,
        default=1,
        help="compute the policies without a one-pass curve only at every N-th size (N, 2N, "
        "..., plus the smallest and largest); LRU and OPT keep every size (default 1: every "
        "size; compiled passes make this rarely worth it)",
    )
    p.add_argument(
        "--granularity",
        choices=("step", "lookup"),
        default=None,
        help="step: mer's step semantics (a layer's top-k looked up together, never evicted "
        "for each other); lookup: every lookup its own step, request by request as in "
        "libCacheSim and most papers (default step; lookup with --backend libcachesim)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "dask", "libcachesim"),
        default="local",
        help="local: processes on this machine (default); dask: jobs on a dask cluster "
        "(--scheduler); libcachesim: libCacheSim's policies (--policies lirs,lecar,...; "
        "needs pip install 'mer-moe[peers]', GPL), at lookup granularity",
    )
    p.add_argument("--scheduler", default=None, help="dask scheduler address (--backend dask)")
    p.add_argument(
        "--processes",
        type=int_range(1, 256),
        default=None,
        help="worker processes (default: every CPU of this machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_warmup_arg(p)
    add_tuned_arg(p)
    add_phase_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=run_mrc)

    q = sub.add_parser(
        "predict-eval",
        help="precision and recall of expert predictors on a trace",
        description=(
            "Replays the trace through each predictor (observe step t, then predict steps "
            "t+1..t+depth) and scores its top-k guesses: precision = predicted keys that are "
            "in the true set / predicted keys; recall = true keys predicted / true keys."
        ),
    )
    q.add_argument("trace", type=input_file, help="trace file (.parquet, format v1)")
    q.add_argument(
        "--predictors",
        type=str_list,
        default=None,
        help="comma-separated predictors (default: all that apply to this trace)",
    )
    q.add_argument(
        "--depth",
        type=int_range(1, 32),
        default=1,
        help="how many steps ahead to score (1..32, default 1)",
    )
    add_phase_arg(q)
    q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    q.add_argument(
        "-o", "--output", type=output_file, default=None, help="write the table (.parquet)"
    )
    q.set_defaults(func=run_predict_eval)


def _load(path: Path, phase: str) -> Any:
    from mer.traces.format import read_trace

    return read_trace(path).select_phase(phase)


def mrc_definition(granularity: str = "step") -> str:
    """What every figure of `mer mrc` is (docs/policies.md, "Hit rates")."""
    return f"{granularity} granularity, no prefetch, cold start"


def summary_sizes(sizes: list[int] | None, n_total: int) -> list[int]:
    """The sizes the summary shows: the ones asked for with --sizes (the first 8), else
    1/8, 1/4, 1/2 and all of the key space."""
    if sizes:
        return sorted(set(sizes))[:8]  # a line per policy stays readable
    return sorted({max(1, n_total // 8), max(1, n_total // 4), max(1, n_total // 2), n_total})


def run_mrc(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mer.sim.mrc import MRCRequest, compute_mrc, default_policies, write_mrc

    granularity = args.granularity or ("lookup" if args.backend == "libcachesim" else "step")
    if args.backend == "libcachesim":
        from mer.sim import peers

        peers.module()  # the clear message when the extra is missing, before reading anything
        if granularity != "lookup":
            raise BadInput(
                "libCacheSim replays request by request: --backend libcachesim takes "
                "--granularity lookup (its default)."
            )
    if args.scheduler and args.backend != "dask":
        raise BadInput("--scheduler is for --backend dask.")
    tr = _load(args.trace, args.phase)
    steps = tr.keys().reshape(-1, tr.top_k)
    if args.backend == "libcachesim":
        from mer.sim import peers

        policies = [p.lower() for p in (args.policies or list(peers.DEFAULT_POLICIES))]
        peers.check_policies([p for p in policies if p != "opt"])
    else:
        policies = resolve_names("policy", args.policies or default_policies(tr.n_layers))
    if "opt" not in policies:
        policies = [*policies, "opt"]
    params: dict[str, dict[str, Any]] = {}
    epl = (tr.meta.extra or {}).get("experts_per_layer")
    if "seed-lru-locality" in policies and epl:
        params["seed-lru-locality"] = {"experts_per_layer": int(epl)}
    tuned = load_tuned_files(args.tuned)
    for t in tuned.values():
        params[t.policy] = dict(t.params)
        if t.policy not in policies:
            policies = [*policies[:-1], t.policy, policies[-1]]
    warm_tokens = warmup_tokens(args.warmup, tr.n_tokens)
    per_token = tr.n_layers * (tr.top_k if granularity == "lookup" else 1)
    req = MRCRequest(
        policies=policies,
        scopes=args.scopes,
        sizes=args.sizes,
        replay_step=args.replay_step,
        processes=args.processes,
        policy_params=params,
        granularity=granularity,
        backend=args.backend,
        scheduler=args.scheduler,
        warmup_steps=warm_tokens * per_token,
    )
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description:24s}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
        disable=args.no_progress or args.json,
    ) as prog:
        tasks: dict[str, Any] = {}

        def progress(label: str, done: float, total: float) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total)
            prog.update(tasks[label], completed=done)

        df = compute_mrc(steps, tr.n_layers, tr.n_experts, req, progress=progress)
    seconds = time.perf_counter() - t0
    prov = held_out_columns(df, _load(args.trace, "all"), params, tuned)
    want = set(args.sizes or range(1, tr.n_layers * tr.n_experts + 1))
    for (pol, scope), sub in df.groupby(["policy", "scope"]):
        lost = sorted(want - set(sub.cache_slots.tolist()))
        if lost and args.replay_step == 1:
            note(
                f"note: {pol} ({scope}) has no result at {len(lost)} size(s) "
                f"({lost[0]}..{lost[-1]} slots): libCacheSim's implementation aborted there "
                "(caches too small for its internal queues)."
            )
    n_total = tr.n_layers * tr.n_experts
    title = (
        f"Hit rate vs cache size, no prefetch: {args.trace.name} ({tr.meta.model}, "
        f"{tr.n_tokens:,} tokens, phase {args.phase})"
    )

    def draw(path: Path) -> None:
        from mer.analysis.plots import plot_mrc

        for p in plot_mrc(df, path, title=title)[1:]:
            note(f"wrote {p}")

    writes = FinalWrites()
    meta = {
        "trace": str(args.trace),
        "granularity": granularity,
        "backend": args.backend,
        "phase": args.phase,
        "warmup_tokens": warm_tokens,
        "tuned": prov,
    }
    writes.add(args.output, lambda p: write_mrc(df, p, meta=meta), "curves")
    writes.add(args.plot, draw, "plot")
    writes.run()
    for p in writes.written:
        note(f"wrote {p}")
    marks = summary_sizes(args.sizes, n_total)
    summary = {
        "trace": str(args.trace),
        "output": str(args.output),
        "plot": str(args.plot) if args.plot else None,
        "model": tr.meta.model,
        "lookups": int(steps.size),
        "phase": args.phase,
        "granularity": granularity,
        "backend": args.backend,
        "policies": policies,
        "scopes": args.scopes,
        "rows": len(df),
        "seconds": round(seconds, 3),
        "warmup_tokens": warm_tokens,
        "tuned": prov,
    }
    shown = [*policies, *(p for p in ("lru",) if p not in policies)]
    for key, col in (
        ("at", "hit_rate"),
        ("gap_closed_at", "gap_closed"),
        ("warm_at", "warm_hit_rate"),
        ("warm_gap_closed_at", "warm_gap_closed"),
    ):
        summary[key] = {
            f"{scope}/{pol}": {
                int(r.cache_slots): _round(getattr(r, col))
                for r in df[(df.policy == pol) & (df.scope == scope)].itertuples()
                if int(r.cache_slots) in marks
            }
            for scope in args.scopes
            for pol in shown
        }
    summary["at_sizes"] = marks
    definition = mrc_definition(granularity)
    summary["hit_rate_definition"] = definition
    lines = [
        f"hit rate ({definition}, backend {args.backend}) in {seconds:.1f} s:",
        f"  {'scope/policy':28s} " + "  ".join(f"{m:>7d}" for m in marks) + "  slots",
    ]
    for key, vals in summary["at"].items():
        lines.append(
            f"  {key:28s} "
            + "  ".join(f"{100 * vals[m]:6.2f}%" if m in vals else f"{'-':>7s}" for m in marks)
        )
    lines += table_lines(
        "share of the LRU->OPT gap closed (0% = LRU, 100% = OPT)", summary["gap_closed_at"], marks
    )
    lines += table_lines(
        f"steady state: hit rate after a warm-up of {warm_tokens} tokens", summary["warm_at"], marks
    )
    lines += provenance_lines(prov)
    emit(args, summary, "\n".join(lines))
    return writes.finish()


def _round(v: Any) -> float | None:
    v = float(v)
    return None if v != v else round(v, 6)


def table_lines(title: str, at: dict[str, dict[int, float | None]], marks: list[int]) -> list[str]:
    out = [f"{title}:"]
    for key, vals in at.items():
        cells = []
        for m in marks:
            v = vals.get(m)
            cells.append(f"{'-':>7s}" if v is None else f"{100 * v:6.1f}%")
        out.append(f"  {key:28s} " + "  ".join(cells))
    return out


def run_predict_eval(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from mer.atomic import atomic_path
    from mer.core import ReplayContext, make_predictor, predictor_names
    from mer.core.predictors import evaluate

    if args.depth < 1:
        raise BadInput(f"--depth must be >= 1, got {args.depth}.")
    tr = _load(args.trace, args.phase)
    steps = tr.keys().reshape(-1, tr.top_k).astype(np.int32)
    la = tr.lookahead()
    la_keys = None
    if la is not None:
        layer = np.arange(tr.n_layers, dtype=np.int32)[None, :, None]
        la_keys = (layer * tr.n_experts + la.astype(np.int32)).reshape(-1, tr.top_k)
    ctx = ReplayContext(tr.n_layers, tr.n_experts, tr.top_k, steps, la_keys)
    names = args.predictors or [
        n for n in predictor_names() if n != "none" and (n != "lookahead" or la is not None)
    ]
    rows: list[dict[str, Any]] = []
    for name in names:
        res = evaluate(make_predictor(name, ctx), steps, args.depth)
        rows.extend({"predictor": name, **r} for r in res)
    df = pd.DataFrame(rows)

    def write(path: Path) -> None:
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)

    writes = FinalWrites()
    writes.add(args.output, write, "table")
    writes.run()
    for p in writes.written:
        note(f"wrote {p}")
    lines = [f"{'predictor':16s} {'dist':>4s} {'precision':>9s} {'recall':>7s}"]
    for r in rows:
        lines.append(
            f"{r['predictor']:16s} {r['distance']:4d} {100 * r['precision']:8.2f}% "
            f"{100 * r['recall']:6.2f}%"
        )
    emit(args, {"trace": str(args.trace), "depth": args.depth, "results": rows}, "\n".join(lines))
    return writes.finish()
