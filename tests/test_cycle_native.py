"""cycle's compiled twin (mer/native/replay.c) against the Python class, decision by decision.

The compiled loop first knows each score only within bounds (its logarithms from a
table) and computes the exact score, with libm as Python does, only where the bounds
cannot settle a comparison; it reads the layers visited last first and stops where no
other layer can be lower. These tests hold every lookup's outcome and every eviction,
in order, equal to the Python class's (tests/decisions_kit.py) where that matters: the
bundled trace under the default weights, random weights of either sign (every term on),
exact ties (settled by the exact values and the tie rule), weights too large for bounds,
more than 64 experts a layer, the duel, and every size side by side.
"""

from __future__ import annotations

import decisions_kit
import numpy as np
import pytest

from mer import native
from mer.core import ReplayConfig
from mer.core.cycle import FEATURES, Cycle

pytestmark = pytest.mark.skipif(
    native.load("replay") is None, reason="the compiled replays do not build here"
)


def assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch):
    return decisions_kit.assert_same_decisions(Cycle, steps, n_layers, n_experts, cfg, monkeypatch)


def random_weights(rng, duel=0):
    w = rng.normal(0, 1, len(FEATURES)).round(3)
    return {
        **{f"w{i}": float(v) for i, v in enumerate(w)},
        "prior": float(rng.choice([0.5, 3.0])),
        "rate_mid": float(rng.choice([0.1, 0.5])),
        "duel": duel,
    }


def cycle_trace(rng, n_layers, n_experts, k, n_tokens, repeat=0.5):
    """Layers in the cycle; each token repeats its predecessor's pick with prob. `repeat`."""
    pop = rng.dirichlet(np.full(n_experts, 0.5), size=n_layers)
    rows, prev = [], {}
    for _ in range(n_tokens):
        for layer in range(n_layers):
            if layer in prev and rng.random() < repeat:
                pick = prev[layer]
            else:
                pick = [int(e) for e in rng.choice(n_experts, k, replace=False, p=pop[layer])]
            prev[layer] = pick
            rows.append([layer * n_experts + e for e in pick])
    return np.asarray(rows, dtype=np.int32)


@pytest.mark.skipif(
    not decisions_kit.BUNDLED.exists(), reason="the bundled trace is not in this checkout"
)
@pytest.mark.parametrize(("slots", "scope"), [(64, "global"), (128, "global"), (96, "per-layer")])
def test_bundled_trace_decision_by_decision(slots, scope, monkeypatch):
    decisions_kit.bundled_trace_same_decisions(Cycle, slots, scope, monkeypatch)


@pytest.mark.parametrize("seed", range(8))
def test_random_traces_random_weights_decision_by_decision(seed, monkeypatch):
    # Odd seeds: the default weights (the compiled loop's lean bounds); even: random ones
    # of either sign with every term on. Seeds 2 and 3 take the duel; 70 experts a layer
    # are past the bit masks.
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(1, 6))
    n_experts = int(rng.choice([4, 8, 8, 70]))
    k = int(rng.integers(1, 4))
    steps = cycle_trace(rng, n_layers, n_experts, k, int(rng.integers(40, 120)))
    duel = int(seed in (2, 3))
    params = random_weights(rng, duel) if seed % 2 == 0 else {"duel": duel}
    seen = np.zeros(2, dtype=np.int64)
    for slots, scope in (
        (max(2, k), "global"),
        (n_layers * n_experts // 3, "global"),
        (n_layers * 3, "per-layer"),
    ):
        cfg = ReplayConfig(policy="cycle", cache_slots=slots, scope=scope, policy_params=params)
        seen += assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch)
    assert (seen > 0).all()  # hits and evictions were compared


@pytest.mark.parametrize("scope", ["global", "per-layer"])
@pytest.mark.parametrize("duel", [0, 1])
def test_exact_ties_at_every_size_decision_by_decision(scope, duel, monkeypatch):
    # Scores tie exactly within a layer and across layers at equal distance: the bounds
    # overlap, and the exact values and the tie rule decide.
    decisions_kit.exact_ties_same_decisions(Cycle, scope, {"duel": duel}, monkeypatch)


@pytest.mark.parametrize("big", [1e150, -1e150])
def test_weights_beyond_the_bounds_decide_exactly(big, monkeypatch):
    # Past 1e100 a weight's bounds could overflow: the compiled loop then computes every
    # score exactly and decides as written.
    rng = np.random.default_rng(5)
    steps = cycle_trace(rng, 3, 8, 2, 60)
    params = {"w6": big, "w2": 0.3}
    for slots, scope in ((6, "global"), (12, "global"), (9, "per-layer")):
        cfg = ReplayConfig(policy="cycle", cache_slots=slots, scope=scope, policy_params=params)
        assert_same_decisions(steps, 3, 8, cfg, monkeypatch)


@pytest.mark.parametrize("seed", range(3))
def test_every_size_side_by_side_equals_per_size_python(seed):
    # `mer mrc`'s pass: every size in one read of the trace, the features shared and each
    # cache's candidates its own.
    rng = np.random.default_rng(200 + seed)
    steps = cycle_trace(rng, 3, 6, 2, 60)
    params = random_weights(rng) if seed else {}
    decisions_kit.side_by_side_equals_python("cycle", steps, 3, 6, params)
