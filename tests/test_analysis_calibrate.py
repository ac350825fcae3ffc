"""calibrate: each fitted field against its closed form, the SSD fit checked by
evaluating the fitted profile's own read_time, and refusal of simulated runs."""

from __future__ import annotations

import math

import pytest
from summaries import make_summary

from mer.analysis.calibrate import calibrate
from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim.hardware import load_profile
from mer.summary import RunSummary

SHAPE = "mixtral-tiny"
TOKENS, LAYERS, TOP_K = 10, 32, 2
HITS, MISSES = 400, 240
COMPUTE_S, DENSE_S, READ_P50 = 0.64, 0.16, 2.0e-3


def _measured(**over: object) -> RunSummary:
    base: dict[str, object] = dict(
        kind="measured",
        model="mixtral-8x7b",
        shape=SHAPE,
        hardware="this machine",
        tokens=TOKENS,
        layers=LAYERS,
        top_k=TOP_K,
        hits=HITS,
        misses=MISSES,
        hit_rate=HITS / (HITS + MISSES),
        bytes_read=MISSES * 86016,
        compute_s=COMPUTE_S,
        dense_s=DENSE_S,
        latency={"read": {"p50": READ_P50, "p99": 0.004}, "token": {"p50": 0.2, "p99": 0.3}},
    )
    return make_summary(**{**base, **over})


def test_ffn_throughput_closed_form() -> None:
    before = load_profile("ci-tiny")
    cal = calibrate(_measured(), before)
    bpe = get_shape(SHAPE).bytes_per_expert
    expected = bpe * (HITS + MISSES) / COMPUTE_S  # every routed expert computed once
    assert cal.profile.compute.ffn_bytes_per_s == pytest.approx(expected, rel=1e-12)
    m = cal.moved["compute.ffn_bytes_per_s"]
    assert m["before"] == before.compute.ffn_bytes_per_s and m["after"] == pytest.approx(expected)
    assert m["rel"] == pytest.approx(expected / before.compute.ffn_bytes_per_s - 1)
    # and the fitted profile's own ffn_time reproduces the measured mean per expert
    assert cal.profile.compute.ffn_time(bpe) == pytest.approx(COMPUTE_S / (HITS + MISSES))


def test_dense_time_closed_form() -> None:
    cal = calibrate(_measured(), load_profile("ci-tiny"))
    per_layer = DENSE_S / (TOKENS * LAYERS)
    assert cal.profile.compute.dense_s_per_layer == pytest.approx(per_layer)
    dense_bytes = get_shape(SHAPE).dense_bytes_per_layer
    assert cal.profile.compute.dense_time(dense_bytes) == pytest.approx(per_layer)


def test_ssd_bandwidth_reproduces_the_measured_read() -> None:
    before = load_profile("ci-tiny")
    cal = calibrate(_measured(), before)
    ssd = cal.profile.ssd
    # untouched: what one run cannot separate
    assert (ssd.latency_s, ssd.channels, ssd.chunk_bytes) == (
        before.ssd.latency_s,
        before.ssd.channels,
        before.ssd.chunk_bytes,
    )
    # the engine reads whole slots; the fitted profile must predict the measured p50
    slot = get_shape(SHAPE).slot_bytes
    assert ssd.read_time(slot) == pytest.approx(READ_P50, rel=1e-9)
    # closed form for this geometry, written out independently
    chunks = math.ceil(slot / before.ssd.chunk_bytes)
    waves = math.ceil(chunks / before.ssd.channels)
    per_chunk_transfer = READ_P50 / waves - before.ssd.latency_s
    bw = (slot / chunks) / per_chunk_transfer * before.ssd.channels
    assert ssd.bandwidth_bytes_per_s == pytest.approx(bw, rel=1e-12)
    assert cal.moved["ssd.bandwidth_bytes_per_s"]["after"] == pytest.approx(bw)


def test_other_fields_kept_and_name_says_calibrated() -> None:
    before = load_profile("ci-tiny")
    cal = calibrate(_measured(), before)
    assert cal.profile.name == "ci-tiny-calibrated"
    assert cal.profile.memory == before.memory
    assert cal.profile.compute.dense_bytes_per_s == before.compute.dense_bytes_per_s
    assert set(cal.moved) == {
        "compute.ffn_bytes_per_s",
        "compute.dense_s_per_layer",
        "ssd.bandwidth_bytes_per_s",
    }
    text = cal.format_text()
    for name in cal.moved:
        assert name in text
    # the input profile is not modified in place
    assert before == load_profile("ci-tiny")


def test_read_faster_than_latency_leaves_bandwidth_alone() -> None:
    before = load_profile("ci-tiny")
    cal = calibrate(_measured(latency={"read": {"p50": before.ssd.latency_s / 2}}), before)
    assert "ssd.bandwidth_bytes_per_s" not in cal.moved
    assert cal.profile.ssd.bandwidth_bytes_per_s == before.ssd.bandwidth_bytes_per_s


def test_no_misses_no_ssd_fit() -> None:
    cal = calibrate(_measured(hits=640, misses=0), load_profile("ci-tiny"))
    assert "ssd.bandwidth_bytes_per_s" not in cal.moved


def test_refuses_a_simulated_run() -> None:
    with pytest.raises(BadInput, match="measured run"):
        calibrate(_measured(kind="simulated"), load_profile("ci-tiny"))


def test_refuses_a_run_without_tokens() -> None:
    with pytest.raises(BadInput, match="no tokens"):
        calibrate(_measured(tokens=0), load_profile("ci-tiny"))


def test_tokens_per_s_bounds_closed_forms() -> None:
    """The bounds drawn on tokens/s plots, recomputed from the profile by hand."""
    from mer.analysis.bounds import tokens_per_s_bounds
    from mer.shapes import get_shape
    from mer.sim.hardware import load_profile

    hw = load_profile("nvme-desktop")
    shape = get_shape("mixtral-small")
    bounds, curves = tokens_per_s_bounds("mixtral-small", "nvme-desktop", None, 32, 2)
    assert curves == {}
    mem = hw.memory.read_bandwidth_bytes_per_s / (
        32 * (2 * shape.bytes_per_expert + shape.dense_bytes_per_layer)
    )
    ffn = shape.bytes_per_expert / hw.compute.ffn_bytes_per_s
    dense = (
        hw.compute.dense_s_per_layer
        if hw.compute.dense_s_per_layer is not None
        else shape.dense_bytes_per_layer / hw.compute.dense_bytes_per_s
    )
    compute = 1 / (32 * (dense + 2 * ffn / min(hw.compute.workers, 2)))
    ssd = hw.ssd.bandwidth_bytes_per_s / (32 * 2 * shape.bytes_per_expert)
    values = sorted(bounds.values())
    assert values == pytest.approx(sorted([mem, compute, ssd]))


def _all_miss_case(wake_ffn: float, wake_dense: float, ffn_bps: float = 1.3e9):
    """The all-misses one-channel trace of test_sim_model, its profile (no wake costs) and
    a measured run whose FFN and dense totals are the closed form with the wake costs."""
    import numpy as np

    from mer.core.replay import ReplayConfig
    from mer.sim.model import SimOptions, simulate
    from mer.traces.format import TraceMeta, from_arrays

    layers, tokens = 4, 12
    t = np.arange(tokens)[:, None, None]
    experts = np.broadcast_to((2 * t + np.arange(2)) % 8, (tokens, layers, 2)).astype(np.int16)
    trace = from_arrays(experts, TraceMeta(model="test", n_layers=layers, n_experts=8, top_k=2))
    d = load_profile("ci-tiny").to_dict()
    d["ssd"].update(latency_s=37e-6, bandwidth_bytes_per_s=7.3e8, channels=1, chunk_bytes=1 << 30)
    d["compute"].update(ffn_bytes_per_s=ffn_bps, dense_bytes_per_s=2.9e9, workers=1)
    from mer.sim.hardware import HardwareProfile

    hw = HardwareProfile.from_dict(d)
    shape = get_shape(SHAPE)
    read = hw.ssd.latency_s + shape.slot_bytes / hw.ssd.bandwidth_bytes_per_s
    c = shape.bytes_per_expert / hw.compute.ffn_bytes_per_s
    dense = shape.dense_bytes_per_layer / hw.compute.dense_bytes_per_s
    steps = tokens * layers
    second = 2 * read > read + c + wake_ffn  # FFN 2 waits for read 2 too
    n_ffn = steps * (1 + second)
    base = simulate(trace, ReplayConfig(cache_slots=2), hw, SimOptions(shape=SHAPE)).summary
    d = base.to_dict()
    d.update(
        kind="measured",
        compute_s=steps * 2 * c + n_ffn * wake_ffn,
        dense_s=steps * dense + (steps - 1) * wake_dense,
        io_wait_share=0.9,
    )
    d["extra"]["driver_time"].update(ffn_direct_n=2 * steps, ffn_busy_n=0)
    return trace, hw, RunSummary.from_dict(d), n_ffn, steps - 1


@pytest.mark.parametrize(
    ("wake_ffn", "ffn_bps"),
    [(2e-5, 1.3e9), (2e-5, 2.0e8), (9e-4, 1.3e9)],  # FFN 2 waits; does not; no longer does
)
def test_wake_costs_closed_form(wake_ffn: float, ffn_bps: float) -> None:
    from mer.analysis.calibrate import fit_wake

    trace, hw, run, n_ffn, n_dense = _all_miss_case(wake_ffn, 3e-5, ffn_bps)
    got = fit_wake(run, hw, trace)
    assert got is not None
    assert got[2:] == (n_ffn, n_dense)
    assert got[0] == pytest.approx(wake_ffn, rel=1e-6)
    assert got[1] == pytest.approx(3e-5, rel=1e-6)
    # calibrate fits them from an I/O-bound run (and keeps them with wake=False)
    cal = calibrate(run, hw, trace=trace)
    assert cal.profile.compute.wake_ffn_s == pytest.approx(wake_ffn, rel=1e-3)
    assert cal.profile.compute.wake_dense_s == pytest.approx(3e-5, rel=1e-3)
    off = calibrate(run, hw, trace=trace, wake=False)
    assert (off.profile.compute.wake_ffn_s, off.profile.compute.wake_dense_s) == (0.0, 0.0)
