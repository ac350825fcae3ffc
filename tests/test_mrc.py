"""Miss-ratio curves: one-pass curves against per-size replay, OPT as the
ceiling, LRU's inclusion property, FIFO's anomaly, the seed reproduction."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_policies import traces

from mer.cli import main
from mer.core import Replay, ReplayConfig, policy_names, replay_counts
from mer.core.policy import POLICIES
from mer.sim.mrc import MRCRequest, compute_mrc, one_pass_hits
from mer.traces.format import TraceMeta, from_arrays, write_trace


def replay_hits(steps, n_layers, n_experts, policy, cap, scope):
    cfg = ReplayConfig(policy=policy, cache_slots=cap, scope=scope)
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    return replay_counts(rep, fast=False).total("hits")


def _engines():
    from mer import native

    return ["python", "c"] if native.load("stackdist") is not None else ["python"]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("policy", ["lru", "opt"])
@settings(max_examples=40, deadline=None)
@given(tr=traces(max_steps=60), scope=st.sampled_from(["global", "per-layer"]))
def test_one_pass_equals_per_size_replay(policy, engine, tr, scope):
    steps, n_layers, n_experts = tr
    curve = one_pass_hits(policy, steps, n_layers, n_experts, scope, engine=engine)
    for cap in range(1, n_layers * n_experts + 1):
        assert curve[cap] == replay_hits(steps, n_layers, n_experts, policy, cap, scope), cap


@settings(max_examples=15, deadline=None)
@given(tr=traces(max_steps=40))
def test_opt_is_the_ceiling_and_lru_never_falls(tr):
    steps, n_layers, n_experts = tr
    df = compute_mrc(
        steps,
        n_layers,
        n_experts,
        MRCRequest(policies=policy_names(), processes=1),
    )
    for scope, sub in df.groupby("scope"):
        opt = sub[sub.policy == "opt"].set_index("cache_slots")["hits"]
        for pol, cur in sub.groupby("policy"):
            if not POLICIES[pol].protects_step:
                # OPT is optimal among policies that keep the step's experts resident;
                # the public engine's may evict one of them, which OPT is not allowed to.
                continue
            h = cur.set_index("cache_slots")["hits"]
            assert (h <= opt.loc[h.index]).all(), (scope, pol)
        lru = sub[sub.policy == "lru"].sort_values("cache_slots")["hits"].to_numpy()
        assert (np.diff(lru) >= 0).all(), scope


def test_fifo_beladys_anomaly():
    # The classic reference string 1 2 3 4 1 2 5 1 2 3 4 5: FIFO misses 9 times
    # with 3 slots and 10 times with 4.
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    steps = np.asarray([[k - 1] for k in seq], dtype=np.int32)
    h3 = replay_hits(steps, 1, 5, "fifo", 3, "global")
    h4 = replay_hits(steps, 1, 5, "fifo", 4, "global")
    assert (len(seq) - h3, len(seq) - h4) == (9, 10)
    # LRU, a stack algorithm, cannot do that.
    assert replay_hits(steps, 1, 5, "lru", 4, "global") >= replay_hits(
        steps, 1, 5, "lru", 3, "global"
    )


def test_mrc_cli_writes_tidy_frame_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(30 * 2)]).reshape(30, 2, 2)
    meta = TraceMeta(model="toy", n_layers=2, n_experts=4, top_k=2)
    path = tmp_path / "t.parquet"
    write_trace(from_arrays(experts, meta), path)
    out, png = tmp_path / "m.parquet", tmp_path / "m.png"
    rc = main(["mrc", str(path), "-o", str(out), "--plot", str(png), "--processes", "1"])
    assert rc == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == [
        "policy",
        "scope",
        "cache_slots",
        "hits",
        "misses",
        "hit_rate",
        "gap_closed",
        "warm_hits",
        "warm_misses",
        "warm_hit_rate",
        "warm_gap_closed",
        "tuned_on",
        "held_out",
    ]
    assert set(df.cache_slots) == set(range(1, 9))
    assert (df.hits + df.misses == 120).all()
    assert "seed-lru-locality" not in set(df.policy)  # multi-layer trace
    assert png.stat().st_size > 10_000
    assert main(["mrc", str(tmp_path / "missing.parquet"), "-o", str(out)]) == 2


# -- the public engine's runs ------------------------------------------------------------


def _seed_trace():
    synth = pytest.importorskip("mer.traces.synth.seed_skewed")
    return synth.SeedSkewed(synth.SkewedParams()).generate()


def seed_reference_misses(ids: list[list[int]], slots: int, n: int = 256, epl: int = 8) -> int:
    """specs/seed-engine.md restated: monitor, lookups, inserts with LRU-not-pinned."""
    n_l = n // epl
    w, f = 256 * n_l, 0.10 / n_l
    window: list[int] = []
    counts: Counter[int] = Counter()
    lru: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for step in ids:
        for i in step:
            window.append(i)
            counts[i] += 1
            if len(window) > w:
                counts[window.pop(0)] -= 1
        thr = max(f * len(window), 1)
        hot = sorted((i for i, c in counts.items() if c >= thr), key=lambda i: (-counts[i], i))
        pinned = set(hot[: slots - 1])
        missed = []
        for i in step:
            if i in lru:
                lru.move_to_end(i)
            else:
                missed.append(i)
        misses += len(missed)
        for i in missed:
            if len(lru) >= slots:
                victim = next((k for k in lru if k not in pinned), None)
                if victim is None:
                    continue
                del lru[victim]
            lru[i] = None
    return misses


@pytest.mark.slow
def test_seed_lru_locality_reproduces_its_spec():
    tr = _seed_trace()
    ids = tr.keys().reshape(-1, tr.top_k).tolist()
    for slots in (16, 32, 64, 124):
        cfg = ReplayConfig(policy="seed-lru-locality", cache_slots=slots)
        stats = replay_counts(Replay.from_trace(tr, cfg))
        assert stats.lookups == 20_000
        assert stats.total("misses") == seed_reference_misses(ids, slots), slots


def test_headline_run_is_cold_misses_only():
    tr = _seed_trace()
    keys = tr.keys().reshape(-1)
    distinct = len(set(keys.tolist()))
    for policy in ("seed-lru-locality", "lru", "fifo", "opt"):
        cfg = ReplayConfig(policy=policy, cache_slots=256)
        stats = replay_counts(Replay.from_trace(tr, cfg))
        assert stats.hit_rate == pytest.approx(1 - distinct / len(keys), abs=0, rel=1e-12)


def test_predict_eval_cli_json(tmp_path, capsys):
    rng = np.random.default_rng(5)
    experts = np.stack([rng.choice(4, 2, replace=False) for _ in range(20 * 3)]).reshape(20, 3, 2)
    meta = TraceMeta(model="toy", n_layers=3, n_experts=4, top_k=2)
    path = tmp_path / "t.parquet"
    write_trace(from_arrays(experts, meta), path)
    assert main(["predict-eval", str(path), "--json", "--depth", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = {(r["predictor"], r["distance"]): r for r in out["results"]}
    assert by[("oracle", 1)]["precision"] == 1.0 and by[("oracle", 2)]["recall"] == 1.0
    assert ("lookahead", 1) not in by  # no lookahead column in this trace
    assert main(["predict-eval", str(path), "--predictors", "lookahead"]) == 2


def test_replay_step_keeps_one_pass_curves_whole_and_replays_a_subset() -> None:
    rng = np.random.default_rng(3)
    steps = np.stack([rng.choice(8, 2, replace=False) for _ in range(4 * 60)]).astype(np.int32)
    steps += (np.arange(len(steps)) % 4)[:, None].astype(np.int32) * 8  # 4 layers x 8 experts
    full = compute_mrc(
        steps, 4, 8, MRCRequest(policies=["lru", "fifo"], scopes=["global"], processes=1)
    )
    part = compute_mrc(
        steps,
        4,
        8,
        MRCRequest(policies=["lru", "fifo"], scopes=["global"], processes=1, replay_step=5),
    )
    # LRU is one-pass: every size is kept.
    assert list(part[part.policy == "lru"].cache_slots) == list(range(1, 33))
    # FIFO is replayed at the smallest size, every 5th size and the largest, with the same
    # values as the full run.
    fifo = part[part.policy == "fifo"].set_index("cache_slots")["hits"]
    assert list(fifo.index) == [1, 5, 10, 15, 20, 25, 30, 32]
    full_fifo = full[full.policy == "fifo"].set_index("cache_slots")["hits"]
    assert all(fifo[s] == full_fifo[s] for s in fifo.index)


def test_default_curves_leave_out_policies_whose_cost_grows_with_the_trace() -> None:
    """knn (and knnctx) vote with every past token: even compiled they stay out of the
    default curves, which must stay seconds on a long trace, and are drawn when named."""
    from mer.sim.mrc import default_policies

    for n_layers in (1, 32):
        names = default_policies(n_layers)
        assert "knn" not in names and "knnctx" not in names
        assert "lru" in names and "opt" in names


def test_default_curves_leave_out_python_only_policies_until_asked(tmp_path, monkeypatch):
    """cotoken replays at Python speed without its compiled twin: a default `mer mrc` must
    not spend half an hour on it there, while every other policy stays in and naming
    cotoken still draws it. Where the twin runs, the default curves draw it."""
    from mer import native
    from mer.core.policy import POLICIES, policy_names
    from mer.native import replay as native_replay
    from mer.sim.mrc import default_policies

    compiled = bool(native_replay.compiled_names())
    assert ("cotoken" in default_policies(32)) == compiled
    monkeypatch.setenv("MER_NO_NATIVE", "1")
    native.reset()
    try:
        names = default_policies(32)
    finally:
        monkeypatch.delenv("MER_NO_NATIVE")
        native.reset()
    assert "cotoken" not in names
    assert "seed-lru-locality" not in names and "seed-lru-locality" in default_policies(1)
    for p in policy_names():
        if p not in ("cotoken", "seed-lru-locality") and POLICIES[p].in_default_curves:
            assert p in names
    if compiled:
        for p in default_policies(32):  # everything drawn by default has a fast curve
            assert native_replay.lookup(p) is not None or p in ("lru", "opt"), p

    rng = np.random.default_rng(3)
    steps = np.stack([rng.choice(8, 2, replace=False) for _ in range(4 * 32)]).astype(np.int16)
    trace = from_arrays(
        steps.reshape(4, 32, 2), TraceMeta(model="t", n_layers=32, n_experts=8, top_k=2), name="t"
    )
    write_trace(trace, tmp_path / "t.parquet")
    out = tmp_path / "m.parquet"
    rc = main(
        [
            "mrc",
            str(tmp_path / "t.parquet"),
            "--policies",
            "lru,cotoken",
            "--sizes",
            "4,8",
            "-o",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert set(pd.read_parquet(out)["policy"]) == {"lru", "cotoken", "opt"}
