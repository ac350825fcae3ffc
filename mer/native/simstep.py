"""The simulator's prefetch-on step in C (simstep.c): the glue, and where its reference lives.

The reference is the Python pair that defines a prefetch-on simulation: the
core's cache and prefetch rule (`mer.core.cache.ExpertCache`, `Replay.prefetch`)
driven by the fast engine's step loop and SSD model (`mer.sim.model._run_fast`,
`AnalyticSSD`, `_ffn_schedule`). `simstep.c` restates them in one loop over the
trace, taking the predictor's proposals precomputed (`mer.core.replay.
prefetch_proposals`: no built-in predictor reads the cache or the clock), and
`tests/test_simstep_native.py` holds it equal to them. `run()` returns None when
the compiled path does not cover a replay; the caller then runs `_run_fast`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mer import native
from mer.errors import BadInput
from mer.native.replay import REPEAT_MESSAGE, _ptr

#: The policies this loop is tested equal to the Python step loop on (step-protecting,
#: no future; cotoken's hooks read only the state its begin_step left, so a victim for a
#: prefetch is chosen as Python chooses it). cycle (whose compiled hooks assume the
#: hit-only driver), opt, seed-lru-locality and plugins run the Python step loop.
POLICIES = ("lru", "fifo", "lfu", "clock", "sieve", "s3fifo", "arc", "cotoken")


@dataclass
class SimArrays:
    """What one compiled run gives back (ticks): per step and per read, in issue order."""

    per_step: (
        np.ndarray
    )  # (n_steps, 10): iter, io, comp, n_busy, over, hits, late, pf, reads, dense
    read_issued: np.ndarray
    read_key: np.ndarray
    read_step: np.ndarray
    read_finish: np.ndarray
    obs: tuple[np.ndarray, np.ndarray, np.ndarray]  # the driver's reaping windows (a, b, p)
    stats: np.ndarray  # (8, n_layers): CacheStats.COUNTERS
    end: int


def run(
    *,
    policy_index: int,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    global_scope: bool,
    caps: list[int],
    params: np.ndarray,
    pinned: np.ndarray | None,
    proposals: tuple[np.ndarray, np.ndarray, np.ndarray],
    prefetch_slots: int,
    prefetch_reclaim: bool,
    max_inflight: int,
    tm: Any,
    hold: int = 0,
) -> SimArrays | None:
    """One compiled run of a whole trace, or None without a compiler."""
    mod = native.load("simstep")
    if mod is None:
        return None
    ffi, lib = mod.ffi, mod.lib
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    n_steps, k = steps.shape
    off, wkey, wtarget = proposals
    off = np.ascontiguousarray(off, dtype=np.int64)
    wkey = np.ascontiguousarray(wkey, dtype=np.int32)
    wtarget = np.ascontiguousarray(wtarget, dtype=np.int64)
    params = np.ascontiguousarray(params, dtype=np.float64)
    caps_arr = np.ascontiguousarray(caps, dtype=np.int32)
    pin = None if pinned is None else np.ascontiguousarray(pinned, dtype=np.uint8)
    cfg = ffi.new("mer_sim_cfg *")
    cfg.policy = policy_index
    cfg.k = k
    cfg.n_layers = n_layers
    cfg.n_experts = n_experts
    cfg.n_params = params.shape[1] if params.ndim == 2 else 0
    cfg.global_scope = 1 if global_scope else 0
    cfg.prefetch_slots = prefetch_slots
    cfg.prefetch_reclaim = 1 if prefetch_reclaim else 0
    cfg.max_inflight = max_inflight
    cfg.hold = hold
    for name in (
        "dense",
        "ffn",
        "ffn_busy",
        "poll",
        "step",
        "submit",
        "complete",
        "ffn_wake",
        "dense_wake",
    ):
        setattr(cfg, name, int(getattr(tm, name)))
    cfg.workers = tm.workers
    cfg.seed = 1 if tm.seed else 0
    cfg.channels = tm.channels
    cfg.chunks = tm.chunks
    cfg.chunk = tm.chunk
    cfg.lag = tm.lag
    cfg.access = tm.access
    share = np.ascontiguousarray(tm.share, dtype=np.int64)
    cfg.share = _ptr(mod, "int64_t *", share) if share.size else ffi.NULL
    cfg.n_share = share.size
    max_reads = n_steps * k + len(wkey) + 1
    max_obs = n_steps * (3 + 3 * k) + 1
    per_step = np.zeros((n_steps, 10), dtype=np.int64)
    r_issued = np.zeros(max_reads, dtype=np.int64)
    r_key = np.zeros(max_reads, dtype=np.int32)
    r_step = np.zeros(max_reads, dtype=np.int64)
    r_finish = np.zeros(max_reads, dtype=np.int64)
    oa = np.zeros(max_obs, dtype=np.int64)
    ob = np.zeros(max_obs, dtype=np.int64)
    op = np.zeros(max_obs, dtype=np.int64)
    stats = np.zeros((8, n_layers), dtype=np.int64)
    out = ffi.new("mer_sim_out *")
    out.per_step = _ptr(mod, "int64_t *", per_step)
    out.read_issued = _ptr(mod, "int64_t *", r_issued)
    out.read_key = _ptr(mod, "int32_t *", r_key)
    out.read_step = _ptr(mod, "int64_t *", r_step)
    out.read_finish = _ptr(mod, "int64_t *", r_finish)
    out.max_reads = max_reads
    out.obs_a = _ptr(mod, "int64_t *", oa)
    out.obs_b = _ptr(mod, "int64_t *", ob)
    out.obs_p = _ptr(mod, "int64_t *", op)
    out.max_obs = max_obs
    out.stats = _ptr(mod, "int64_t *", stats)
    rc = lib.mer_sim_run(
        cfg,
        _ptr(mod, "int32_t *", steps),
        n_steps,
        _ptr(mod, "int64_t *", off),
        _ptr(mod, "int32_t *", wkey),
        _ptr(mod, "int64_t *", wtarget),
        _ptr(mod, "uint8_t *", pin),
        _ptr(mod, "double *", params) if params.size else ffi.NULL,
        _ptr(mod, "int32_t *", caps_arr),
        out,
    )
    if rc == -1:
        raise MemoryError("compiled simulation: out of memory")
    if rc == -5:
        raise BadInput(REPEAT_MESSAGE)
    if rc != 0:
        raise ValueError(f"compiled simulation: bad input (code {rc})")
    n, m = int(out.n_reads), int(out.n_obs)
    return SimArrays(
        per_step,
        r_issued[:n],
        r_key[:n],
        r_step[:n],
        r_finish[:n],
        (oa[:m], ob[:m], op[:m]),
        stats,
        int(out.end),
    )
