"""Decision-by-decision comparison of a compiled replay with its Python policy class.

The reference is the Python class under the core's general path
(`replay_counts(..., fast=False)`); every lookup's outcome (1 hit, 0 miss into a slot,
2 bypass) and every eviction, in order, must equal the compiled loop's
(`run_pass(outcome=True, victims=True)`). Used by the layer-aware policies' tests
(cycle, cotoken), whose compiled twins decide by a model rather than by a list order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mer.core import Replay, ReplayConfig, replay_counts
from mer.native import replay as native_replay


def python_decisions(cls, steps, n_layers, n_experts, cfg, monkeypatch):
    """Every lookup's outcome and the evicted keys in order, from the Python class
    `cls` (its begin_step and on_remove wrapped, decisions untouched)."""
    removed: list[int] = []
    out = np.full(steps.shape, -1, dtype=np.int8)
    begin, remove = cls.begin_step, cls.on_remove

    def close_step(self):
        # the previous step of this partition: a miss still resident now went into a slot
        t, keys = getattr(self, "_test_prev", (None, ()))
        for r, key in enumerate(keys):
            if out[t, r] != 1:
                out[t, r] = 0 if self._res[key] else 2

    def on_begin(self, t, keys):
        close_step(self)
        out[t] = [1 if self._res[k] else -1 for k in keys]
        self._test_prev = (t, list(keys))
        begin(self, t, keys)

    def on_remove(self, key):
        removed.append(int(key))
        remove(self, key)

    monkeypatch.setattr(cls, "begin_step", on_begin)
    monkeypatch.setattr(cls, "on_remove", on_remove)
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    replay_counts(rep, fast=False)
    monkeypatch.undo()
    for part in rep.cache.partitions:
        close_step(part.policy)
    return out, removed


def compiled_decisions(steps, n_layers, n_experts, cfg):
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    pol = native_replay.lookup(cfg.policy)
    assert pol is not None
    cache = rep.cache
    parts = native_replay.split_partitions(
        rep.decision_steps, n_layers, n_experts, cache.scope, sorted(cache.pinned)
    )
    out = np.zeros(steps.shape, dtype=np.int8)
    removed_by_part = []
    for part, cpart in zip(parts, cache.partitions, strict=True):
        params = np.asarray([native_replay.policy_params(pol, cpart.policy)])
        res = native_replay.run_pass(
            pol, part, [cpart.capacity], params, outcome=True, victims=True
        )
        assert res.outcome is not None and res.victims is not None
        if part.tidx is None:
            out[:] = res.outcome
        else:
            out[part.tidx] = res.outcome
        v = res.victims.reshape(-1)
        removed_by_part.append((v[v >= 0] + part.key_base).tolist())
    return out, removed_by_part


def assert_same_decisions(cls, steps, n_layers, n_experts, cfg, monkeypatch):
    """(hits, evictions) compared: both must be the Python class's, lookup by lookup."""
    want_out, want_removed = python_decisions(cls, steps, n_layers, n_experts, cfg, monkeypatch)
    got_out, got_removed = compiled_decisions(steps, n_layers, n_experts, cfg)
    assert (want_out >= 0).all()
    bad = np.flatnonzero((got_out != want_out).any(axis=1))
    assert not len(bad), f"first different step {bad[0] if len(bad) else None}"
    if cfg.scope == "global":
        assert got_removed == [want_removed]
    else:  # one partition per layer: Python's log split by layer, in order
        by_layer = [
            [k for k in want_removed if k // n_experts == layer] for layer in range(n_layers)
        ]
        assert got_removed == by_layer
    return int((want_out == 1).sum()), len(want_removed)


def side_by_side_equals_python(policy, steps, n_layers, n_experts, params):
    """`mer mrc`'s pass (every size in one read of the trace) against one Python replay
    per size, both scopes."""
    from mer.sim.mrc import compiled_hits

    sizes = list(range(1, n_layers * n_experts + 1))
    for scope in ("global", "per-layer"):
        got = compiled_hits(policy, steps, n_layers, n_experts, scope, sizes, params=params)
        assert got is not None
        for c in sizes:
            cfg = ReplayConfig(policy=policy, cache_slots=c, scope=scope, policy_params=params)
            rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
            assert got[c] == replay_counts(rep, engine="python").total("hits"), (scope, c)


BUNDLED = (
    Path(__file__).resolve().parents[1] / "traces" / "data" / "mixtral-offloading-h39s.parquet"
)


def bundled_trace_same_decisions(cls, slots, scope, monkeypatch):
    """The first 6000 steps of the bundled trace, the default weights."""
    from mer.traces.format import read_trace

    tr = read_trace(BUNDLED)
    steps = np.ascontiguousarray(tr.keys().reshape(-1, tr.top_k)[:6000], dtype=np.int32)
    cfg = ReplayConfig(policy=cls.name, cache_slots=slots, scope=scope)
    n_hits, n_evicted = assert_same_decisions(
        cls, steps, tr.n_layers, tr.n_experts, cfg, monkeypatch
    )
    assert n_hits > 1000 and n_evicted > 1000


def exact_ties_same_decisions(cls, scope, params, monkeypatch):
    """Experts that are always picked together share every count, feature and score bit
    for bit, and every layer routes alike: victims are settled by the tie rule (the
    smaller key, then the lower layer). Every even size of 4 layers x 4 experts."""
    n_layers, n_experts = 4, 4
    pattern = [[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [1, 2]]
    rows = [
        [layer * n_experts + e for e in pattern[(t // 2) % len(pattern)]]
        for t in range(48)
        for layer in range(n_layers)
    ]
    steps = np.asarray(rows, dtype=np.int32)
    seen = np.zeros(2, dtype=np.int64)
    for slots in range(2, n_layers * n_experts + 1, 2):
        if scope == "per-layer" and slots % n_layers:
            continue
        cfg = ReplayConfig(policy=cls.name, cache_slots=slots, scope=scope, policy_params=params)
        seen += assert_same_decisions(cls, steps, n_layers, n_experts, cfg, monkeypatch)
    assert (seen > 0).all()
