"""The compiled prefetch-on simulation (mer/native/simstep.c) against the Python engines.

The reference is the step-by-step fast engine (`_run_fast`: the core's
`Replay.step` / `Replay.prefetch` / `complete` with the Python `AnalyticSSD` and
FFN schedule), itself held equal to the literal simpy engine in
tests/test_sim_model.py and test_sim_fast.py; a few cases here also go to simpy
directly. Expectations come from those Python runs only: the whole summary (hits,
misses, late / used / wasted prefetches, bytes, times) and the per-token table
must be equal, times to the tick (the engines count integer picoseconds).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_sim_fast import _summary, random_profile
from test_sim_model import SHAPE, profile

from mer import native
from mer.core import Replay, ReplayConfig
from mer.core.replay import prefetch_proposals
from mer.native import simstep
from mer.sim import model
from mer.sim.hardware import load_profile
from mer.sim.model import SimOptions, simulate
from mer.traces.format import TraceMeta, from_arrays

pytestmark = pytest.mark.skipif(
    native.load("simstep") is None, reason="the compiled simulation step does not build here"
)

#: every policy the compiled path takes
POLICIES = list(simstep.POLICIES)
PREDICTORS = ["oracle", "previous-token", "lookahead", "markov", "popularity", "cooccur", "none"]


def _trace(seed: int, tokens: int, layers: int, n_experts: int, k: int):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_experts + 1) ** 0.9
    p /= p.sum()
    n = tokens * layers
    ex = np.stack([rng.choice(n_experts, k, replace=False, p=p) for _ in range(n)])
    # a recorded lookahead column: the next layer's true experts, often wrong
    la = np.stack([rng.choice(n_experts, k, replace=False, p=p) for _ in range(n)])
    la = np.where(rng.random((n, 1)) < 0.6, np.roll(ex, -1, axis=0), la)
    meta = TraceMeta(model="test", n_layers=layers, n_experts=n_experts, top_k=k)
    return from_arrays(
        ex.reshape(tokens, layers, k).astype(np.int16),
        meta,
        name="test",
        lookahead=la.reshape(tokens, layers, k).astype(np.int16),
    )


def _python(monkeypatch, trace, cfg, hw, opts):
    with monkeypatch.context() as m:
        m.setattr(model, "_run_compiled", lambda *a: None)
        m.setattr(model, "_run_vectorised", lambda *a: None)
        return simulate(trace, cfg, hw, opts)


def _random_case(rng: random.Random, i: int):
    k = rng.choice([1, 2, 2, 8])
    n_experts = rng.choice([10, 12]) if k == 8 else rng.choice([4, 6, 8])
    layers = rng.choice([1, 2, 3])
    trace = _trace(i, rng.choice([6, 12, 20]), layers, n_experts, k)
    n_keys = layers * n_experts
    if rng.random() < 0.3:
        hw = load_profile(rng.choice(["nvme-desktop", "ci-tiny", "seed-g2-standard-32"]))
    else:
        hw = random_profile(rng, workers=(1, 1, 2, 3))
    scope = rng.choice(["global", "per-layer"])
    slots = rng.choice([1, 2, k - 1 or 1, k, k + 1, 2 * k, n_keys // 2 or 1, n_keys])
    pin = rng.choice([0, 0, 0, 1, 2])
    if scope == "per-layer":
        slots = max(slots, layers * (pin + 1))
    elif pin >= slots:
        pin = 0
    cfg = ReplayConfig(
        policy=rng.choice(POLICIES),
        cache_slots=min(slots, n_keys),
        scope=scope,
        pin=pin,
        predictor=rng.choice(PREDICTORS),
        pipeline_depth=rng.choice([1, 1, 2, 3, 5]),
        prefetch_top_n=rng.choice([None, None, 1, 3]),
        prefetch_min_prob=rng.choice([0.0, 0.0, 0.2, 0.5]),
        prefetch_inflight=rng.choice([1, 2, 8]),
        prefetch_slots=rng.choice([0, 0, 1, 2, 4]),
        prefetch_reclaim=rng.choice([False, True]),
        prefetch_lead=rng.choice([1, 1, 2, 0]),
    )
    cfg.prefetch_hold = rng.choice([0, 0, 1, 2, 4])
    cfg.prefetch_window = 2 * (i % 3 == 1)  # not from rng: the other cases stay as they were
    return trace, cfg, hw, SimOptions(mode=rng.choice(["model", "seed"]), shape=SHAPE.name)


def test_compiled_step_equals_the_python_step_engine(monkeypatch):
    rng = random.Random(17)
    ran = 0
    for i in range(70):
        trace, cfg, hw, opts = _random_case(rng, i)
        fast = simulate(trace, cfg, hw, opts)
        ref = _python(monkeypatch, trace, cfg, hw, opts)
        case = (i, cfg, hw.name, opts.mode)
        assert ref.summary.extra["sim_path"] == "python"
        assert fast.summary.extra["sim_path"] in ("compiled", "arrays"), case
        ran += fast.summary.extra["sim_path"] == "compiled"
        assert_same_run(fast, ref, case)
    assert ran >= 50


def assert_same_run(fast, ref, case):
    """Every counter, the summary, the per-token table and the read latencies."""
    assert fast.stats.to_dict(per_layer=True) == ref.stats.to_dict(per_layer=True), case
    assert _summary(fast) == _summary(ref), case
    assert fast.tokens.equals(ref.tokens), case
    assert fast.read_latencies.tolist() == ref.read_latencies.tolist(), case


def test_compiled_step_equals_python_on_wrong_guesses(monkeypatch):
    """Longer runs with full caches and often-wrong predictors: the speculative budget
    (--prefetch-slots), reclaim of missed guesses and wasted prefetches all matter."""
    rng = random.Random(29)
    for i in range(16):
        trace = _trace(200 + i, 40, 4, 8, 2)
        hw = profile(
            latency=rng.choice([1e-5, 4e-5]),
            bw=rng.choice([8e8, 4e9]),
            channels=rng.choice([1, 4]),
            ffn_bps=rng.choice([3e8, 1.3e9]),
        )
        cfg = ReplayConfig(
            policy=rng.choice(POLICIES),
            cache_slots=rng.choice([6, 9, 12, 16]),
            scope=rng.choice(["global", "per-layer"]),
            predictor=rng.choice(
                ["markov", "popularity", "previous-token", "lookahead", "cooccur"]
            ),
            pipeline_depth=rng.choice([2, 3, 4]),
            prefetch_inflight=rng.choice([2, 8]),
            prefetch_slots=rng.choice([0, 1, 2, 3]),
            prefetch_reclaim=i % 2 == 0,
            prefetch_lead=rng.choice([1, 2]),
            prefetch_hold=rng.choice([0, 1, 3]),
        )
        opts = SimOptions(shape=SHAPE.name)
        fast = simulate(trace, cfg, hw, opts)
        ref = _python(monkeypatch, trace, cfg, hw, opts)
        assert fast.summary.extra["sim_path"] == "compiled"
        assert fast.stats.to_dict(per_layer=True) == ref.stats.to_dict(per_layer=True), (i, cfg)
        assert _summary(fast) == _summary(ref), (i, cfg)
        assert fast.tokens.equals(ref.tokens)


def test_compiled_step_equals_the_literal_simpy_engine():
    rng = random.Random(3)
    for i in range(4):
        trace, cfg, hw, opts = _random_case(rng, 100 + i)
        cfg.predictor = rng.choice(["oracle", "previous-token"])
        fast = simulate(trace, cfg, hw, opts)
        literal = simulate(
            trace, cfg, hw, SimOptions(mode=opts.mode, engine="simpy", shape=opts.shape)
        )
        assert fast.summary.extra["sim_path"] == "compiled"
        assert _summary(fast) == _summary(literal), (cfg, hw.name)
        assert sorted(fast.read_latencies.tolist()) == sorted(literal.read_latencies.tolist())


@pytest.mark.parametrize("predictor", ["oracle", "previous-token", "lookahead", "popularity"])
def test_vectorised_proposals_equal_the_rule_step_by_step(predictor):
    rng = random.Random(predictor)
    for i in range(12):
        k = rng.choice([1, 2, 3])
        trace = _trace(i, rng.choice([3, 9]), rng.choice([1, 2, 4]), 8, k)
        cfg = ReplayConfig(
            cache_slots=4,
            predictor=predictor,
            pipeline_depth=rng.choice([1, 2, 3, 6, 9]),
            prefetch_top_n=rng.choice([None, 1, 2, 5]),
            prefetch_lead=rng.choice([1, 2, 3]),
            prefetch_min_prob=rng.choice([0.0, 0.3, 0.6]),
        )
        assert Replay.from_trace(trace, cfg).predictor.predict_all(cfg.pipeline_depth) is not None
        fast = prefetch_proposals(Replay.from_trace(trace, cfg))
        # the reference: Replay.prefetch's own rule on the predictor's step-by-step answers
        rep = Replay.from_trace(trace, cfg)
        keys: list[int] = []
        targets: list[int] = []
        off = [0]
        for t in range(rep.n_steps):
            rep.predictor.observe(t, rep.steps[t])
            wanted, target = rep.proposals(t, rep.predictor.predict(t, cfg.pipeline_depth))
            keys += wanted
            targets += [target[x] for x in wanted]
            off.append(len(keys))
        assert fast is not None
        assert fast[0].tolist() == off
        assert fast[1].tolist() == keys
        assert fast[2].tolist() == targets


def test_what_the_compiled_path_leaves_to_python(monkeypatch):
    trace = _trace(0, 6, 2, 6, 2)
    hw = profile()
    opts = SimOptions(shape=SHAPE.name)
    for cfg in (
        ReplayConfig(policy="seed-lru-locality", cache_slots=4, predictor="oracle"),
        ReplayConfig(policy="opt", cache_slots=4, predictor="oracle"),
        ReplayConfig(policy="cycle", cache_slots=4, predictor="oracle"),
        ReplayConfig(cache_slots=4, predictor="oracle", granularity="lookup"),
    ):
        fast = simulate(trace, cfg, hw, opts)
        assert fast.summary.extra["sim_path"] == "python", cfg
    assert simulate(trace, ReplayConfig(cache_slots=4), hw, opts).summary.extra["sim_path"] == (
        "arrays"
    )
    simpy = simulate(
        trace,
        ReplayConfig(cache_slots=4, predictor="oracle"),
        hw,
        SimOptions(shape=SHAPE.name, engine="simpy"),
    )
    assert simpy.summary.extra["sim_path"] == "simpy"
