"""`mer tune`: fit a policy's parameters on tuning traces (the held-out protocol)."""

from __future__ import annotations

import argparse
from typing import Any

from mer.cli.common import (
    FinalWrites,
    add_phase_arg,
    emit,
    input_file,
    int_list,
    note,
    output_file,
    str_list,
)
from mer.errors import BadInput


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="fit a policy's parameters on some traces, for held-out evaluation on others",
        description=(
            "Fit an eviction policy's parameters on the TUNING traces and write them, with "
            "the traces' routing digests, to a JSON file. Pass that file to `mer mrc`, "
            "`mer sweep`, `mer simulate` or `mer report` with --tuned: every result is then "
            "marked with the traces the parameters were fitted on and whether the trace "
            "evaluated is one of them (held_out). Policies with a model (cycle) are fitted "
            "by maximum likelihood; others by a grid search for the highest mean share of "
            "the LRU->OPT gap closed at --sizes."
        ),
        epilog=(
            "example: mer tune --policy cycle a.parquet b.parquet -o cycle.json && "
            "mer mrc c.parquet --tuned cycle.json --sizes 64,96,128,192 -o c-mrc.parquet"
        ),
    )
    p.add_argument("traces", nargs="+", type=input_file, metavar="TRACE", help="tuning traces")
    p.add_argument("--policy", required=True, help="the policy to tune (e.g. cycle, lfu, s3fifo)")
    p.add_argument(
        "-o", "--output", type=output_file, required=True, help="tuned parameters (.json)"
    )
    p.add_argument(
        "--sizes",
        type=int_list,
        default=[64, 96, 128, 192],
        help="cache sizes scored (and searched, for grid-tuned policies); default 64,96,128,192",
    )
    p.add_argument(
        "--scope",
        choices=("global", "per-layer"),
        default="global",
        help="cache scope scored (default global)",
    )
    p.add_argument(
        "--features",
        type=str_list,
        default=None,
        help="cycle only: the model terms to fit (default bias,log_ema_mid,used_last,"
        "log_repeat; all: bias,log_ema_long,log_ema_mid,log_ema_short,used_last,log1p_gap,"
        "log_repeat)",
    )
    add_phase_arg(p)
    p.add_argument("--json", action="store_true", help="print the tuned file as JSON on stdout")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from mer.sim.tune import tune_policy
    from mer.traces.format import read_trace

    options: dict[str, Any] = {}
    if args.features is not None:
        if args.policy != "cycle":
            raise BadInput("--features applies to --policy cycle only.")
        options["features"] = tuple(args.features)
    traces = [(path, read_trace(path)) for path in args.traces]
    tuned = tune_policy(
        args.policy,
        traces,
        phase=args.phase,
        scope=args.scope,
        sizes=args.sizes,
        options=options,
        progress=note,
    )
    writes = FinalWrites()
    writes.add(args.output, tuned.save)
    writes.run()
    lines = [
        f"{tuned.policy} tuned on {', '.join(t.name for t in tuned.tuned_on)} "
        f"({tuned.method}; phase {tuned.phase})",
        "params: " + ", ".join(f"{k}={v}" for k, v in tuned.params.items()),
        f"on the tuning traces (in-sample), scope {tuned.scope}:",
        f"  {'trace':34s} {'slots':>5s} {'hit rate':>9s} {'LRU':>7s} {'OPT':>7s} {'gap closed':>10s}",
    ]
    for r in tuned.train:
        lines.append(
            f"  {r['trace']:34s} {r['cache_slots']:5d} {100 * r['hit_rate']:8.2f}% "
            f"{100 * r['lru_hit_rate']:6.2f}% {100 * r['opt_hit_rate']:6.2f}% "
            f"{100 * r['gap_closed']:9.1f}%"
        )
    lines.append(f"wrote {args.output}: evaluate it on traces not listed above (--tuned).")
    emit(args, tuned.to_dict(), "\n".join(lines))
    return writes.finish()
