"""The two LRU figures of the bundled trace, each against an LRU written out here.

`mer trace stats` counts lookups one at a time (Mattson's reuse distance);
`mer mrc` counts steps (a token-layer's top-k looked up together, never evicting
each other). docs/policies.md, "Hit rates", quotes 28.59% and 32.70% at 64 slots.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import mer
from mer.traces.bundled import load_bundled


def lru_by_lookup(keys: np.ndarray, slots: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys.reshape(-1).tolist():
        if k in cache:
            hits += 1
            cache.move_to_end(k)
        else:
            if len(cache) >= slots:
                cache.popitem(last=False)
            cache[k] = None
    return hits / keys.size


def lru_by_step(steps: np.ndarray, slots: int) -> float:
    """Look the step up, admit its misses in rank order (evicting the least recent key
    that is not the step's), then make the step's keys the most recent, rank 0 last."""
    order: list[int] = []  # least recent first
    hits = 0
    for step in steps.tolist():
        resident = set(order)
        hits += sum(k in resident for k in step)
        for k in step:
            if k in resident:
                continue
            if len(order) >= slots:
                order.remove(next(v for v in order if v not in step))
            order.append(k)
            resident.add(k)
        for k in reversed(step):
            order.remove(k)
            order.append(k)
    return hits / steps.size


@pytest.fixture(scope="module")
def trace():
    return load_bundled().head(250)


def test_stats_lru_is_lookup_granularity(trace) -> None:
    stats = mer.trace_stats(trace)["reuse_distance"]
    for c in (32, 64, 128):
        assert stats["lru_hit_rate"][str(c)] == pytest.approx(
            lru_by_lookup(trace.keys(), c), abs=1e-6
        )
    assert stats["lru_hit_rate_definition"].startswith("lookup granularity")


def test_mrc_lru_is_step_granularity_and_differs(trace) -> None:
    curves = mer.mrc(trace, policies=["lru"], scopes=["global"], sizes=[32, 64, 128])
    lru = curves[curves.policy == "lru"].set_index("cache_slots")["hit_rate"]
    steps = trace.keys().reshape(-1, trace.top_k)
    for c in (32, 64, 128):
        assert lru[c] == pytest.approx(lru_by_step(steps, c), abs=1e-9)
    assert lru[64] > lru_by_lookup(trace.keys(), 64)  # why the two figures differ


def test_the_quoted_figures() -> None:
    """The 28.59% / 32.70% that docs/policies.md and the README quote (whole trace)."""
    full = load_bundled()
    stats = mer.trace_stats(full)["reuse_distance"]["lru_hit_rate"]["64"]
    curves = mer.mrc(full, policies=["lru"], scopes=["global"], sizes=[64])
    step = float(curves[curves.policy == "lru"]["hit_rate"].iloc[0])
    assert f"{stats:.2%}" == "28.59%" and f"{step:.2%}" == "32.70%"
