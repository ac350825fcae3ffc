"""The claim check on small regenerated workloads, held against brute force.

Expectations are computed here independently: distinct ids with a Python set
over the generated rows, an LRU written out with an OrderedDict, Belady's
optimality as an inequality, and the closed forms for the floor and 21 TPS.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest

import mer.analysis.claim as claim
from mer.traces.bundled import bundled_trace_path
from mer.traces.format import Trace, read_trace
from mer.traces.synth.seed_skewed import SeedSkewed, SkewedParams

HEAD_ITERS = 300
SCALING_ITERS = 600
REAL_TOKENS = 40


def _distinct(trace: Trace) -> int:
    return len(set(zip(trace.df["layer"].tolist(), trace.df["expert"].tolist(), strict=True)))


def _lru_misses(ids: list[int], slots: int, k: int = 2) -> int:
    """LRU over steps of k experts needed together (the core's documented step
    semantics): each miss is admitted evicting the least recently used expert
    this step does not need; at the end of the step its experts become the most
    recent, rank 0 most recent of all."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for s in range(0, len(ids), k):
        step = ids[s : s + k]
        missed = []
        for i in step:
            if i in cache:
                cache.move_to_end(i)
            else:
                missed.append(i)
        for i in missed:
            misses += 1
            if len(cache) >= slots:
                victim = next(key for key in cache if key not in step)
                del cache[victim]
            cache[i] = None
        for i in reversed(step):
            cache.move_to_end(i)
    return misses


@pytest.fixture(scope="module")
def check() -> tuple[claim.ClaimCheck, Trace]:
    mp = pytest.MonkeyPatch()
    mp.setitem(claim.PUBLISHED, "iterations", HEAD_ITERS)
    mp.setitem(claim.PUBLISHED, "scaling_iterations", SCALING_ITERS)
    real = read_trace(bundled_trace_path()).head(REAL_TOKENS)
    try:
        yield claim.run_claim_check(real), real  # type: ignore[misc]
    finally:
        mp.undo()


def _stream(iterations: int) -> Trace:
    return SeedSkewed(SkewedParams(iterations=iterations)).generate()


def test_headline_misses_are_the_distinct_ids(check: tuple[claim.ClaimCheck, Trace]) -> None:
    h = check[0].headline
    stream = _stream(HEAD_ITERS)
    distinct = _distinct(stream)
    assert distinct < 256  # the test means something only if not every id appeared
    assert h["lookups"] == HEAD_ITERS * 2 == len(stream.df)
    assert h["distinct_ids"] == distinct
    assert h["misses"] == distinct
    assert h["hits"] == HEAD_ITERS * 2 - distinct
    assert h["all_misses_are_cold"] is True
    assert h["hit_rate"] == pytest.approx(1 - distinct / (HEAD_ITERS * 2))


def test_floor_and_tps_closed_forms(check: tuple[claim.ClaimCheck, Trace]) -> None:
    c = check[0]
    assert c.headline["floor_any_policy"] == pytest.approx(1 - 256 / (HEAD_ITERS * 2))
    assert c.tps["whole_model_tokens_per_s_upper_bound"] == pytest.approx(21.38 / 32)
    assert c.tps["ms_per_token_at_that_rate"] == pytest.approx(1000 * 32 / 21.38)


def test_every_row_cold_misses_and_counts(check: tuple[claim.ClaimCheck, Trace]) -> None:
    c, real = check
    stream = _stream(SCALING_ITERS)
    expected = {
        "seed-skewed (synthetic, flat ids)": (_distinct(stream), len(stream.df)),
        f"{real.name} (real Mixtral routing)": (_distinct(real), len(real.df)),
    }
    assert {r.workload for r in c.rows} == set(expected)
    for r in c.rows:
        distinct, lookups = expected[r.workload]
        assert r.cold_misses == distinct, r
        assert r.lookups == lookups and r.hits + r.misses == lookups, r
        assert r.misses >= distinct, r  # every id misses at least once
        assert r.hit_rate == pytest.approx(r.hits / lookups)
        if r.cache_slots >= distinct:  # nothing ever evicted: only cold misses
            assert r.misses == distinct, r


def test_opt_is_never_beaten(check: tuple[claim.ClaimCheck, Trace]) -> None:
    rows = check[0].rows
    opt = {(r.workload, r.scope, r.cache_slots): r.misses for r in rows if r.policy == "opt"}
    assert opt
    for r in rows:
        assert r.misses >= opt[(r.workload, r.scope, r.cache_slots)], r


def test_lru_rows_match_a_textbook_lru(check: tuple[claim.ClaimCheck, Trace]) -> None:
    ids = _stream(SCALING_ITERS).df["expert"].tolist()  # flat ids, replay order
    rows = [r for r in check[0].rows if r.policy == "lru" and r.workload.startswith("seed-skewed")]
    assert {r.cache_slots for r in rows} == {16, 32, 64, 124, 256}
    for r in rows:
        assert r.misses == _lru_misses(ids, r.cache_slots), r


def test_real_rows_respect_the_trace_geometry(check: tuple[claim.ClaimCheck, Trace]) -> None:
    c = check[0]
    real_rows = [r for r in c.rows if "real" in r.workload]
    # per-layer needs at least top_k slots per layer (64 for 32 layers x top-2)
    assert {r.cache_slots for r in real_rows if r.scope == "per-layer"} == {64, 124, 256}
    assert {r.cache_slots for r in real_rows if r.scope == "global"} == {16, 32, 64, 124, 256}
    assert {r.policy for r in real_rows} == {"lru", "opt"}


def test_markdown_states_the_computed_figures(check: tuple[claim.ClaimCheck, Trace]) -> None:
    c = check[0]
    md = claim.format_markdown(c, mrc_figure="figures/m.png")
    assert f"| misses | 254 | {c.headline['misses']:,} |" in md
    assert f"{(1 - 256 / (HEAD_ITERS * 2)) * 100:.2f}%" in md
    assert f"{21.38 / 32:.3f} whole-model tokens/s" in md
    assert "![" in md and "figures/m.png" in md
