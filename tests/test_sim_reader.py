"""The reader table: queue depth and chunk size change the SSD model's prediction as
they change the probe's measurement, exactly on a synthetic disk."""

from __future__ import annotations

import math

import numpy as np
import pytest
from probes import make_probe_result

from mer.core import ReplayConfig
from mer.engine.probe import BURSTS, BurstPoint, ProbeResult, ReadPoint, to_profile
from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim.hardware import HardwareProfile, load_profile
from mer.sim.model import SimOptions, simulate, timing_of
from mer.traces.format import TraceMeta, from_arrays

KiB = 1 << 10
SHAPE = get_shape("mixtral-small")
# A synthetic disk for the channel model (`--ssd-model channels`): one channel, a fixed access latency per read, and a transfer rate that
# depends on the reader's setting (queue depth, chunk): B_REF * FACTOR[(qd, chunk)].
B_REF = 1.2e9
ACCESS = 3e-5
FACTOR = {
    (1, 128 * KiB): 0.55,
    (4, 128 * KiB): 0.9,
    (32, 128 * KiB): 1.3,
    (1, 512 * KiB): 0.8,
    (4, 512 * KiB): 1.4,
    (32, 512 * KiB): 1.0,  # the engine's default: where the bursts are fitted
}


def synthetic_disk_read_s(nbytes: int, qd: int, chunk: int) -> float:
    """The synthetic disk's time for one read alone, written out."""
    n = math.ceil(nbytes / chunk)
    return ACCESS + n * ((nbytes / n) / (B_REF * FACTOR[(qd, chunk)]))


def synthetic_probe(burst_speed: float = 1.0) -> ProbeResult:
    """What the probe measures on the synthetic disk: bursts at the default setting and
    steady streams at every setting, two whole-expert reads submitted together, the next
    two when they have landed: each batch takes ACCESS + 2 n chunks' transfer.
    `burst_speed` > 1: short bursts run that much faster than the disk sustains (a
    cache, an idle spell); a run's reads get the streams' rate."""
    nbytes = SHAPE.slot_bytes
    points = []
    for (qd, chunk), f in FACTOR.items():
        batch_s = ACCESS + 2 * nbytes / (B_REF * f)
        points.append(ReadPoint(qd, chunk, 40, 40 * nbytes, 20 * batch_s, batch=2))
    bursts = [
        BurstPoint(k, c, ACCESS + k * c / (burst_speed * B_REF), 0.0, 0.0)
        for c in (512 * KiB,)
        for k in BURSTS
    ]
    return make_probe_result(
        points,
        5e-5,
        nbytes,
        shape=SHAPE.name,
        file_bytes=64 << 20,
        ffn_bytes_per_s=2e10,
        dense_bytes_per_s=1e10,
        bursts=bursts,
        engine_chunk_bytes=512 * KiB,
        engine_queue_depth=32,
    )


@pytest.mark.parametrize("burst_speed", [1.0, 3.0])
@pytest.mark.parametrize(("qd", "chunk"), sorted(FACTOR))
def test_synthetic_disk_read_time_is_predicted_exactly(
    qd: int, chunk: int, burst_speed: float
) -> None:
    probe = synthetic_probe(burst_speed)
    prof = HardwareProfile.from_dict(to_profile(probe, ssd_model="channels").to_dict())  # JSON
    assert probe.fit_ssd("channels")["stream_over_burst"] == pytest.approx(
        1 / burst_speed, rel=1e-9
    )
    nbytes = SHAPE.slot_bytes
    tm, read_bytes = timing_of(
        prof, SHAPE, SimOptions(shape=SHAPE.name, queue_depth=qd, chunk_bytes=chunk)
    )
    assert read_bytes == nbytes
    assert tm.channels == 1
    predicted = (tm.chunks * tm.chunk + tm.access) * 1e-12
    # exact but for the clock: durations are whole picoseconds, one rounding per chunk
    expected = synthetic_disk_read_s(nbytes, qd, chunk)
    assert abs(predicted - expected) <= (tm.chunks + 1) * 1e-12 + 1e-9 * expected


def test_between_measured_settings_the_scale_is_log_linear() -> None:
    ssd = to_profile(synthetic_probe(), ssd_model="channels").ssd
    # queue depth 8 lies a third of the way from 4 to 32 in log2; 256 KiB half way
    # between 128 KiB and 512 KiB
    f8_128 = 0.9 + (1.3 - 0.9) / 3
    f8_512 = 1.4 + (1.0 - 1.4) / 3
    assert ssd.reader_scale(8, 128 * KiB) == pytest.approx(f8_128, rel=1e-12)
    assert ssd.reader_scale(8, 256 * KiB) == pytest.approx((f8_128 + f8_512) / 2, rel=1e-12)
    # outside the measured settings: the nearest one
    assert ssd.reader_scale(256, 2 << 20) == pytest.approx(1.0, rel=1e-12)
    assert ssd.reader_scale(None, None) == 1.0


def _all_misses_trace(tokens: int, layers: int) -> object:
    t = np.arange(tokens)[:, None, None]
    experts = np.broadcast_to((2 * t + np.arange(2)) % 8, (tokens, layers, 2)).astype(np.int16)
    meta = TraceMeta(model="test", n_layers=layers, n_experts=8, top_k=2)
    return from_arrays(experts, meta, name="test")


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_queue_depth_and_chunk_change_a_simulated_run_as_the_table_says(engine: str) -> None:
    # Every lookup misses, one channel, nothing but the device's time: each step reads two
    # experts back to back, so its time is 2 R (+ the FFN of the second) whatever R is.
    d = load_profile("ci-tiny").to_dict()
    d["ssd"].update(
        latency_s=0.0,
        bandwidth_bytes_per_s=B_REF,
        channels=1,
        chunk_bytes=512 * KiB,
        queue_depth=32,
        access_latency_s=0.0,
        reader_bandwidth=[[qd, c, 1e9 * f] for (qd, c), f in FACTOR.items()],
    )
    d["compute"].update(
        ffn_bytes_per_s=1e13,
        dense_bytes_per_s=1e13,
        dense_s_per_layer=0.0,
        step_overhead_s=0.0,
        read_submit_s=0.0,
        read_complete_s=0.0,
        ffn_busy_overhead_s=0.0,
    )
    hw = HardwareProfile.from_dict(d)
    trace = _all_misses_trace(6, 4)
    c = SHAPE.bytes_per_expert / 1e13
    walls = {}
    for qd, chunk in ((32, 512 * KiB), (4, 512 * KiB), (4, 128 * KiB)):
        s = simulate(
            trace,
            ReplayConfig(cache_slots=2),
            hw,
            SimOptions(engine=engine, shape=SHAPE.name, queue_depth=qd, chunk_bytes=chunk),
        ).summary
        read = synthetic_disk_read_s(SHAPE.slot_bytes, qd, chunk) - ACCESS
        assert s.misses == 6 * 4 * 2
        assert s.wall_s == pytest.approx(6 * 4 * (2 * read + c), rel=1e-6)
        walls[qd, chunk] = s.wall_s
    assert len(set(walls.values())) == 3


def test_a_bad_reader_table_is_refused_naming_the_row() -> None:
    d = load_profile("ci-tiny").to_dict()
    d["ssd"]["reader_bandwidth"] = [[4, 131072, 1e9], [0, 131072, 1e9]]
    with pytest.raises(BadInput, match=r"ssd.reader_bandwidth\[1\]\[0\] must be >= 1"):
        HardwareProfile.from_dict(d)
    d["ssd"]["reader_bandwidth"] = [[4, 131072]]
    with pytest.raises(BadInput, match=r"ssd.reader_bandwidth\[0\] must be \[queue depth"):
        HardwareProfile.from_dict(d)
