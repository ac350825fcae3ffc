"""traces.stats: expectations from hand-made traces, brute force and closed forms."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.cli import main
from mer.traces.format import TraceMeta, from_arrays, write_trace
from mer.traces.stats import (
    random_baselines,
    ranks_look_sorted,
    reuse_distances,
    reuse_summary,
    trace_stats,
)


def brute_reuse(keys: list[int]) -> list[int]:
    """Distinct keys strictly between an access and the previous access of its key."""
    out = []
    for i, x in enumerate(keys):
        seen: set[int] = set()
        d = -1
        for j in range(i - 1, -1, -1):
            if keys[j] == x:
                d = len(seen)
                break
            seen.add(keys[j])
        out.append(d)
    return out


def tiny_trace():
    # 2 layers, 4 experts, top-2; seq 0 has tokens 0..2, seq 1 has tokens 0..1.
    experts = np.array(
        [
            [[0, 1], [2, 3]],  # s0 t0
            [
                [0, 2],
                [3, 1],
            ],  # s0 t1: L0 first same (0), overlap yes; L1 first differs, overlap yes
            [[3, 2], [0, 1]],  # s0 t2: L0 first differs, overlap yes (2); L1 overlap yes (1)
            [[3, 1], [2, 0]],  # s1 t0: pair with s0 t2 must NOT be counted
            [
                [1, 0],
                [2, 3],
            ],  # s1 t1: L0 first differs, overlap yes (1); L1 first same (2), overlap
        ]
    )
    meta = TraceMeta(model="tiny", n_layers=2, n_experts=4, top_k=2)
    w = np.tile(np.array([0.6, 0.4], np.float32), (5, 2, 1))
    return from_arrays(
        experts, meta, weights=w, seq=np.array([0, 0, 0, 1, 1]), token=np.array([0, 1, 2, 0, 1])
    )


def test_tiny_trace_by_hand():
    s = trace_stats(tiny_trace())
    assert s["consecutive_pairs"] == 3
    l0, l1 = s["layers"]
    # Layer 0 pairs: (t0,t1) first same; (t1,t2) no; (s1 t0, s1 t1) no -> 1/3.
    assert l0["repetition"]["first"] == pytest.approx(1 / 3, abs=1e-6)
    assert l0["repetition"]["first_or_second"] == pytest.approx(1.0)
    # rank-0 among previous top-2: 0 in {0,1} yes; 3 in {0,2} no; 1 in {3,1} yes.
    assert l0["repetition"]["first_in_prev_topk"] == pytest.approx(2 / 3, abs=1e-6)
    assert l1["repetition"]["first"] == pytest.approx(1 / 3, abs=1e-6)
    assert l1["repetition"]["first_or_second"] == pytest.approx(1.0)
    # Layer 0 usage over 10 lookups: 0:3, 1:3, 2:2, 3:2.
    assert l0["popularity"] == pytest.approx([0.3, 0.3, 0.2, 0.2])
    assert l0["first_choice_popularity"] == pytest.approx([0.4, 0.2, 0.0, 0.4])
    ent = -(2 * 0.3 * math.log2(0.3) + 2 * 0.2 * math.log2(0.2))
    assert l0["entropy_bits"] == pytest.approx(ent, abs=1e-6)
    assert l0["entropy_normalised"] == pytest.approx(ent / 2, abs=1e-6)
    assert l0["distinct_experts"] == 4
    # Transitions layer 0 -> 1, all top-2 pairs per token; row 0 comes from
    # tokens with 0 at layer 0: t0 -> {2,3}, t1 -> {3,1}, s1t1 -> {2,3}.
    t = np.array(s["transitions"][0])
    assert t[0] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6], abs=1e-6)
    # Row 3: s0t2 -> {0,1}, s1t0 -> {2,0}.
    assert t[3] == pytest.approx([2 / 4, 1 / 4, 1 / 4, 0], abs=1e-6)
    assert s["rank_order_known"] is True
    assert s["totals"]["distinct_keys"] == 8


def test_repetition_never_crosses_sequences():
    e = np.array([[[0]], [[0]], [[0]]])
    meta = TraceMeta(model="m", n_layers=1, n_experts=3, top_k=1)
    one = trace_stats(from_arrays(e, meta, seq=np.array([0, 0, 0])))
    split = trace_stats(from_arrays(e, meta, seq=np.array([0, 1, 2]), token=np.array([0, 0, 0])))
    assert one["layers"][0]["repetition"]["first"] == 1.0
    assert split["consecutive_pairs"] == 0
    assert split["layers"][0]["repetition"]["first"] is None


@pytest.mark.parametrize("n,k", [(8, 1), (8, 2), (6, 3), (5, 2), (4, 4), (7, 4)])
def test_random_baselines_match_enumeration(n, k):
    subsets = list(itertools.combinations(range(n), k))
    overlap = sum(bool(set(a) & set(b)) for a in subsets for b in subsets) / len(subsets) ** 2
    # First choice: rank-0 of uniform random ordered top-k is uniform over n.
    ordered = list(itertools.permutations(range(n), k))
    in_prev = sum(a[0] in b for a in ordered for b in ordered) / len(ordered) ** 2
    base = random_baselines(n, k)
    assert base["first_or_second"] == pytest.approx(overlap)
    assert base["first"] == pytest.approx(1 / n)
    assert base["first_in_prev_topk"] == pytest.approx(in_prev)


def test_mixtral_random_baseline_is_papers_46_percent():
    assert random_baselines(8, 2)["first_or_second"] == pytest.approx(13 / 28)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=0, max_size=120))
def test_reuse_distance_matches_brute_force(keys):
    assert reuse_distances(np.array(keys, dtype=np.int64)).tolist() == brute_reuse(keys)


def test_reuse_distance_hand_example():
    # a b c a b b d a: a@3 sees {b,c}=2, b@4 sees {c,a}=2, b@5 0, a@7 sees {b,d}=2
    keys = [0, 1, 2, 0, 1, 1, 3, 0]
    assert reuse_distances(np.array(keys)).tolist() == [-1, -1, -1, 2, 2, 0, -1, 2]
    s = reuse_summary(reuse_distances(np.array(keys)), 4)
    assert s["cold_misses"] == 4 and s["reuses"] == 4
    # LRU with C slots hits iff distance < C: C=1 -> 1 hit, C=4 -> 4 hits of 8 lookups.
    assert s["lru_hit_rate"]["1"] == pytest.approx(1 / 8)
    assert s["lru_hit_rate"]["4"] == pytest.approx(4 / 8)


def test_lru_hit_rate_matches_an_lru_simulation():
    rng = np.random.default_rng(3)
    keys = rng.zipf(1.5, size=3000) % 40
    dist = reuse_distances(keys)
    for c in (1, 4, 16):
        cache: list[int] = []
        hits = 0
        for x in keys.tolist():
            if x in cache:
                hits += 1
                cache.remove(x)
            elif len(cache) == c:
                cache.pop(0)
            cache.append(x)
        assert int((dist[dist >= 0] < c).sum()) == hits


def test_sorted_ranks_are_flagged():
    meta = TraceMeta(model="m", n_layers=1, n_experts=4, top_k=2)
    e = np.array([[[0, 1]], [[1, 3]], [[0, 2]]])
    tr = from_arrays(e, meta)
    assert ranks_look_sorted(tr.experts, tr.weights())
    assert trace_stats(tr)["rank_order_known"] is False
    e2 = np.array([[[0, 1]], [[3, 1]], [[0, 2]]])
    assert not ranks_look_sorted(e2, None)


def test_cli_stats_json_and_text(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    write_trace(tiny_trace(), path)
    assert main(["trace", "stats", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 5 and len(out["layers"]) == 2
    assert main(["trace", "stats", str(path)]) == 0
    assert "first-or-second" in capsys.readouterr().out
    assert main(["trace", "stats", str(path), "--phase", "prefill"]) == 2
    assert main(["trace", "stats", str(tmp_path / "missing.parquet")]) == 2
