"""The `mer` command: a thin dispatcher over one module per command group.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommands and sets `func` on them. Adding a command group is one module and
one line here. Errors become one message on stderr and the contract's exit
code (2 bad input, 1 runtime failure), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mer import __version__
from mer.errors import MerError

COMMAND_MODULES = (
    "mer.cli.trace_cmd",
    "mer.cli.record_cmd",
    "mer.cli.mrc_cmd",
    "mer.cli.sim_cmd",
    "mer.cli.experts_cmd",
    "mer.cli.run_cmd",
    "mer.cli.generate_cmd",
    "mer.cli.analysis_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer",
        description=(
            "mer: router traces, cache policies, a simpy model and a real io_uring engine "
            "for SSD-streamed Mixture-of-Experts inference. Every subcommand has --help."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MerError as exc:
        print(f"mer: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mer: interrupted; finished results were kept, rerun to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
