"""Compiled hit-only replays (replay.c): the glue, and where their reference lives.

The reference is the core itself: the policy classes of `mer.core.policies`
driven by the lean clockless loop `mer.core.replay._counts_no_prefetch`
(prefetch off). `replay.c` restates both in C; `tests/test_replay_native.py`
holds every compiled policy equal to its Python class (hits, misses, evictions,
bypasses and the final residents) on random traces. Without a compiler
`lookup()` returns None and callers run the Python loop.

A replay runs one *partition* of the cache (the whole cache in scope `global`,
one layer's slots in `per-layer`) with any number of caches of one policy side
by side: one read of the trace gives every requested size. Parameters come
from Python policy objects (the attributes the C registry names), so the
Python class stays the one place that sets and validates them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mer import native
from mer.errors import BadInput

#: A step that names one key twice (the compiled loops refuse it; traces never hold one).
REPEAT_MESSAGE = (
    "a step names the same expert twice: each step's keys are one token's top-k experts "
    "at one layer and must be distinct (mer's trace reader refuses such traces; fix the "
    "array passed to Replay)."
)

#: Steps fed to C per call: progress and Ctrl-C are seen between chunks.
CHUNK_STEPS = 1 << 15
#: Memory one pass may use for cache states; more caches are split into passes.
STATE_BUDGET = 256 << 20


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    index: int
    params: tuple[str, ...]
    protects_step: bool
    needs_future: bool


def lookup(name: str) -> CompiledPolicy | None:
    """The compiled loop of policy `name`, or None (no compiler, or no C twin)."""
    mod = native.load("replay")
    if mod is None:
        return None
    lib = mod.lib
    i = int(lib.mer_replay_policy(name.encode()))
    if i < 0:
        return None
    names = mod.ffi.string(lib.mer_replay_param_names(i)).decode().split()
    return CompiledPolicy(
        name,
        i,
        tuple(names),
        bool(lib.mer_replay_protects_step(i)),
        bool(lib.mer_replay_needs_future(i)),
    )


def compiled_names() -> list[str]:
    mod = native.load("replay")
    if mod is None:
        return []
    lib = mod.lib
    return [
        mod.ffi.string(lib.mer_replay_policy_name(i)).decode()
        for i in range(lib.mer_replay_n_policies())
    ]


def policy_params(pol: CompiledPolicy, policy: Any) -> list[float]:
    """The row of parameters the C loop reads, from a Python policy object: its
    attributes, else its `model_params()` (knn keeps its weights in a dict)."""
    model: dict[str, Any] | None = None
    row = []
    for name in pol.params:
        if hasattr(policy, name):
            row.append(float(getattr(policy, name)))
            continue
        if model is None:
            model = policy.model_params() if hasattr(policy, "model_params") else {}
        if name not in model:
            raise AttributeError(f"policy {pol.name!r} has no parameter {name!r} for its C loop")
        row.append(float(model[name]))
    return row


@dataclass
class Partition:
    """One partition's slice of the trace, in its own key numbering 0..n_keys-1."""

    keys: np.ndarray  # (n_steps, k) int32
    tidx: np.ndarray | None  # global step index of each row (None: 0, 1, 2, ...)
    n_keys: int
    key_base: int  # global key = local key + key_base
    layer_div: int  # counters go to layer key // layer_div (global keys); see layer
    n_layers_out: int
    layer: int | None  # per-layer partitions: the one layer all counters belong to
    pinned: np.ndarray | None  # (n_keys,) uint8 static pins, or None

    @property
    def n_steps(self) -> int:
        return len(self.keys)


def split_partitions(
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    pinned: Sequence[int] = (),
) -> list[Partition]:
    """The trace split as the cache splits it (one step = one layer's keys)."""
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    n_total = n_layers * n_experts
    pin = None
    if len(pinned):
        pin = np.zeros(n_total, dtype=np.uint8)
        pin[np.asarray(list(pinned), dtype=np.int64)] = 1
    if scope == "global":
        return [Partition(steps, None, n_total, 0, n_experts, n_layers, None, pin)]
    layers = steps[:, 0] // n_experts if len(steps) else np.zeros(0, dtype=np.int32)
    out = []
    for layer in range(n_layers):
        idx = np.flatnonzero(layers == layer)
        base = layer * n_experts
        keys = np.ascontiguousarray(steps[idx] - base, dtype=np.int32)
        lp = None if pin is None else np.ascontiguousarray(pin[base : base + n_experts])
        out.append(Partition(keys, idx.astype(np.int64), n_experts, base, n_experts, 1, layer, lp))
    return out


def next_use(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Next-use position of every lookup of a partition (OPT's order; INF if none).

    The same array as `mer.core.policies.next_positions`, in one O(n) C scan.
    """
    flat = np.ascontiguousarray(keys.reshape(-1), dtype=np.int32)
    mod = native.load("replay")
    if mod is None:
        from mer.core.policies import next_positions

        return np.ascontiguousarray(next_positions(flat), dtype=np.int64)
    out = np.empty(len(flat), dtype=np.int64)
    rc = mod.lib.mer_next_use(
        _ptr(mod, "int32_t *", flat), len(flat), n_keys, _ptr(mod, "int64_t *", out)
    )
    if rc != 0:
        raise ValueError(f"next-use scan: keys outside 0..{n_keys - 1}")
    return out


@dataclass
class PassResult:
    counts: np.ndarray  # (n_caches, 4, n_layers_out): hits, misses, evictions, bypass
    resident: np.ndarray | None  # (n_caches, n_keys) bool
    outcome: np.ndarray | None  # (n_steps, k) int8: 1 hit, 0 miss into a slot, 2 bypass
    #: the counts after the first `split` steps (run_pass(split=...)), else None
    counts_before: np.ndarray | None = None
    #: (n_steps, k) int32: the key each miss evicted, -1 none (run_pass(victims=True))
    victims: np.ndarray | None = None


def _ptr(mod: Any, ctype: str, arr: np.ndarray | None) -> Any:
    if arr is None:
        return mod.ffi.NULL
    return mod.ffi.cast(ctype, mod.ffi.from_buffer(arr))


def run_pass(
    pol: CompiledPolicy,
    part: Partition,
    caps: Sequence[int],
    params: np.ndarray,
    *,
    outcome: bool = False,
    resident: bool = False,
    progress: Callable[[int], None] | None = None,
    split: int | None = None,
    victims: bool = False,
) -> PassResult:
    """One read of the partition's steps with len(caps) caches side by side.

    `params`: (len(caps), len(pol.params)) float64, one row per cache.
    `split`: also read the counters after the first `split` steps (a warm-up
    window: counts over the rest are `counts - counts_before`).
    `victims`: also keep the key each miss evicted (one cache only: decision by
    decision comparisons with the Python class).
    `progress(n)` is called with the steps just done, after each chunk.
    """
    mod = native.load("replay")
    if mod is None:  # pragma: no cover - callers check lookup() first
        raise RuntimeError("the compiled replays are unavailable")
    lib, ffi = mod.lib, mod.ffi
    n_caches = len(caps)
    if (outcome or victims) and n_caches != 1:
        raise ValueError("per-lookup outcomes need exactly one cache")
    k = part.keys.shape[1] if part.keys.ndim == 2 else 1
    caps_arr = np.ascontiguousarray(caps, dtype=np.int32)
    par = np.ascontiguousarray(params, dtype=np.float64).reshape(n_caches, len(pol.params))
    h = lib.mer_replay_new(
        pol.index,
        k,
        part.n_keys,
        part.key_base,
        part.layer_div,
        part.n_layers_out,
        _ptr(mod, "uint8_t *", part.pinned),
        n_caches,
        _ptr(mod, "int32_t *", caps_arr),
        _ptr(mod, "double *", par) if par.size else ffi.NULL,
        len(pol.params),
    )
    if h == ffi.NULL:
        raise MemoryError(f"compiled replay of {pol.name}: out of memory for {n_caches} caches")
    try:
        keys = np.ascontiguousarray(part.keys, dtype=np.int32)
        nu = next_use(keys, part.n_keys) if pol.needs_future else None
        out = np.zeros(keys.shape, dtype=np.int8) if outcome else None
        vic = np.full(keys.shape, -1, dtype=np.int32) if victims else None
        tidx = None if part.tidx is None else np.ascontiguousarray(part.tidx, dtype=np.int64)
        n = part.n_steps
        cut = None if split is None else max(0, min(int(split), n))
        bounds = sorted({*range(0, n, CHUNK_STEPS), *(() if cut is None else (cut,)), n})
        before = None
        for a, b in itertools.pairwise(bounds):
            if a == cut:
                before = _read_counts(lib, h, n_caches, part.n_layers_out)
            rc = lib.mer_replay_feed(
                h,
                _ptr(mod, "int32_t *", keys[a:b]),
                _ptr(mod, "int64_t *", None if tidx is None else tidx[a:b]),
                _ptr(mod, "int64_t *", None if nu is None else nu[a * k : b * k]),
                b - a,
                _ptr(mod, "int8_t *", None if out is None else out[a:b]),
                _ptr(mod, "int32_t *", None if vic is None else vic[a:b]),
            )
            if rc == -4:
                raise MemoryError(f"compiled replay of {pol.name}: out of memory")
            if rc == -5:
                raise BadInput(REPEAT_MESSAGE)
            if rc != 0:
                raise ValueError(f"compiled replay of {pol.name}: bad input (code {rc})")
            if progress:
                progress(b - a)
        counts = _read_counts(lib, h, n_caches, part.n_layers_out)
        if cut is not None and before is None:  # the split is the end (or nothing fed)
            before = counts.copy()
        res = None
        if resident:
            res = np.zeros((n_caches, part.n_keys), dtype=np.uint8)
            for c in range(n_caches):
                lib.mer_replay_resident(h, c, _ptr(mod, "uint8_t *", res[c]))
        return PassResult(counts, None if res is None else res.astype(bool), out, before, vic)
    finally:
        lib.mer_replay_free(h)


def _read_counts(lib: Any, h: Any, n_caches: int, n_layers_out: int) -> np.ndarray:
    mod = native.load("replay")
    counts = np.zeros((n_caches, 4, n_layers_out), dtype=np.int64)
    for c in range(n_caches):
        lib.mer_replay_counts(h, c, _ptr(mod, "int64_t *", counts[c]))
    return counts


def cache_groups(pol: CompiledPolicy, k: int, n_keys: int, n_caches: int) -> list[range]:
    """Split n_caches into passes whose states fit STATE_BUDGET."""
    mod = native.load("replay")
    assert mod is not None
    per = max(1, int(mod.lib.mer_replay_state_bytes(pol.index, k, n_keys)))
    size = max(1, STATE_BUDGET // per)
    return [range(a, min(n_caches, a + size)) for a in range(0, n_caches, size)]
