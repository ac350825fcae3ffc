"""mer validate's compute pulse: a CPU that moves from run to run is predicted exactly from
the pulse before each run (and missed by the fixed calibration); the pulse's arithmetic and
the statistics held against the runs, by hand; the pulse on a real expert file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from summaries import make_summary
from test_validation import GRID, _start, _truth

from mer.analysis.validate import ModelMachine, ValidateOptions, run_validation
from mer.analysis.validation_grid import Grid
from mer.analysis.validation_pulse import (
    COMPUTE_STAGE,
    compute_per_read,
    compute_pulse_stats,
    pulse_token_compute,
    run_compute,
)
from mer.cli.validate_cmd import format_text
from mer.engine.probe import engine_step_of
from mer.traces.bundled import bundled_trace_path
from mer.traces.format import read_trace


def test_a_cpu_that_moves_is_predicted_exactly_from_the_pulse_before_each_run(
    tmp_path: Path,
) -> None:
    """The FFN runs 1.8x slower in every third run after calibration: the fixed calibration
    misses those runs, the prediction from the compute pulse right before each is exact and
    is the headline; without the pulse the old behaviour (fixed calibration) is kept."""
    trace = read_trace(bundled_trace_path())
    truth = _truth()

    def cpu(i: int) -> float:  # run 0 is the calibration
        return 1.8 if i % 3 == 1 else 1.0

    m = ModelMachine(
        trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768, slowdown=cpu
    )
    grid = Grid(GRID.calibration, GRID.configs[:4], name="four").check()
    opts = ValidateOptions(tokens=4, repeats=2, drift=10.0)
    res = run_validation(m, trace, grid, _start(truth), tmp_path / "on", opts, log=None)
    t = res.table
    assert set(t.stage) == {"uncalibrated", "calibrated", COMPUTE_STAGE}
    cp = t[t.stage == COMPUTE_STAGE]
    assert cp["abs_rel_error"].max() < 1e-6, cp.sort_values("abs_rel_error").tail(3)
    fixed = t[(t.stage == "calibrated") & (t.metric == "tokens/s")]
    assert fixed["abs_rel_error"].max() > 0.02
    s = res.summary
    assert s["calibrated_stage"] == COMPUTE_STAGE and s["compute_pulse"]
    assert s["targets"]["tokens/s worst abs. error"]["value"] < 1e-6
    assert s["targets_by_stage"]["calibrated"]["tokens/s worst abs. error"]["value"] > 0.02
    runs = res.runs
    assert np.allclose(runs.compute_pulse_tokens_per_s, runs.tokens_per_s, rtol=1e-6)
    # the pulse before a slow run sees it slow: 1.8x the FFN of the pulse before a quick one
    ffn = runs.pulse_before_ffn_s.to_numpy()
    assert ffn.max() / ffn.min() == pytest.approx(1.8)
    # the model machine's FFN time is the pulse's (plus the busy overhead of FFNs run
    # while a read is in flight, which a resident pulse does not have)
    assert s["compute_pulse_stats"]["figures"]["ffn_s"]["r_before_run"] > 0.99
    assert s["compute_pulse_stats"]["per_run_median_abs_log_error"][COMPUTE_STAGE] < 1e-6
    md = (tmp_path / "on" / "validation.md").read_text()
    assert "compute-pulse error (%)" in md and "headline is the compute-pulse stage" in md
    assert "fixed cal." in format_text(res).splitlines()[2]
    # the old behaviour, kept for comparison
    off = run_validation(
        m,
        trace,
        grid,
        _start(truth),
        tmp_path / "off",
        ValidateOptions(tokens=4, repeats=1, drift=10.0, compute_pulse=False),
        log=None,
    )
    assert COMPUTE_STAGE not in set(off.table.stage)
    assert off.summary["calibrated_stage"] == "calibrated"
    assert "pulse_before_ffn_s" in off.runs and off.runs.pulse_before_ffn_s.isna().all()
    assert "compute-pulse" not in format_text(off)


def test_engine_step_figures_by_hand() -> None:
    """Medians over the tokens that read nothing, per step (2 layers, top-2)."""
    tokens = pd.DataFrame(
        {
            "misses": [4, 0, 0, 0, 1],
            "prefetch_issued": [0, 0, 0, 0, 0],
            "time_s": [9.0, 1.0, 1.2, 2.0, 9.0],
            "io_wait_s": [5.0, 0.0, 0.0, 0.0, 5.0],
            "compute_s": [2.0, 0.4, 0.8, 0.4, 2.0],
            "dense_s": [1.0, 0.2, 0.2, 0.4, 1.0],
        }
    )
    st = engine_step_of(tokens, n_layers=2, top_k=2)
    assert st.tokens == 3
    assert st.ffn_s == pytest.approx(0.4 / 4)  # median compute 0.4 over 2 layers x 2
    assert st.dense_s == pytest.approx(0.2 / 2)
    # rest per token: 0.4, 0.2, 1.2 -> median 0.4, per layer 0.2
    assert st.step_overhead_s == pytest.approx(0.2)


def test_run_figures_and_pulse_statistics_by_hand() -> None:
    s = make_summary(
        tokens=10,
        layers=32,
        top_k=2,
        hits=400,
        misses=240,
        compute_s=1.0,
        dense_s=0.5,
        extra={
            "driver_time": {
                "steps": 320,
                "ffn_direct_n": 500.0,
                "ffn_busy_n": 140.0,
                "overhead_s": 0.032,
            },
            "reads": 250,
            # the first (cold) token is skipped; 9 resident tokens: 1.0 x4 then 1.1 x5
            "token_compute_s": [5.0] + [1.0] * 4 + [1.1] * 5,
            "token_misses": [64] + [0] * 9,
        },
    )
    rc = run_compute(s)
    assert rc["run_ffn_s"] == pytest.approx(1.0 / 640)
    assert rc["run_dense_s"] == pytest.approx(0.5 / 320)
    assert rc["run_step_s"] == pytest.approx(1e-4)
    assert rc["run_token_compute_s"] == pytest.approx(1.1)  # median of 4x 1.0, 5x 1.1
    assert rc["run_compute_drift"] == pytest.approx(0.1)  # halves 1.0 | 1.1
    pulse = {"ffn_s": 1e-3, "dense_s": 5e-4, "step_s": 1e-5}
    assert pulse_token_compute(pulse, 32, 2) == pytest.approx(32 * 2.5e-3)
    assert math.isnan(pulse_token_compute({}, 32, 2))
    # (1.0 + 0.5 - 10 x 0.08) / 250 reads
    assert compute_per_read(s, pulse) == pytest.approx(0.7 / 250)
    # runs exactly 1.5x their pulse before, unrelated to the pulse after
    b = np.array([1.0, 2.0, 3.0, 4.0])
    runs = pd.DataFrame(
        {
            "pulse_before_ffn_s": b,
            "pulse_after_ffn_s": [2.0, 2.0, 2.0, 2.0],
            "run_ffn_s": 1.5 * b,
            "tokens_per_s": [10.0, 10.0, 10.0, 10.0],
            "predicted_tokens_per_s": [11.0, 9.0, 12.0, 10.0],
            "compute_pulse_tokens_per_s": [10.0, 10.0, 10.0, 10.0],
            "run_compute_drift": [0.1, -0.2, np.nan, 0.05],
            "compute_per_read_s": [1e-5, 3e-5, np.nan, 2e-5],
        }
    )
    st = compute_pulse_stats(runs)
    f = st["figures"]["ffn_s"]
    assert f["r_before_run"] == pytest.approx(1.0)
    assert f["r_after_run"] is None  # a constant pulse after: no correlation
    assert f["median_abs_run_vs_before"] == pytest.approx(0.5)
    assert f["median_abs_after_vs_before"] == pytest.approx(np.median([1.0, 0.0, 1 / 3, 0.5]))
    err = st["per_run_median_abs_log_error"]
    assert err["calibrated"] == pytest.approx(
        np.median(np.abs(np.log([10 / 11, 10 / 9, 10 / 12, 1.0])))
    )
    assert err[COMPUTE_STAGE] == 0.0
    w = st["within_run_compute_change"]
    assert w["median_abs"] == pytest.approx(0.1) and w["min"] == pytest.approx(-0.2)
    assert st["compute_per_read_s"]["median"] == pytest.approx(2e-5)
    assert compute_pulse_stats(pd.DataFrame()) == {"figures": {}}


def test_compute_pulse_on_a_real_expert_file(tmp_path: Path) -> None:
    """The executor on a real (tiny) expert file, every step resident after the first:
    positive figures, the FFN no slower than the whole token's compute allows."""
    from mer.engine.gguf_synth import synth_gguf
    from mer.engine.probe import compute_pulse
    from mer.engine.store import ExpertStore
    from mer.engine.streaming import EngineConfig
    from mer.shapes import get_shape

    path = tmp_path / "tiny.gguf"
    synth_gguf(path, get_shape("mixtral-tiny"), seed=1)
    store = ExpertStore.open(path)
    p = compute_pulse(store, EngineConfig(threads=1, realtime=False), tokens=6, seed=3)
    assert set(p) == {"ffn_s", "dense_s", "step_s", "seconds"}
    assert p["ffn_s"] > 0 and p["dense_s"] > 0 and p["step_s"] >= 0
    per_token = store.n_layers * (store.shape.top_k * p["ffn_s"] + p["dense_s"])
    assert per_token < p["seconds"]
