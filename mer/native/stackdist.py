"""Stack-distance histograms for the one-pass LRU and OPT curves: C kernel, Python reference.

The stack updates (explained in mer.sim.mrc) are short integer loops that
Python runs at ~10^7 simple steps per second, far from the <= 5 s a 1M-lookup
curve should take. `stackdist.c` runs the same two loops; `lru_hits` and
`opt_hits` below are their Python reference (and the fallback when
`mer.native.load("stackdist")` is None). Tests hold both against per-size
replay of the core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mer import native
from mer.core.policies import INF

# -- one-pass LRU ----------------------------------------------------------------------


def lru_depths(steps: Sequence[Sequence[int]]) -> np.ndarray:
    """Stack depth at step start of every lookup (flattened), -1 for a first use."""
    stack: list[int] = []  # top first
    seen: set[int] = set()
    out: list[int] = []
    for keys in steps:
        for key in keys:
            if key in seen:
                out.append(stack.index(key))
            else:
                out.append(-1)
        for key in keys:
            if key in seen:
                stack.remove(key)
            else:
                seen.add(key)
        stack[0:0] = keys
    return np.asarray(out, dtype=np.int64)


def hits_from_depths(depths: np.ndarray, max_size: int) -> np.ndarray:
    """hits[C] for C = 0..max_size: lookups whose depth is < C."""
    finite = depths[depths >= 0]
    hist = np.bincount(np.minimum(finite, max_size), minlength=max_size + 1)
    out = np.zeros(max_size + 1, dtype=np.int64)
    out[1:] = np.cumsum(hist[:max_size])
    return out


def lru_hits(steps: Sequence[Sequence[int]], max_size: int) -> np.ndarray:
    return hits_from_depths(lru_depths(steps), max_size)


# -- one-pass OPT ----------------------------------------------------------------------


def opt_hits(steps: Sequence[Sequence[int]], next_pos: Sequence[int], max_size: int) -> np.ndarray:
    """hits[C] for C = 0..max_size under the core's `opt` policy, in one pass.

    `next_pos[i]` is the global position of the next use of the key at flat
    position i (t * k + rank), INF if none; it orders the keys exactly as the
    `opt` policy does (never-used-again keys: the largest key is evicted first).
    """
    stack: list[int] = []  # top first
    seen: set[int] = set()
    val: dict[int, int] = {}
    hist = np.zeros(max_size + 2, dtype=np.int64)
    pos = 0
    cap = max_size + 1
    for keys in steps:
        k = len(keys)
        kset = set(keys)
        depths = []
        for key in keys:
            if key in seen:
                d = stack.index(key)
                depths.append(d)
                hist[min(d, cap)] += 1
            else:
                seen.add(key)
                depths.append(INF)
        for key in keys:
            n = next_pos[pos]
            pos += 1
            val[key] = n if n < INF else INF + key
        # j values (C - k) at which the number of step keys still below drops by one.
        drops = sorted(d - k + 1 for d in depths if k <= d < INF)
        m = sum(1 for d in depths if d >= k)
        n_old = len(stack)
        if m == 0:  # every step key was in the top k: they just move to the top
            for key in keys:
                stack.remove(key)
            stack[0:0] = keys
            continue
        i = 0
        pool: list[int] = []
        while len(pool) < m and i < n_old:
            x = stack[i]
            i += 1
            if x not in kset:
                pool.append(x)
        out: list[int] = []
        j = 0
        di = 0
        nd = len(drops)
        while True:
            if di < nd and drops[di] == j + 1:
                m_next = m - 1
                di += 1
            else:
                m_next = m
                while i < n_old:
                    x = stack[i]
                    i += 1
                    if x not in kset:
                        pool.append(x)
                        break
            if not pool:
                break
            if len(pool) == 1:
                best = pool.pop()
            else:
                best = min(pool, key=val.__getitem__)
                pool.remove(best)
            out.append(best)
            m = m_next
            j += 1
            if m == 0 and not pool:
                break
        tail = stack[i:]
        if any(d >= i for d in depths if d < INF):
            tail = [x for x in tail if x not in kset]
        stack = list(keys) + out + tail
    out_hits = np.zeros(max_size + 1, dtype=np.int64)
    out_hits[1:] = np.cumsum(hist[:max_size])
    return out_hits


# -- compiled ----------------------------------------------------------------------


def _ptr(mod: Any, ctype: str, arr: np.ndarray) -> Any:
    return mod.ffi.cast(ctype, mod.ffi.from_buffer(arr))


def lru_hist(steps: np.ndarray, cap: int) -> np.ndarray | None:
    """hist[d] = lookups at stack depth d (d >= cap folded into cap); None without C."""
    return _hist("mer_lru_hist", steps, None, cap)


def opt_hist(steps: np.ndarray, nval: np.ndarray, cap: int) -> np.ndarray | None:
    """Like `lru_hist` for the OPT stack; `nval` orders keys by next use (see sim.mrc)."""
    return _hist("mer_opt_hist", steps, nval, cap)


def _hist(fn: str, steps: np.ndarray, nval: np.ndarray | None, cap: int) -> np.ndarray | None:
    """One stack-depth histogram from the compiled loop `fn` (OPT's takes `nval`)."""
    mod = native.load("stackdist")
    if mod is None:
        return None
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    n_keys = int(steps.max()) + 1 if steps.size else 1
    hist = np.zeros(cap + 1, dtype=np.int64)
    nv = None if nval is None else np.ascontiguousarray(nval, dtype=np.int64)  # kept alive
    order = [] if nv is None else [_ptr(mod, "int64_t *", nv)]
    rc = getattr(mod.lib, fn)(
        _ptr(mod, "int32_t *", steps),
        *order,
        len(steps),
        steps.shape[1],
        n_keys,
        _ptr(mod, "int64_t *", hist),
        cap,
    )
    if rc != 0:
        raise MemoryError(f"{fn}: out of memory")
    return hist
