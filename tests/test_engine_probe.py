"""mer probe: the SSD fit against the simulator's own model, and a quick real probe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mer.engine.ffn import native_available
from mer.engine.io import _fs_type
from mer.engine.probe import ProbeResult, ReadPoint, is_memory_fs
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
    return ProbeResult(
        shape="mixtral-8x7b",
        expert_read_bytes=read_bytes,
        file_bytes=1 << 31,
        filesystem="ext4",
        io_kind="uring",
        direct=True,
        latency_s=lat,
        latency_p90_s=lat,
        points=points,
        ffn_bytes_per_s=1e9,
        dense_bytes_per_s=1e9,
        memory_read_bytes_per_s=1e10,
        threads=2,
        ram_bytes=1 << 34,
    )


@pytest.mark.parametrize("channels", [4, 8, 32])
def test_fit_recovers_a_device_that_follows_the_model(channels: int) -> None:
    lat, bw, chunk, read_bytes = 80e-6, 3e9, 512 << 10, 99 << 20
    qds = [1, 2, 4, 8, 16, 32, 64]
    pts = _model_points(lat, bw, channels, chunk, read_bytes, qds)
    # a worse chunk size, to check the best one is chosen
    pts += [
        ReadPoint(q, 128 << 10, 1, p.bytes, p.seconds * 2) for q, p in zip(qds, pts, strict=True)
    ]
    fit = _result(pts, lat, read_bytes).fit_ssd()
    assert fit["chunk_bytes"] == chunk
    assert fit["channels"] == channels
    assert fit["bandwidth_bytes_per_s"] == pytest.approx(bw, rel=1e-9)
    assert fit["latency_s"] == lat


def test_channels_are_never_more_than_one_read_can_fill() -> None:
    """A 1.5 MiB expert in 512 KiB chunks has 3 chunks: deeper queues repeat the QD-4
    measurement (noise), so their plateau must not become the device's channel count."""
    read_bytes = 1512 << 10
    bw = {1: 0.3e9, 2: 0.5e9, 4: 0.6e9, 8: 0.62e9, 16: 0.9e9, 64: 1.0e9}  # noise past QD 4
    pts = [ReadPoint(q, 512 << 10, 10, 10 * read_bytes, 10 * read_bytes / b) for q, b in bw.items()]
    fit = _result(pts, 50e-6, read_bytes).fit_ssd()
    assert fit["channels"] <= 3
    assert fit["measured_bandwidth_bytes_per_s"] <= 0.6e9
    # one expert alone takes what was measured for it, as before
    ssd = SSDProfile(
        fit["latency_s"], fit["bandwidth_bytes_per_s"], fit["channels"], fit["chunk_bytes"]
    )
    assert ssd.read_time(read_bytes) == pytest.approx(
        read_bytes / fit["measured_bandwidth_bytes_per_s"], rel=1e-9
    )


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
    fit = _result(pts, 100e-6, read_bytes).fit_ssd()
    assert fit["channels"] == 16  # 1.9 >= 0.9 * 2.0, 1.4 is not
    ssd = SSDProfile(
        fit["latency_s"], fit["bandwidth_bytes_per_s"], fit["channels"], fit["chunk_bytes"]
    )
    assert ssd.read_time(read_bytes) == pytest.approx(read_bytes / 1.9e9, rel=1e-9)


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
    n_chunks = -(-probe["expert_read_bytes"] // prof.ssd.chunk_bytes)
    assert prof.ssd.channels in {p["queue_depth"] for p in probe["points"]} | {n_chunks}
    assert prof.ssd.channels <= max(n_chunks, 1)
    assert prof.ssd.chunk_bytes in {p["chunk_bytes"] for p in probe["points"]}
    assert prof.ssd.bandwidth_bytes_per_s >= probe["fit"]["measured_bandwidth_bytes_per_s"] * (
        1 - 1e-9
    )
    assert prof.compute.ffn_bytes_per_s > 0 and prof.memory.read_bandwidth_bytes_per_s > 0
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
