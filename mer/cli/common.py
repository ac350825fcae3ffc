"""Shared CLI plumbing: --json / -o handling and common options."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import BadInput


def add_output_args(p: argparse.ArgumentParser, *, parquet: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    if parquet:
        p.add_argument("-o", "--output", type=Path, default=None, help="write the detailed result to this file (parquet)")


def add_phase_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--phase",
        choices=("prefill", "decode", "all"),
        default="all",
        help="replay only prompt tokens, only generated tokens, or all (default: all)",
    )


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_default, sort_keys=False)


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    """Print `obj` as one JSON object with --json, else the human text."""
    if getattr(args, "json", False):
        print(to_json(obj))
    else:
        print(text)


def note(msg: str) -> None:
    """Progress and notices go to stderr so that --json stdout stays parseable."""
    print(msg, file=sys.stderr)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_list(text: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64]."""
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def str_list(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise BadInput(f"{what} {path}: no such file.")
    return path
