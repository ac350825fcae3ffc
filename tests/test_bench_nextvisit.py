"""bench/bench_nextvisit.py's online nearest-neighbour vote: held against a brute-force
restatement of its definition, and checked never to read the future."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_nextvisit", BENCH / "bench_nextvisit.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def random_picked(rng: np.random.Generator, T: int, L: int, E: int, k: int) -> np.ndarray:
    picked = np.zeros((T, L * E), dtype=bool)
    for t in range(T):
        for layer in range(L):
            # a few repeated tokens, so similarities vary
            src = t if t < 3 or rng.random() < 0.6 else int(rng.integers(0, 3))
            e = np.random.default_rng(src * 1000 + layer).choice(E, size=k, replace=False)
            picked[t, layer * E + e] = True
    return picked


def brute_vote(picked, L, tau, c, key, a, routed_only, beta, window, context=0.0):
    """The module doc's definition, one (step, key) at a time, with plain loops (with
    `context`, knnctx's: plus context x the picks of sigma - 1 and tau - 1 in common)."""
    E = picked.shape[1] // L
    lo = max(0, tau - window) if window else 0
    num = den = 0.0
    sims = []
    for sigma in range(lo, tau):
        succ = sigma + a
        if not (succ < tau or (succ == tau and routed_only)):
            continue
        shared = sum(int(picked[tau, j] and picked[sigma, j]) for j in range(L * E) if j // E <= c)
        if sigma >= 1:
            both = sum(int(picked[tau - 1, j] and picked[sigma - 1, j]) for j in range(L * E))
            shared += context * both
        sims.append((sigma, beta * shared))
    if not sims:
        return float(picked[0].sum()) / picked.shape[1]
    top = max(s for _, s in sims)
    for sigma, s in sims:
        w = math.exp(s - top)
        num += w * float(picked[sigma + a, key])
        den += w
    return num / den


@pytest.mark.parametrize(("window", "context"), [(0, 0.0), (3, 0.0), (0, 0.6), (3, 1.5)])
def test_votes_equal_brute_force(bench, window, context):
    rng = np.random.default_rng(7)
    T, L, E, k = 8, 3, 4, 2
    picked = random_picked(rng, T, L, E, k)
    votes = bench.knn_votes(picked, L, beta=0.7, window=window, visits=3, context=context)
    assert sorted(votes) == [(1, False), (1, True), (2, False), (2, True), (3, True)]
    for (a, is_routed), v in votes.items():
        for tau in range(T):
            for c in range(L):
                for key in range(L * E):
                    got = v[tau * L + c, key]
                    if (key // E <= c) != is_routed:
                        assert got == 0.0  # the other group of layers
                        continue
                    want = brute_vote(picked, L, tau, c, key, a, is_routed, 0.7, window, context)
                    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("context", [0.0, 0.5])
def test_votes_never_read_the_future(bench, context):
    """Two routings equal up to step (tau, c) and different after: every vote up to that
    step is the same."""
    rng = np.random.default_rng(3)
    T, L, E, k = 10, 4, 4, 2
    a = random_picked(rng, T, L, E, k)
    fork_tok, fork_layer = 6, 2  # the routings differ from layer 2 of token 6 on
    b = a.copy()
    b[fork_tok, fork_layer * E :] = np.roll(a[fork_tok, fork_layer * E :], 1)
    b[fork_tok + 1 :] = np.roll(a[fork_tok + 1 :], 3, axis=1)
    assert (a != b).any()
    va = bench.knn_votes(a, L, beta=0.5, visits=3, context=context)
    vb = bench.knn_votes(b, L, beta=0.5, visits=3, context=context)
    upto = fork_tok * L + fork_layer  # step index of the first step that differs
    for g in va:
        x, y = va[g], vb[g]
        np.testing.assert_array_equal(x[:upto], y[:upto])
        assert (x[upto:] != y[upto:]).any()  # the check can fail: later votes do move
