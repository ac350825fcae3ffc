"""The simpy model against closed forms, the clockless reference and a brute-force SSD."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

from mer.core import Replay, ReplayConfig, policy_names, replay_counts
from mer.engine.io import POLL_INTERVAL_S
from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim import model as sim_model
from mer.sim.hardware import HardwareProfile, load_profile
from mer.sim.model import TICKS_PER_S, AnalyticSSD, SimOptions, simulate
from mer.traces.format import TraceMeta, from_arrays

SHAPE = get_shape("mixtral-tiny")


def make_trace(experts: np.ndarray, n_experts: int) -> Any:
    _tokens, layers, k = experts.shape
    meta = TraceMeta(model="test", n_layers=layers, n_experts=n_experts, top_k=k)
    return from_arrays(experts, meta, name="test")


def profile(
    *,
    latency: float = 37e-6,
    bw: float = 7.3e8,
    channels: int = 1,
    chunk: int = 1 << 30,
    ffn_bps: float = 1.3e9,
    dense_bps: float = 2.9e9,
    workers: int = 1,
) -> HardwareProfile:
    d = load_profile("ci-tiny").to_dict()
    d["ssd"].update(
        latency_s=latency, bandwidth_bytes_per_s=bw, channels=channels, chunk_bytes=chunk
    )
    d["compute"].update(ffn_bytes_per_s=ffn_bps, dense_bytes_per_s=dense_bps, workers=workers)
    return HardwareProfile.from_dict(d)


def times(hw: HardwareProfile) -> tuple[float, float, float]:
    """(read R of one slot alone on one channel, FFN c, dense D), from the profile's numbers."""
    read = hw.ssd.latency_s + SHAPE.slot_bytes / hw.ssd.bandwidth_bytes_per_s
    return (
        read,
        SHAPE.bytes_per_expert / hw.compute.ffn_bytes_per_s,
        (SHAPE.dense_bytes_per_layer / hw.compute.dense_bytes_per_s),
    )


def run(trace: Any, hw: HardwareProfile, engine: str = "fast", mode: str = "model", **cfg: Any):
    return simulate(
        trace, ReplayConfig(**cfg), hw, SimOptions(mode=mode, engine=engine, shape=SHAPE.name)
    )


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("ffn_bps", [1.3e9, 2.0e8])  # FFN shorter / longer than a read
def test_all_hits_after_cold_misses(engine: str, ffn_bps: float) -> None:
    layers, tokens = 4, 20
    experts = np.zeros((tokens, layers, 2), np.int16)
    experts[:, :, 1] = 1
    hw = profile(ffn_bps=ffn_bps)
    read, c, dense = times(hw)
    res = run(make_trace(experts, 8), hw, engine, cache_slots=8)
    s = res.summary
    assert (s.hits, s.misses) == ((tokens - 1) * layers * 2, layers * 2)
    # cold token: both reads queue on one channel; FFN 2 waits for read 2 or for FFN 1
    cold = layers * (dense + max(2 * read, read + c) + c)
    warm = layers * (dense + 2 * c)
    assert s.wall_s == pytest.approx(cold + (tokens - 1) * warm, rel=1e-7)
    assert res.tokens["time_s"].to_numpy()[1:] == pytest.approx(warm, rel=1e-7)
    assert 1.0 / res.tokens["time_s"].to_numpy()[-1] == pytest.approx(
        1.0 / (layers * (dense + 2 * c)), rel=1e-7
    )


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("ffn_bps", [1.3e9, 2.0e8])
def test_all_misses_one_channel_no_prefetch(engine: str, ffn_bps: float) -> None:
    layers, tokens = 4, 12
    t = np.arange(tokens)[:, None, None]
    experts = np.broadcast_to((2 * t + np.arange(2)) % 8, (tokens, layers, 2)).astype(np.int16)
    hw = profile(ffn_bps=ffn_bps)
    read, c, dense = times(hw)
    s = run(make_trace(experts, 8), hw, engine, cache_slots=2).summary
    assert s.hits == 0 and s.misses == tokens * layers * 2
    step = dense + max(2 * read, read + c) + c
    assert s.wall_s == pytest.approx(tokens * layers * step, rel=1e-7)
    assert s.tokens_per_s == pytest.approx(1.0 / (layers * step), rel=1e-7)
    assert s.bytes_read == tokens * layers * 2 * SHAPE.slot_bytes
    # Read 1 lands at R and is waited for; read 2 lands at 2R, seen then if the driver is
    # waiting for it, else when the FFN of expert 1 (shorter than a poll interval) ends.
    assert c < POLL_INTERVAL_S
    seen2 = max(2 * read, read + c)
    assert s.latency["read"]["p50"] == pytest.approx((read + seen2) / 2, rel=1e-6)
    # reads are in flight from the lookup until read 2 is seen; the step waits R for read
    # 1 and then max(0, 2R - (R + c)) for read 2: the rest of that time is hidden
    wait = read + max(0.0, 2 * read - (read + c))
    assert s.read_busy_s == pytest.approx(tokens * layers * seen2, rel=1e-6)
    assert s.hidden_read_share == pytest.approx(1 - wait / seen2, rel=1e-6)
    assert s.prefetch["issued_bytes"] == 0


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("wake_ffn", [2e-5, 9e-4])  # FFN 2 then waits / does not wait
def test_wake_costs_closed_form(engine: str, wake_ffn: float) -> None:
    """All misses, one channel: FFN 1 always follows a block (it waits R for read 1);
    FFN 2 only when read 2 (at 2R) lands after FFN 1 ends; every step after the first
    follows a blocked one, so its dense block wakes too."""
    layers, tokens = 4, 12
    t = np.arange(tokens)[:, None, None]
    experts = np.broadcast_to((2 * t + np.arange(2)) % 8, (tokens, layers, 2)).astype(np.int16)
    hw = profile(ffn_bps=1.3e9)
    wd = 3e-5
    hw.compute.wake_ffn_s, hw.compute.wake_dense_s = wake_ffn, wd
    read, c, dense = times(hw)
    s = run(make_trace(experts, 8), hw, engine, cache_slots=2).summary
    steps = tokens * layers
    second_waits = 2 * read > read + c + wake_ffn
    assert second_waits == (wake_ffn < 1e-4)  # both cases are exercised
    ffn_pair = 2 * c + wake_ffn * (1 + second_waits)
    step = dense + max(2 * read, read + c + wake_ffn) + c + wake_ffn * second_waits
    assert s.wall_s == pytest.approx(steps * step + (steps - 1) * wd, rel=1e-7)
    assert s.dense_s == pytest.approx(steps * dense + (steps - 1) * wd, rel=1e-7)
    assert s.compute_s == pytest.approx(steps * ffn_pair, rel=1e-7)


def test_wake_costs_spare_steps_that_never_block() -> None:
    """Only the step after the cold token's last pays a dense wake: resident steps do not."""
    layers, tokens = 4, 20
    experts = np.zeros((tokens, layers, 2), np.int16)
    experts[:, :, 1] = 1
    hw = profile(ffn_bps=1.3e9)
    hw.compute.wake_ffn_s, hw.compute.wake_dense_s = 2e-5, 3e-5
    _read, c, dense = times(hw)
    res = run(make_trace(experts, 8), hw, cache_slots=8)
    tok = res.tokens["time_s"].to_numpy()
    warm = layers * (dense + 2 * c)
    assert tok[1] == pytest.approx(warm + 3e-5, rel=1e-7)
    assert tok[2:] == pytest.approx(warm, rel=1e-7)


def test_oracle_prefetch_with_ample_bandwidth_reaches_the_compute_bound() -> None:
    rng = np.random.default_rng(3)
    layers, tokens = 4, 30
    experts = np.stack([rng.permutation(8)[:2] for _ in range(tokens * layers)]).reshape(
        tokens, layers, 2
    )
    hw = profile(bw=5e10, latency=1e-6, channels=8, chunk=16384)
    _read, c, dense = times(hw)
    s = run(
        make_trace(experts.astype(np.int16), 8),
        hw,
        cache_slots=layers * 8,
        predictor="oracle",
        pipeline_depth=1,
    ).summary
    bound = 1.0 / (layers * (dense + 2 * c))
    assert s.misses == 2  # only the first step's cold keys
    assert s.prefetch["late"] == 0
    assert s.tokens_per_s <= bound * (1 + 1e-9)
    assert s.tokens_per_s >= 0.99 * bound
    assert s.extra["bound_compute_tokens_per_s"] == pytest.approx(bound, rel=1e-7)


def _zipf_trace(tokens: int = 60, layers: int = 8, n_experts: int = 8, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_experts + 1) ** 1.1
    p /= p.sum()
    out = np.empty((tokens, layers, 2), np.int16)
    for i in range(tokens):
        for layer in range(layers):
            out[i, layer] = rng.choice(n_experts, size=2, replace=False, p=p)
    return make_trace(out, n_experts)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_prefetch_off_matches_replay_counts(scope: str) -> None:
    trace = _zipf_trace()
    hw = profile(channels=3, chunk=20000, workers=2)
    checked = 0
    for policy in policy_names():
        for slots in (8, 24):
            cfg = ReplayConfig(policy=policy, cache_slots=slots, scope=scope)
            try:
                ref = replay_counts(Replay.from_trace(trace, cfg)).to_dict()
            except BadInput:
                continue  # a policy that does not take this scope/size
            s = run(trace, hw, policy=policy, cache_slots=slots, scope=scope).summary
            assert (s.hits, s.misses) == (ref["hits"], ref["misses"]), (policy, slots)
            assert s.extra["evictions"] == ref["evictions"]
            checked += 1
    assert checked >= 6


def test_same_inputs_same_outputs() -> None:
    trace = _zipf_trace(seed=5)
    hw = profile(channels=4, chunk=30000)
    a = run(trace, hw, cache_slots=16, predictor="previous-token", pipeline_depth=2)
    b = run(trace, hw, cache_slots=16, predictor="previous-token", pipeline_depth=2)
    da, db = a.summary.to_dict(), b.summary.to_dict()
    for d in (da, db):
        d["extra"].pop("sim_seconds")
        d["extra"].pop("sim_lookups_per_s")
    assert da == db
    assert a.tokens.equals(b.tokens)


def test_fast_engine_equals_literal_simpy_engine() -> None:
    """The analytic solution against one simpy process per chunk and FFN."""
    trace = _zipf_trace(tokens=25, seed=7)
    rng = random.Random(11)
    for _ in range(12):
        hw = profile(
            latency=rng.uniform(1e-5, 1e-4),
            bw=rng.uniform(2e8, 2e9),
            channels=rng.choice([1, 2, 3, 5]),
            chunk=rng.choice([9000, 20000, 40000, 1 << 30]),
            ffn_bps=rng.uniform(3e8, 3e9),
            workers=rng.choice([1, 2]),
        )
        cfg = dict(
            policy=rng.choice(["lru", "fifo"]),
            cache_slots=rng.choice([6, 16, 40]),
            predictor=rng.choice(["oracle", "previous-token", "none"]),
            pipeline_depth=rng.choice([1, 2, 3]),
            prefetch_inflight=rng.choice([1, 4]),
        )
        mode = rng.choice(["model", "seed"])
        a = run(trace, hw, "fast", mode, **cfg).summary
        b = run(trace, hw, "simpy", mode, **cfg).summary
        assert (a.hits, a.misses, a.prefetch) == (b.hits, b.misses, b.prefetch), (hw, cfg)
        assert a.wall_s == b.wall_s
        assert a.latency["read"] == b.latency["read"]


def _lru_misses_per_step(steps: np.ndarray, slots: int) -> list[int]:
    cache: OrderedDict[int, None] = OrderedDict()
    out = []
    for keys in steps.tolist():
        misses = [k for k in keys if k not in cache]
        for k in keys:
            if k in cache:
                cache.move_to_end(k)
        for k in misses:
            if len(cache) >= slots:
                cache.popitem(last=False)
            cache[k] = None
        out.append(len(misses))
    return out


def test_seed_mode_closed_form() -> None:
    """One iteration = one step: reads first (one at a time), then two FFNs; no dense."""
    rng = np.random.default_rng(2)
    n = 32
    p = 1.0 / np.arange(1, n + 1) ** 1.2
    p /= p.sum()
    experts = np.stack([rng.choice(n, 2, replace=False, p=p) for _ in range(400)])
    trace = make_trace(experts.reshape(400, 1, 2).astype(np.int16), n)
    hw = profile()
    read, c, _ = times(hw)
    s = run(trace, hw, mode="seed", cache_slots=8).summary
    misses = _lru_misses_per_step(experts.astype(np.int64), 8)
    assert s.misses == sum(misses)
    expected = sum(m * read + 2 * c for m in misses)
    assert s.wall_s == pytest.approx(expected, rel=1e-7)
    assert s.layer_iterations_per_s == pytest.approx(400 / expected, rel=1e-7)
    assert s.io_wait_s == pytest.approx(sum(misses) * read, rel=1e-6)


def _reference_ssd(issues: list[tuple[int, bool]], C: int, m: int, d: int) -> list[int]:
    """Chunk-by-chunk list scheduling, one dispatch at a time: the earliest-free channel
    takes the oldest queued foreground chunk, else the oldest background one; before a
    read is issued at `a`, every chunk that can start at or before `a` is dispatched."""
    free = [0] * C
    queue: list[list[Any]] = []  # [index, fg, chunks left, issued]
    end = [0] * len(issues)

    def dispatch(limit: float) -> None:
        while queue:
            ch = min(range(C), key=lambda i: free[i])
            fg = [q for q in queue if q[1]]
            head = fg[0] if fg else queue[0]
            start = max(free[ch], head[3])
            if start > limit:
                return
            head[2] -= 1
            free[ch] = start + d
            end[head[0]] = max(end[head[0]], start + d)
            if head[2] == 0:
                queue.remove(head)

    for i, (at, is_fg) in enumerate(issues):
        dispatch(at)
        queue.append([i, is_fg, m, at])
    dispatch(float("inf"))
    return end


@pytest.mark.parametrize("seed", range(40))
def test_analytic_ssd_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    C, m, d = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 5]), rng.choice([7, 10, 13])
    t = 0
    issues = []
    for _ in range(40):
        t += rng.choice([0, 0, 1, 3, 5, 10, 20, 40])
        issues.append((t, rng.random() < 0.5))
    ssd = AnalyticSSD(C, m, d)
    reads = [ssd.issue(i, fg, at, True) for i, (at, fg) in enumerate(issues)]
    finished = {r.key: r.finish for r in ssd.drain()}
    expected = _reference_ssd(issues, C, m, d)
    assert [finished[i] for i in range(len(reads))] == expected


def test_tick_resolution() -> None:
    assert TICKS_PER_S == 10**12


def _reference_windowed_ssd(
    issues: list[tuple[int, bool]], C: int, W: int, m: int, d: int
) -> list[int]:
    """Event by event: the reader queues chunks (foreground first, FIFO within a class)
    and keeps at most W of them in the device, which serves its own queue FIFO on C
    channels. At one instant, chunks that finish free their room before the reader
    moves queued chunks in, and those go before a read issued then."""
    reader: list[list[int]] = [[], []]  # read indices, one per chunk: [foreground, background]
    device: list[int] = []  # admitted, not yet started (FIFO)
    running: list[tuple[int, int]] = []  # (finish, read)
    end = [0] * len(issues)
    pending = sorted(range(len(issues)), key=lambda i: issues[i][0])

    def settle(x: int) -> None:
        nonlocal running
        for f, i in running:
            if f <= x:
                end[i] = max(end[i], f)
        running = [(f, i) for f, i in running if f > x]
        while True:
            moved = False
            while len(device) + len(running) < W and (reader[0] or reader[1]):
                device.append((reader[0] or reader[1]).pop(0))
                moved = True
            while device and len(running) < C:
                running.append((x + d, device.pop(0)))
                moved = True
            if not moved:
                return

    t = 0
    while pending or running or device or reader[0] or reader[1]:
        nxt = [f for f, _ in running]
        if pending:
            nxt.append(issues[pending[0]][0])
        t = min(nxt)
        settle(t)
        while pending and issues[pending[0]][0] == t:
            i = pending.pop(0)
            reader[0 if issues[i][1] else 1].extend([i] * m)
            settle(t)
    return end


@pytest.mark.parametrize("seed", range(40))
def test_windowed_analytic_ssd_against_event_by_event(seed: int) -> None:
    """The device queue: chunks beyond the channels wait there FIFO (no overtaking)."""
    rng = random.Random(100 + seed)
    C = rng.choice([1, 2, 3])
    W = C * rng.choice([1, 2, 3, 5])
    m, d = rng.choice([1, 2, 5]), rng.choice([7, 10, 13])
    t = 0
    issues = []
    for _ in range(40):
        t += rng.choice([0, 0, 1, 3, 5, 10, 20, 40])
        issues.append((t, rng.random() < 0.5))
    ssd = AnalyticSSD(C, m, d, lag=(W // C - 1) * d)
    reads = [ssd.issue(i, fg, at, True) for i, (at, fg) in enumerate(issues)]
    finished = {r.key: r.finish for r in ssd.drain()}
    assert [finished[i] for i in range(len(reads))] == _reference_windowed_ssd(issues, C, W, m, d)
    # W = C is the unwindowed device
    if W == C:
        assert [finished[i] for i in range(len(reads))] == _reference_ssd(issues, C, m, d)


def test_fast_engine_equals_simpy_engine_with_driver_costs() -> None:
    """Both engines on the full timing definition: device window, chunked multi-range
    reads, per-step and per-read driver costs, the busy FFN's extra cost and its polls."""
    trace = _zipf_trace(tokens=20, seed=9)
    rng = random.Random(5)
    for _ in range(14):
        hw = profile(
            latency=rng.uniform(1e-5, 1e-4),
            bw=rng.uniform(2e8, 2e9),
            channels=rng.choice([1, 2, 4]),
            chunk=rng.choice([9000, 20000, 40000]),
            ffn_bps=rng.uniform(3e8, 3e9),
            workers=rng.choice([1, 1, 2]),
        )
        hw.ssd.queue_depth = rng.choice([None, 1, 4, 8, 32])
        hw.ssd.access_latency_s = rng.choice([0.0, 6e-5])
        hw.compute.step_overhead_s = rng.choice([0.0, 2e-5])
        hw.compute.read_submit_s = rng.choice([0.0, 1e-5, 4e-5])
        hw.compute.read_complete_s = rng.choice([0.0, 7e-6])
        hw.compute.ffn_busy_overhead_s = rng.choice([0.0, 3e-5])
        hw.compute.wake_ffn_s = rng.choice([0.0, 2e-5])
        hw.compute.wake_dense_s = rng.choice([0.0, 3e-5])
        cfg = dict(
            policy=rng.choice(["lru", "fifo", "clock"]),
            cache_slots=rng.choice([6, 16, 40]),
            predictor=rng.choice(["oracle", "previous-token", "none"]),
            pipeline_depth=rng.choice([1, 2]),
            prefetch_inflight=rng.choice([1, 4, 8]),
        )
        mode = rng.choice(["model", "model", "seed"])
        ranges = rng.choice([None, (30000, 30000, 26000), (5000,)])
        qd = rng.choice([None, 3, 16])
        out = []
        for engine in ("fast", "simpy"):
            opts = SimOptions(
                mode=mode, engine=engine, shape=SHAPE.name, read_ranges=ranges, queue_depth=qd
            )
            out.append(simulate(trace, ReplayConfig(**cfg), hw, opts))
        a, b = (r.summary for r in out)
        why = (hw, cfg, mode, ranges, qd)
        assert (a.hits, a.misses, a.prefetch) == (b.hits, b.misses, b.prefetch), why
        assert a.wall_s == b.wall_s, why
        assert a.io_wait_s == b.io_wait_s, why
        assert a.compute_s == b.compute_s, why
        assert a.dense_s == b.dense_s, why
        assert a.latency["read"] == b.latency["read"], why
        assert a.read_busy_s == b.read_busy_s, why
        if cfg["predictor"] == "none":  # the prefetch-off array path, on the same definition
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(sim_model, "_run_vectorised", lambda *a: None)
                c = simulate(
                    trace,
                    ReplayConfig(**cfg),
                    hw,
                    SimOptions(mode=mode, shape=SHAPE.name, read_ranges=ranges, queue_depth=qd),
                ).summary
            assert (c.wall_s, c.io_wait_s, c.latency["read"]) == (
                a.wall_s,
                a.io_wait_s,
                a.latency["read"],
            ), why
