"""cotoken's compiled twin (mer/native/replay.c) against the Python class, decision by decision.

The reference is the Python class under the core's general path
(`replay_counts(..., fast=False)`); every lookup's outcome (hit, miss into a slot,
bypass) and every eviction, in order, must be the same as the compiled loop's
(`run_pass(outcome=True, victims=True)`), on the bundled trace and on random
traces with random weights, including traces whose steps do not follow the layer
cycle (the naive-Bayes model's token boundaries then fall where Python puts them).
Counters per layer and final residents at every size are the property tests of
tests/test_replay_native.py.
"""

from __future__ import annotations

import decisions_kit
import numpy as np
import pytest

from mer import native
from mer.core import ReplayConfig
from mer.core.cotoken import FEATURES, Cotoken

pytestmark = pytest.mark.skipif(
    native.load("replay") is None, reason="the compiled replays do not build here"
)


def assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch):
    return decisions_kit.assert_same_decisions(
        Cotoken, steps, n_layers, n_experts, cfg, monkeypatch
    )


def random_weights(rng):
    w = rng.normal(0, 1, len(FEATURES)).round(3)
    return {
        **{f"w{i}": float(v) for i, v in enumerate(w)},
        "rate_mid": float(rng.choice([0.1, 0.5])),
        "prior": float(rng.choice([0.5, 3.0])),
        "alpha": float(rng.choice([0.25, 1.0])),
    }


@pytest.mark.skipif(
    not decisions_kit.BUNDLED.exists(), reason="the bundled trace is not in this checkout"
)
@pytest.mark.parametrize(("slots", "scope"), [(64, "global"), (128, "global"), (96, "per-layer")])
def test_bundled_trace_decision_by_decision(slots, scope, monkeypatch):
    decisions_kit.bundled_trace_same_decisions(Cotoken, slots, scope, monkeypatch)


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_random_weights_decision_by_decision(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(2, 6))
    n_experts = int(rng.choice([4, 8, 70]))
    k = int(rng.integers(1, 4))
    n_tokens = int(rng.integers(40, 120))
    pop = rng.dirichlet(np.full(n_experts, 0.5), size=n_layers)
    if seed % 2:  # layers in the cycle, each token repeating its predecessor half the time
        layers = np.tile(np.arange(n_layers), n_tokens)
    else:  # layers in any order: token boundaries only where layer 0 comes round
        layers = rng.integers(0, n_layers, size=n_tokens * n_layers)
    rows = [
        [
            int(layer) * n_experts + int(e)
            for e in rng.choice(n_experts, k, replace=False, p=pop[layer])
        ]
        for layer in layers
    ]
    steps = np.asarray(rows, dtype=np.int32)
    params = random_weights(rng)
    seen = np.zeros(2, dtype=np.int64)
    for slots, scope in (
        (max(2, k), "global"),
        (n_layers * n_experts // 3, "global"),
        (n_layers * 3, "per-layer"),
    ):
        cfg = ReplayConfig(policy="cotoken", cache_slots=slots, scope=scope, policy_params=params)
        seen += assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch)
    assert (seen > 0).all()  # hits and evictions were compared


@pytest.mark.parametrize("seed", range(3))
def test_every_size_side_by_side_equals_per_size_python(seed):
    # `mer mrc`'s pass: all sizes in one read of the trace, where the compiled loop ranks
    # every key once per step and each cache takes its first resident in that order.
    rng = np.random.default_rng(100 + seed)
    n_layers, n_experts, k = 3, 6, 2
    pop = rng.dirichlet(np.full(n_experts, 0.5), size=n_layers)
    rows = [
        [layer * n_experts + int(e) for e in rng.choice(n_experts, k, replace=False, p=pop[layer])]
        for _ in range(60)
        for layer in range(n_layers)
    ]
    steps = np.asarray(rows, dtype=np.int32)
    params = random_weights(rng) if seed else {}
    decisions_kit.side_by_side_equals_python("cotoken", steps, n_layers, n_experts, params)


@pytest.mark.skipif(native.load("simstep") is None, reason="the compiled step does not build")
def test_prefetch_on_compiled_step_equals_the_python_step(monkeypatch):
    # The simulator's compiled prefetch-on loop drives the same hooks at other moments
    # (victims for prefetches, reclaim of missed guesses, a speculative budget); every
    # counter, the summary, the per-token table and the read latencies must equal the
    # Python step loop's.
    import random
    from dataclasses import replace

    from test_sim_model import SHAPE, profile
    from test_simstep_native import _python, _random_case, _trace, assert_same_run

    from mer.sim.model import SimOptions, simulate

    rng = random.Random(41)
    cases = [_random_case(rng, i) for i in range(14)]
    for i in range(6):  # longer, full caches, often-wrong guesses
        cfg = ReplayConfig(
            policy="cotoken",
            cache_slots=rng.choice([6, 9, 12]),
            scope=rng.choice(["global", "per-layer"]),
            predictor=rng.choice(["markov", "popularity", "previous-token", "cooccur"]),
            pipeline_depth=rng.choice([2, 3]),
            prefetch_inflight=rng.choice([2, 8]),
            prefetch_slots=rng.choice([0, 2]),
            prefetch_reclaim=i % 2 == 0,
        )
        cases.append((_trace(300 + i, 40, 4, 8, 2), cfg, profile(), SimOptions(shape=SHAPE.name)))
    ran = 0
    for trace, cfg, hw, opts in cases:
        cfg = replace(
            cfg, policy="cotoken", policy_params=random_weights(np.random.default_rng(ran))
        )
        fast = simulate(trace, cfg, hw, opts)
        ref = _python(monkeypatch, trace, cfg, hw, opts)
        ran += fast.summary.extra["sim_path"] == "compiled"
        assert_same_run(fast, ref, cfg)
    assert ran >= 12


def test_simulate_and_mrc_take_the_compiled_paths():
    from test_sim_model import SHAPE, profile
    from test_simstep_native import _trace

    from mer.sim.model import SimOptions, simulate
    from mer.sim.mrc import MRCRequest, _kind, default_policies

    trace = _trace(5, 8, 3, 6, 2)
    opts = SimOptions(shape=SHAPE.name)
    off = simulate(trace, ReplayConfig(policy="cotoken", cache_slots=5), profile(), opts)
    assert off.summary.extra["sim_path"] == "arrays"
    assert "cotoken" in default_policies(32)
    assert _kind(MRCRequest(policies=["cotoken"]), "cotoken") == "compiled"


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_exact_ties_at_every_size_decision_by_decision(scope, monkeypatch):
    # The table bounds that spare a key its log1p meet scores equal to the best so far
    # instead of above it.
    decisions_kit.exact_ties_same_decisions(Cotoken, scope, {}, monkeypatch)
