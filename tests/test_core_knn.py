"""The `knn` policy against bench/bench_nextvisit.py's restatement of the model.

The bench computes the votes for a whole trace at once, token by token, from the
picks matrix (and is itself held against a brute-force loop in
tests/test_bench_nextvisit.py); cotoken's features come from its own tested
class. Here the policy's incremental state must give the same score for every
key at every step, and the cache driven by it the same hits as the bench's
plain replay of the victim rule (step keys protected, lowest score evicted).
Never reading the future is checked for every registered policy in
tests/test_core_no_future.py; equal counts in the engine in tests/test_engine_run.py.
"""

from __future__ import annotations

import numpy as np
import pytest

# the bench module as a fixture (its votes are held against brute force there)
from test_bench_nextvisit import bench  # noqa: F401

from mer.core import Replay, ReplayConfig, replay_counts
from mer.core.knn import (
    MAX_VISITS,
    N_WEIGHTS,
    WEIGHT_NAMES,
    Knn,
    KnnCtx,
    fit_weights,
    training_rows,
)
from mer.errors import BadInput
from mer.sim.tune import tune_policy
from mer.traces.format import TraceMeta, from_arrays


def repeating_steps(seed: int, n_tokens: int, L: int, E: int, k: int) -> np.ndarray:
    """Steps in layer order with text that repeats (tokens copied from earlier ones)."""
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    for t in range(n_tokens):
        src = t if t < 4 or rng.random() < 0.5 else int(rng.integers(0, 4))
        for layer in range(L):
            g = np.random.default_rng(src * 101 + layer)
            rows.append([layer * E + int(e) for e in g.choice(E, k, replace=False)])
    return np.asarray(rows, dtype=np.int64)


def random_weights(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {n: float(rng.normal(0, 0.6)) for n in WEIGHT_NAMES}


def bench_scores(mods, steps, L, E, w, beta, window, visits, context=0.0):
    """The bench's score matrix (n_steps, n_keys): the hit density over `visits` visits."""
    nv = mods
    data = nv.prepare(steps, L, E, beta, window, MAX_VISITS, context)
    d = data["d"]
    dens = np.zeros_like(d)
    for j in range(1, visits + 1):
        wj = np.array([w[f"w{j}_{i}"] for i in range(N_WEIGHTS[j - 1])])
        z = data[f"knn{j}"].astype(np.float64) @ wj
        dens += 1.0 / (1.0 + np.exp(-z)) / (d + (j - 1) * L)
    return np.log(dens)


@pytest.mark.parametrize(
    ("beta", "window", "visits", "context"),
    [(0.5, 0, 3, 0.0), (1.3, 3, 2, 0.0), (0.7, 0, 1, 0.0), (0.5, 0, 3, 0.5), (0.9, 4, 3, 1.7)],
)
def test_scores_equal_the_bench_model(bench, beta, window, visits, context):  # noqa: F811
    L, E, k = 4, 6, 2
    steps = repeating_steps(5, 14, L, E, k)
    w = random_weights(1)
    want = bench_scores(bench, steps, L, E, w, beta, window, visits, context)
    kw = {"context": context} if context else {}
    pol = (KnnCtx if context else Knn)(4, **w, beta=beta, window=window, visits=visits, **kw)
    pol.attach_keyspace(L * E)
    pol.attach_geometry(L, E)
    for t, keys in enumerate(steps.tolist()):
        pol.begin_step(t, keys)
        # the bench stores features in float32
        np.testing.assert_allclose(pol.scores(), want[t], rtol=0, atol=2e-5)


@pytest.mark.parametrize(("cap", "policy"), [(5, "knn"), (9, "knn"), (14, "knn"), (9, "knnctx")])
def test_hits_equal_the_bench_replay(bench, cap, policy):  # noqa: F811
    L, E, k = 4, 6, 2
    steps = repeating_steps(9, 18, L, E, k)
    w = random_weights(4)
    context = KnnCtx.default_context if policy == "knnctx" else 0.0
    score = bench_scores(bench, steps, L, E, w, 0.5, 0, 3, context)
    want, _ = bench.replay(steps, score, cap)
    cfg = ReplayConfig(policy=policy, cache_slots=cap, scope="global", policy_params=w)
    rep = Replay(steps.astype(np.int32), n_layers=L, n_experts=E, config=cfg)
    assert replay_counts(rep).total("hits") == want


def test_per_layer_votes_stay_at_the_prior():
    """A partition of one layer has no token to match: every vote is k / E."""
    L, E, k = 3, 4, 2
    steps = repeating_steps(2, 6, L, E, k)
    pol = Knn(2)
    pol.attach_keyspace(E)
    pol.attach_geometry(L, E)
    for t, keys in enumerate(steps.tolist()):
        if keys[0] // E != 1:
            continue
        pol.begin_step(t, keys)
        X, _ = pol.visit_features()
        assert len(X) == MAX_VISITS
        prior = np.log(k / E + 0.02)
        routed = np.arange(L * E) // E <= 1
        np.testing.assert_allclose(X[0][routed, 9], prior)
        np.testing.assert_allclose(X[1][~routed, 10], prior)


def test_bad_parameters_are_bad_input():
    with pytest.raises(BadInput, match="w1_0"):
        Knn(4, w0=1.0)
    with pytest.raises(BadInput, match="visits"):
        Knn(4, visits=4)
    with pytest.raises(BadInput, match="window"):
        Knn(4, window=-1)
    with pytest.raises(BadInput, match="context"):
        Knn(4, context=0.5)  # knn has no context term: knnctx has
    with pytest.raises(BadInput, match="context"):
        KnnCtx(4, context=float("inf"))


def test_fit_rows_answer_the_jth_visit():
    """training_rows' y for visit j is "the key's layer, visited the j-th time after
    step t, picks it", restated with loops over the steps; `mer tune` writes every
    weight and names its trace."""
    L, E, k = 3, 5, 2
    steps = repeating_steps(3, 16, L, E, k)
    stride = 2
    rows = training_rows(steps, L, E, stride=stride)
    sampled = [t for t in range(len(steps)) if t % stride == 0 and t >= L]
    for j in range(MAX_VISITS):
        want = []
        for t in sampled:
            for key in range(L * E):
                layer = key // E
                later = [u for u in range(t + 1, len(steps)) if steps[u][0] // E == layer]
                if len(later) > j:
                    want.append(float(key in steps[later[j]]))
        np.testing.assert_array_equal(rows[j][1], want)
        assert rows[j][0].shape == (len(want), N_WEIGHTS[j])
    params, diag = fit_weights([(steps, L, E)])
    assert set(params) == set(WEIGHT_NAMES)
    assert diag["visit1"]["log_likelihood"] > diag["visit1"]["log_likelihood_constant"]
    meta = TraceMeta(model="t", n_layers=L, n_experts=E, top_k=k, source={})
    tr = from_arrays((steps % E).reshape(-1, L, k), meta, name="rep")
    tuned = tune_policy("knn", [("rep.parquet", tr)], sizes=(4, 8))
    assert set(tuned.params) == set(WEIGHT_NAMES)
    assert tuned.tuned_on[0].name == "rep.parquet"
