"""`mer tune` and the held-out protocol: fitted parameters name the traces they came from."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_kit import run_mer

from mer.core import Replay, ReplayConfig, replay_counts
from mer.errors import BadInput
from mer.sim.mrc import one_pass_hits
from mer.sim.tune import (
    TunedPolicy,
    held_out,
    routing_digest,
    tune_policy,
    tuned_on_for,
)
from mer.traces.bundled import bundled_trace_path, load_bundled
from mer.traces.format import TraceMeta, from_arrays, write_trace

L, E, K = 4, 6, 2


def _trace(seed, n_tokens=40, name="t"):
    rng = np.random.default_rng(seed)
    p = rng.random(E) ** 2 + 0.05
    ex = np.stack(
        [
            np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(L)])
            for _ in range(n_tokens)
        ]
    ).astype(np.int16)
    meta = TraceMeta(model="test", n_layers=L, n_experts=E, top_k=K)
    return from_arrays(ex, meta, name=name)


_cli = run_mer


def test_routing_digest_follows_the_routing_not_the_file(tmp_path):
    a = _trace(1)
    write_trace(a, tmp_path / "a.parquet")
    from mer.traces.format import read_trace

    again = read_trace(tmp_path / "a.parquet")
    again.meta.provenance = "copied elsewhere"
    assert routing_digest(again) == routing_digest(a)
    assert routing_digest(_trace(2)) != routing_digest(a)


def test_tuned_cycle_scores_what_a_replay_scores(tmp_path):
    traces = [(tmp_path / f"t{i}.parquet", _trace(i)) for i in range(2)]
    tuned = tune_policy("cycle", traces, sizes=[6, 10])
    assert tuned.policy == "cycle" and set(tuned.params) >= {"w0", "w6"}
    assert [t.routing_digest for t in tuned.tuned_on] == [routing_digest(t) for _, t in traces]
    for row in tuned.train:
        tr = dict(traces)[tmp_path / row["trace"]]
        steps = tr.keys().reshape(-1, K)
        cfg = ReplayConfig(
            policy="cycle", cache_slots=row["cache_slots"], policy_params=tuned.params
        )
        hits = replay_counts(Replay(steps, n_layers=L, n_experts=E, config=cfg)).total("hits")
        lru = one_pass_hits("lru", steps, L, E, "global")[row["cache_slots"]]
        opt = one_pass_hits("opt", steps, L, E, "global")[row["cache_slots"]]
        assert row["hit_rate"] == hits / steps.size
        assert row["gap_closed"] == pytest.approx((hits - lru) / (opt - lru))
    path = tmp_path / "tuned.json"
    tuned.save(path)
    back = TunedPolicy.load(path)
    assert back.params == tuned.params and back.digests == tuned.digests


def test_grid_search_takes_the_best_candidate(tmp_path):
    traces = [(tmp_path / "a.parquet", _trace(5)), (tmp_path / "b.parquet", _trace(6))]
    tuned = tune_policy("lfu", traces, sizes=[5, 9, 13])
    means = {}
    for decay in (1.0, 0.999, 0.995, 0.99, 0.95, 0.9):
        gaps = []
        for _, tr in traces:
            steps = tr.keys().reshape(-1, K)
            lru = one_pass_hits("lru", steps, L, E, "global")
            opt = one_pass_hits("opt", steps, L, E, "global")
            for c in (5, 9, 13):
                cfg = ReplayConfig(policy="lfu", cache_slots=c, policy_params={"decay": decay})
                h = replay_counts(Replay(steps, n_layers=L, n_experts=E, config=cfg)).total("hits")
                if opt[c] != lru[c]:
                    gaps.append((h - lru[c]) / (opt[c] - lru[c]))
        means[decay] = np.mean(gaps)
    best = max(means, key=lambda d: (means[d], -list(means).index(d)))
    assert tuned.params == {"decay": best}


def test_held_out_names_the_tuning_traces(tmp_path):
    a, b = _trace(1), _trace(2)
    tuned = tune_policy("cycle", [(tmp_path / "a.parquet", a)], sizes=[8])
    refs = tuned_on_for("cycle", tuned.params, tuned)
    assert not held_out(routing_digest(a), refs)
    assert held_out(routing_digest(b), refs)
    # the defaults of cycle were fitted on the bundled trace: in-sample there only
    defaults = tuned_on_for("cycle", {})
    assert [r.name for r in defaults] == [bundled_trace_path().name]
    assert not held_out(routing_digest(load_bundled()), defaults)
    assert held_out(routing_digest(a), defaults)
    # overriding a fitted weight leaves nothing tuned; untuned policies never are
    assert tuned_on_for("cycle", {"w0": 0.1}) == []
    assert tuned_on_for("lru", {}) == []


def test_load_refuses_what_is_not_a_tuned_file(tmp_path):
    bad = tmp_path / "bad.json"
    for text, match in (
        ("not json", "JSON"),
        (json.dumps({"kind": "other"}), "tuned-policy"),
        (json.dumps({"kind": "mer.tuned-policy", "version": 1, "policy": "nope"}), "malformed"),
    ):
        bad.write_text(text)
        with pytest.raises(BadInput, match=match):
            TunedPolicy.load(bad)
    t = tune_policy("cycle", [(tmp_path / "a.parquet", _trace(3))], sizes=[8])
    obj = t.to_dict()
    obj["params"]["rate_mid"] = 5.0
    bad.write_text(json.dumps(obj))
    with pytest.raises(BadInput, match="rate_mid"):
        TunedPolicy.load(bad)


def test_tune_refuses_what_cannot_be_tuned(tmp_path):
    tr = [(tmp_path / "a.parquet", _trace(3))]
    with pytest.raises(BadInput, match="no parameters to tune"):
        tune_policy("lru", tr)
    with pytest.raises(BadInput, match="future"):
        tune_policy("opt", tr)
    with pytest.raises(BadInput, match="outside"):
        tune_policy("cycle", tr, sizes=[1000])


def test_cli_tune_writes_the_file_and_refuses_bad_input(tmp_path):
    for i in range(2):
        write_trace(_trace(i), tmp_path / f"t{i}.parquet")
    out = tmp_path / "tuned.json"
    res = _cli(
        "tune",
        "--policy",
        "cycle",
        tmp_path / "t0.parquet",
        tmp_path / "t1.parquet",
        "--sizes",
        "8,12",
        "-o",
        out,
        "--json",
    )
    obj = json.loads(res.stdout)
    assert obj["policy"] == "cycle" and len(obj["tuned_on"]) == 2
    assert TunedPolicy.load(out).params == obj["params"]
    assert len(pd.DataFrame(obj["train"])) == 4
    for args in (
        ("--policy", "lru", tmp_path / "t0.parquet", "-o", tmp_path / "x.json"),
        (
            "--policy",
            "lfu",
            "--features",
            "bias",
            tmp_path / "t0.parquet",
            "-o",
            tmp_path / "x.json",
        ),
        ("--policy", "nope", tmp_path / "t0.parquet", "-o", tmp_path / "x.json"),
    ):
        res = _cli("tune", *args, check=False)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "x.json").exists()
