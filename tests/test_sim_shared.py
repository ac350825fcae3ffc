"""The shared SSD (reads in flight share the device): closed forms on a synthetic disk, the
three engines (fast Python, literal simpy, compiled) equal, and the probe's fit of it."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
from probes import make_probe_result
from test_sim_fast import _summary
from test_sim_model import SHAPE, make_trace, profile

from mer import native
from mer.core import ReplayConfig
from mer.engine.probe import BURSTS, BurstPoint, ReadPoint
from mer.errors import BadInput
from mer.sim import model
from mer.sim.hardware import HardwareProfile
from mer.sim.model import TICKS_PER_S, SharedSSD, SimOptions, simulate

D1, D2, D3 = 1_000_000, 1_500_000, 1_800_000  # ticks for 1, 2, 3 chunks submitted together


def test_a_lone_read_takes_its_burst_time() -> None:
    ssd = SharedSSD(3, (D1, D2, D3), access=7)
    r = ssd.issue(0, True, 100, True)
    assert ssd.finish_of(r) == 100 + D3 + 7
    assert ssd.busy_until() == 100 + D3 + 7
    ssd.drain()
    assert r.finish == 100 + D3 + 7


def test_two_reads_submitted_together_land_together() -> None:
    spans = tuple(1_000_000 + 250_000 * k for k in range(4))  # 1..4 chunks
    ssd = SharedSSD(2, spans)
    a = ssd.issue(0, True, 0, True)
    b = ssd.issue(1, True, 0, True)
    assert ssd.finish_of(a) == ssd.finish_of(b) == spans[3]


def test_a_read_joining_another_shares_the_rate() -> None:
    # A alone for x: x / D1 of its chunk done; then both at 1 / D2 each until A is done,
    # at x + (1 - x / D1) D2, with B as far as A was; B then alone needs x more.
    x = 400_000
    ssd = SharedSSD(1, (D1, D2))
    a = ssd.issue(0, True, 0, True)
    b = ssd.issue(1, False, x, True)
    ta = x + (1 - x / D1) * D2
    assert ssd.finish_of(a) == pytest.approx(ta, abs=2)
    assert ssd.finish_of(b) == pytest.approx(ta + x, abs=2)
    ssd.drain()
    assert (a.finish, b.finish) == (ssd.finish_of(a), ssd.finish_of(b))


def test_a_full_device_queues_foreground_first() -> None:
    # W = 2: two chunks in the device, the rest wait in the reader; a foreground read
    # overtakes a background one still waiting there, never one already in the device.
    ssd = SharedSSD(1, (D1, D2))
    r0 = ssd.issue(0, False, 0, True)
    r1 = ssd.issue(1, False, 0, True)
    r2 = ssd.issue(2, False, 10, True)
    r3 = ssd.issue(3, True, 20, True)
    r4 = ssd.issue(4, True, 30, True)
    assert ssd.finish_of(r0) == ssd.finish_of(r1) == D2
    assert ssd.finish_of(r3) == ssd.finish_of(r4) == 2 * D2  # they enter at D2, together
    assert ssd.finish_of(r2) == 2 * D2 + D1  # then the background read, alone
    landed = ssd.drain()
    assert [r.key for r in landed] == [0, 1, 3, 4, 2]


def _shared_profile(bw: float, s1: float, s2: float, **kw) -> HardwareProfile:
    """A disk whose bursts of 1 and 2 chunks take s1 and s2; its level `bw` is the
    aggregate with the device full (queue depth 2)."""
    d = profile(bw=bw, **kw).to_dict()
    d["ssd"].update(
        queue_depth=2, access_latency_s=0.0, burst_curve=[[1, 1 << 30, s1], [2, 1 << 30, s2]]
    )
    return HardwareProfile.from_dict(d)


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_a_run_of_two_misses_per_step_matches_the_closed_form(engine: str) -> None:
    layers, tokens = 3, 5
    rng = np.random.default_rng(1)
    # every step two distinct cold experts: two misses submitted together
    experts = np.stack([rng.permutation(64)[:2] for _ in range(tokens * layers)])
    experts = experts.reshape(tokens, layers, 2).astype(np.int16)
    bw = 9e8
    hw = _shared_profile(bw, 1.0e-4, 1.5e-4)
    res = simulate(
        make_trace(experts, 64),
        ReplayConfig(cache_slots=2),
        hw,
        SimOptions(engine=engine, shape=SHAPE.name),
    )
    s = res.summary
    assert s.misses == tokens * layers * 2 and s.extra["ssd_model"] == "shared"
    # R(2) = bw: both land after 2 slot / bw; then the two FFNs one after the other
    c = SHAPE.bytes_per_expert / hw.compute.ffn_bytes_per_s
    dense = SHAPE.dense_bytes_per_layer / hw.compute.dense_bytes_per_s
    step = dense + 2 * SHAPE.slot_bytes / bw + 2 * c
    assert s.wall_s == pytest.approx(tokens * layers * step, rel=1e-7)
    # R(1) = bw * (1 / s1) / (2 / s2): a lone read takes slot / R(1)
    lone = SHAPE.slot_bytes / (bw * 1.5e-4 / (2 * 1.0e-4))
    assert s.extra["read_alone_s"] == pytest.approx(lone, rel=1e-7)
    assert hw.ssd.read_time(SHAPE.slot_bytes) == pytest.approx(lone, rel=1e-9)


def test_shared_rates_follow_the_bursts() -> None:
    hw = _shared_profile(2e9, 1.0e-4, 1.6e-4)
    r1, r2 = hw.ssd.shared_rates()
    assert r2 == pytest.approx(2e9) and r1 == pytest.approx(2e9 * 1.6e-4 / 2e-4)
    assert hw.ssd.shared and not profile().ssd.shared


@pytest.mark.parametrize(
    "curve", [[[0, 4096, 1e-3]], [[1, 4096]], [[1, 4096, -1.0]], "fast", [[1, 100, 1e-3]]]
)
def test_a_bad_burst_curve_is_refused_naming_the_field(curve) -> None:
    d = profile().to_dict()
    d["ssd"]["burst_curve"] = curve
    with pytest.raises(BadInput, match=r"ssd\.burst_curve"):
        HardwareProfile.from_dict(d)


# -- the three engines equal ------------------------------------------------------------


@contextlib.contextmanager
def _python_only():
    saved = model._run_compiled, model._run_vectorised
    model._run_compiled = lambda *a: None
    model._run_vectorised = lambda *a: None
    try:
        yield
    finally:
        model._run_compiled, model._run_vectorised = saved


def _random_shared_case(rng: random.Random, i: int):
    from test_simstep_native import _random_case

    trace, cfg, hw, opts = _random_case(rng, i)
    # a curve that speeds up with chunks in flight, at one or two chunk sizes
    sizes = rng.choice([[1 << 30], [SHAPE.slot_bytes // 4, 1 << 30]])
    base = rng.choice([8e8, 3e9])
    hw.ssd.burst_curve = [
        [k, c, k * c / (base * (1 + 0.3 * min(k, 4)))] for c in sizes for k in (1, 2, 3, 8)
    ]
    hw.ssd.queue_depth = rng.choice([1, 2, 3, 8, 32])
    hw.ssd.access_latency_s = rng.choice([0.0, 3e-6])
    return trace, cfg, hw, opts


def test_shared_engines_are_equal() -> None:
    """Fast (compiled, arrays and Python step loop) and the literal simpy engine: every
    counter, time and read latency, on random traces, policies, prefetch and disks."""
    rng = random.Random(11)
    paths = set()
    for i in range(14):
        trace, cfg, hw, opts = _random_shared_case(rng, i)
        fast = simulate(trace, cfg, hw, opts)
        with _python_only():
            ref = simulate(trace, cfg, hw, opts)
        literal = simulate(
            trace, cfg, hw, SimOptions(mode=opts.mode, engine="simpy", shape=opts.shape)
        )
        case = (i, cfg, hw.ssd.queue_depth, opts.mode)
        paths.add(fast.summary.extra["sim_path"])
        assert ref.summary.extra["ssd_model"] == "shared"
        assert fast.stats.to_dict(per_layer=True) == ref.stats.to_dict(per_layer=True), case
        assert _summary(fast) == _summary(ref) == _summary(literal), case
        assert fast.tokens.equals(ref.tokens), case
        assert fast.read_latencies.tolist() == ref.read_latencies.tolist(), case
        assert sorted(literal.read_latencies.tolist()) == ref.read_latencies.tolist(), case
    assert "arrays" in paths
    if native.load("simstep") is not None:
        assert "compiled" in paths


def test_shared_device_counts_ticks_as_the_model_says() -> None:
    # the integer progress: a lone chunk lands exactly one span after it was issued
    hw = _shared_profile(1e9, 1e-4, 1.5e-4)
    tm, _ = model.timing_of(hw, SHAPE, SimOptions(shape=SHAPE.name))
    assert tm.share == (
        round(SHAPE.slot_bytes / (1e9 * 1.5e-4 / 2e-4) * TICKS_PER_S),
        round(2 * SHAPE.slot_bytes / 1e9 * TICKS_PER_S),
    )
    assert model.read_alone_ticks(tm) == tm.share[0]


# -- the probe's fit ---------------------------------------------------------------------


def test_probe_fits_the_shared_device_it_measured() -> None:
    # A disk that really shares: k chunks of c land after k c / R(k), R growing with k up
    # to 16 chunks; streams of 2-read batches at each queue depth. The fit's level is the
    # full-device rate at the engine's queue depth, its curve the bursts.
    access, chunk, read_bytes = 0.0, 512 << 10, 3 * (512 << 10)

    def rate(k: int) -> float:
        return 1e9 * (1 + 0.5 * min(k, 16) / 16)

    bursts = [
        BurstPoint(k, c, access + k * c / rate(k), 0.0, 0.0)
        for c in (chunk, 128 << 10)
        for k in BURSTS
    ]
    points = []
    for q in (1, 4, 32):
        inflight = min(6, q)  # 2 reads of 3 chunks, at most q in the device
        waves = 6 / inflight
        t = access + waves * inflight * chunk / rate(inflight)
        points.append(ReadPoint(q, chunk, 20, 20 * read_bytes, 10 * t, batch=2))
    res = make_probe_result(points, 1e-4, read_bytes)
    res.bursts = bursts
    res.engine_queue_depth, res.engine_chunk_bytes = 32, chunk
    fit = res.fit_ssd()
    assert fit["model"] == "shared"
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(rate(32), rel=1e-3)
    hw = profile().to_dict()
    hw["ssd"].update({k: fit[k] for k in ("bandwidth_bytes_per_s", "queue_depth", "chunk_bytes")})
    hw["ssd"].update(access_latency_s=fit["access_latency_s"], burst_curve=fit["burst_curve"])
    hw["ssd"]["reader_bandwidth"] = fit["reader_bandwidth"]
    ssd = HardwareProfile.from_dict(hw).ssd
    assert fit["access_latency_s"] == 0.0
    for k in (1, 3, 6, 32):
        assert ssd.shared_rates()[k - 1] == pytest.approx(rate(k), rel=2e-3), k
    # the stream at queue depth 32 (two 3-chunk reads together) is reproduced
    assert ssd.burst_seconds(6, chunk) + access == pytest.approx(points[2].seconds / 10, rel=2e-3)
    assert res.fit_ssd("channels")["channels"] >= 1  # the channel model is still there


def test_calibration_without_a_trace_solves_the_shared_bandwidth() -> None:
    from mer.analysis.calibrate import _solve_bandwidth

    hw = _shared_profile(2e9, 1.0e-4, 1.5e-4)
    # a lone read of a slot took 1 ms: R(1) = slot / 1 ms, and R(1) = bw * 1.5 / 2
    bw = _solve_bandwidth(hw, SHAPE.slot_bytes, 1e-3)
    assert bw == pytest.approx(SHAPE.slot_bytes / 1e-3 / (1.5e-4 / 2e-4), rel=1e-9)
