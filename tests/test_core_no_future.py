"""Online policies and predictors never read the future.

Two traces share their first t0 steps and then differ. Every decision the core
takes up to step t0 - 1 (hits, reads, slots, victims, prefetches) must be the
same on both. The offline ones (OPT, the oracle) are run too, to show that the
check can fail: they do change their early decisions when the future changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.core import Replay, ReplayConfig, policy_names, predictor_names
from mer.core.policy import POLICIES
from mer.core.predictor import PREDICTORS

L, E, K = 4, 6, 2


def _trace(rng, n_tokens):
    p = rng.random(E) ** 2 + 0.05
    return np.asarray(
        [
            [layer * E + int(e) for e in rng.choice(E, K, replace=False, p=p / p.sum())]
            for _ in range(n_tokens)
            for layer in range(L)
        ],
        dtype=np.int32,
    )


def _decisions(steps, lookahead, cfg, upto):
    """Every decision of steps 0 .. upto-1, reads completing at once."""
    rep = Replay(steps, n_layers=L, n_experts=E, config=cfg, lookahead=lookahead)
    out = []
    for t in range(upto):
        res = rep.step(t)
        reads = [(a.key, a.slot, a.evicted) for a in res.reads]
        for a in res.reads:
            rep.complete(a.key)
        pfs = [(a.key, a.slot, a.evicted) for a in rep.prefetch(t)]
        for key, _, _ in pfs:
            rep.complete(key)
        out.append((res.hit, res.late, reads, pfs))
    return out


def _pairs(n_pairs=6, n_tokens=14):
    rng = np.random.default_rng(11)
    for _ in range(n_pairs):
        a = _trace(rng, n_tokens)
        t0 = int(rng.integers(L, len(a) - L))
        b = a.copy()
        b[t0:] = _trace(rng, n_tokens)[t0:]
        la_a = _trace(rng, n_tokens)
        la_b = la_a.copy()
        # lookahead row u is the prediction of step u made at step u - 1: known before t0
        la_b[t0 + 1 :] = _trace(rng, n_tokens)[t0 + 1 :]
        yield a, b, la_a, la_b, t0


def _same_past(cfg):
    changed = 0
    for a, b, la_a, la_b, t0 in _pairs():
        da = _decisions(a, la_a, cfg, t0)
        db = _decisions(b, la_b, cfg, t0)
        changed += da != db
    return changed


@pytest.mark.parametrize("policy", [p for p in policy_names() if not POLICIES[p].needs_future])
@pytest.mark.parametrize("slots", [5, 9, 16])
def test_online_policies_ignore_the_future(policy, slots):
    for scope in ("global", "per-layer"):
        cfg = ReplayConfig(policy=policy, cache_slots=slots, scope=scope)
        assert _same_past(cfg) == 0, (policy, scope)


@pytest.mark.parametrize(
    "predictor", [p for p in predictor_names() if p != "none" and not PREDICTORS[p].offline]
)
def test_online_predictors_ignore_the_future(predictor):
    for policy in ("lru", "cycle"):
        cfg = ReplayConfig(policy=policy, cache_slots=12, predictor=predictor, pipeline_depth=3)
        assert _same_past(cfg) == 0, (predictor, policy)


def test_the_check_catches_what_reads_the_future():
    assert _same_past(ReplayConfig(policy="opt", cache_slots=9)) > 0
    oracle = ReplayConfig(policy="lru", cache_slots=12, predictor="oracle", pipeline_depth=3)
    assert _same_past(oracle) > 0


def test_window_order_ignores_the_future():
    """--prefetch-window reorders guesses by their probability, computed from the past."""
    cfg = ReplayConfig(
        policy="cycle",
        cache_slots=12,
        predictor="cooccur",
        predictor_params={"beta": 0.4, "beta_prev": 0.1, "near": 0.3},
        pipeline_depth=6,
        prefetch_min_prob=0.3,
        prefetch_top_n=2,
        prefetch_inflight=1,
        prefetch_lead=2,
        prefetch_hold=3,
        prefetch_window=2,
    )
    assert _same_past(cfg) == 0


@pytest.mark.parametrize(
    "params",
    [
        {"beta": 0.4, "beta_prev": 0.1, "near": 0.5, "near_decay": 0.6},
        {"beta": 0.4, "beta_prev": 0.1, "near": 1.0, "near_decay": 1.0},
    ],
)
def test_cooccur_distance_weights_ignore_the_future(params):
    cfg = ReplayConfig(
        policy="cycle",
        cache_slots=12,
        predictor="cooccur",
        predictor_params=params,
        pipeline_depth=6,
        prefetch_min_prob=0.3,
    )
    assert _same_past(cfg) == 0
