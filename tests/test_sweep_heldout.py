"""Sweeps and simulations beside their gap closed, warm hit rate and held-out status."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_kit import run_mer

from mer.sim.mrc import one_pass_hits
from mer.sim.tune import tune_policy
from mer.traces.format import TraceMeta, from_arrays, read_trace, write_trace

L, E, K = 3, 6, 2


def _trace(seed, n_tokens=40):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 0.6))
    ex = np.stack(
        [
            np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(L)])
            for _ in range(n_tokens)
        ]
    ).astype(np.int16)
    return from_arrays(ex, TraceMeta(model="t", n_layers=L, n_experts=E, top_k=K))


_mer = run_mer


@pytest.fixture()
def files(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_trace(_trace(1), a)
    write_trace(_trace(2), b)
    tuned = tune_policy("cycle", [(a, read_trace(a))], sizes=[6, 9])
    tuned.save(tmp_path / "cycle.json")
    return a, b, tmp_path / "cycle.json"


def test_sweep_rows_carry_gap_warm_and_provenance(files, tmp_path):
    _, b, tuned = files
    out = tmp_path / "sw.parquet"
    _mer(
        "sweep",
        b,
        "--policies",
        "lru,fifo",
        "--tuned",
        tuned,
        "--cache-slots",
        "6,9",
        "--warmup",
        "5",
        "--hardware",
        "ci-tiny",
        "-o",
        out,
        "--no-progress",
        "--jobs",
        "1",
    )
    df = pd.read_parquet(out)
    assert set(df.policy) == {"lru", "fifo", "cycle"}
    steps = read_trace(b).keys().reshape(-1, K)
    lru = one_pass_hits("lru", steps, L, E, "global")
    opt = one_pass_hits("opt", steps, L, E, "global")
    n = steps.size
    for r in df.itertuples():
        c = r.cache_slots
        assert r.lru_hit_rate == pytest.approx(lru[c] / n)
        assert r.opt_hit_rate == pytest.approx(opt[c] / n)
        assert r.gap_closed == pytest.approx((r.hits - lru[c]) / (opt[c] - lru[c]))
        assert r.warmup_tokens == 5
        assert r.held_out
        assert r.tuned_on == ("a.parquet" if r.policy == "cycle" else "")
        if r.policy == "lru":  # prefetch off: the simulator's LRU is the curve's
            assert r.gap_closed == pytest.approx(0.0)
    # the warm hit rate is the per-token table's after 5 tokens
    res = _mer(
        "simulate",
        b,
        "--policy",
        "fifo",
        "--cache-slots",
        "6",
        "--warmup",
        "5",
        "--hardware",
        "ci-tiny",
        "-o",
        tmp_path / "tok.parquet",
        "--json",
    )
    tok = pd.read_parquet(tmp_path / "tok.parquet")
    warm = json.loads(res.stdout)["extra"]["warm"]
    assert warm["hits"] == int(tok.hits[5:].sum())
    row = df[(df.policy == "fifo") & (df.cache_slots == 6)].iloc[0]
    assert row.warm_hit_rate == pytest.approx(warm["hit_rate"])


def test_simulate_marks_in_sample_runs_and_refuses_a_mismatched_file(files, tmp_path):
    a, _, tuned = files
    res = _mer(
        "simulate",
        a,
        "--policy",
        "cycle",
        "--tuned",
        tuned,
        "--cache-slots",
        "6",
        "--hardware",
        "ci-tiny",
        "--json",
    )
    s = json.loads(res.stdout)
    assert s["extra"]["tuned"] == {"tuned_on": "a.parquet", "held_out": False}
    assert "in-sample" in res.stderr
    assert s["config"]["policy_params"]["w6"] == json.loads(tuned.read_text())["params"]["w6"]
    res = _mer(
        "simulate", a, "--policy", "lru", "--tuned", tuned, "--hardware", "ci-tiny", check=False
    )
    assert res.returncode == 2 and "--tuned is for policy cycle" in res.stderr


def test_simulate_says_when_the_lead_leaves_nothing_to_prefetch(tmp_path):
    """A lead beyond the pipeline depth leaves no layer to prefetch for: the run says so
    (and prefetches nothing), instead of silently measuring no prefetch."""
    path = tmp_path / "t.parquet"
    write_trace(_trace(3), path)
    args = ["simulate", path, "--policy", "lru", "--cache-slots", 6, "--predictor", "oracle"]
    out = _mer(*args, "--pipeline-depth", 2, "--prefetch-lead", 3, "--json")
    assert "nothing was prefetched" in out.stderr
    assert json.loads(out.stdout)["prefetch"]["issued"] == 0
    ok = _mer(*args, "--pipeline-depth", 3, "--prefetch-lead", 3, "--json")
    assert "nothing was prefetched" not in ok.stderr
    assert json.loads(ok.stdout)["prefetch"]["issued"] > 0
