"""Curves for every size: the compiled all-sizes pass against per-size replay of the
Python policies, the stack property refuted by counterexample for every policy
that lacks it, processes and dask giving the same frame, --granularity lookup."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_policies import traces

from mer import native
from mer.cli import main
from mer.core import Replay, ReplayConfig, replay_counts
from mer.sim import mrc
from mer.sim.mrc import MRCRequest, compiled_hits, compute_mrc
from mer.traces.format import TraceMeta, from_arrays, write_trace

NO_C = native.load("replay") is None
PASSED = ["fifo", "lfu", "clock", "sieve", "s3fifo", "arc", "seed-lru-locality"]


def python_hits(steps, n_layers, n_experts, policy, cap, scope, params=None):
    """The reference: one replay per size through the Python policy (no compiled loop)."""
    cfg = ReplayConfig(policy=policy, cache_slots=cap, scope=scope, policy_params=params or {})
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    return replay_counts(rep, engine="python").total("hits")


@pytest.mark.skipif(NO_C, reason="the compiled replays do not build here")
@pytest.mark.parametrize("policy", PASSED)
@settings(max_examples=12, deadline=None)
@given(tr=traces(max_steps=50), scope=st.sampled_from(["global", "per-layer"]))
def test_all_sizes_in_one_pass_equal_per_size_replay(policy, tr, scope):
    steps, n_layers, n_experts = tr
    sizes = list(range(1, n_layers * n_experts + 1))
    params = {"experts_per_layer": 2} if policy == "seed-lru-locality" else None
    got = compiled_hits(policy, steps, n_layers, n_experts, scope, sizes, params=params)
    assert got is not None
    for c in sizes:
        assert got[c] == python_hits(steps, n_layers, n_experts, policy, c, scope, params), c


def test_without_a_compiler_the_curve_is_the_same(monkeypatch):
    rng = np.random.default_rng(4)
    steps = np.stack([rng.choice(6, 2, replace=False) for _ in range(80)]).astype(np.int32)
    steps += (np.arange(80) % 2)[:, None].astype(np.int32) * 6
    req = MRCRequest(policies=["fifo", "arc", "lru"], processes=1)
    a = compute_mrc(steps, 2, 6, req)
    from mer.native import replay as native_replay

    monkeypatch.setattr(native_replay, "lookup", lambda name: None)
    b = compute_mrc(steps, 2, 6, req)
    pd.testing.assert_frame_equal(a, b)


# -- the stack property --------------------------------------------------------------------
# A stack algorithm holds at C slots a subset of what it holds at C + 1, so a hit at C is
# a hit at C + 1 and hits never fall as slots grow. Each trace below (one key per step)
# makes them fall, which refutes the property for that policy (docs/policies.md).
ANOMALIES = {
    "fifo": ([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5], 3),  # Belady's string
    "clock": ([3, 4, 3, 4, 1, 2, 2, 1, 3, 5, 1, 1, 4], 2),
    "sieve": ([0, 0, 4, 4, 1, 2, 2, 2, 3, 1, 3], 3),
    "lfu": ([2, 2, 0, 1, 4, 0, 1, 3, 4, 3, 4, 3], 3),
    "arc": ([3, 0, 3, 4, 3, 2, 1, 2, 0, 5, 3, 4, 3], 3),
    "s3fifo": ([5, 1, 3, 2, 2, 3, 3, 5, 0, 5], 2),
    "seed-lru-locality": ([1, 2, 3, 4, 4, 0, 2, 0, 1, 1, 3, 0], 3),
}


@pytest.mark.parametrize("policy", sorted(ANOMALIES))
def test_no_stack_property(policy):
    seq, c = ANOMALIES[policy]
    steps = np.asarray(seq, dtype=np.int32).reshape(-1, 1)
    n = max(seq) + 1
    params = {"experts_per_layer": 1} if policy == "seed-lru-locality" else None

    def hits(cap, **kw):
        cfg = ReplayConfig(policy=policy, cache_slots=cap, policy_params=params or {})
        return replay_counts(Replay(steps, n_layers=1, n_experts=n, config=cfg), **kw).total("hits")

    assert hits(c + 1, fast=False) < hits(c, fast=False)  # the Python policy itself
    assert hits(c + 1) < hits(c)  # and its compiled twin


# -- processes, dask, granularity ------------------------------------------------------------


def _steps(n_tokens=60, n_layers=4, n_experts=8, k=2, seed=3):
    rng = np.random.default_rng(seed)
    rows = [
        [layer * n_experts + int(e) for e in rng.choice(n_experts, k, replace=False)]
        for _ in range(n_tokens)
        for layer in range(n_layers)
    ]
    return np.asarray(rows, dtype=np.int32)


def test_processes_give_the_same_frame(monkeypatch):
    steps = _steps()
    req = dict(policies=["lru", "fifo", "s3fifo", "opt"])
    one = compute_mrc(steps, 4, 8, MRCRequest(processes=1, **req))
    monkeypatch.setattr(mrc, "IN_PROCESS_BELOW", 0)  # force the process pool
    two = compute_mrc(steps, 4, 8, MRCRequest(processes=2, **req))
    pd.testing.assert_frame_equal(one, two)


def test_dask_backend_gives_the_same_frame():
    distributed = pytest.importorskip("dask.distributed")
    steps = _steps(n_tokens=30)
    req = dict(policies=["lru", "clock"], scopes=["global"])
    ref = compute_mrc(steps, 4, 8, MRCRequest(processes=1, **req))
    with distributed.LocalCluster(
        n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None
    ) as cluster:
        got = compute_mrc(
            steps, 4, 8, MRCRequest(backend="dask", scheduler=cluster.scheduler_address, **req)
        )
    pd.testing.assert_frame_equal(ref, got)


def test_lookup_granularity_is_the_flattened_trace():
    steps = _steps(n_tokens=25)
    policies = ["lru", "opt", "fifo", "arc"]
    got = compute_mrc(steps, 4, 8, MRCRequest(policies=policies, processes=1, granularity="lookup"))
    flat = steps.reshape(-1, 1)
    for r in got[got.cache_slots.isin([3, 8, 20])].itertuples():
        cfg = ReplayConfig(policy=r.policy, cache_slots=int(r.cache_slots), scope=r.scope)
        want = replay_counts(Replay(flat, n_layers=4, n_experts=8, config=cfg), fast=False)
        assert r.hits == want.total("hits"), r


def test_mrc_cli_granularity_backend_and_progress_flags(tmp_path, capsys):
    rng = np.random.default_rng(3)
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(30 * 2)]).reshape(30, 2, 2)
    path = tmp_path / "t.parquet"
    write_trace(
        from_arrays(experts, TraceMeta(model="toy", n_layers=2, n_experts=4, top_k=2)), path
    )
    out = tmp_path / "m.parquet"
    rc = main(["mrc", str(path), "-o", str(out), "--granularity", "lookup", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["granularity"] == "lookup" and summary["backend"] == "local"
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(out).metadata[b"mer.mrc"])
    assert meta["granularity"] == "lookup"
    assert main(["mrc", str(path), "-o", str(out), "--scheduler", "tcp://x:1"]) == 2
    assert main(["mrc", str(path), "-o", str(out), "--backend", "dask"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["mrc", str(path), "-o", str(out), "--processes", "0"])
    assert exc.value.code == 2
