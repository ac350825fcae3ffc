"""Predictors against hand-derived expectations and brute-force counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.core import ReplayContext, make_predictor
from mer.core.predictors import evaluate
from mer.errors import BadInput
from mer.traces.format import TraceMeta, from_arrays, write_trace


def ctx_for(steps, n_layers, n_experts, lookahead=None):
    steps = np.asarray(steps, dtype=np.int32)
    return ReplayContext(n_layers, n_experts, steps.shape[1], steps, lookahead)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n_tokens=st.integers(2, 12))
def test_markov_first_order_matches_brute_force(seed, n_tokens):
    rng = np.random.default_rng(seed)
    n_layers, n_experts, k, alpha = 2, 4, 2, 0.5
    rows = []
    for _ in range(n_tokens):
        for layer in range(n_layers):
            rows.append([layer * n_experts + int(e) for e in rng.choice(n_experts, k, False)])
    ctx = ctx_for(rows, n_layers, n_experts)
    pred = make_predictor("markov", ctx, alpha=alpha)
    t_last = len(rows) - 2
    for t in range(t_last + 1):
        pred.observe(t, ctx.steps[t])
    (got,) = pred.predict(t_last, 1)
    # Brute force: c(a->b) over consecutive steps up to t_last, c(a) = times a had a successor.
    layer = (t_last + 1) % n_layers
    cands = range(layer * n_experts, (layer + 1) * n_experts)
    score = {}
    for b in cands:
        qs = []
        for a in rows[t_last]:
            c_ab = sum(1 for t in range(t_last) if a in rows[t] and b in rows[t + 1])
            c_a = sum(1 for t in range(t_last) if a in rows[t])
            qs.append((c_ab + alpha) / (k * c_a + alpha * n_experts))
        score[b] = np.mean(qs)
    total = sum(score.values())
    want = {b: min(1.0, k * s / total) for b, s in score.items()}
    assert {b for b, _ in got} == set(cands)
    for b, p in got:
        assert p == pytest.approx(want[b], rel=1e-9)
    probs = [p for _, p in got]
    assert probs == sorted(probs, reverse=True)


def test_markov_warm_start_counts_the_other_trace(tmp_path):
    experts = np.array([[[0, 1], [2, 3]]] * 5)  # layer 0 {0,1} -> layer 1 {2,3}, always
    meta = TraceMeta(model="toy", n_layers=2, n_experts=4, top_k=2)
    path = tmp_path / "warm.parquet"
    write_trace(from_arrays(experts, meta), path)
    steps = np.array([[0, 1], [6, 7]], dtype=np.int32)
    pred = make_predictor("markov", ctx_for(steps, 2, 4), alpha=0.0, warm=str(path))
    pred.observe(0, steps[0])
    (got,) = pred.predict(0, 1)
    assert {b for b, p in got if p > 0} == {6, 7}  # experts 2, 3 of layer 1
    bad = TraceMeta(model="toy", n_layers=1, n_experts=4, top_k=2)
    write_trace(from_arrays(experts[:, :1], bad), tmp_path / "bad.parquet")
    with pytest.raises(BadInput):
        make_predictor("markov", ctx_for(steps, 2, 4), warm=str(tmp_path / "bad.parquet"))


def test_popularity_ranks_by_count_per_layer():
    steps = [[0, 1], [4, 5], [0, 2], [4, 6], [0, 1], [5, 6]]
    ctx = ctx_for(steps, 2, 4)
    pred = make_predictor("popularity", ctx)
    for t in range(4):
        pred.observe(t, ctx.steps[t])
    # After t = 3 the next step (t = 4) is layer 0: counts 0:2, 1:1, 2:1 over 2 steps.
    (got,) = pred.predict(3, 1)
    assert got == [(0, 1.0), (1, 0.5), (2, 0.5)]


def test_lookahead_reads_the_column_and_refuses_without_it():
    steps = [[0, 1], [4, 5], [2, 3]]
    la = np.array([[0, 1], [6, 7], [1, 2]], dtype=np.int32)
    pred = make_predictor("lookahead", ctx_for(steps, 2, 4, la))
    assert pred.predict(0, 2) == [[(6, 1.0), (7, 1.0)], []]
    assert pred.predict(2, 1) == []
    with pytest.raises(BadInput):
        make_predictor("lookahead", ctx_for(steps, 2, 4))


def test_evaluate_precision_and_recall_by_hand():
    # previous-token with 1 layer predicts step t+1 = step t.
    steps = np.array([[0, 1], [0, 2], [3, 2]], dtype=np.int32)
    res = evaluate(make_predictor("previous-token", ctx_for(steps, 1, 4)), steps, 1)[0]
    # t=0 -> {0,1} vs {0,2}: 1 right; t=1 -> {0,2} vs {3,2}: 1 right.
    assert (res["true_positives"], res["predicted"], res["true"]) == (2, 4, 4)
    assert res["precision"] == 0.5 and res["recall"] == 0.5


def test_cooccur_near_weights_match_a_per_layer_brute_force() -> None:
    """With `near`, a same-token score is beta_prev * ev_prev + sum over the token's routed
    layers j of (beta + near * decay^(d-1)) * (layer j's log likelihood ratio), d = the
    distance from j to the target layer: recomputed here from the predictor's tables."""
    import numpy as np

    from mer.core.cooccur import CooccurPredictor
    from mer.core.predictor import ReplayContext

    L, E, K = 6, 5, 2
    rng = np.random.default_rng(3)
    steps = np.asarray(
        [
            [layer * E + int(e) for e in rng.choice(E, K, replace=False)]
            for _ in range(9)
            for layer in range(L)
        ],
        dtype=np.int32,
    )
    ctx = ReplayContext(L, E, K, steps, None)
    beta, beta_prev, near, decay = 0.3, 0.2, 0.7, 0.5
    p = CooccurPredictor(ctx, beta=beta, beta_prev=beta_prev, near=near, near_decay=decay)
    for t in range(len(steps) - 1):
        p.observe(t, steps[t])
        layer = t % L
        if layer == L - 1:
            continue
        tok = t // L
        x = np.zeros(L * E)
        x[steps[tok * L : t + 1].reshape(-1)] = 1.0
        for lu in range(layer + 1, L):
            blk = slice(lu * E, (lu + 1) * E)
            want = p.logit_prior[blk] + beta_prev * p._ev_prev[blk]
            for j in range(layer + 1):
                bj = slice(j * E, (j + 1) * E)
                ev = x[bj] @ p.W1[bj, blk] + (1 - x[bj]) @ p.W0[bj, blk]
                want = want + (beta + near * decay ** (lu - j - 1)) * ev
            np.testing.assert_allclose(p.log_odds(t, tok * L + lu), want, rtol=1e-9, atol=1e-9)
        for row in p.predict(t, L - 1 - layer):  # best first
            probs = [prob for _, prob in row]
            assert probs == sorted(probs, reverse=True)
