"""Sweeps: rows equal single simulations, resume without duplicates, dask backend, --best."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mer.cli import main
from mer.core import ReplayConfig
from mer.sim.hardware import load_profile
from mer.sim.model import SimOptions, simulate
from mer.sim.sweep import SweepSpec, best_row, run_command, run_sweep
from mer.summary import read_token_table, trace_digest
from mer.traces.format import TraceMeta, from_arrays, write_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 9) ** 1.2
    p /= p.sum()
    experts = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(30 * 32)])
    meta = TraceMeta(model="test", n_layers=32, n_experts=8, top_k=2)
    tr = from_arrays(experts.reshape(30, 32, 2).astype(np.int16), meta, name="t")
    path = tmp_path_factory.mktemp("sw") / "t.parquet"
    write_trace(tr, path)
    return path


def spec(path: Path, **kw) -> SweepSpec:
    base = dict(
        trace=str(path),
        policies=["lru", "fifo"],
        cache_slots=[16, 48],
        predictors=["none", "oracle"],
        hardware=["ci-tiny"],
        shape="mixtral-tiny",
    )
    base.update(kw)
    return SweepSpec(**base)  # type: ignore[arg-type]


KEY_COLS = ["config_hash", "hits", "misses", "tokens_per_s", "prefetch_late", "wall_s"]


def test_rows_equal_single_simulations(trace_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    res = run_sweep(spec(trace_path), out, trace_digest="d", jobs=1, progress=False)
    df = res.results
    assert len(df) == 8 and res.ran == 8 and not res.failed
    from mer.traces.format import read_trace

    tr = read_trace(trace_path)
    for row in df.itertuples():
        s = simulate(
            tr,
            ReplayConfig(
                policy=str(row.policy),
                cache_slots=int(row.cache_slots),  # type: ignore[arg-type]
                predictor=str(row.predictor),
            ),
            load_profile("ci-tiny"),
            SimOptions(shape="mixtral-tiny"),
        ).summary
        assert (row.hits, row.misses, row.tokens_per_s) == (s.hits, s.misses, s.tokens_per_s)


def test_resume_after_partial_grid(trace_path: Path, tmp_path: Path) -> None:
    full = tmp_path / "full.parquet"
    run_sweep(spec(trace_path), full, trace_digest="d", jobs=2, progress=False)
    out = tmp_path / "r.parquet"
    part = run_sweep(
        spec(trace_path, policies=["lru"]), out, trace_digest="d", jobs=1, progress=False
    )
    assert part.ran == 4
    res = run_sweep(spec(trace_path), out, trace_digest="d", jobs=2, progress=False)
    assert (res.ran, res.skipped) == (4, 4)
    df = pd.read_parquet(out)
    assert df["config_hash"].is_unique and len(df) == 8
    a = df[KEY_COLS].sort_values("config_hash").reset_index(drop=True)
    b = pd.read_parquet(full)[KEY_COLS].sort_values("config_hash").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    again = run_sweep(spec(trace_path), out, trace_digest="d", jobs=2, progress=False)
    assert (again.ran, again.skipped) == (0, 8)


def test_dask_backend(trace_path: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(
        n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None
    ) as cluster:
        out = tmp_path / "d.parquet"
        res = run_sweep(
            spec(trace_path, predictors=["none"]),
            out,
            trace_digest="d",
            backend="dask",
            scheduler=cluster.scheduler_address,
            progress=False,
        )
    ref = run_sweep(
        spec(trace_path, predictors=["none"]),
        tmp_path / "l.parquet",
        trace_digest="d",
        jobs=1,
        progress=False,
    )
    assert res.ran == 4
    pd.testing.assert_frame_equal(
        res.results[KEY_COLS].reset_index(drop=True), ref.results[KEY_COLS].reset_index(drop=True)
    )


def test_best_and_command() -> None:
    df = pd.DataFrame(
        [
            dict(
                trace="t.parquet",
                policy="lru",
                scope="global",
                cache_slots=16,
                predictor="none",
                pipeline_depth=1,
                tokens_per_s=1.0,
                hit_rate=0.9,
                tokens_per_s_per_gib=5.0,
            ),
            dict(
                trace="t.parquet",
                policy="arc",
                scope="per-layer",
                cache_slots=64,
                predictor="oracle",
                pipeline_depth=2,
                tokens_per_s=2.0,
                hit_rate=0.5,
                tokens_per_s_per_gib=1.0,
            ),
        ]
    )
    assert best_row(df, "tokens_per_s")["policy"] == "arc"
    assert best_row(df, "hit_rate")["policy"] == "lru"
    cmd = run_command(best_row(df, "tokens_per_s"), "E.gguf")
    assert cmd == (
        "mer run t.parquet --experts E.gguf --policy arc --cache-slots 64 --scope per-layer "
        "--predictor oracle --pipeline-depth 2"
    )


def test_cli_sweep_and_simulate(trace_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.parquet"
    rc = main(
        [
            "sweep",
            str(trace_path),
            "--policies",
            "lru,fifo",
            "--cache-slots",
            "16,32",
            "--predictors",
            "none",
            "--hardware",
            "ci-tiny",
            "--shape",
            "mixtral-tiny",
            "-o",
            str(out),
            "--jobs",
            "1",
            "--json",
            "--best",
            "hit_rate",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    df = pd.read_parquet(out)
    assert res["configs"] == 4 and len(df) == 4
    assert res["best"]["hit_rate"] == df["hit_rate"].max()
    assert res["command"].startswith(f"mer run {trace_path} --experts EXPERTS.gguf --policy ")

    tok = tmp_path / "tok.parquet"
    summ = tmp_path / "s.json"
    rc = main(
        [
            "simulate",
            str(trace_path),
            "--policy",
            "lru",
            "--cache-slots",
            "32",
            "--hardware",
            "ci-tiny",
            "--shape",
            "mixtral-tiny",
            "--json",
            "-o",
            str(tok),
            "--summary",
            str(summ),
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "simulated" and d["hits"] + d["misses"] == 30 * 32 * 2
    assert d["trace_digest"] == trace_digest(trace_path)
    rows, summary = read_token_table(tok)
    assert len(rows) == 30 and summary is not None and summary.hits == d["hits"]
    assert int(rows["hits"].sum()) == d["hits"]
    assert json.loads(summ.read_text())["tokens_per_s"] == d["tokens_per_s"]
    rc = main(["simulate", str(trace_path), "--hardware", "ci-tiny", "--shape", "mixtral-tiny"])
    text = capsys.readouterr().out
    assert rc == 0 and "hit rate" in text and "per-read latency" in text


def test_cli_errors(trace_path: Path, capsys) -> None:
    assert main(["simulate", str(trace_path), "--hardware", "nope"]) == 2
    assert "unknown hardware profile" in capsys.readouterr().err
    assert main(["simulate", "/no/such.parquet"]) == 2
    assert main(["sweep", str(trace_path), "--policies", "zzz", "-o", "/tmp/x.parquet"]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_offline_flag_and_online_best(trace_path: Path, tmp_path: Path) -> None:
    res = run_sweep(
        spec(trace_path, policies=["lru", "opt"], cache_slots=[48], base={"tokens": 20}),
        tmp_path / "o.parquet",
        trace_digest="d",
        jobs=1,
        progress=False,
    )
    df = res.results
    expected = (df["policy"] == "opt") | (df["predictor"] == "oracle")
    assert df["offline"].tolist() == expected.tolist()
    assert (df["tokens"] == 20).all() and (df["replay_tokens"] == 20).all()
    online = best_row(df, "hit_rate", online=True)
    assert online["policy"] == "lru" and online["predictor"] == "none"
    assert run_command(online).endswith("--pipeline-depth 1 --tokens 20")


def test_grid_excludes_rows_of_earlier_grids_in_the_same_file(
    trace_path: Path, tmp_path: Path
) -> None:
    """A results file can hold other grids; --best must choose within this one."""
    out = tmp_path / "r.parquet"
    run_sweep(spec(trace_path, cache_slots=[200]), out, trace_digest="d", jobs=1, progress=False)
    res = run_sweep(spec(trace_path), out, trace_digest="d", jobs=1, progress=False)
    assert len(res.results) == 12  # the file keeps both grids
    grid = res.grid()
    assert len(grid) == 8 and set(grid["cache_slots"]) == {16, 48}
    best = best_row(grid, "tokens_per_s")
    assert best["cache_slots"] in (16, 48)
    # Independently: the best of this grid is the max over its 8 rows.
    assert best["tokens_per_s"] == grid["tokens_per_s"].max()


def test_results_read_while_another_sweep_replaces_the_file(tmp_path: Path) -> None:
    """A reader racing a concurrent sweep's atomic rewrites must see one whole file each
    time. Reading by path let pyarrow pair one version's footer with another's pages
    (CI saw "Page was smaller than expected"), so the race is provoked many times here."""
    import os
    import threading

    from mer.sim.sweep import read_results

    out = tmp_path / "r.parquet"
    frames = [
        pd.DataFrame({"config_hash": [f"h{j}" for j in range(n)], "x": np.arange(n)})
        for n in (5, 17, 40, 83)
    ]
    frames[0].to_parquet(out, index=False)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".w{i % 2}"
            frames[i % len(frames)].to_parquet(tmp, index=False)
            os.replace(tmp, out)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        sizes = {len(read_results(out)) for _ in range(600)}
    finally:
        stop.set()
        t.join()
    assert sizes <= {len(f) for f in frames}
