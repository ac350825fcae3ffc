"""Checks for values read from files (metadata, profiles, manifests, summaries).

Every field mer reads from a file goes through one of these, so a bad value is
one `BadInput` naming the file, the field, what was found and what is allowed,
instead of a crash deep inside (an allocation of 24 GiB, a NaN in a division).
JSON gives bools where ints are expected and floats where ints are meant
(1e9); both are judged here once. The CLI's argument types (mer.cli.values)
use the same bounds.
"""

from __future__ import annotations

import math
import os
from typing import Any

from mer.errors import BadInput

#: The largest count mer accepts anywhere (tokens, items): 2**40.
MAX_COUNT = 1 << 40
#: Cache slots: the compiled replays count in int32 (and no model has 2**31 experts).
MAX_SLOTS = (1 << 31) - 1


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(
    where: str, name: str, value: Any, *, lo: int | None = None, hi: int | None = None
) -> int:
    """An integer in [lo, hi] (a float that is a whole number is accepted)."""
    if not _is_number(value):
        raise BadInput(f"{where}: field {name} must be an integer, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadInput(f"{where}: field {name} must be an integer, got {value!r}.")
        value = int(value)
    if lo is not None and value < lo:
        raise BadInput(f"{where}: field {name} must be >= {lo}, got {value}.")
    if hi is not None and value > hi:
        raise BadInput(f"{where}: field {name} must be <= {hi:,}, got {value:,}.")
    return int(value)


def number(
    where: str,
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
    if not _is_number(value) or not math.isfinite(value):
        raise BadInput(f"{where}: field {name} must be a finite number, got {value!r}.")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise BadInput(
            f"{where}: field {name} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}."
        )
    if hi is not None and value > hi:
        raise BadInput(f"{where}: field {name} must be <= {hi:g}, got {value!r}.")
    return float(value)


def text(where: str, name: str, value: Any, *, optional: bool = False, limit: int = 1 << 16) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{where}: field {name} must be a string, got {type(value).__name__}.")
    if len(value) > limit:
        raise BadInput(
            f"{where}: field {name} is {len(value):,} characters long (limit {limit:,})."
        )
    return value


def obj(where: str, name: str, value: Any, *, optional: bool = True) -> dict[str, Any]:
    """A JSON object (None is an empty one where optional)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: field {name} must be a JSON object, got {type(value).__name__}.")
    return value


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can get (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, what: str) -> None:
    """Refuse an allocation that cannot fit in the memory available now (BadInput)."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise BadInput(
            f"{what} needs {nbytes / 2**30:,.2f} GiB of memory, but {avail / 2**30:,.2f} GiB "
            "is available; give fewer slots (--cache-slots or --cache-gib) or free memory."
        )
