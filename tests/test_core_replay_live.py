"""A live replay (steps handed in as a model produces them) decides exactly as a trace replay.

The reference is the trace replay itself, whose semantics the rest of the suite
pins down (policies against brute force, the simulator and the engine against
`replay_counts`): fed the same keys in the same order, with the same completion
order, a live replay must make every decision the same way, so its counters
and the Admissions it returns are equal step for step.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.core import Replay, ReplayConfig, replay_counts
from mer.errors import BadInput


def _steps(seed: int, n_tokens: int, n_layers: int, n_experts: int, k: int) -> np.ndarray:
    """Skewed random routing: a few popular experts per layer, so caches hit and miss."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_experts, 0.4))
    rows = []
    for _ in range(n_tokens):
        for layer in range(n_layers):
            rows.append([layer * n_experts + int(e) for e in rng.choice(n_experts, k, False, p=p)])
    return np.asarray(rows, dtype=np.int32)


def _drive(replay: Replay, steps: np.ndarray, live: bool, lookahead: np.ndarray | None) -> list:
    """Every read completes at the end of its step (a clock the two must share)."""
    log = []
    for t, keys in enumerate(steps.tolist()):
        res = replay.step(t, keys) if live else replay.step(t)
        if live and lookahead is not None:
            replay.supply_lookahead(t + 1, lookahead[t + 1].tolist())
        # A live replay cannot know that the trace ends; the driver knows, and asks for no
        # prefetch whose horizon passes the last step (the trace replay would cut it short).
        pf = replay.prefetch(t) if t + replay.config.pipeline_depth < len(steps) else []
        log.append((res.keys, res.hit, res.late, res.reads, pf))
        # Demand reads land now; prefetches land one step later (so some are late).
        for adm in res.reads:
            replay.complete(adm.key)
        if t >= 1:
            for adm in log[t - 1][4]:
                replay.complete(adm.key)
    return log


POLICIES = ["lru", "fifo", "lfu", "clock", "sieve", "s3fifo", "arc", "seed-lru-locality"]
PREDICTORS = ["none", "previous-token", "markov", "popularity", "lookahead"]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    policy=st.sampled_from(POLICIES),
    predictor=st.sampled_from(PREDICTORS),
    slots=st.integers(1, 20),
    scope=st.sampled_from(["global", "per-layer"]),
    depth=st.integers(1, 2),
    granularity=st.sampled_from(["step", "lookup"]),
)
def test_live_replay_decides_as_the_trace_replay(
    seed, policy, predictor, slots, scope, depth, granularity
):
    n_layers, n_experts, k = 3, 6, 2
    if scope == "per-layer":
        slots = max(slots, n_layers)
    # A live run has no end, so its predictors look `depth` steps ahead even at the last
    # step; the trace replay is given `depth` more steps so that its horizon is never cut
    # short either (both are driven over the first n steps only).
    n = 12 * n_layers
    ext = _steps(seed, 12 + 1, n_layers, n_experts, k)
    steps = ext[:n]
    la = _steps(seed + 1, 12 + 1, n_layers, n_experts, k) if predictor == "lookahead" else None
    cfg = ReplayConfig(
        policy=policy,
        cache_slots=slots,
        scope=scope,
        predictor=predictor,
        pipeline_depth=depth,
        granularity=granularity,
    )
    ref = Replay(ext, n_layers=n_layers, n_experts=n_experts, config=cfg, lookahead=la)
    live = Replay.live(n_layers=n_layers, n_experts=n_experts, top_k=k, config=cfg)
    want = _drive(ref, steps, live=False, lookahead=None)
    got = _drive(live, steps, live=True, lookahead=la)
    assert got == want
    assert live.stats.to_dict(per_layer=True) == ref.stats.to_dict(per_layer=True)
    assert live.n_steps == len(steps)


def test_live_replay_matches_replay_counts_without_prefetch():
    steps = _steps(7, 40, 4, 8, 2)
    cfg = ReplayConfig(policy="lru", cache_slots=10)
    want = replay_counts(Replay(steps, n_layers=4, n_experts=8, config=cfg))
    live = Replay.live(n_layers=4, n_experts=8, top_k=2, config=cfg)
    for t, keys in enumerate(steps.tolist()):
        for adm in live.step(t, keys).reads:
            live.complete(adm.key)
    assert live.stats.to_dict(per_layer=True) == want.to_dict(per_layer=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"policy": "opt"}, "future"),
        ({"predictor": "oracle"}, "future"),
        ({"pin": 4}, "--pin"),
        ({"tokens": 5}, "--tokens"),
        ({"phase": "decode"}, "--phase"),
    ],
)
def test_live_replay_refuses_what_needs_the_future(kw, match):
    with pytest.raises(BadInput, match=match):
        Replay.live(n_layers=2, n_experts=4, top_k=2, config=ReplayConfig(**kw))


def test_live_steps_must_come_in_order_with_keys():
    live = Replay.live(n_layers=2, n_experts=4, top_k=2, config=ReplayConfig(cache_slots=4))
    with pytest.raises(ValueError, match="keys"):
        live.step(0)
    live.step(0, [0, 1])
    with pytest.raises(ValueError, match="order"):
        live.step(2, [4, 5])
    trace = Replay(np.array([[0, 1]]), n_layers=2, n_experts=4, config=ReplayConfig())
    with pytest.raises(ValueError, match="trace"):
        trace.step(0, [0, 1])
