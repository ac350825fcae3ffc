"""mer validate: the table's arithmetic by hand, a synthetic machine the calibrated model
must predict exactly, drift and resume, and bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from summaries import make_summary

from mer.analysis.validate import ModelMachine, ValidateOptions, run_validation
from mer.analysis.validation_grid import CALIBRATION, Grid, GridConfig, load_grid
from mer.analysis.validation_table import build_table, rel_error, summarize
from mer.cli.validate_cmd import format_text
from mer.errors import BadInput
from mer.sim.hardware import load_profile
from mer.summary import RunSummary, busy_seconds
from mer.traces.bundled import bundled_trace_path
from mer.traces.format import read_trace

ROOT = Path(__file__).resolve().parents[1]


def _summary(**over: Any) -> RunSummary:
    base: dict[str, Any] = dict(
        kind="measured",
        hardware="h",
        cache_slots=8,
        hits=100,
        misses=540,
        hit_rate=100 / 640,
        bytes_read=540 * 4096,
        wall_s=1.0,
        tokens_per_s=10.0,
        layer_iterations_per_s=320.0,
        compute_s=0.3,
        dense_s=0.1,
        io_wait_share=0.5,
        latency={"read": {"p50": 1e-3, "p99": 3e-3}, "token": {"p50": 0.1, "p99": 0.2}},
    )
    return make_summary(**{**base, **over})


# -- the table's arithmetic, against numbers worked out by hand -------------------------


def test_rel_error_rules() -> None:
    assert rel_error(11.5, 11.0) == pytest.approx(0.5 / 11.0)
    assert rel_error(0.0, 0.0) == 0.0
    assert math.isnan(rel_error(1.0, 0.0))
    assert math.isnan(rel_error(float("nan"), 1.0))


def test_table_median_spread_error_and_inside() -> None:
    a = GridConfig("a", cache_slots=8)
    b = GridConfig("b", cache_slots=16, predictor="oracle")
    measured = {
        "a": [_summary(tokens_per_s=v, io_wait_share=0.6) for v in (10.0, 12.0, 11.0)],
        "b": [_summary(tokens_per_s=v, io_wait_share=0.1) for v in (6.0, 5.0, 5.5)],
    }
    predicted = {
        "calibrated": {"a": [_summary(tokens_per_s=11.5)], "b": [_summary(tokens_per_s=7.0)]},
        "uncalibrated": {"a": [_summary(tokens_per_s=20.0)], "b": [_summary(tokens_per_s=2.0)]},
    }
    t = build_table([a, b], measured, predicted)
    row = t[(t.config == "a") & (t.stage == "calibrated") & (t.metric == "tokens/s")].iloc[0]
    assert (row.measured, row.measured_min, row.measured_max) == (11.0, 10.0, 12.0)
    assert row.spread == pytest.approx(2.0 / 11.0)
    assert row.rel_error == pytest.approx(0.5 / 11.0)
    assert bool(row.within_spread) and row.n_runs == 3 and row.bound == "I/O-bound"
    # standard error of the median: sqrt(pi/2) * s / sqrt(n), s = 1 (10, 11, 12)
    assert row.median_se == pytest.approx(math.sqrt(math.pi / 2) / math.sqrt(3) / 11.0)
    assert bool(row.within_2se)  # 0.5 from the median, 2 SE = 1.45
    row = t[(t.config == "b") & (t.stage == "calibrated") & (t.metric == "tokens/s")].iloc[0]
    assert row.measured == 5.5 and row.rel_error == pytest.approx(1.5 / 5.5)
    assert not bool(row.within_spread) and row.bound == "compute-bound"
    assert not bool(row.within_2se)  # 1.5 from the median, 2 SE = 2 * 1.2533 * 0.5 / 1.732
    s = summarize(t, [a, b])
    cal = s["stages"]["calibrated"]["tokens/s"]
    assert cal["median"] == pytest.approx(np.median([0.5 / 11.0, 1.5 / 5.5]))
    assert cal["worst"] == pytest.approx(1.5 / 5.5)
    assert (cal["within_spread"], cal["configs"]) == (1, 2)
    unc = s["stages"]["uncalibrated"]["tokens/s"]
    assert unc["median"] == pytest.approx(np.median([9.0 / 11.0, 3.5 / 5.5]))
    tg = s["targets"]["tokens/s median abs. error"]
    assert tg["met"] is False and tg["short_by"] == pytest.approx(cal["median"] - 0.05)
    # a is measured faster and predicted faster: no swap
    assert s["ranking"]["calibrated"]["equal"] and s["ranking"]["calibrated"]["swapped_pairs"] == []


def test_ranking_names_swapped_pairs_and_noise() -> None:
    from mer.analysis.validation_table import ranking

    meas = {"x": (10.0, 9.0, 11.0), "y": (10.5, 10.2, 10.8), "z": (5.0, 4.9, 5.1)}
    r = ranking({"x": 12.0, "y": 11.0, "z": 6.0}, meas)
    assert r["predicted_order"] == ["x", "y", "z"] and r["measured_order"] == ["y", "x", "z"]
    assert r["swapped_pairs"] == [
        {"measured_faster": "y", "predicted_faster": "x", "within_noise": True}
    ]
    assert r["kendall_tau"] == pytest.approx((2 - 1) / 3)
    r = ranking({"x": 12.0, "z": 13.0}, meas)
    assert r["swapped_pairs"] == [
        {"measured_faster": "x", "predicted_faster": "z", "within_noise": False}
    ]


def test_counts_check_prefetch_off_exact_on_within_one_percent() -> None:
    off = GridConfig("off", cache_slots=8)
    on = GridConfig("on", cache_slots=8, predictor="oracle")
    pf = {"issued": 200, "used": 150, "late": 30, "wasted": 20}
    measured = {
        "off": [_summary(), _summary()],
        "on": [_summary(prefetch=pf), _summary(prefetch={**pf, "late": 31})],
    }
    # predicted: two of the used prefetches late instead of on time (a race between a read
    # and its lookup: two hits fewer, two late more), and one more late prefetch
    predicted = {
        "calibrated": {
            "off": [_summary()],
            "on": [_summary(prefetch={**pf, "used": 148, "late": 33}, hits=98)],
        }
    }
    s = summarize(build_table([off, on], measured, predicted), [off, on])
    c = s["counts"]
    assert c["prefetch_off_equal"] and c["configs"]["off"]["exact"]
    # the decisions, by hand: hits incl. late predicted 98 + 33 = 131 against the median of
    # 130 and 131 = 130.5, relative to itself; used incl. late 148 + 33 = 181 against 180.5,
    # relative to the 200 issued; issued and wasted equal. The on-time split does not count.
    assert c["configs"]["on"]["worst"] == pytest.approx(max(0.5 / 130.5, 0.5 / 200))
    assert s["targets"]["counts with prefetch on, abs. error"]["met"]
    # the repeats among themselves: used incl. late 180 and 181, one of the 200 issued
    assert c["configs"]["on"]["repeat_spread"] == pytest.approx(1 / 200)
    assert c["prefetch_on_repeat_spread"] == pytest.approx(1 / 200)
    assert c["configs"]["off"]["repeat_spread"] == 0.0
    # a decision that differs does count: 3 more prefetches issued of 200
    predicted["calibrated"]["on"] = [_summary(prefetch={**pf, "issued": 203, "late": 30})]
    s = summarize(build_table([off, on], measured, predicted), [off, on])
    assert s["counts"]["configs"]["on"]["worst"] == pytest.approx(3 / 200)
    assert not s["targets"]["counts with prefetch on, abs. error"]["met"]
    measured["off"][1] = _summary(hits=101, misses=539)
    s = summarize(build_table([off, on], measured, predicted), [off, on])
    assert not s["counts"]["prefetch_off_equal"]
    assert not s["targets"]["counts equal with prefetch off"]["met"]


def test_busy_seconds_is_the_union_of_intervals() -> None:
    rng = np.random.default_rng(4)
    for _ in range(30):
        start = rng.integers(0, 50, size=12).astype(float)
        end = start + rng.integers(0, 9, size=12)
        covered = np.zeros(80, dtype=bool)
        for s, e in zip(start, end, strict=True):
            covered[int(s) : int(e)] = True
        assert busy_seconds(start, end) == pytest.approx(float(covered.sum()))
    assert busy_seconds(np.zeros(0), np.zeros(0)) == 0.0


# -- a synthetic machine: the calibrated prediction must be exact ---------------------


def _truth() -> Any:
    hw = load_profile("ci-tiny")
    hw.name = "truth"
    hw.ssd.channels = 2
    hw.ssd.queue_depth = 8
    hw.ssd.chunk_bytes = 32768
    hw.compute.step_overhead_s = 3e-5
    hw.compute.read_submit_s = 2e-5
    hw.compute.read_complete_s = 1.5e-5
    hw.compute.ffn_busy_overhead_s = 1e-5
    hw.ssd.access_latency_s = 2e-5
    hw.compute.dense_s_per_layer = 4e-5
    return hw.validate()


def _start(truth: Any) -> Any:
    """What the probe got wrong: every figure calibration refits, off by 20-300%."""
    p = copy.deepcopy(truth)
    p.name = "start"
    p.compute.ffn_bytes_per_s *= 2.0
    p.compute.dense_s_per_layer = 1e-4
    p.compute.step_overhead_s = 1e-4
    p.compute.read_submit_s = 5e-6
    p.compute.read_complete_s = 0.0
    p.compute.ffn_busy_overhead_s = 0.0
    p.ssd.bandwidth_bytes_per_s *= 1.6
    return p


GRID = Grid(
    # the calibration run's tokens issue different numbers of reads: the per-step and
    # per-read parts of the driver's time separate
    CALIBRATION.__class__("cal", cache_slots=160),
    (
        GridConfig("lru-16", cache_slots=16),
        GridConfig("fifo-64-pl", policy="fifo", cache_slots=64, scope="per-layer"),
        GridConfig("arc-96", policy="arc", cache_slots=96),
        GridConfig("lru-256", cache_slots=256),
        GridConfig("lru-64-oracle", cache_slots=64, predictor="oracle", pipeline_depth=2),
        GridConfig("lru-32-qd2", cache_slots=32, queue_depth=2),
    ),
    name="test",
).check()


def test_synthetic_machine_is_predicted_exactly_after_calibration(tmp_path: Path) -> None:
    trace = read_trace(bundled_trace_path())
    truth = _truth()
    m = ModelMachine(trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768)
    res = run_validation(
        m, trace, GRID, _start(truth), tmp_path, ValidateOptions(tokens=4, repeats=2), log=None
    )
    t = res.table
    cal = t[t.stage == "calibrated"]
    # every timing metric within the bisection's precision, every count exactly
    assert cal["abs_rel_error"].max() < 1e-6, cal.sort_values("abs_rel_error").tail(3)
    assert cal["within_spread"].all()
    unc = t[(t.stage == "uncalibrated") & (t.metric == "tokens/s")]
    assert unc["abs_rel_error"].median() > 0.05  # calibrating mattered
    s = res.summary
    assert all(v["met"] for v in s["targets"].values()), s["targets"]
    assert s["counts"]["prefetch_off_equal"]
    assert s["ranking"]["calibrated"]["equal"]
    assert s["recalibrations"] == 0 and m.runs == 1 + 2 * len(GRID.configs)
    # what was written
    for name in ("validation.parquet", "validation.csv", "runs.parquet", "summary.json"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "figures" / "validation-tokens-per-s.png").exists()
    back = pd.read_parquet(tmp_path / "validation.parquet")
    assert len(back) == len(t)
    assert set(back.stage) == {"calibrated", "uncalibrated", "compute-pulse"}
    # a steady CPU: the compute pulse before each run sees the calibrated figures
    cp = t[t.stage == "compute-pulse"]
    assert cp["abs_rel_error"].max() < 1e-6, cp.sort_values("abs_rel_error").tail(3)
    assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 2 * len(GRID.configs)
    md = (tmp_path / "validation.md").read_text()
    assert "figures/validation-tokens-per-s.png" in md and "lru-256" in md


def test_io_bound_calibration_fits_only_io_and_predicts_exactly(tmp_path: Path) -> None:
    """From an I/O-bound calibration run only the SSD and the per-read costs are fitted;
    compute stays the probe's. With the probe right about compute and wrong about the
    disk, the calibrated prediction is exact; a wrong compute figure is kept, not fitted."""
    trace = read_trace(bundled_trace_path())
    truth = _truth()
    truth.ssd.bandwidth_bytes_per_s /= 4  # a slow disk: the calibration run waits on reads
    # compute after the driver blocked on a read is slower (what the probe, which never
    # blocks, does not see)
    truth.compute.wake_ffn_s, truth.compute.wake_dense_s = 2e-5, 1e-5
    m = ModelMachine(trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768)
    cal_cfg = CALIBRATION.__class__("cal-io", cache_slots=24)
    probe = copy.deepcopy(truth)
    probe.name = "probe"
    probe.ssd.bandwidth_bytes_per_s *= 1.6
    probe.compute.read_submit_s = 5e-6
    probe.compute.read_complete_s = 0.0
    probe.compute.wake_ffn_s = probe.compute.wake_dense_s = 0.0
    grid = Grid(cal_cfg, GRID.configs, name="io").check()
    res = run_validation(m, trace, grid, probe, tmp_path, ValidateOptions(tokens=4, repeats=1))
    assert res.summary["calibration_tokens"] == 16  # 4 x the held-out runs' 4 tokens
    prof = res.profiles[0]
    moved = prof.extra["calibration"]["moved"]
    assert set(moved) == {
        "compute.read_submit_s",
        "compute.read_complete_s",
        "ssd.bandwidth_bytes_per_s",
        "compute.wake_ffn_s",
        "compute.wake_dense_s",
    }
    assert prof.compute.wake_ffn_s == pytest.approx(truth.compute.wake_ffn_s, rel=1e-6)
    assert prof.compute.wake_dense_s == pytest.approx(truth.compute.wake_dense_s, rel=1e-6)
    assert prof.compute.read_submit_s == pytest.approx(truth.compute.read_submit_s)
    assert prof.compute.read_complete_s == pytest.approx(truth.compute.read_complete_s)
    assert prof.ssd.bandwidth_bytes_per_s == pytest.approx(
        truth.ssd.bandwidth_bytes_per_s, rel=1e-6
    )
    cal = res.table[res.table.stage == "calibrated"]
    assert cal["abs_rel_error"].max() < 1e-6, cal.sort_values("abs_rel_error").tail(3)
    # the same run from a profile whose FFN is wrong: compute is kept as it was
    wrong = copy.deepcopy(probe)
    wrong.compute.ffn_bytes_per_s *= 2
    run = m.run(cal_cfg, 4)
    assert run.io_wait_share > 0.5
    from mer.analysis.calibrate import calibrate

    c2 = calibrate(run, wrong, trace=trace)
    assert c2.profile.compute.ffn_bytes_per_s == wrong.compute.ffn_bytes_per_s
    assert "compute.ffn_bytes_per_s" in c2.kept and "compute.ffn_bytes_per_s" not in c2.moved
    assert "I/O-bound" in c2.format_text()


def test_disk_pulse_scaling_predicts_a_disk_that_moves_exactly(tmp_path: Path) -> None:
    """The device alone runs 2.5x slower in every other held-out run (after calibration):
    the fixed calibration misses those runs, the prediction scaled by the pulse right
    before each run is exact, and both stand in the table and the summary."""
    trace = read_trace(bundled_trace_path())
    truth = _truth()

    def disk(i: int) -> float:  # run 0 is the calibration, pulsed before (0) and after (1)
        return 2.5 if i >= 2 and i % 2 else 1.0

    m = ModelMachine(
        trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768, disk_slowdown=disk
    )
    opts = ValidateOptions(tokens=4, repeats=2, pulse_scale=True, compute_pulse=False)
    res = run_validation(m, trace, GRID, _start(truth), tmp_path, opts, log=None)
    t = res.table
    assert set(t.stage) == {"uncalibrated", "calibrated", "pulse-scaled"}
    tps = t[t.metric == "tokens/s"].set_index(["stage", "config"])
    pulsed = t[t.stage == "pulse-scaled"]
    assert pulsed["abs_rel_error"].max() < 1e-6, pulsed.sort_values("abs_rel_error").tail(3)
    assert tps.loc["calibrated", "abs_rel_error"].median() > 0.05  # the fixed profile misses
    runs = res.runs
    slow = runs.disk_pulse_ratio < 0.5
    assert slow.sum() == 5  # runs 3, 5, 7, 9 and 11 of the 12 held-out runs (1..12)
    assert np.allclose(runs.disk_pulse_ratio[slow], 1 / 2.5)
    assert np.allclose(runs.pulse_scaled_tokens_per_s, runs.tokens_per_s, rtol=1e-6)
    s = res.summary
    assert (
        s["pulse_scale"]
        and s["targets_by_stage"]["pulse-scaled"]["tokens/s worst abs. error"]["met"]
    )
    assert not s["targets"]["tokens/s median abs. error"]["met"]  # the fixed calibration's
    md = (tmp_path / "validation.md").read_text()
    assert "pulse-scaled error (%)" in md and "fixed calibration" in md
    # off: the stage is gone
    res2 = run_validation(
        m,
        trace,
        GRID,
        _start(truth),
        tmp_path / "off",
        ValidateOptions(tokens=4, repeats=1, pulse_scale=False, compute_pulse=False),
    )
    assert "pulse-scaled" not in set(res2.table.stage)
    # the text table carries the pulse-scaled column only when it was measured
    assert "pulse-scaled" in format_text(res).splitlines()[2]
    off_text = format_text(res2)
    assert "pulse-scaled" not in off_text and "nan" not in off_text


def test_rounds_continue_while_the_medians_standard_error_is_above_target(tmp_path: Path) -> None:
    trace = read_trace(bundled_trace_path())
    truth = _truth()
    grid = Grid(GRID.calibration, GRID.configs[:2], name="two").check()
    # a machine that repeats itself exactly: no standard error, the minimum of rounds
    m = ModelMachine(trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768)
    opts = ValidateOptions(tokens=4, repeats=2, max_repeats=5, target_se=0.01, drift=10.0)
    res = run_validation(m, trace, grid, _start(truth), tmp_path / "a", opts, log=None)
    assert res.summary["repeats"] == 2 and m.runs == 1 + 2 * 2
    # every other run slower (CPU): the medians stay uncertain, all 5 rounds are run
    m = ModelMachine(
        trace,
        truth,
        shape="mixtral-tiny",
        queue_depth=8,
        chunk_bytes=32768,
        slowdown=lambda i: 2.0 if i % 2 else 1.0,
    )
    res = run_validation(m, trace, grid, _start(truth), tmp_path / "b", opts, log=None)
    assert res.summary["repeats"] == 5 and m.runs == 1 + 5 * 2
    assert len(res.runs) == 10 and res.runs.cpu_wait_share.eq(0).all()
    assert res.summary["cpu_wait"]["median"] == 0.0
    assert res.summary["cpu_wait"]["r_with_error"] is None  # no variation, no correlation
    t = res.table
    row = t[(t.stage == "calibrated") & (t.metric == "tokens/s")].iloc[0]
    assert row.n_runs == 5
    with pytest.raises(BadInput, match="--max-repeats"):
        ValidateOptions(repeats=3, max_repeats=2).check()


def test_cpu_wait_summary_by_hand() -> None:
    from mer.analysis.validate import cpu_wait_summary

    runs = pd.DataFrame(
        {
            "cpu_wait_share": [0.1, 0.3, 0.5],
            # measured / predicted = e^0, e^-1, e^-2: the error falls in step with the wait
            "tokens_per_s": [10.0, 10.0 * math.exp(-1), 10.0 * math.exp(-2)],
            "predicted_tokens_per_s": [10.0, 10.0, 10.0],
        }
    )
    s = cpu_wait_summary(runs)
    assert (s["median"], s["min"], s["max"]) == (0.3, 0.1, 0.5)
    assert s["r_with_error"] == pytest.approx(-1.0)


def test_drift_recalibrates_and_resume_reruns_nothing(tmp_path: Path) -> None:
    trace = read_trace(bundled_trace_path())
    truth = _truth()
    n_cfg = len(GRID.configs)
    # the CPU slows by 40% after the calibration run and the first round
    slow = 1 + n_cfg

    def slowdown(i: int) -> float:
        return 1.4 if i >= slow else 1.0

    m = ModelMachine(
        trace, truth, shape="mixtral-tiny", queue_depth=8, chunk_bytes=32768, slowdown=slowdown
    )
    opts = ValidateOptions(tokens=4, repeats=2, drift=0.15)
    res = run_validation(m, trace, GRID, _start(truth), tmp_path, opts, log=None)
    s = res.summary
    assert s["recalibrations"] == 1 and len(s["drift_events"]) == 1
    assert s["drift_events"][0]["round"] == 1
    assert s["drift_events"][0]["drift"] == pytest.approx(0.4)
    runs = res.runs
    assert sorted(set(runs.profile_version)) == [0, 1]
    # each run predicted by the profile in force: exact in both rounds
    assert np.allclose(runs.predicted_tokens_per_s, runs.tokens_per_s, rtol=1e-6)
    done = m.runs
    again = run_validation(m, trace, GRID, _start(truth), tmp_path, opts, log=None)
    assert m.runs == done  # every run and calibration kept from the first pass
    pd.testing.assert_frame_equal(again.table, res.table)


# -- bad input ---------------------------------------------------------------------------


def _grid_file(tmp_path: Path, obj: Any) -> Path:
    p = tmp_path / "grid.json"
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ("{not json", "not JSON"),
        ({"configs": "x"}, 'list "configs"'),
        ({"configs": [{"name": "a", "colour": 1}]}, "unknown field"),
        ({"configs": [{"policy": "lru"}]}, "missing field name"),
        ({"configs": [{"name": "a"}, {"name": "a", "cache_slots": 9}]}, "repeat"),
        ({"configs": [{"name": "a", "policy": "nope"}]}, "nope"),
        ({"configs": [{"name": "a", "cache_slots": 0}]}, "cache_slots"),
        ({"configs": [{"name": "a", "chunk_bytes": 5000}]}, "4096"),
        ({"configs": [{"name": "../x"}]}, "plain label"),
        (
            {
                "calibration": {"name": "c", "cache_slots": 9},
                "configs": [{"name": "a", "cache_slots": 9}],
            },
            "calibration configuration itself",
        ),
        ({"configs": []}, "no configurations"),
    ],
)
def test_bad_grid_files(tmp_path: Path, obj: Any, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        load_grid(_grid_file(tmp_path, obj))


def test_bundled_grids_cover_the_issue() -> None:
    for name in ("full", "quick"):
        g = load_grid(name)
        cfgs = g.configs
        assert len(cfgs) >= 8
        assert len({c.policy for c in cfgs}) >= 3
        assert len({c.cache_slots for c in cfgs}) >= 2
        assert {c.scope for c in cfgs} == {"global", "per-layer"}
        assert {c.prefetch_on for c in cfgs} == {True, False}
        assert all(c.identity() != g.calibration.identity() for c in cfgs)
    with pytest.raises(BadInput, match="neither a bundled grid"):
        load_grid("no-such-grid")


def _mer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mer", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_bad_input_one_message_exit_2(tmp_path: Path) -> None:
    trace = str(bundled_trace_path())
    out = str(tmp_path / "v")
    missing = _mer("validate", trace, "--experts", str(tmp_path / "none.gguf"), "-o", out)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    bad = _grid_file(tmp_path, {"configs": [{"name": "a", "colour": 1}]})
    experts = tmp_path / "e.gguf"
    experts.write_bytes(b"\0" * 4096)
    for args, match in (
        (("--tokens", "0"), "--tokens"),
        (("--repeats", "0"), "--repeats"),
        (("--grid", str(bad)), "unknown field"),
        (("--drift", "-1"), "--drift"),
    ):
        p = _mer("validate", trace, "--experts", str(experts), "-o", out, *args)
        assert p.returncode == 2, (args, p.stderr)
        assert match in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_cli_validate_end_to_end_on_the_real_engine(tmp_path: Path) -> None:
    """Real runs (io_uring or the pread pool, the FFN) on a tiny expert file: the command,
    its files and its numbers hold together (not their accuracy: this is a test machine)."""
    experts = tmp_path / "tiny.gguf"
    assert _mer("experts", "synth", "--shape", "mixtral-tiny", "-o", str(experts)).returncode == 0
    grid = _grid_file(
        tmp_path,
        {
            "calibration": {"name": "cal", "cache_slots": 40},
            "configs": [
                {"name": "lru-16", "cache_slots": 16},
                {"name": "fifo-64-pl", "policy": "fifo", "cache_slots": 64, "scope": "per-layer"},
                {"name": "lru-64-oracle", "cache_slots": 64, "predictor": "oracle"},
            ],
        },
    )
    out = tmp_path / "v"
    p = _mer(
        "validate",
        str(bundled_trace_path()),
        "--experts",
        str(experts),
        "--hardware",
        "ci-tiny",
        "--grid",
        str(grid),
        "--tokens",
        "2",
        "--repeats",
        "2",
        "-o",
        str(out),
        "--json",
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    t = pd.read_parquet(out / "validation.parquet")
    assert set(t.config) == {"lru-16", "fifo-64-pl", "lru-64-oracle"}
    row = t[(t.config == "lru-16") & (t.stage == "calibrated") & (t.metric == "tokens/s")]
    runs = pd.read_parquet(out / "runs.parquet")
    mine = runs[runs.config == "lru-16"].tokens_per_s
    assert float(row.measured.iloc[0]) == pytest.approx(float(np.median(mine)))
    assert s["counts"]["prefetch_off_equal"]  # one decision core: hits equal exactly
    assert (out / "figures" / "validation-tokens-per-s.svg").exists()


def test_disk_pulse_reads_whole_experts_from_the_file(tmp_path: Path) -> None:
    """The pulse reads `experts` distinct experts through the engine's reader, every byte
    of each one's read plan (the sizes come from the store's plans, not the pulse)."""
    from mer.engine.gguf_synth import synth_gguf
    from mer.engine.probe import disk_pulse
    from mer.engine.store import ExpertStore
    from mer.shapes import get_shape

    path = tmp_path / "tiny.gguf"
    synth_gguf(path, get_shape("mixtral-tiny"), seed=1)
    store = ExpertStore.open(path)
    n = store.n_layers * store.n_experts
    sizes = [
        sum(r.length for r in store.read_plan(layer, e))
        for layer in range(store.n_layers)
        for e in range(store.n_experts)
    ]
    p = disk_pulse(store, experts=6, seed=2)
    assert set(p) == {"read_bytes_per_s", "expert_read_s", "seconds"}
    got = p["read_bytes_per_s"] * p["seconds"]
    assert 6 * min(sizes) - 1e-6 <= got <= 6 * max(sizes) + 1e-6
    assert 0 < p["expert_read_s"] <= p["seconds"]
    # more experts than the file has: each is read once, every byte of its plan
    q = disk_pulse(store, experts=n + 5, seed=2)
    assert q["read_bytes_per_s"] * q["seconds"] == pytest.approx(sum(sizes))


def test_cli_resume_keeps_the_probe_it_started_with(tmp_path: Path) -> None:
    """Without --hardware, an interrupted validation (its probe and state in OUT) resumes
    from that probe instead of probing again: a new probe would not match the state."""
    experts = tmp_path / "tiny.gguf"
    assert _mer("experts", "synth", "--shape", "mixtral-tiny", "-o", str(experts)).returncode == 0
    grid = _grid_file(
        tmp_path,
        {"calibration": {"name": "cal", "cache_slots": 40}, "configs": [{"name": "a"}]},
    )
    out = tmp_path / "v"
    out.mkdir()
    load_profile("ci-tiny").save(out / "profile-probed.json")
    (out / "state.json").write_text("{}")  # what an interrupted validation leaves
    args = ("--grid", str(grid), "--tokens", "2", "--repeats", "1", "-o", str(out))
    p = _mer("validate", str(bundled_trace_path()), "--experts", str(experts), *args)
    assert p.returncode == 0, p.stderr
    assert "resuming with the probe" in p.stderr and "probing this machine" not in p.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["profile"] == "ci-tiny"
