"""bench/bench_prefetch_run.py: real `mer run`s of the tiny shape beside `mer simulate`, the
decision counts held against the clock-free replay of the decision core."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mer.engine.gguf_synth import synth_gguf
from mer.shapes import get_shape

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_prefetch_run.py"
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
REFERENCE = f"""
import json
from mer.core import Replay, ReplayConfig, replay_counts
from mer.traces.format import read_trace
tr = read_trace({str(TRACE)!r}).select_phase("decode").head(4)
cfg = ReplayConfig(policy="lru", cache_slots=40, predictor="cooccur", prefetch_top_n=1,
                   prefetch_lead=2, pipeline_depth=6, prefetch_inflight=1, prefetch_hold=3,
                   prefetch_window=2, prefetch_cancel=2).validate()
ref = replay_counts(Replay.from_trace(tr, cfg), fast=False)
names = ("prefetch_issued", "prefetch_wasted", "prefetch_cancelled", "prefetch_used")
print(json.dumps({{n: int(ref.total(n)) for n in names}}))
"""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_prefetch_run", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decision_flags_drop_run_only_flags_and_their_values() -> None:
    mod = _bench()
    flags = ["--predictor", "oracle", "--background-depth", "2", "--ffn=numpy", "--io", "pread"]
    flags += ["--prefetch-lead", "2", "--threads", "1"]
    assert mod.decision_flags(flags) == ["--predictor", "oracle", "--prefetch-lead", "2"]


def test_runs_and_their_simulation_take_the_core_decisions(tmp_path: Path) -> None:
    experts = tmp_path / "tiny.gguf"
    synth_gguf(experts, get_shape("mixtral-tiny"), seed=1)
    rule = (
        "--predictor cooccur --prefetch-top-n 1 --prefetch-lead 2 --pipeline-depth 6 "
        "--prefetch-inflight 1 --prefetch-hold 3 --prefetch-window 2 --prefetch-cancel 2 "
        "--background-depth 2"
    )
    cmd = [sys.executable, str(BENCH), str(TRACE), "--experts", str(experts)]
    cmd += ["--cache-slots", "40", "--tokens", "4", "--rounds", "2", "--hardware", "ci-tiny"]
    cmd += ["--policy", "lru"]
    cmd += ["--prefetch", rule, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mismatches"] == []
    (row,) = out["rules"]
    assert row["decisions_equal"] is True
    assert len(row["ratios"]) == 2 and row["predicted_ratio"] > 0
    # the reference: every read landed at once, no clock at all (in a fresh interpreter, so
    # that no other test's registry changes reach it)
    ref = json.loads(
        subprocess.run(
            [sys.executable, "-c", REFERENCE],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=True,
        ).stdout
    )
    assert ref["prefetch_issued"] > 0
    assert row["issued"] == ref["prefetch_issued"]
    assert row["wasted"] == ref["prefetch_wasted"]
    assert row["cancelled"] == ref["prefetch_cancelled"]
    assert row["used"] + row["late"] == ref["prefetch_used"]


@pytest.mark.parametrize(
    "bad, said",
    [(["--rounds", "0"], "--rounds"), (["--rounds", "1", "--tokens", "1"], "no such file")],
)
def test_bad_input_exits_2_with_one_message(bad: list[str], said: str, tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--experts", str(tmp_path / "x.gguf"), *bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert said in proc.stderr and "Traceback" not in proc.stderr
