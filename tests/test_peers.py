"""libCacheSim as a peer: mer's policies against it at lookup granularity, its backend
for `mer mrc`, the message without the extra, and S3-FIFO's exact differences.

libCacheSim is GPL and optional: the cross-checks run where `libcachesim` is
installed (`make test` installs it with the dev extra) and skip elsewhere.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mer.cli import main
from mer.core import Replay, ReplayConfig, replay_counts
from mer.traces.format import TraceMeta, from_arrays, write_trace

BUNDLED = (
    Path(__file__).resolve().parents[1] / "traces" / "data" / "mixtral-offloading-h39s.parquet"
)
#: mer's policy -> libCacheSim's, equal request by request.
SAME = {
    "lru": "lru",
    "fifo": "fifo",
    "clock": "clock",
    "sieve": "sieve",
    "arc": "arc",
    "lfu": "lfu",
    "opt": "belady",
}


def mer_hits(flat: np.ndarray, n_layers: int, n_experts: int, policy: str, cap: int, **kw) -> int:
    cfg = ReplayConfig(policy=policy, cache_slots=cap, granularity="lookup", **kw)
    steps = flat.reshape(-1, 1)
    return replay_counts(Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)).total(
        "hits"
    )


def _zipf_flat(seed: int, n: int = 3000, n_keys: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.2, n) % n_keys).astype(np.int32)


@pytest.fixture(scope="module")
def peers():
    pytest.importorskip("libcachesim", reason="the optional libCacheSim peer is not installed")
    from mer.sim import peers

    return peers


@pytest.mark.parametrize("policy", sorted(SAME))
def test_mer_equals_libcachesim_at_lookup_granularity(peers, policy):
    sizes = [1, 2, 5, 9, 16, 30, 47]
    for seed in (0, 1):
        flat = _zipf_flat(seed)
        got = peers.lcs_hits(SAME[policy], flat.reshape(-1, 1), 1, 48, "global", sizes)
        for c in sizes:
            assert got[c] == mer_hits(flat, 1, 48, policy, c), (policy, seed, c)


@pytest.mark.skipif(not BUNDLED.exists(), reason="bundled trace missing")
@pytest.mark.parametrize("policy", sorted(SAME))
def test_bundled_trace_flattened(peers, policy):
    from mer.traces.format import read_trace

    tr = read_trace(BUNDLED)
    flat = tr.keys().reshape(-1).astype(np.int32)
    sizes = [64, 96, 128, 192]
    got = peers.lcs_hits(
        SAME[policy], flat.reshape(-1, 1), tr.n_layers, tr.n_experts, "global", sizes
    )
    for c in sizes:
        assert got[c] == mer_hits(flat, tr.n_layers, tr.n_experts, policy, c), (policy, c)


def test_mrc_backend_libcachesim_writes_the_tidy_frame(peers, tmp_path, capsys):
    rng = np.random.default_rng(3)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(60 * 2)]).reshape(60, 2, 2)
    path = tmp_path / "t.parquet"
    write_trace(
        from_arrays(experts, TraceMeta(model="toy", n_layers=2, n_experts=8, top_k=2)), path
    )
    out = tmp_path / "m.parquet"
    rc = main(
        [
            "mrc",
            str(path),
            "-o",
            str(out),
            "--backend",
            "libcachesim",
            "--policies",
            "lirs,lru",
            "--json",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["granularity"] == "lookup"
    df = pd.read_parquet(out)
    assert list(df.columns)[:6] == ["policy", "scope", "cache_slots", "hits", "misses", "hit_rate"]
    assert {"lirs", "lru", "opt"} <= set(df.policy)
    assert (df.hits + df.misses == 240).all()
    lru = df[(df.policy == "lru") & (df.scope == "global")].set_index("cache_slots").hits
    flat = experts.reshape(-1).astype(np.int32) + np.tile([0, 0, 8, 8], 60).astype(np.int32)
    for c in (2, 7, 16):
        assert lru[c] == mer_hits(flat, 2, 8, "lru", c)
    assert (
        main(["mrc", str(path), "-o", str(out), "--backend", "libcachesim", "--policies", "nope"])
        == 2
    )
    assert (
        main(
            ["mrc", str(path), "-o", str(out), "--backend", "libcachesim", "--granularity", "step"]
        )
        == 2
    )


def test_missing_extra_is_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "libcachesim", None)  # import fails as if not installed
    path = tmp_path / "t.parquet"
    experts = np.zeros((3, 1, 2), dtype=np.int16)
    experts[:, :, 1] = 1
    write_trace(
        from_arrays(experts, TraceMeta(model="toy", n_layers=1, n_experts=2, top_k=2)), path
    )
    assert (
        main(["mrc", str(path), "-o", str(tmp_path / "m.parquet"), "--backend", "libcachesim"]) == 2
    )
    err = capsys.readouterr().err
    assert "pip install 'mer-moe[peers]'" in err and "GPL" in err and "Traceback" not in err


# -- S3-FIFO: the exact differences --------------------------------------------------------
# One S3-FIFO at lookup granularity with a switch for each way libCacheSim's (0.3.5)
# differs from mer's. With mer's switches it must equal mer's policy; with
# libCacheSim's, libCacheSim. So the two differ by exactly these six rules
# (docs/policies.md gives each one's effect on the bundled trace).
MER = dict(sizes="round", warmup=False, reject=False, walk="mer", ghost_early=False, threshold=1)
LCS = dict(sizes="floor", warmup=True, reject=True, walk="lcs", ghost_early=True, threshold=2)


def s3fifo_hits(keys, C, sizes, warmup, reject, walk, ghost_early, threshold):
    if sizes == "floor":  # libCacheSim: int(0.1 C), int(0.9 C)
        s, g = int(C * 0.1), int(C * 0.9)
    else:  # mer: at least one slot each, rounded
        s, g = max(1, round(0.1 * C)), max(1, round(0.9 * C))
    m = max(0, C - s)
    S: OrderedDict[int, int] = OrderedDict()  # oldest first; value = access counter
    M: OrderedDict[int, int] = OrderedDict()
    G: OrderedDict[int, None] = OrderedDict()
    hits = 0
    evicted_once = False

    def evict_main():
        while M:
            y, f = next(iter(M.items()))
            del M[y]
            if f > 0:
                M[y] = f - 1
            else:
                return y
        return None

    def evict_small():
        while S:
            y, f = next(iter(S.items()))
            del S[y]
            if f >= threshold:
                M[y] = 0
                # mer: a move that overfills M evicts from M at once (one victim per miss);
                # libCacheSim: keeps walking S until it demotes one, M may overfill.
                if walk == "mer" and len(M) > m:
                    v = evict_main()
                    if v is not None:
                        return v
            else:
                G[y] = None
                if len(G) > g:
                    G.popitem(last=False)
                return y
        return None

    for x in keys:
        if x in S:
            S[x] = min(S[x] + 1, 3)
            hits += 1
            continue
        if x in M:
            M[x] = min(M[x] + 1, 3)
            hits += 1
            continue
        ghost_hit = False
        if ghost_early and x in G:  # libCacheSim: the ghost is checked before evicting
            del G[x]
            ghost_hit = True
        while len(S) + len(M) >= C:
            evicted_once = True
            if walk == "mer":
                v = evict_small() if len(S) >= s else evict_main()
                if v is None:
                    v = evict_main() if len(S) >= s else evict_small()
                break
            if len(M) <= m and S:
                evict_small()
            else:
                evict_main()
        if not ghost_early and x in G:
            del G[x]
            ghost_hit = True
        if ghost_hit:
            M[x] = 0
        elif reject and s <= 1:  # libCacheSim admits nothing to a one-slot S
            continue
        elif warmup and not evicted_once and len(S) >= s:  # libCacheSim: fill M at warm-up
            M[x] = 0
        else:
            S[x] = 0
    return hits


def test_s3fifo_reference_with_mer_switches_is_mer():
    for seed in range(6):
        flat = _zipf_flat(seed, n=600, n_keys=int(10 + 7 * seed))
        n = int(flat.max()) + 1
        for c in range(1, n + 1, 2):
            assert s3fifo_hits(flat.tolist(), c, **MER) == mer_hits(flat, 1, n, "s3fifo", c), (
                seed,
                c,
            )


def test_s3fifo_reference_with_libcachesim_switches_is_libcachesim(peers):
    for seed in range(3):
        flat = _zipf_flat(seed, n=2000, n_keys=60)
        sizes = [10, 14, 20, 33, 50]  # libCacheSim aborts below 10 objects (S would be empty)
        got = peers.lcs_hits("s3fifo", flat.reshape(-1, 1), 1, 60, "global", sizes)
        for c in sizes:
            assert got[c] == s3fifo_hits(flat.tolist(), c, **LCS), (seed, c)
