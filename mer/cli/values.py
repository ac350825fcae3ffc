"""argparse types for command-line values: each refuses what the work cannot use.

Use them as `type=` so a bad value is argparse's one-line error (exit 2)
before anything runs:

    p.add_argument("--seed", type=seed_int)                 # 0 .. 2**63-1
    p.add_argument("--depth", type=positive_int)            # 1 .. 2**40
    p.add_argument("--pin", type=non_negative_int)          # 0 .. 2**40
    p.add_argument("--queue-depth", type=int_range(1, 4096))
    p.add_argument("--prob", type=probability)              # finite, 0 .. 1
    p.add_argument("--gib", type=positive_float)            # finite, > 0
    p.add_argument("--rate", type=float_range(0.0, 1.0, lo_open=True))
    p.add_argument("--sizes", type=int_list)                # "16,32,64", each >= 1
    p.add_argument("--policies", type=name_list)            # "lru,arc", at least one

NaN and infinities are refused everywhere (float('nan') parses, but no size,
probability or rate can be NaN).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from mer.validate import MAX_COUNT, MAX_SLOTS

MAX_SEED = (1 << 63) - 1


def _int(text: str, what: str) -> int:
    t = text.strip().replace("_", "")
    try:
        return int(t)
    except ValueError:
        pass
    try:
        f = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(f) or not f.is_integer():
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return int(f)


def int_range(lo: int, hi: int, what: str | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi]."""
    desc = what or f"an integer from {lo} to {hi:,}"

    def parse(text: str) -> int:
        v = _int(text, desc)
        if v > hi:
            raise argparse.ArgumentTypeError(f"expected {desc} (at most {hi:,}), got {text!r}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}")
        return v

    parse.__name__ = "integer"
    return parse


positive_int = int_range(1, MAX_COUNT, "a positive integer")
slot_count = int_range(1, MAX_SLOTS, "a positive number of slots")
non_negative_int = int_range(0, MAX_COUNT, "an integer >= 0")
seed_int = int_range(0, MAX_SEED, f"a seed from 0 to {MAX_SEED}")


def float_range(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, what: str = ""
) -> Callable[[str], float]:
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        bounds.append(f"<= {hi:g}")
    desc = what or ("a finite number" + (f" {' and '.join(bounds)}" if bounds else ""))

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"expected {desc}, got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


finite_float = float_range()
probability = float_range(0.0, 1.0, what="a probability from 0 to 1")
positive_float = float_range(0.0, None, lo_open=True, what="a finite number > 0")
non_negative_float = float_range(0.0, None, what="a finite number >= 0")


def int_list(text: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64]; each a positive integer (at most 2**31-1), at least one."""
    parts = [x for x in text.replace(" ", "").split(",") if x]
    if not parts:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    if len(parts) > 100_000:
        raise argparse.ArgumentTypeError(f"expected at most 100,000 values, got {len(parts):,}")
    out = []
    for x in parts:
        try:
            out.append(slot_count(x))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers, got {text!r}"
            ) from None
    return out


def name_list(text: str) -> list[str]:
    """'lru,arc' -> ['lru', 'arc']: at least one name, no empty entries."""
    out = [x for x in text.replace(" ", "").split(",") if x]
    if not out:
        raise argparse.ArgumentTypeError(
            f"expected at least one comma-separated name, got {text!r}"
        )
    return out
