"""`mer trace synth KIND -o OUT.parquet`: write a synthetic trace.

One sub-subcommand per entry of `traces.synth.GENERATORS`, so a new generator
appears here without touching this file.
"""

from __future__ import annotations

import argparse
import time

from mer.cli.common import emit, note, output_file


def register(tsub: argparse._SubParsersAction) -> None:
    from mer.traces.synth import GENERATORS

    p = tsub.add_parser(
        "synth",
        help="generate a synthetic trace: " + " | ".join(GENERATORS),
        description="Generate a synthetic router trace and write it as a format-v1 parquet file.",
    )
    ksub = p.add_subparsers(dest="synth_kind", metavar="KIND")
    p.set_defaults(func=lambda a: p.print_help() or 2)
    for name, cls in GENERATORS.items():
        g = ksub.add_parser(name, help=cls.help, description=(cls.__doc__ or cls.help).strip())
        g.add_argument(
            "-o", "--output", type=output_file, required=True, help="output trace file (.parquet)"
        )
        g.add_argument(
            "--json", action="store_true", help="print one JSON summary object on stdout"
        )
        cls.add_arguments(g)
        g.set_defaults(func=run, generator_cls=cls)


def run(args: argparse.Namespace) -> int:
    from mer.traces.format import write_trace

    cls = args.generator_cls
    gen = cls.from_args(args)
    t0 = time.perf_counter()
    trace = gen.generate()
    seconds = time.perf_counter() - t0
    write_trace(trace, args.output)
    note(f"wrote {args.output}")
    summary = {
        "output": str(args.output),
        "generator": cls.name,
        "parameters": gen.parameters(),
        "tokens": trace.n_tokens,
        "lookups": trace.n_lookups,
        "n_layers": trace.n_layers,
        "n_experts": trace.n_experts,
        "top_k": trace.top_k,
        "distinct_keys": len(set(trace.keys().reshape(-1).tolist())),
        "seconds": round(seconds, 4),
    }
    text = (
        f"{cls.name}: {summary['tokens']} tokens x {trace.n_layers} layers x top-{trace.top_k} "
        f"over {trace.n_experts} experts, {summary['distinct_keys']} distinct keys, "
        f"{seconds:.3f} s -> {args.output}"
    )
    emit(args, summary, text)
    return 0
