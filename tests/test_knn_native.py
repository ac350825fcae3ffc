"""knn's compiled twin (mer/native/replay.c) against the Python class, decision by decision.

The reference is the Python class `mer.core.knn.Knn` under the core's general path
(`replay_counts(..., fast=False)`); every lookup's outcome (hit, miss into a slot,
bypass) and every eviction, in order, must be the compiled loop's
(`run_pass(outcome=True, victims=True)`): on the bundled trace (real routing), on
random traces whose text repeats itself (so the votes matter) with random weights,
betas, windows and visit counts, on traces whose steps leave the layer cycle, at
every size side by side (`mer mrc`'s pass), and on exact ties.
"""

from __future__ import annotations

import decisions_kit
import numpy as np
import pytest

from mer import native
from mer.core import Replay, ReplayConfig, replay_counts
from mer.core.knn import WEIGHT_NAMES, Knn

pytestmark = pytest.mark.skipif(
    native.load("replay") is None, reason="the compiled replays do not build here"
)


def assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch):
    return decisions_kit.assert_same_decisions(Knn, steps, n_layers, n_experts, cfg, monkeypatch)


def random_params(rng):
    return {
        **{
            n: float(v)
            for n, v in zip(WEIGHT_NAMES, rng.normal(0, 0.8, len(WEIGHT_NAMES)), strict=True)
        },
        "beta": float(rng.choice([-0.4, 0.5, 1.7])),
        "window": int(rng.choice([0, 0, 3, 11])),
        "visits": int(rng.integers(1, 4)),
        "prior": float(rng.choice([0.5, 3.0])),
        "alpha": float(rng.choice([0.25, 1.0])),
    }


def repeating(rng, n_tokens, n_layers, n_experts, k, in_cycle=True):
    """Steps whose tokens often copy an earlier token's routing (text repeating itself)."""
    pop = rng.dirichlet(np.full(n_experts, 0.5), size=n_layers)
    picks = []
    for t in range(n_tokens):
        if t > 3 and rng.random() < 0.5:
            picks.append(picks[int(rng.integers(0, t))])
        else:
            picks.append(
                [rng.choice(n_experts, k, replace=False, p=pop[layer]) for layer in range(n_layers)]
            )
    if in_cycle:
        order = [(t, layer) for t in range(n_tokens) for layer in range(n_layers)]
    else:  # layers in any order: knn's tokens end wherever the layer goes down
        order = [(t, int(rng.integers(0, n_layers))) for t in range(n_tokens) for _ in range(2)]
    rows = [[layer * n_experts + int(e) for e in picks[t][layer]] for t, layer in order]
    return np.asarray(rows, dtype=np.int32)


@pytest.mark.skipif(
    not decisions_kit.BUNDLED.exists(), reason="the bundled trace is not in this checkout"
)
@pytest.mark.parametrize(("slots", "scope"), [(64, "global"), (160, "global"), (96, "per-layer")])
def test_bundled_trace_decision_by_decision(slots, scope, monkeypatch):
    decisions_kit.bundled_trace_same_decisions(Knn, slots, scope, monkeypatch)


@pytest.mark.parametrize("seed", range(8))
def test_random_traces_random_params_decision_by_decision(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(2, 6))
    n_experts = int(rng.choice([4, 8, 30]))
    k = int(rng.integers(1, 4))
    steps = repeating(rng, int(rng.integers(30, 80)), n_layers, n_experts, k, seed % 3 != 2)
    params = random_params(rng)
    seen = np.zeros(2, dtype=np.int64)
    for slots, scope in (
        (max(2, k), "global"),
        (n_layers * n_experts // 3, "global"),
        (n_layers * n_experts * 2 // 3, "global"),
        (n_layers * 3, "per-layer"),
    ):
        cfg = ReplayConfig(policy="knn", cache_slots=slots, scope=scope, policy_params=params)
        seen += assert_same_decisions(steps, n_layers, n_experts, cfg, monkeypatch)
    assert (seen > 0).all()  # hits and evictions were compared


@pytest.mark.parametrize("seed", range(2))
def test_every_size_side_by_side_equals_per_size_python(seed):
    # `mer mrc`'s pass: every size in one read, each cache taking its first resident in
    # the step's ranking of every key.
    rng = np.random.default_rng(200 + seed)
    steps = repeating(rng, 30, 3, 5, 2)
    params = random_params(rng) if seed else {}
    decisions_kit.side_by_side_equals_python("knn", steps, 3, 5, params)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_exact_ties_at_every_size_decision_by_decision(scope, monkeypatch):
    decisions_kit.exact_ties_same_decisions(Knn, scope, {}, monkeypatch)


def test_the_core_runs_knn_compiled_and_counts_equal_python():
    rng = np.random.default_rng(5)
    steps = repeating(rng, 40, 4, 8, 2)
    got = []
    for kw in ({"engine": "c"}, {"fast": False}):
        cfg = ReplayConfig(policy="knn", cache_slots=12)
        rep = Replay(steps, n_layers=4, n_experts=8, config=cfg)
        got.append((replay_counts(rep, **kw).to_dict(per_layer=True), rep.cache.resident_keys()))
    assert got[0] == got[1]


def test_simulate_and_mrc_take_the_compiled_paths():
    # A prefetch-off simulation times the compiled loop's per-lookup outcomes ("arrays"),
    # and `mer mrc` draws knn with its twin when named (not by default: its cost grows
    # with the trace); the simulator's counts are
    # the Python class's. (The prefetch-on compiled step, mer/native/simstep, does not
    # run knn yet: it takes the Python step loop there.)
    from test_sim_model import SHAPE, profile
    from test_simstep_native import _trace

    from mer.sim.model import SimOptions, simulate
    from mer.sim.mrc import MRCRequest, _kind, default_policies

    trace = _trace(5, 30, 4, 8, 2)
    cfg = ReplayConfig(policy="knn", cache_slots=9)
    off = simulate(trace, cfg, profile(), SimOptions(shape=SHAPE.name))
    assert off.summary.extra["sim_path"] == "arrays"
    ref = replay_counts(Replay.from_trace(trace, cfg), fast=False)
    assert int(off.summary.hits) == ref.total("hits")
    assert "knn" not in default_policies(32)
    assert _kind(MRCRequest(policies=["knn"]), "knn") == "compiled"
