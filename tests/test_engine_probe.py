"""mer probe: the SSD fit against the simulator's own model, and a quick real probe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from probes import make_probe_result

from mer.engine.ffn import native_available
from mer.engine.io import _fs_type
from mer.engine.probe import BURSTS, BurstPoint, ProbeResult, ReadPoint, fit_device, is_memory_fs
from mer.sim.hardware import SSDProfile, load_profile


def _model_points(
    lat: float, bw: float, channels: int, chunk: int, read_bytes: int, qds: list[int]
) -> list[ReadPoint]:
    """Bandwidths a device obeying the simulator's SSD model would show at each queue depth.

    With q reads in flight, min(q, channels) chunks are served at once, each taking
    latency + chunk / (bw / channels): written out here, independently of the fit.
    """
    n = math.ceil(read_bytes / chunk)
    per_chunk = read_bytes / n
    pts = []
    for q in qds:
        par = min(q, channels)
        t = math.ceil(n / par) * (lat + per_chunk * channels / bw)
        pts.append(ReadPoint(q, chunk, 10, 10 * read_bytes, 10 * t))
    return pts


def _result(points: list[ReadPoint], lat: float, read_bytes: int) -> ProbeResult:
    return make_probe_result(points, lat, read_bytes)


@pytest.mark.parametrize("channels", [4, 8, 32])
def test_fit_recovers_a_device_that_follows_the_model(channels: int) -> None:
    lat, bw, chunk, read_bytes = 80e-6, 3e9, 512 << 10, 99 << 20
    qds = [1, 2, 4, 8, 16, 32, 64]
    pts = _model_points(lat, bw, channels, chunk, read_bytes, qds)
    # a worse chunk size, to check the best one is chosen
    pts += [
        ReadPoint(q, 128 << 10, 1, p.bytes, p.seconds * 2) for q, p in zip(qds, pts, strict=True)
    ]
    fit = _result(pts, lat, read_bytes).fit_grid()
    assert fit["chunk_bytes"] == chunk
    assert fit["channels"] == channels
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(bw, rel=1e-9)
    assert fit["latency_s"] == lat


def test_fitted_profile_reproduces_the_measured_read_time() -> None:
    # Measurements that follow no model: the fit must still make the simulator's
    # read_time of one expert equal the time measured at the chosen queue depth.
    read_bytes = 25 << 20
    pts = [
        ReadPoint(1, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 0.5e9),
        ReadPoint(4, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 1.4e9),
        ReadPoint(16, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 1.9e9),
        ReadPoint(64, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 2.0e9),
    ]
    fit = _result(pts, 100e-6, read_bytes).fit_grid()
    assert fit["channels"] == 16  # 1.9 >= 0.9 * 2.0, 1.4 is not
    ssd = SSDProfile(
        fit["latency_s"], fit["bandwidth_bytes_per_s"], fit["channels"], fit["chunk_bytes"]
    )
    assert ssd.read_time(read_bytes) == pytest.approx(read_bytes / 1.9e9, rel=1e-9)


@pytest.mark.parametrize(
    ("channels", "access", "latency"), [(1, 4e-5, 0.0), (3, 0.0, 2e-5), (8, 1e-4, 3e-5)]
)
def test_burst_fit_recovers_a_device_that_follows_the_model(
    channels: int, access: float, latency: float
) -> None:
    # k chunks of c bytes on C channels: access + ceil(k / C) (latency + c C / B), written out
    bw = 1.3e9
    bursts = [
        (k, c, access + math.ceil(k / channels) * (latency + c * channels / bw))
        for c in (512 << 10, 128 << 10)
        for k in BURSTS
    ]
    fit = fit_device(bursts)
    assert fit.channels == channels and fit.rms_rel_error == pytest.approx(0.0, abs=1e-9)
    assert fit.access_s == pytest.approx(access, abs=1e-9)
    assert fit.latency_s == pytest.approx(latency, abs=1e-9)
    assert fit.bandwidth == pytest.approx(bw, rel=1e-6)


def test_burst_fit_profile_reproduces_the_bursts() -> None:
    # A serial disk with noise: the profile's model gives the fitted times, parameters
    # are never negative, and the chunk time is about what was seen.
    rng = np.random.default_rng(0)
    bursts = [
        BurstPoint(k, c, (5e-5 + k * c / 1.25e9) * float(rng.uniform(0.9, 1.1)), 0.0, 0.0)
        for c in (512 << 10, 128 << 10)
        for k in BURSTS
    ]
    res = _result([ReadPoint(1, 512 << 10, 1, 512 << 10, 1e-3)], 3e-4, 99 << 20)
    res.bursts = bursts
    fit = res.fit_ssd()
    assert fit["channels"] == 1 and fit["chunk_bytes"] == 512 << 10
    assert fit["latency_s"] >= 0 and fit["access_latency_s"] >= 0
    ssd = SSDProfile(
        fit["latency_s"],
        fit["bandwidth_bytes_per_s"],
        fit["channels"],
        fit["chunk_bytes"],
        access_latency_s=fit["access_latency_s"],
    )
    assert ssd.chunk_time_of(512 << 10) == pytest.approx(fit["chunk_s"], rel=1e-12)
    assert 3.7e-4 <= fit["chunk_s"] <= 4.7e-4
    assert fit["fit_rms_rel_error"] < 0.1


def test_quick_probe_writes_a_loadable_profile_and_deletes_its_file(tmp_path: Path) -> None:
    if is_memory_fs(_fs_type(str(tmp_path))):
        pytest.skip(f"{tmp_path} is on a RAM file system; the probe refuses it")
    out = tmp_path / "out" / "hw.json"
    work = tmp_path / "disk"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mer",
            "probe",
            "--quick",
            "--dir",
            str(work),
            "-o",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    prof = load_profile(out)
    assert prof.name == printed["name"]
    probe = prof.extra["probe"]
    assert prof.ssd.chunk_bytes == probe["engine_chunk_bytes"]
    assert prof.ssd.queue_depth == probe["engine_queue_depth"]
    assert [b["chunks"] for b in probe["bursts"]] == list(BURSTS) * 2
    # the profile's device is the shared one: its curve is the bursts as measured ...
    ssd = prof.ssd
    fit = probe["fit"]
    assert fit["model"] == "shared" and ssd.shared and ssd.access_latency_s == 0
    bursts = [[b["chunks"], b["chunk_bytes"], b["seconds"]] for b in probe["bursts"]]
    assert ssd.burst_curve == sorted(bursts, key=lambda r: (r[1], r[0]))
    # ... and its level the steady stream's at the engine's setting: a batch of the
    # stream's reads takes, on the shared device, what it took on the disk
    ref = next(
        p
        for p in probe["points"]
        if (p["queue_depth"], p["chunk_bytes"]) == (ssd.queue_depth, ssd.chunk_bytes)
    )
    n = max(1, math.ceil((ref["bytes"] // ref["reads"]) / ssd.chunk_bytes))
    model = ssd.burst_seconds(ref["batch"] * n, ref["bytes"] / ref["reads"] / n)
    assert model == pytest.approx(ref["seconds"] * ref["batch"] / ref["reads"], rel=1e-9)
    # the channel model fitted to the same bursts reproduces them as well as its fit says
    chan = ProbeResult.from_dict(probe).fit_ssd("channels")
    burst_per_byte = chan["channels"] / chan["burst_bandwidth_bytes_per_s"]
    rel = [
        (
            chan["access_latency_s"]
            + math.ceil(b["chunks"] / chan["channels"])
            * (chan["latency_s"] + b["chunk_bytes"] * burst_per_byte)
        )
        / b["seconds"]
        - 1
        for b in probe["bursts"]
    ]
    assert math.sqrt(sum(r * r for r in rel) / len(rel)) == pytest.approx(
        chan["fit_rms_rel_error"], rel=1e-6
    )
    assert prof.compute.ffn_bytes_per_s > 0 and prof.memory.read_bandwidth_bytes_per_s > 0
    assert prof.compute.read_submit_s > 0 and prof.compute.step_overhead_s > 0
    assert prof.compute.read_complete_s == probe["read_complete_s"] > 0  # reaping, measured
    # the kernel that runs is the one measured, and it is reported next to memory
    want = "native" if native_available() else "numpy"
    assert prof.compute.kernel.startswith(want) and probe["ffn_kernel"] == prof.compute.kernel
    assert probe["memory_read_1thread_bytes_per_s"] > 0
    assert "of the memory read bandwidth" in proc.stderr
    assert list(work.iterdir()) == []  # the probe file is gone


def test_probe_refuses_a_memory_file_system() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not is_memory_fs(_fs_type(str(shm))):
        pytest.skip("no tmpfs at /dev/shm")
    proc = subprocess.run(
        [sys.executable, "-m", "mer", "probe", "--quick", "--dir", str(shm)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "RAM" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_ffn_rate_is_the_streamers_direct_call() -> None:
    """The profile charges per expert what the streamer's direct call took (the median on
    cold weights), not the kernel's mean throughput; without that figure, the throughput."""
    from mer.engine.probe import to_profile
    from mer.shapes import get_shape

    read_bytes = 25 << 20
    pts = [ReadPoint(q, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 1e9) for q in (1, 4)]
    bpe = get_shape("mixtral-8x7b").bytes_per_expert
    got = to_profile(make_probe_result(pts, 1e-4, read_bytes, ffn_direct_s=0.004))
    assert got.compute.ffn_bytes_per_s == pytest.approx(bpe / 0.004)
    assert got.compute.ffn_time(bpe) == pytest.approx(0.004)
    old = to_profile(make_probe_result(pts, 1e-4, read_bytes))
    assert old.compute.ffn_bytes_per_s == 1e9


def test_engine_step_layers_fill_the_file_budget() -> None:
    """As many whole layers of experts as the budget holds, at least one, at most all."""
    from mer.engine.probe import engine_step_layers
    from mer.shapes import get_shape

    shape = get_shape("mixtral-small")
    per_layer = shape.n_experts * shape.slot_bytes
    assert engine_step_layers(shape, 5 * per_layer + per_layer // 2) == 5
    assert engine_step_layers(shape, per_layer - 1) == 1
    assert engine_step_layers(shape, 10**15) == shape.n_layers


def test_engine_step_is_the_executors_own_steps(tmp_path: Path) -> None:
    """The engine-step figures come from an all-resident replay by the executor (real
    GGUF file, real reads, real FFNs) that leaves nothing behind, and the profile then
    charges exactly them per step, per FFN and per dense block."""
    from mer.engine.probe import ProbeConfig, engine_step_layers, measure_engine_step, to_profile
    from mer.shapes import get_shape

    shape = get_shape("mixtral-tiny")
    cfg = ProbeConfig.quick(shape="mixtral-tiny", threads=1, step_file_bytes=3 << 20)
    es = measure_engine_step(tmp_path, shape, cfg, 0.05)
    assert list(tmp_path.iterdir()) == []
    assert es.layers == engine_step_layers(shape, 3 << 20) and 1 <= es.layers < shape.n_layers
    assert es.tokens >= 1 and es.ffn_s > 0 and es.dense_s > 0 and es.step_overhead_s >= 0
    read_bytes = shape.slot_bytes
    pts = [ReadPoint(q, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 1e9) for q in (1, 4)]
    res = make_probe_result(
        pts, 1e-4, read_bytes, shape="mixtral-tiny", engine_step=es.to_dict(), ffn_direct_s=1.0
    )
    prof = to_profile(res)
    assert prof.compute.ffn_time(shape.bytes_per_expert) == pytest.approx(es.ffn_s)
    assert prof.compute.dense_time(shape.dense_bytes_per_layer) == pytest.approx(es.dense_s)
    assert prof.compute.step_overhead_s == es.step_overhead_s
    # a probe result without the engine's step (an older mer) keeps the figures timed apart
    old = to_profile(make_probe_result(pts, 1e-4, read_bytes, step_overhead_s=2e-5))
    assert old.compute.step_overhead_s == 2e-5 and old.compute.dense_bytes_per_s == 1e9


def test_wake_is_measured_and_carried_into_the_profile(tmp_path: Path) -> None:
    """measure_wake times the engine's dense + FFN with and without a blocking read of the
    probe file before the FFN (real reads, real kernels) and returns non-negative extras;
    the profile charges exactly what the probe result holds."""
    from mer.engine.probe import ProbeConfig, measure_wake, to_profile
    from mer.shapes import get_shape

    shape = get_shape("mixtral-tiny")
    cfg = ProbeConfig.quick(shape="mixtral-tiny", threads=1)
    path = tmp_path / "probe.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, np.uint8).tobytes())
    w_ffn, w_dense = measure_wake(path, shape, cfg, 0.05)
    assert w_ffn >= 0.0 and w_dense >= 0.0
    read_bytes = shape.slot_bytes
    pts = [ReadPoint(q, 256 << 10, 5, 5 * read_bytes, 5 * read_bytes / 1e9) for q in (1, 4)]
    res = make_probe_result(pts, 1e-4, read_bytes, wake_ffn_s=2.5e-5, wake_dense_s=1.5e-5)
    prof = to_profile(res)
    assert (prof.compute.wake_ffn_s, prof.compute.wake_dense_s) == (2.5e-5, 1.5e-5)
    assert to_profile(make_probe_result(pts, 1e-4, read_bytes)).compute.wake_ffn_s == 0.0
