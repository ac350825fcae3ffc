"""Miss-ratio curves beside their gap closed, cold and in the steady state, held out or not.

The reference replays the core step by step (the general path, reads completing
at once) and reads the hit counter when the warm-up window ends; the gap closed
is recomputed from that replay's LRU and OPT.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_kit import run_mer
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.core import Replay, ReplayConfig
from mer.sim.mrc import MRCRequest, compute_mrc
from mer.sim.tune import tune_policy
from mer.traces.format import TraceMeta, from_arrays, write_trace


def _ref_hits(steps, n_layers, n_experts, policy, size, scope, warm):
    cfg = ReplayConfig(policy=policy, cache_slots=size, scope=scope)
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    before = 0
    for t in range(rep.n_steps):
        if t == warm:
            before = rep.stats.total("hits")
        for adm in rep.step(t).reads:
            rep.complete(adm.key)
    total = rep.stats.total("hits")
    return total, total - (before if warm else 0)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n_layers=st.integers(1, 3),
    n_experts=st.integers(3, 5),
    warm_tokens=st.integers(0, 4),
)
def test_gap_and_warm_columns_equal_a_step_by_step_replay(seed, n_layers, n_experts, warm_tokens):
    rng = np.random.default_rng(seed)
    k = 2
    steps = np.asarray(
        [
            [layer * n_experts + int(e) for e in rng.choice(n_experts, k, replace=False)]
            for _ in range(10)
            for layer in range(n_layers)
        ],
        dtype=np.int32,
    )
    warm = warm_tokens * n_layers
    req = MRCRequest(policies=["fifo", "cycle"], processes=1, warmup_steps=warm)
    df = compute_mrc(steps, n_layers, n_experts, req)
    assert set(df.policy) == {"fifo", "cycle", "lru", "opt"}
    n_warm = steps[warm:].size
    for scope in ("global", "per-layer"):
        for size in range(1, n_layers * n_experts + 1):
            ref = {
                p: _ref_hits(steps, n_layers, n_experts, p, size, scope, warm)
                for p in ("fifo", "cycle", "lru", "opt")
            }
            rows = df[(df.scope == scope) & (df.cache_slots == size)].set_index("policy")
            for p, (cold, hot) in ref.items():
                assert rows.loc[p, "hits"] == cold, (p, scope, size)
                assert rows.loc[p, "warm_hits"] == hot, (p, scope, size)
                assert rows.loc[p, "warm_hit_rate"] == pytest.approx(hot / n_warm)
                for col, i in (("gap_closed", 0), ("warm_gap_closed", 1)):
                    lru, opt = ref["lru"][i], ref["opt"][i]
                    want = (ref[p][i] - lru) / (opt - lru) if opt != lru else None
                    got = rows.loc[p, col]
                    if want is None:
                        assert np.isnan(got)
                    else:
                        assert got == pytest.approx(want), (p, col, scope, size)


def _trace(seed, n_tokens=24):
    rng = np.random.default_rng(seed)
    ex = np.stack(
        [np.stack([rng.choice(6, 2, replace=False) for _ in range(3)]) for _ in range(n_tokens)]
    ).astype(np.int16)
    return from_arrays(ex, TraceMeta(model="t", n_layers=3, n_experts=6, top_k=2))


_mer = run_mer


def test_cli_marks_tuned_results_held_out_or_in_sample(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_trace(_trace(1), a)
    write_trace(_trace(2), b)
    tuned = tune_policy("cycle", [(a, _trace(1))], sizes=[6, 9])
    tuned.save(tmp_path / "t.json")
    for trace, held in ((b, True), (a, False)):
        out = tmp_path / f"m-{trace.stem}.parquet"
        res = _mer(
            "mrc",
            trace,
            "--policies",
            "lru",
            "--tuned",
            tmp_path / "t.json",
            "--sizes",
            "6,9",
            "--warmup",
            "4",
            "-o",
            out,
            "--json",
        )
        df = pd.read_parquet(out)
        rows = df[df.policy == "cycle"]
        assert len(rows) == 4  # added by --tuned, both scopes
        assert set(rows.tuned_on) == {"a.parquet"}
        assert rows.held_out.tolist() == [held] * 4
        assert df[df.policy == "lru"].held_out.all()
        summary = json.loads(res.stdout)
        assert summary["tuned"]["cycle"]["held_out"] is held
        assert summary["warmup_tokens"] == 4
        assert ("in-sample" in res.stderr) is (not held)
    res = _mer("mrc", b, "--warmup", "24", "-o", tmp_path / "x.parquet", check=False)
    assert res.returncode == 2 and "warmup" in res.stderr
    assert not (tmp_path / "x.parquet").exists()
