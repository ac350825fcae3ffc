"""libCacheSim as a peer: its policies on a mer trace, request by request.

libCacheSim (https://github.com/1a1a11a/libCacheSim, PyPI `libcachesim`) is
GPL-3.0-or-later, so it is an optional extra, never a dependency:
`pip install 'mer-moe[peers]'`. It replays one request at a time, which is
mer's `--granularity lookup`: every lookup is a request for the object
`layer * n_experts + expert` of size 1, and a cache of C objects is C slots.

The trace is written once as a libCacheSim oracleGeneral binary file (which
carries each request's next use, for its Belady), and every (policy, size) is
one `process_trace` over it, inside libCacheSim's C loop.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mer.core import split_slots
from mer.errors import BadInput

INSTALL_HINT = (
    "the libCacheSim peer is an optional extra (GPL-3.0-or-later): pip install 'mer-moe[peers]'"
)
#: A sensible default set (its classic and adaptive policies), `--policies` takes any.
DEFAULT_POLICIES = (
    "lru",
    "fifo",
    "lfu",
    "clock",
    "sieve",
    "s3fifo",
    "arc",
    "lirs",
    "twoq",
    "lecar",
    "cacheus",
    "belady",
)
#: libCacheSim's oracleGeneral record: time, object id, size, next access (-1: none).
RECORD = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])


def module() -> Any:
    """The `libcachesim` module, or BadInput saying how to install it."""
    try:
        import libcachesim
    except ImportError as exc:
        raise BadInput(f"--backend libcachesim: {INSTALL_HINT} ({exc}).") from None
    return libcachesim


def available() -> bool:
    try:
        module()
    except BadInput:
        return False
    return True


@cache
def policies() -> dict[str, str]:
    """libCacheSim's policies: lower-case name -> class name."""
    lcs = module()
    out = {}
    for name, cls in inspect.getmembers(lcs, inspect.isclass):
        if issubclass(cls, lcs.CacheBase) and cls is not lcs.CacheBase and name != "PluginCache":
            out[name.lower()] = name
    return out


def check_policies(names: Sequence[str]) -> None:
    known = policies()
    bad = [n for n in names if n.lower() not in known]
    if bad:
        raise BadInput(
            f"libCacheSim has no policy {', '.join(map(repr, bad))}; it has: "
            f"{', '.join(sorted(known))}."
        )


def write_oracle_trace(keys: np.ndarray, path: Path) -> None:
    """keys (flat object ids) as an oracleGeneral file: size 1, time = index, next use."""
    from mer.native.replay import next_use

    keys = np.ascontiguousarray(keys, dtype=np.int32).reshape(-1)
    rec = np.zeros(len(keys), dtype=RECORD)
    rec["t"] = np.arange(len(keys), dtype=np.uint32)
    rec["id"] = keys.astype(np.uint64) + 1  # libCacheSim reserves object id 0 in places
    rec["size"] = 1
    nxt = next_use(keys.reshape(-1, 1), int(keys.max()) + 1 if len(keys) else 1)
    rec["next"] = np.where(nxt >= 1 << 62, -1, nxt)
    rec.tofile(path)


def make_cache(name: str, size: int) -> Any:
    lcs = module()
    cls = getattr(lcs, policies()[name.lower()])
    return cls(size, hashpower=16)


def replay_file(name: str, path: Path, n_req: int, size: int) -> int:
    """Hits of libCacheSim's `name` with `size` objects over the trace file."""
    if size <= 0 or n_req == 0:
        return 0
    lcs = module()
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = make_cache(name, size).process_trace(reader)
    return round(n_req * (1.0 - miss_ratio))


def guarded_map(fn: Callable[[Any], int], items: Sequence[Any]) -> list[int | None]:
    """[fn(x) for x in items], where a crash of libCacheSim's C code (some of its policies
    abort on caches too small for their internal queues) loses only that item (None).

    The items run in a forked child that streams its results back; when it dies, the
    parent records the item it died on and forks again for the rest.
    """
    if not hasattr(os, "fork"):  # pragma: no cover - not on Linux
        return [fn(x) for x in items]
    import struct

    out: list[int | None] = [None] * len(items)
    i = 0
    while i < len(items):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no Python cleanup, just the results
            os.close(r)
            code = 0
            try:
                for j in range(i, len(items)):
                    os.write(w, struct.pack("<qq", j, int(fn(items[j]))))
            except BaseException:
                code = 1
            os._exit(code)
        os.close(w)
        buf = b""
        with os.fdopen(r, "rb") as f:
            buf = f.read()
        os.waitpid(pid, 0)
        last = i - 1
        for off in range(0, len(buf) - len(buf) % 16, 16):
            j, v = struct.unpack_from("<qq", buf, off)
            out[j] = v
            last = j
        i = last + 2  # skip the item the child died on (or stop: all done)
    return out


def lcs_hits(
    policy: str,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    sizes: Sequence[int],
    *,
    progress: Callable[[float], None] | None = None,
) -> dict[int, int]:
    """Total hits per size of libCacheSim's `policy`, lookup by lookup.

    Scope per-layer runs each layer's own requests with its share of the slots
    (`split_slots`), as mer's caches split them.
    """
    flat = np.ascontiguousarray(steps, dtype=np.int32).reshape(-1)
    with tempfile.TemporaryDirectory(prefix="mer-lcs-") as tmp:
        if scope == "global":
            path = Path(tmp) / "trace.oracleGeneral"
            write_oracle_trace(flat, path)
            got = guarded_map(functools.partial(replay_file, policy, path, len(flat)), list(sizes))
            if progress:
                progress(1.0)
            return {c: h for c, h in zip(sizes, got, strict=True) if h is not None}
        layers = flat // n_experts
        shares = {s: split_slots(s, n_layers) for s in sizes}
        per_layer: list[dict[int, int]] = []
        for layer in range(n_layers):
            sub = flat[layers == layer]
            path = Path(tmp) / f"layer{layer}.oracleGeneral"
            write_oracle_trace(sub, path)
            caps = sorted({sh[layer] for sh in shares.values()})
            got = guarded_map(functools.partial(replay_file, policy, path, len(sub)), caps)
            per_layer.append({c: h for c, h in zip(caps, got, strict=True) if h is not None})
            os.unlink(path)
            if progress:
                progress(1.0 / n_layers)
        return {
            s: sum(per_layer[i][sh[i]] for i in range(n_layers))
            for s, sh in shares.items()
            if all(sh[i] in per_layer[i] for i in range(n_layers))
        }
