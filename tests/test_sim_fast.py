"""The simulator's prefetch-off array path against the step-by-step engines.

With prefetch off, `simulate` times a run from the compiled replay's per-lookup
outcomes and a table per miss count (`step_spans`). The references are the
step-by-step fast engine (`_run_fast`, driving `replay.step`) and the literal
simpy engine (one process per chunk and FFN): the whole summary and the
per-token table must be equal.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_sim_model import SHAPE, make_trace, profile

from mer import native
from mer.core import ReplayConfig
from mer.sim import model
from mer.sim.model import SimOptions, simulate

pytestmark = pytest.mark.skipif(
    native.load("replay") is None, reason="the compiled replays do not build here"
)


def _trace(seed: int, tokens: int = 20, layers: int = 3, n_experts: int = 6, k: int = 2):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_experts + 1) ** 0.9
    p /= p.sum()
    ex = np.stack([rng.choice(n_experts, k, replace=False, p=p) for _ in range(tokens * layers)])
    return make_trace(ex.reshape(tokens, layers, k).astype(np.int16), n_experts)


def _summary(res):
    d = res.summary.to_dict()
    d["extra"].pop("sim_seconds")
    d["extra"].pop("sim_lookups_per_s")
    d["extra"].pop("engine", None)
    d["extra"].pop("sim_path", None)  # which implementation ran: the one thing that differs
    d["config"] = dict(d["config"])
    return d


def random_profile(rng: random.Random, workers: tuple[int, ...] = (1, 2, 3)):
    """A hardware profile with random SSD and compute figures (for engine comparisons),
    the wake costs on or off."""
    hw = profile(
        latency=rng.uniform(1e-5, 1e-4),
        bw=rng.uniform(2e8, 2e9),
        channels=rng.choice([1, 2, 3, 5]),
        chunk=rng.choice([9000, 40000, 1 << 30]),
        ffn_bps=rng.uniform(3e8, 3e9),
        workers=rng.choice(workers),
    )
    # drawn apart (seeded by the profile), so the callers' own draws stay as they were
    sub = random.Random(hw.ssd.bandwidth_bytes_per_s)
    hw.compute.wake_ffn_s = sub.choice([0.0, 0.0, 2.5e-5])
    hw.compute.wake_dense_s = sub.choice([0.0, 0.0, 1.5e-5])
    return hw


def test_array_path_equals_the_step_engines(monkeypatch):
    rng = random.Random(5)
    for i in range(14):
        hw = random_profile(rng)
        k = rng.choice([1, 2, 3])
        trace = _trace(i, k=k)
        cfg = ReplayConfig(
            policy=rng.choice(["lru", "fifo", "arc", "s3fifo", "opt", "clock"]),
            cache_slots=rng.choice([1, 2, 5, 9, 18]),
            scope=rng.choice(["global", "per-layer"]),
            pin=rng.choice([0, 0, 1]),
            granularity=rng.choice(["step", "lookup"]),
        )
        if cfg.scope == "per-layer":
            cfg.cache_slots = max(cfg.cache_slots, 3 * (cfg.pin + 1))
        mode = rng.choice(["model", "seed"])
        opts = SimOptions(mode=mode, engine="fast", shape=SHAPE.name)
        fast = simulate(trace, cfg, hw, opts)
        assert fast.summary.extra["engine"] == "fast"
        with monkeypatch.context() as m:
            m.setattr(model, "_run_vectorised", lambda *a: None)  # the step-by-step engine
            m.setattr(model, "_run_compiled", lambda *a: None)
            step = simulate(trace, cfg, hw, opts)
        literal = simulate(trace, cfg, hw, SimOptions(mode=mode, engine="simpy", shape=SHAPE.name))
        assert _summary(fast) == _summary(step), (cfg, hw, mode)
        assert fast.tokens.equals(step.tokens)
        assert _summary(fast) == _summary(literal), (cfg, hw, mode)
        assert sorted(fast.read_latencies.tolist()) == sorted(literal.read_latencies.tolist())


def test_array_path_runs_only_with_prefetch_off(monkeypatch):
    from mer.core import replay as core_replay

    calls = []

    orig = core_replay.replay_outcomes

    def spy(rep):
        out = orig(rep)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(core_replay, "replay_outcomes", spy)
    trace = _trace(1)
    hw = profile()
    simulate(trace, ReplayConfig(cache_slots=4), hw, SimOptions(shape=SHAPE.name))
    simulate(
        trace, ReplayConfig(cache_slots=4, predictor="oracle"), hw, SimOptions(shape=SHAPE.name)
    )
    assert calls == [True, False]
