"""`import mer`: cheap to import, and each function returns what its command returns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import mer
from mer.cli import main
from mer.traces.bundled import bundled_trace_path

HEAVY = ("numpy", "pandas", "pyarrow", "matplotlib", "torch", "transformers", "simpy")


def test_import_mer_loads_nothing_heavy() -> None:
    code = (
        "import sys, mer\n"
        "f = mer.simulate\n"  # naming a function does not import its dependencies either
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_api_name_resolves_and_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for name in mer.__all__:
        if name.startswith("__"):
            continue
        assert getattr(mer, name) is not None
    for name in (
        "read_trace",
        "import_trace",
        "mrc",
        "simulate",
        "sweep",
        "run",
        "compare",
        "plot",
    ):
        assert f"mer.{name}" in doc, name
    with pytest.raises(AttributeError):
        mer.no_such_thing  # noqa: B018


def test_mrc_equals_the_command(tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    args = ["--policies", "lru,fifo", "--scopes", "global,per-layer", "--sizes", "16,64,200"]
    assert main(["mrc", str(bundled_trace_path()), "-o", str(out), *args]) == 0
    cli = pd.read_parquet(out)
    api = mer.mrc(bundled_trace_path(), policies=["lru", "fifo"], sizes=[16, 64, 200])
    key = ["policy", "scope", "cache_slots"]
    pd.testing.assert_frame_equal(
        cli.sort_values(key).reset_index(drop=True)[api.columns],
        api.sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )


def test_simulate_equals_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    trace = str(bundled_trace_path())
    opts = ["--policy", "arc", "--cache-slots", "48", "--predictor", "markov", "--tokens", "60"]
    assert (
        main(
            [
                "simulate",
                trace,
                *opts,
                "--hardware",
                "ci-tiny",
                "--json",
                "-o",
                str(tmp_path / "t.parquet"),
            ]
        )
        == 0
    )
    cli = json.loads(capsys.readouterr().out)
    res = mer.simulate(
        trace, policy="arc", cache_slots=48, predictor="markov", tokens=60, hardware="ci-tiny"
    )
    api = res.summary.to_dict()
    for k in (
        "hits",
        "misses",
        "hit_rate",
        "tokens",
        "tokens_per_s",
        "bytes_read",
        "prefetch",
        "trace_digest",
        "shape",
    ):
        assert api[k] == cli[k], k
    from mer.summary import read_token_table

    rows, _ = read_token_table(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(
        rows.reset_index(drop=True), res.tokens.reset_index(drop=True), check_dtype=False
    )


def test_sweep_equals_the_command(tmp_path: Path) -> None:
    trace = str(bundled_trace_path())
    grid = [
        "--policies",
        "lru,fifo",
        "--cache-slots",
        "32,64",
        "--tokens",
        "30",
        "--hardware",
        "ci-tiny",
    ]
    assert (
        main(
            [
                "sweep",
                trace,
                *grid,
                "-o",
                str(tmp_path / "cli.parquet"),
                "--jobs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    api = mer.sweep(
        trace,
        output=tmp_path / "api.parquet",
        policies=["lru", "fifo"],
        cache_slots=[32, 64],
        hardware=["ci-tiny"],
        tokens=30,
        jobs=1,
    )
    cli = pd.read_parquet(tmp_path / "cli.parquet")
    cols = ["policy", "cache_slots", "hits", "misses", "tokens_per_s", "config_hash"]
    assert (
        cli.sort_values(cols[:2])[cols].values.tolist()
        == api.sort_values(cols[:2])[cols].values.tolist()
    )


def test_compare_and_plot_take_results_or_files(tmp_path: Path) -> None:
    trace = mer.bundled_trace().head(12)
    a = mer.simulate(trace, cache_slots=64, hardware="ci-tiny")
    b = mer.simulate(trace, cache_slots=64, hardware="nvme-desktop")
    a.summary.save(tmp_path / "a.json")
    c = mer.compare(tmp_path / "a.json", b)
    assert c.hit_counts_equal and c.row("hits").predicted == a.summary.hits
    with pytest.raises(mer.BadInput, match="cache_slots"):
        mer.compare(a, mer.simulate(trace, cache_slots=32, hardware="ci-tiny"))
    files = mer.plot("popularity", trace, tmp_path / "pop.png")
    assert {".png", ".svg"} <= {f.suffix for f in files} and all(f.exists() for f in files)


def test_api_errors_are_bad_input() -> None:
    with pytest.raises(mer.BadInput, match="unknown replay option"):
        mer.simulate(mer.bundled_trace(), cache_sloths=3)
    with pytest.raises(mer.BadInput, match="unknown policy"):
        mer.simulate(mer.bundled_trace(), policy="nope")
    with pytest.raises(mer.BadInput, match="more than the trace's 256"):
        mer.simulate(mer.bundled_trace(), cache_slots=300)
