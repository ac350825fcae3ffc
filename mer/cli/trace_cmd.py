"""`mer trace ...`: import, validate, info, stats, synth.

import/validate/info live here; stats and synth are registered from their own
modules (`trace_stats_cmd`, `trace_synth_cmd`) so each stays small.
"""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="import, check, describe and generate router traces")
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION")
    p.set_defaults(func=lambda a: p.print_help() or 2)
    for name in ("mer.cli.trace_io_cmd", "mer.cli.trace_stats_cmd", "mer.cli.trace_synth_cmd"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(tsub)
