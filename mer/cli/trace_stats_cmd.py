"""`mer trace stats FILE`: popularity, repetition, reuse distance, transitions."""

from __future__ import annotations

import argparse

from mer.atomic import write_json_atomic
from mer.cli.common import (
    FinalWrites,
    add_phase_arg,
    emit,
    input_file,
    note,
    output_file,
    require_file,
)


def register(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser(
        "stats",
        help="routing statistics of a trace (popularity, repetition, reuse distance, transitions)",
        description=(
            "Per layer: expert popularity and entropy, the share of consecutive tokens routed to "
            "the same expert (first choice, and first-or-second choice as in the Mixtral paper), "
            "the inter-layer transition matrix and the number of distinct experts; plus the reuse "
            "distance distribution of global expert keys in replay order. Definitions: "
            "docs/trace-statistics.md. Transition matrices are in the --json output only."
        ),
    )
    p.add_argument(
        "trace", type=input_file, metavar="FILE", help="trace file (.parquet, format v1)"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    p.add_argument(
        "-o",
        "--output",
        type=output_file,
        default=None,
        help="also write the JSON object to this file",
    )
    p.add_argument(
        "--no-matrices",
        action="store_true",
        help="leave the (layers-1) x n x n transition matrices out of the JSON",
    )
    add_phase_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mer.traces.format import read_trace
    from mer.traces.stats import format_stats, trace_stats

    trace = read_trace(require_file(args.trace, "trace"))
    stats = trace_stats(trace, args.phase, matrices=not args.no_matrices)
    writes = FinalWrites()
    writes.add(args.output, lambda p: write_json_atomic(p, stats), "statistics")
    writes.run()
    for p in writes.written:
        note(f"wrote {p}")
    emit(args, stats, format_stats(stats))
    return writes.finish()
