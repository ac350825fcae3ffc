"""`mer probe`: measure this machine and write it as a simulator hardware profile.

The simulator is only as good as the numbers it is given; this measures them
with the engine's own code paths, on the disk and CPU the engine will run on:

- SSD: a probe file on the target file system (never tmpfs: that would measure
  RAM), read with the engine's reader (io_uring, O_DIRECT) as whole experts of
  the shape's size at random expert-aligned offsets, one expert at a time (as a
  demand miss is), for queue depths 1..64 and a few chunk sizes; plus 4 KiB
  reads at queue depth 1 for the per-request latency.
- CPU: the q4_0 SwiGLU expert FFN with the kernel `mer run` uses (`--ffn`: the
  native C kernel wherever it is built, else numpy; `mer.engine.ffn.make_ffn`), on
  synthesised experts of the shape taken in turn from a working set larger than
  the CPU caches (as a run's slots are), and the dense block, in bytes of weights/s.
- Memory: the streaming read bandwidth on the same threads and on one (the C
  kernel module's wide loads, else a numpy sum): the physical limit of the FFN,
  reported next to it.

The simulator's SSD model (`sim.hardware.SSDProfile`) says: `channels` chunks are
served at once, each taking latency + chunk / (bandwidth / channels) on its
channel, and a read lands `access_latency_s` after its last chunk (a pipelined
latency that occupies no channel), so k chunks submitted together land after
access + ceil(k / channels) chunk times. The probe measures exactly that curve:
bursts of k chunks submitted at once, k = 1..32, through the engine's reader, at
the engine's chunk size (`--chunk-bytes`, 512 KiB by default) and at a quarter
of it, which separates the per-chunk latency from the transfer. The fit
(`fit_device`) is least squares per channel count, the best count winning. (A
disk that serves one request at a time has a straight line here, an NVMe drive a
flat start.) The whole-expert grid over queue depths and chunk sizes is kept in
the profile's `extra`, to check the fit against.

The driver's own costs, which a fast FFN makes visible, are measured on the
engine's code paths too: submitting one expert read (`read_submit_s`), reaping it once
it has landed, outside a wait (`read_complete_s`), an FFN
handed to a thread while a read is in flight against a direct call
(`ffn_busy_overhead_s`), and the decision core's work per step
(`step_overhead_s`). FFN and dense throughputs are timed on weights rotated
through more memory than the CPU caches hold, as the engine's slots are.

What the profile charges per step, per FFN and per dense block comes from the engine
itself (`measure_engine_step`): a short replay by `mer run`'s executor of an expert
file of the shape with fewer layers, written next to the probe file, with every expert
resident. Timed apart, the decision core and the hidden update took 16 us a step on
a quiet 2-core VM while a compute-bound run's steps spent 44-47 us outside FFNs, dense
and I/O (slot book-keeping, the FFN's views and polls, the token accounting), and
FFN and dense block ran 54-62 us and 31-33 us inside the steps against 50 and 26 us
alone (the dense weights leave the caches while the experts stream through them):
that run was then predicted about 20% too fast.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mer.engine.aligned import ALIGN, aligned_empty
from mer.engine.dense import DenseBlock
from mer.engine.ffn import ffn_label, make_ffn
from mer.engine.io import _fs_type, open_reader
from mer.engine.q4_0 import random_q4_0
from mer.errors import BadInput, RuntimeFailure
from mer.shapes import ModelShape, get_shape

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")
SATURATION = 0.9  # (kept for the grid's summary) share of the best bandwidth
BURSTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # chunks submitted at once
CHANNEL_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STREAM_ROUNDS = 3  # interleaved rounds of the reader-setting streams
COLD_BYTES = 96 * MiB  # weights rotated through, beyond any CPU cache


@dataclass
class ProbeConfig:
    directory: Path | None = None  # where the probe file goes (default: the cwd's file system)
    size_bytes: int = 2 * GiB
    shape: str = "mixtral-8x7b"
    queue_depths: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    chunk_sizes: list[int] = field(default_factory=lambda: [128 * KiB, 512 * KiB, 2 * MiB])
    io: str = "auto"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seconds_per_point: float = 1.0  # budget of each (queue depth, chunk) point
    latency_reads: int = 300
    memory_bytes: int = 1 * GiB
    ffn: str = "auto"  # the expert FFN kernel: auto | native | numpy (as `mer run --ffn`)
    ffn_working_set_bytes: int = 512 * MiB  # experts cycled through, to defeat the CPU caches
    seed: int = 0
    engine_chunk_bytes: int = 512 * KiB  # the chunk size the model is fitted at
    engine_queue_depth: int = 32
    burst_repeats: int = 25
    #: expert bytes of the engine-step replay's file (at least one layer of the shape)
    step_file_bytes: int = 128 * MiB
    step_seconds: float = 1.0  # budget of the engine-step replay

    @classmethod
    def quick(cls, **kw: Any) -> ProbeConfig:
        """A probe of a few seconds (tests): small file, small shape, fewer points."""
        base: dict[str, Any] = dict(
            size_bytes=64 * MiB,
            shape="mixtral-small",
            queue_depths=[1, 4, 16, 64],
            chunk_sizes=[128 * KiB, 512 * KiB],
            seconds_per_point=0.3,
            latency_reads=50,
            memory_bytes=64 * MiB,
            ffn_working_set_bytes=96 * MiB,
            burst_repeats=9,
            step_file_bytes=96 * MiB,
            step_seconds=0.5,
        )
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


@dataclass
class ReadPoint:
    """A steady stream of whole-expert reads at one reader setting, `batch` submitted
    together (a step's demand reads) and the next batch when they have landed."""

    queue_depth: int
    chunk_bytes: int
    reads: int
    bytes: int
    seconds: float
    batch: int = 1
    # each read's time from the end of its batch's submission to its landing
    read_p10_s: float = 0.0
    read_p50_s: float = 0.0
    read_p90_s: float = 0.0
    read_mean_s: float = 0.0

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_bytes_per_s"] = self.bandwidth
        return d


@dataclass
class BurstPoint:
    """k chunks submitted together: the median time until all of them have landed."""

    chunks: int
    chunk_bytes: int
    seconds: float  # median over the repeats
    p25_s: float
    p75_s: float


@dataclass
class DeviceFit:
    """T(k, c) = access + ceil(k / channels) * (latency + c / (bandwidth / channels))."""

    channels: int
    access_s: float  # once per burst, after its last chunk: pipelined, occupies no channel
    latency_s: float  # per chunk, on its channel
    seconds_per_byte: float  # per channel: channels / bandwidth
    rms_rel_error: float

    @property
    def bandwidth(self) -> float:
        return self.channels / self.seconds_per_byte

    def chunk_time(self, chunk: float) -> float:
        return self.latency_s + chunk * self.seconds_per_byte

    def time(self, k: int, chunk: float) -> float:
        return self.access_s + -(-k // self.channels) * self.chunk_time(chunk)


def fit_device(bursts: list[tuple[int, int, float]]) -> DeviceFit:
    """The device model fitted to bursts (k chunks, chunk bytes, seconds), least squares.

    For each candidate number of channels the model is linear in (access, latency,
    seconds per byte): weighted least squares (each point by its relative error),
    with access and latency held at 0 when they would come out negative. The
    candidate with the smallest error wins, ties to fewer channels. Bursts of two
    chunk sizes separate the per-chunk latency from the transfer; of one size, the
    latency is taken as 0 (all of a chunk's time is then transfer).
    """
    sizes = {c for _, c, _ in bursts}
    rows = [(k, float(c), t) for k, c, t in bursts if t > 0]
    if not rows:
        raise ValueError("no bursts to fit")
    best: DeviceFit | None = None
    for ch in CHANNEL_CANDIDATES:
        n = np.array([-(-k // ch) for k, _, _ in rows], dtype=float)
        c = np.array([r[1] for r in rows])
        t = np.array([r[2] for r in rows])
        cols_all = {"access": np.ones_like(n), "latency": n, "per_byte": n * c}
        options = [("access", "latency", "per_byte"), ("access", "per_byte")]
        options += [("latency", "per_byte"), ("per_byte",)]
        if len(sizes) < 2:
            options = [("access", "per_byte"), ("per_byte",)]
        for names in options:
            a = np.stack([cols_all[k] / t for k in names], axis=1)
            coef, *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
            v = dict(zip(names, coef, strict=True))
            if any(x < 0 for x in v.values()) or v["per_byte"] <= 0:
                continue
            fit = DeviceFit(
                ch,
                float(v.get("access", 0.0)),
                float(v.get("latency", 0.0)),
                float(v["per_byte"]),
                0.0,
            )
            pred = np.array([fit.time(k, cc) for k, cc, _ in rows])
            fit.rms_rel_error = float(np.sqrt(np.mean((pred / t - 1) ** 2)))
            if best is None or fit.rms_rel_error < best.rms_rel_error - 1e-12:
                best = fit
            break  # the first feasible (richest) model of this channel count
    if best is None:
        raise ValueError("no device model fits these bursts")
    return best


@dataclass
class ProbeResult:
    """Everything measured, and the fitted profile fields."""

    shape: str
    expert_read_bytes: int
    file_bytes: int
    filesystem: str
    io_kind: str
    direct: bool
    latency_s: float
    latency_p90_s: float
    points: list[ReadPoint]
    ffn_bytes_per_s: float
    dense_bytes_per_s: float
    memory_read_bytes_per_s: float
    threads: int
    ram_bytes: int
    ffn_kernel: str = "numpy"  # "native (avx512vnni)" | "numpy": what was measured
    memory_read_1thread_bytes_per_s: float = 0.0
    memory_read_kind: str = "numpy"  # "native" (the C module's loads) | "numpy"
    bursts: list[BurstPoint] = field(default_factory=list)
    engine_chunk_bytes: int = 512 * KiB
    engine_queue_depth: int = 32
    read_submit_s: float = 0.0
    #: median seconds to reap one landed expert read outside a wait (0: not measured)
    read_complete_s: float = 0.0
    ffn_busy_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    #: median seconds of one expert FFN on cold weights, called the way the streamer calls
    #: it with nothing in flight (0: not measured)
    ffn_direct_s: float = 0.0
    #: the engine's own step, FFN and dense figures (EngineStep.to_dict; None: not measured,
    #: then the figures timed apart above are the profile's)
    engine_step: dict[str, Any] | None = None
    #: extra seconds of an FFN right after the driver blocked on a read, and of the dense
    #: block of a step after one that blocked (measure_wake; 0: not measured)
    wake_ffn_s: float = 0.0
    wake_dense_s: float = 0.0

    @property
    def ffn_engine_bytes_per_s(self) -> float:
        """The FFN rate the profile carries: the engine's own FFNs inside its steps
        (median per token), else the median of the streamer's direct calls on cold weights
        (a median, so a busy neighbour's bursts move it less than the kernel's mean
        throughput), else that throughput."""
        es = self.engine_step or {}
        if es.get("ffn_s", 0) > 0:
            return get_shape(self.shape).bytes_per_expert / float(es["ffn_s"])
        if self.ffn_direct_s > 0:
            return get_shape(self.shape).bytes_per_expert / self.ffn_direct_s
        return self.ffn_bytes_per_s

    @property
    def dense_engine_bytes_per_s(self) -> float:
        """The dense rate the profile carries: the engine's own dense blocks inside its
        steps (median), else the block timed alone."""
        es = self.engine_step or {}
        if es.get("dense_s", 0) > 0:
            return get_shape(self.shape).dense_bytes_per_layer / float(es["dense_s"])
        return self.dense_bytes_per_s

    @property
    def step_engine_s(self) -> float:
        """The per-step driver cost the profile carries: the engine's own, else the
        decision core and hidden update timed alone (`step_overhead_s`)."""
        es = self.engine_step
        if es and es.get("step_overhead_s") is not None:
            return float(es["step_overhead_s"])
        return self.step_overhead_s

    def best(self) -> ReadPoint:
        return max(self.points, key=lambda p: p.bandwidth)

    def fit_ssd(self, ssd_model: str = "shared") -> dict[str, Any]:
        """The SSD model fitted to the bursts (see the module docstring): the shared device
        (`shared_fit`) or, with `ssd_model` "channels" or without the stream it is levelled
        at, the channel model; without bursts (a probe result of an older mer) the grid
        fit below."""
        if not self.bursts:
            return self.fit_grid()
        chunk = self.engine_chunk_bytes
        fit = fit_device([(b.chunks, b.chunk_bytes, b.seconds) for b in self.bursts])
        shared = self.shared_fit(fit) if ssd_model == "shared" else None
        if shared is not None:
            return shared
        burst_bw = float(fit.bandwidth)
        steady = self.steady_bandwidth(fit)
        if steady is not None:
            # The bursts give the device's shape (channels, latencies); its level is what a
            # steady stream of a step's reads sustains at the engine's setting, which is
            # what a run's reads get (bursts of a few ms can ride a cache or an idle spell).
            fit.seconds_per_byte = fit.channels / steady
        return {
            "latency_s": fit.latency_s,
            "access_latency_s": fit.access_s,
            "bandwidth_bytes_per_s": float(fit.bandwidth),
            "burst_bandwidth_bytes_per_s": burst_bw,
            "channels": int(fit.channels),
            "chunk_bytes": int(chunk),
            "queue_depth": int(self.engine_queue_depth),
            "chunk_s": fit.chunk_time(chunk),
            "fit_rms_rel_error": fit.rms_rel_error,
            "reader_bandwidth": self.reader_table(fit),
            # the steady stream against the bursts' fit: how much more (or less) a long
            # run's reads get than short bursts say
            "stream_over_burst": None if steady is None else steady / burst_bw,
        }

    def burst_curve(self) -> list[list[float]]:
        """The bursts as the profile's ssd.burst_curve: [chunks, chunk bytes, seconds]."""
        return [
            [int(b.chunks), int(b.chunk_bytes), float(b.seconds)]
            for b in sorted(self.bursts, key=lambda b: (b.chunk_bytes, b.chunks))
            if b.seconds > 0
        ]

    def shared_level(self, p: ReadPoint, curve: list[list[float]], access: float) -> float | None:
        """The full-device rate at which the shared device (the bursts' curve) takes stream
        `p`'s time per batch: `batch` reads of n chunks each submitted together (None when
        the stream is empty or the access latency alone exceeds its time)."""
        from mer.sim.hardware import SSDProfile

        if p.reads <= 0 or p.seconds <= 0 or p.batch <= 0:
            return None
        n = max(1, -(-(p.bytes // p.reads) // p.chunk_bytes))
        per_chunk = p.bytes / p.reads / n
        per_batch = p.seconds / (p.reads / p.batch)
        if per_batch <= access:
            return None
        unit = SSDProfile(0.0, 1.0, 1, p.chunk_bytes, p.queue_depth, access, [], curve)
        return unit.burst_seconds(p.batch * n, per_chunk) / (per_batch - access)

    def shared_fit(self, fit: DeviceFit) -> dict[str, Any] | None:
        """The shared device (sim.hardware.SSDProfile.shared): the bursts' curve (whole
        times: a burst's fixed costs are part of its rate, no access latency apart), its
        level the full-device rate that reproduces the steady stream at the engine's
        setting, and the reader table of every stream's level (None without that stream).
        The bursts of a few ms and a run's steady reads see the disk at different rates
        (1.4x on this project's VM), so the curve gives the shape and the stream the level."""
        curve = self.burst_curve()
        ref = self.reference_point()
        if not curve or ref is None:
            return None
        level = self.shared_level(ref, curve, 0.0)
        if level is None:
            return None
        table = []
        for p in sorted(self.points, key=lambda p: (p.chunk_bytes, p.queue_depth)):
            bw = self.shared_level(p, curve, 0.0)
            if bw is not None and bw > 0:
                table.append([int(p.queue_depth), int(p.chunk_bytes), float(bw)])
        return {
            "model": "shared",
            "latency_s": 0.0,
            # a burst's whole time is its curve point: the fixed costs are in it
            "access_latency_s": 0.0,
            "bandwidth_bytes_per_s": float(level),
            "burst_bandwidth_bytes_per_s": float(fit.bandwidth),
            "channels": 1,
            "chunk_bytes": int(self.engine_chunk_bytes),
            "queue_depth": int(self.engine_queue_depth),
            "chunk_s": fit.chunk_time(self.engine_chunk_bytes),
            "fit_rms_rel_error": fit.rms_rel_error,
            "reader_bandwidth": table,
            "burst_curve": curve,
        }

    def reference_point(self) -> ReadPoint | None:
        """The steady stream at the engine's setting (the one the device is fitted at)."""
        for p in self.points:
            if (p.queue_depth, p.chunk_bytes) == (self.engine_queue_depth, self.engine_chunk_bytes):
                return p
        return None

    @staticmethod
    def model_bandwidth(p: ReadPoint, fit: DeviceFit) -> float | None:
        """The bandwidth that makes the fitted device take stream `p`'s time per batch:
        `batch` reads of n chunks each, submitted together, served in waves on the
        channels the reader keeps busy, then the access latency (None when the stream
        is empty or the fitted fixed costs alone exceed its time)."""
        if p.reads <= 0 or p.seconds <= 0 or p.batch <= 0:
            return None
        n = max(1, -(-(p.bytes // p.reads) // p.chunk_bytes))
        per_chunk = p.bytes / p.reads / n
        per_batch = p.seconds / (p.reads / p.batch)
        served = max(1, min(fit.channels, p.queue_depth))
        waves = -(-(p.batch * n) // served)
        transfer = (per_batch - fit.access_s) / waves - fit.latency_s
        if transfer <= 0:
            return None
        return per_chunk * fit.channels / transfer

    def steady_bandwidth(self, fit: DeviceFit) -> float | None:
        """model_bandwidth of the stream at the engine's setting."""
        p = self.reference_point()
        return None if p is None else self.model_bandwidth(p, fit)

    def reader_table(self, fit: DeviceFit | None = None) -> list[list[float]]:
        """[queue depth, chunk bytes, bytes/s] per steady stream (ssd.reader_bandwidth):
        the model bandwidth that reproduces each stream given the fitted fixed costs (so
        their ratios are the transfer's alone), or the stream's own bandwidth without
        a fit."""
        out = []
        for p in sorted(self.points, key=lambda p: (p.chunk_bytes, p.queue_depth)):
            bw = p.bandwidth if fit is None else self.model_bandwidth(p, fit)
            if bw is not None and bw > 0:
                out.append([int(p.queue_depth), int(p.chunk_bytes), float(bw)])
        return out

    def fit_grid(self) -> dict[str, Any]:
        """latency, chunk, channels and the model bandwidth reproducing the grid's
        whole-expert bandwidth at the saturating queue depth (mer before the bursts)."""
        best = self.best()
        same_chunk = sorted(
            (p for p in self.points if p.chunk_bytes == best.chunk_bytes),
            key=lambda p: p.queue_depth,
        )
        sat = next(p for p in same_chunk if p.bandwidth >= SATURATION * best.bandwidth)
        channels = sat.queue_depth
        chunk = best.chunk_bytes
        lat = self.latency_s
        # One expert alone: ceil(n / C) rounds of (lat + c' C / B), c' = read / n; solve for B.
        n = max(1, -(-self.expert_read_bytes // chunk))
        per_chunk = self.expert_read_bytes / n
        rounds = -(-n // channels)
        t_read = self.expert_read_bytes / sat.bandwidth
        denom = t_read / rounds - lat
        bw = per_chunk * channels / denom if denom > 0 else sat.bandwidth
        bw = max(bw, sat.bandwidth)  # the model's aggregate can not be below what was seen
        return {
            "latency_s": lat,
            "bandwidth_bytes_per_s": float(bw),
            "channels": int(channels),
            "chunk_bytes": int(chunk),
            "measured_bandwidth_bytes_per_s": sat.bandwidth,
            "best_bandwidth_bytes_per_s": best.bandwidth,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [p.to_dict() for p in self.points]
        d["fit"] = self.fit_ssd()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        """The inverse of to_dict (a profile's extra.probe), for re-fitting."""
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["points"] = [
            ReadPoint(**{k: v for k, v in p.items() if k in ReadPoint.__dataclass_fields__})
            for p in d.get("points", [])
        ]
        kw["bursts"] = [BurstPoint(**b) for b in d.get("bursts", [])]
        return cls(**kw)


def is_memory_fs(fstype: str) -> bool:
    return fstype in MEMORY_FILESYSTEMS


@contextlib.contextmanager
def probe_file(directory: Path | None, size: int, seed: int = 0) -> Iterator[Path]:
    """A file of `size` random bytes on the target disk, deleted afterwards."""
    d = Path(directory) if directory is not None else Path.cwd()
    if not d.is_dir():
        raise BadInput(f"--dir {d}: not a directory.")
    fstype = _fs_type(str(d))
    if is_memory_fs(fstype):
        raise BadInput(
            f"{d} is on {fstype}, which lives in RAM: probing it would measure memory, not the "
            "disk. Pass --dir on the disk the expert files will live on."
        )
    size = max(ALIGN, size - size % ALIGN)
    try:
        fd, name = tempfile.mkstemp(prefix=".mer-probe-", suffix=".bin", dir=d)
    except OSError as exc:
        raise BadInput(f"cannot create a probe file in {d}: {exc.strerror}.") from exc
    path = Path(name)
    try:
        rng = np.random.default_rng(seed)
        block = 64 * MiB
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                written = 0
                while written < size:
                    n = min(block, size - written)
                    fh.write(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
                    written += n
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise RuntimeFailure(
                f"writing the {size >> 20} MiB probe file {path} failed: {exc.strerror}; "
                "free space or pass a smaller --size-gib."
            ) from exc
        # Drop it from the page cache too, in case the reads fall back to buffered I/O.
        with contextlib.suppress(OSError, AttributeError):
            rfd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(rfd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def merge_points(parts: list[ReadPoint]) -> ReadPoint:
    """One setting's rounds as one stream: bytes and time summed, the per-read latency
    figures weighted by each round's reads (quantiles: of the rounds' medians etc.)."""
    reads = sum(p.reads for p in parts)
    w = np.array([p.reads for p in parts], dtype=float)

    def avg(name: str) -> float:
        return float(np.dot(w, [getattr(p, name) for p in parts]) / w.sum())

    return ReadPoint(
        parts[0].queue_depth,
        parts[0].chunk_bytes,
        reads,
        sum(p.bytes for p in parts),
        sum(p.seconds for p in parts),
        parts[0].batch,
        avg("read_p10_s"),
        avg("read_p50_s"),
        avg("read_p90_s"),
        avg("read_mean_s"),
    )


def measure_reads(
    path: Path,
    read_bytes: int,
    queue_depth: int,
    chunk_bytes: int,
    io: str,
    seconds: float,
    rng: np.random.Generator,
    batch: int = 1,
) -> tuple[ReadPoint, str, bool]:
    """Whole reads of `read_bytes` at random aligned offsets for ~`seconds`, `batch` of
    them submitted together (as a step submits its demand reads) through a reader at
    (`queue_depth`, `chunk_bytes`): the stream's bandwidth and each read's latency."""
    size = path.stat().st_size
    n_slots = max(1, size // read_bytes)
    batch = max(1, min(batch, n_slots))
    buf = aligned_empty(read_bytes * batch)
    buf[::ALIGN] = 0
    lat: list[float] = []
    with open_reader(kind=io, queue_depth=queue_depth, chunk_bytes=chunk_bytes) as reader:
        fd = reader.open(path)
        direct = reader.is_direct(fd)
        reader.read(fd, 0, min(read_bytes, ALIGN * 16), buf)  # warm the ring / pool
        order = rng.permutation(n_slots)
        total = 0
        reads = 0
        t0 = time.perf_counter()
        while True:
            reqs = []
            for i in range(batch):
                off = int(order[(reads + i) % n_slots]) * read_bytes
                reqs.append((fd, off, read_bytes, buf[i * read_bytes : (i + 1) * read_bytes], i))
            reader.submit_reads(reqs)
            ts = time.perf_counter()
            pending = set(range(batch))
            while pending:
                got = reader.poll()
                if not got:
                    reader.wait(min(pending))  # the oldest first: its landing is timed
                    got = [min(pending)]
                now = time.perf_counter()
                for tag in got:
                    pending.discard(tag)  # type: ignore[arg-type]
                    lat.append(now - ts)
            total += read_bytes * batch
            reads += batch
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and reads >= 2:
                break
        kind = reader.kind
    arr = np.asarray(lat)
    return (
        ReadPoint(
            queue_depth,
            chunk_bytes,
            reads,
            total,
            elapsed,
            batch,
            float(np.percentile(arr, 10)),
            float(np.median(arr)),
            float(np.percentile(arr, 90)),
            float(arr.mean()),
        ),
        kind,
        direct,
    )


def measure_latency(path: Path, io: str, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median and p90 of 4 KiB reads at random offsets, queue depth 1."""
    size = path.stat().st_size
    buf = aligned_empty(ALIGN)
    lats = []
    with open_reader(kind=io, queue_depth=1, chunk_bytes=ALIGN) as reader:
        fd = reader.open(path)
        reader.read(fd, 0, ALIGN, buf)
        offsets = rng.integers(0, size // ALIGN, size=n) * ALIGN
        for off in offsets:
            t0 = time.perf_counter()
            reader.read(fd, int(off), ALIGN, buf)
            lats.append(time.perf_counter() - t0)
    arr = np.asarray(lats)
    return float(np.median(arr)), float(np.percentile(arr, 90))


def _timed(fn: Callable[[], Any], min_seconds: float, min_reps: int = 3) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    reps = 0
    t0 = time.perf_counter()
    while True:
        fn()
        reps += 1
        el = time.perf_counter() - t0
        if reps >= min_reps and el >= min_seconds:
            return el / reps


def _experts(shape: ModelShape, n: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[np.ndarray, ...]] = []
    for _ in range(n):
        gate = random_q4_0(rng, shape.d_ff, shape.d_model, 1.0 / np.sqrt(shape.d_model))
        up = random_q4_0(rng, shape.d_ff, shape.d_model, 1.0 / np.sqrt(shape.d_model))
        down = random_q4_0(rng, shape.d_model, shape.d_ff, 1.0 / np.sqrt(shape.d_ff))
        out.append((gate, up, down))
    return out


def measure_ffn(
    shape: ModelShape,
    threads: int,
    seconds: float,
    seed: int = 0,
    kind: str = "auto",
    working_set_bytes: int = 512 * MiB,
) -> tuple[float, str]:
    """(bytes of expert weights per second, kernel label) of the SwiGLU FFN `mer run` uses.

    The experts are cycled through a working set of at least two and ~`working_set_bytes`,
    so each call reads its weights from memory as a run's cache slots are, not from cache.
    """
    n = max(2, -(-working_set_bytes // shape.bytes_per_expert))
    experts = _experts(shape, n, seed)
    x = np.random.default_rng(seed + 1).standard_normal(shape.d_model).astype(np.float32)
    nbytes = sum(a.nbytes for a in experts[0])
    i = [0]
    with make_ffn(shape, threads, kind) as ffn:
        label = ffn_label(ffn)

        def one() -> None:
            ffn(x, *experts[i[0] % n])
            i[0] += 1

        per = _timed(one, seconds, min_reps=n)
    return nbytes / per, label


def measure_dense(
    shape: ModelShape, threads: int, seconds: float, seed: int = 0, kind: str = "auto"
) -> float:
    """Dense block throughput (bytes of resident attention weights per second)."""
    with make_ffn(shape, threads, kind) as kernel:
        n_layers = min(shape.n_layers, max(4, (256 * MiB) // max(1, shape.dense_bytes_per_layer)))
        block = DenseBlock(shape, n_layers=n_layers, seed=seed, threads=threads, kernel=kernel)
        x = np.random.default_rng(seed).standard_normal(shape.d_model).astype(np.float32)
        layer = [0]
        hidden = [x]

        def one() -> None:
            hidden[0] = block(layer[0], hidden[0])
            layer[0] += 1

        per = _timed(one, seconds, min_reps=max(4, n_layers))
    return block.bytes_per_layer / per


def measure_memory(nbytes: int, threads: int) -> tuple[float, str]:
    """Streaming read bandwidth over `nbytes` on `threads`, best of 3: (bytes/s, how).

    The C module's read (wide loads, software prefetch: what the kernel can at best do) when
    it is compiled, else a numpy float64 sum split over the threads.
    """
    from mer.native import q4_0 as nq

    if nq.available():
        return nq.memory_read_gbs(nbytes, threads, repeats=3) * 1e9, "native"
    a = np.ones(max(1, nbytes // 8), dtype=np.float64)
    parts = np.array_split(a, max(1, threads))
    best = 0.0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for _ in range(3):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            el = time.perf_counter() - t0
            best = max(best, a.nbytes / el)
    return best, "numpy"


def measure_bursts(
    path: Path, chunk: int, io: str, repeats: int, rng: np.random.Generator
) -> tuple[list[BurstPoint], str, bool]:
    """T(k): k chunks of `chunk` bytes at random aligned offsets, submitted at once
    (a queue depth of k, so none waits in the reader), timed from the end of the
    submission to the last landing, as the engine times a read."""
    size = path.stat().st_size
    span = max(ALIGN, size - chunk) // ALIGN
    k_max = max(BURSTS)
    buf = aligned_empty(chunk * k_max)
    buf[::ALIGN] = 0
    out = []
    with open_reader(kind=io, queue_depth=k_max, chunk_bytes=chunk) as reader:
        fd = reader.open(path)
        direct = reader.is_direct(fd)
        reader.read(fd, 0, ALIGN, buf)  # warm the ring
        kind = reader.kind
        for k in BURSTS:
            times = []
            for rep_i in range(repeats + 1):
                offs = rng.integers(0, span, size=k) * ALIGN
                reqs = [
                    (fd, int(o), chunk, buf[i * chunk : (i + 1) * chunk], ("b", rep_i, i))
                    for i, o in enumerate(offs)
                ]
                reader.submit_reads(reqs)
                t0 = time.perf_counter()
                for i in range(k):
                    reader.wait(("b", rep_i, i))
                if rep_i:  # the first of each k warms up
                    times.append(time.perf_counter() - t0)
            arr = np.asarray(times)
            out.append(
                BurstPoint(
                    k,
                    chunk,
                    float(np.median(arr)),
                    float(np.percentile(arr, 25)),
                    float(np.percentile(arr, 75)),
                )
            )
    return out, kind, direct


def _stacked_plan(shape: ModelShape, slot_offset: int) -> list[tuple[int, int, int]]:
    """One expert's read plan as the engine builds it from a stacked GGUF: gate, up and
    down, each a page-aligned range (offset, length, position in the slot buffer)."""
    matrix = shape.bytes_per_expert // 3
    length = (-(-matrix // ALIGN) + 1) * ALIGN
    return [(slot_offset + i * length, length, i * length) for i in range(3)]


def measure_submit(
    path: Path, shape: ModelShape, cfg: ProbeConfig, rng: np.random.Generator
) -> tuple[float, float]:
    """Median driver times to submit one expert read and to reap it once it has landed
    (the streamer's own calls: `_Reads.submit`, and `_Reads.poll` outside a wait, as at a
    lookup or between FFNs)."""
    from mer.engine.streaming import _Reads

    plan0 = _stacked_plan(shape, 0)
    read_bytes = sum(n for _, n, _ in plan0)
    size = path.stat().st_size
    slots = max(1, (size - read_bytes) // ALIGN)
    buf = aligned_empty(read_bytes)
    buf[::ALIGN] = 0
    times = []
    reaps = []
    landed_s = 1e-3  # how long a read took last time: wait a few times that before reaping
    with open_reader(
        kind=cfg.io, queue_depth=cfg.engine_queue_depth, chunk_bytes=cfg.engine_chunk_bytes
    ) as reader:
        fd = reader.open(path)
        reads = _Reads(reader, lambda *_a: None)
        for i in range(max(8, cfg.burst_repeats * 3)):
            base = int(rng.integers(0, slots)) * ALIGN
            plan = [(base + off - plan0[0][0], n, b) for off, n, b in plan0]
            plan = [(min(o, size - n) // ALIGN * ALIGN, n, b) for o, n, b in plan]
            t0 = time.perf_counter()
            reads.submit(("slot", i), i, plan, fd, buf, urgent=True)
            times.append(time.perf_counter() - t0)
            if i % 2:  # every other read: let it land, then reap it in one poll
                time.sleep(min(0.5, 3 * landed_s))
                t0 = time.perf_counter()
                reads.poll()
                if ("slot", i) not in reads.pending:
                    reaps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reads.wait(("slot", i))
            if not i % 2:
                landed_s = time.perf_counter() - t0
    return float(np.median(times[1:])), float(np.median(reaps)) if reaps else 0.0


def measure_ffn_paths(
    path: Path, shape: ModelShape, cfg: ProbeConfig, seconds: float
) -> tuple[float, float]:
    """(direct, busy) seconds per FFN on cold weights: called directly, and handed to a
    thread while this one reaps completions of a read in flight (the streamer's path).
    Alternated, so that load on the machine weighs on both alike."""
    from mer.engine.streaming import _Reads, ffn_while_reading, runs_inline

    weights = _experts(shape, max(2, -(-COLD_BYTES // max(1, shape.bytes_per_expert))), cfg.seed)
    x = np.random.default_rng(cfg.seed).standard_normal(shape.d_model).astype(np.float32)
    chunk = cfg.engine_chunk_bytes
    size = path.stat().st_size
    n_chunks = 16
    buf = aligned_empty(chunk * n_chunks)
    buf[::ALIGN] = 0
    direct: list[float] = []
    busy: list[float] = []
    rng = np.random.default_rng(cfg.seed + 1)
    with (
        make_ffn(shape, cfg.threads, cfg.ffn) as ffn,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-compute") as runner,
        open_reader(kind=cfg.io, queue_depth=cfg.engine_queue_depth, chunk_bytes=chunk) as reader,
    ):
        fd = reader.open(path)
        reads = _Reads(reader, lambda *_a: None)
        inline = runs_inline(ffn, shape.bytes_per_expert)
        i = 0
        t_end = time.perf_counter() + seconds
        while i < 8 or time.perf_counter() < t_end:
            g, u, d = weights[i % len(weights)]
            if i % 2:
                if not reads.pending:
                    off = int(rng.integers(0, max(1, (size - len(buf)) // ALIGN))) * ALIGN
                    reads.submit(("slot", i), i, [(off, len(buf), 0)], fd, buf)
                t0 = time.perf_counter()
                reads.poll()
                if reads.pending:
                    ffn_while_reading(runner, reads, inline, ffn, x, g, u, d)
                    busy.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                ffn(x, g, u, d)
                direct.append(time.perf_counter() - t0)
            i += 1
        reads.drain()
    t_direct = float(np.median(direct))
    t_busy = float(np.median(busy)) if busy else t_direct
    return t_direct, t_busy


def measure_wake(
    path: Path, shape: ModelShape, cfg: ProbeConfig, seconds: float
) -> tuple[float, float]:
    """(wake_ffn_s, wake_dense_s): the engine's step sequence - the dense block, then an
    expert FFN - timed when the driver blocked on a read of one expert just before the FFN,
    against the same steps with nothing read, alternated on the same cold weights. The
    differences of the medians: the FFN right after the wait, and the next step's dense
    block (a thread that slept gave its core and the CPU caches away meanwhile)."""
    from mer.engine.streaming import _Reads

    weights = _experts(shape, max(2, -(-COLD_BYTES // max(1, shape.bytes_per_expert))), cfg.seed)
    x = np.random.default_rng(cfg.seed).standard_normal(shape.d_model).astype(np.float32)
    read_bytes = -(-shape.slot_bytes // ALIGN) * ALIGN
    size = path.stat().st_size
    buf = aligned_empty(read_bytes)
    buf[::ALIGN] = 0
    rng = np.random.default_rng(cfg.seed + 2)
    n_dense = min(shape.n_layers, max(2, (64 * MiB) // max(1, shape.dense_bytes_per_layer)))
    ffn_t: dict[bool, list[float]] = {False: [], True: []}
    dense_t: dict[bool, list[float]] = {False: [], True: []}
    with (
        make_ffn(shape, cfg.threads, cfg.ffn) as ffn,
        open_reader(
            kind=cfg.io, queue_depth=cfg.engine_queue_depth, chunk_bytes=cfg.engine_chunk_bytes
        ) as reader,
    ):
        block = DenseBlock(shape, n_layers=n_dense, seed=cfg.seed, threads=cfg.threads, kernel=ffn)
        fd = reader.open(path)
        reads = _Reads(reader, lambda *_a: None)
        i = 0
        blocked = False  # whether the step before this one blocked
        t_end = time.perf_counter() + seconds
        while i < 16 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            x = block(i % n_dense, x)
            dense_t[blocked].append(time.perf_counter() - t0)
            blocked = bool(rng.random() < 0.5)
            if blocked:
                off = int(rng.integers(0, max(1, (size - read_bytes) // ALIGN))) * ALIGN
                reads.submit(("slot", i), i, [(off, read_bytes, 0)], fd, buf)
                reads.wait(("slot", i))
            g, u, d = weights[i % len(weights)]
            t0 = time.perf_counter()
            ffn(x, g, u, d)
            ffn_t[blocked].append(time.perf_counter() - t0)
            i += 1
        reads.drain()

    def extra(t: dict[bool, list[float]]) -> float:
        if not t[True] or not t[False]:
            return 0.0
        return max(0.0, float(np.median(t[True]) - np.median(t[False])))

    return extra(ffn_t), extra(dense_t)


def measure_step_overhead(shape: ModelShape, seconds: float, seed: int = 0) -> float:
    """The decision core's lookup and prefetch calls per step (LRU, a random routing),
    plus the hidden vector's update: the driver's work per step besides reads and FFNs."""
    from mer.core.replay import Replay, ReplayConfig
    from mer.engine.dense import rmsnorm

    rng = np.random.default_rng(seed)
    n_steps = 4096
    layers = np.arange(n_steps) % shape.n_layers
    experts = np.stack(
        [rng.choice(shape.n_experts, shape.top_k, replace=False) for _ in range(n_steps)]
    )
    steps = (layers[:, None] * shape.n_experts + experts).astype(np.int32)
    x = rng.standard_normal(shape.d_model).astype(np.float32)
    y = np.zeros_like(x)
    done = 0
    t0 = time.perf_counter()
    while True:
        replay = Replay(
            steps,
            n_layers=shape.n_layers,
            n_experts=shape.n_experts,
            config=ReplayConfig(cache_slots=shape.n_keys // 4),
        )
        for t in range(n_steps):
            res = replay.step(t)
            for adm in res.reads:
                replay.complete(adm.key)
            replay.prefetch(t)
            x = rmsnorm(x + y)
        done += n_steps
        if time.perf_counter() - t0 >= seconds:
            return (time.perf_counter() - t0) / done


@dataclass
class EngineStep:
    """Per-step figures of the engine's own replay with every expert resident (medians
    over its tokens, so a neighbour's burst of load moves them less)."""

    step_overhead_s: float  # driver time per step outside FFNs and the dense block
    ffn_s: float  # one expert FFN as the streamer runs it (views, polls included)
    dense_s: float  # one dense block inside the step
    layers: int  # of the replayed file (the shape's, or fewer)
    tokens: int  # replayed without a read (the ones the medians are over)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_step_layers(shape: ModelShape, file_bytes: int) -> int:
    """Layers of the engine-step file: as many as `file_bytes` of experts hold (at least
    one, at most the shape's), so the replay's working set defeats the CPU caches as a
    run's slots do without writing the whole model."""
    per_layer = shape.n_experts * shape.slot_bytes
    return max(1, min(shape.n_layers, file_bytes // max(1, per_layer)))


def measure_engine_step(
    directory: Path, shape: ModelShape, cfg: ProbeConfig, seconds: float
) -> EngineStep:
    """The engine's step timed by the engine: `mer run`'s executor replays a random
    routing over an expert file of the shape (fewer layers, `engine_step_layers`) written
    in `directory`, with a cache that holds every expert, so after the first reads every
    step is the FFNs, the dense block and the driver's own work. Per token the executor
    reports dense, FFN and the rest (`TokenRows`); the tokens that read nothing give the
    per-step cost, the FFN and the dense block as a run's steps spend them. The file is
    deleted."""
    import dataclasses

    from mer.core.replay import ReplayConfig
    from mer.engine.executor import Executor
    from mer.engine.gguf_synth import synth_gguf
    from mer.engine.store import ExpertStore
    from mer.engine.streaming import EngineConfig
    from mer.traces.format import TraceMeta, from_arrays

    n_layers = engine_step_layers(shape, cfg.step_file_bytes)
    small = dataclasses.replace(shape, n_layers=n_layers)
    rng = np.random.default_rng(cfg.seed + 7)
    ecfg = EngineConfig(
        io=cfg.io,
        queue_depth=cfg.engine_queue_depth,
        chunk_bytes=cfg.engine_chunk_bytes,
        threads=cfg.threads,
        ffn=cfg.ffn,
        progress=False,
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=directory, prefix=".mer-probe-step-") as tmp:
        path = Path(tmp) / "experts.gguf"
        synth_gguf(path, small, seed=cfg.seed)
        store = ExpertStore.open(path)
        tokens = 16
        t_end = time.perf_counter() + seconds
        while True:
            picks = np.argsort(rng.random((tokens, n_layers, shape.n_experts)), axis=2)
            trace = from_arrays(
                picks[:, :, : shape.top_k],
                TraceMeta(
                    model="probe", n_layers=n_layers, n_experts=shape.n_experts, top_k=shape.top_k
                ),
                name="probe routing",
            )
            rcfg = ReplayConfig(cache_slots=n_layers * shape.n_experts)
            t0 = time.perf_counter()
            got = Executor(trace, store, rcfg, ecfg, trace_name="probe routing").run().tokens
            rows.append(got)
            left = t_end - time.perf_counter()
            if left <= 0:
                break
            # the next replay about as long as the time left (each starts cold: its reads)
            per_token = (time.perf_counter() - t0) / tokens
            tokens = int(min(4096, max(16, left / max(per_token, 1e-6))))
    import pandas as pd

    return engine_step_of(pd.concat(rows, ignore_index=True), n_layers, shape.top_k)


def engine_step_of(tokens: Any, n_layers: int, top_k: int) -> EngineStep:
    """The per-step figures of an executor's per-token table (`TokenRows`), from its
    tokens that read nothing: the medians of FFN, dense and the rest per step. One
    arithmetic for the probe's engine step and `mer validate`'s compute pulse, so the
    pulse measures exactly what the profile's compute figures are."""
    quiet = tokens[(tokens["misses"] == 0) & (tokens["prefetch_issued"] == 0)]
    if quiet.empty:  # cannot happen: a cache of every expert misses only the first visits
        raise RuntimeFailure("the engine-step replay read on every token")
    rest = quiet["time_s"] - quiet["io_wait_s"] - quiet["compute_s"] - quiet["dense_s"]
    return EngineStep(
        step_overhead_s=max(0.0, float(np.median(rest))) / n_layers,
        ffn_s=float(np.median(quiet["compute_s"])) / (n_layers * top_k),
        dense_s=float(np.median(quiet["dense_s"])) / n_layers,
        layers=n_layers,
        tokens=len(quiet),
    )


def compute_pulse(store: Any, engine: Any, *, tokens: int = 40, seed: int = 0) -> dict[str, float]:
    """The engine's compute speed right now, on the expert file a run reads: `mer run`'s
    executor (with `engine`, the run's EngineConfig: same kernel, threads, priority and
    buffers) replays `tokens` tokens that route the same `top_k` random experts of every
    layer, with a cache of exactly those, so after the first token every step is the FFNs,
    the dense block and the driver's own work, timed as `measure_engine_step` times them
    (`engine_step_of`). About a third of a second on the small shape (one token's reads,
    then ~8 ms a token). `mer validate` takes one right before and right after each real
    run: the CPU's speed on this shared VM moves between a probe and a run minutes later,
    and the run's FFN, dense and step times with it."""
    import dataclasses

    from mer.core.replay import ReplayConfig
    from mer.engine.executor import Executor
    from mer.traces.format import TraceMeta, from_arrays

    n_layers, n_experts, top_k = store.n_layers, store.n_experts, store.shape.top_k
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(n_experts, size=top_k, replace=False) for _ in range(n_layers)])
    routing = np.broadcast_to(picks, (max(2, tokens + 1), n_layers, top_k))
    trace = from_arrays(
        np.ascontiguousarray(routing),
        TraceMeta(model="pulse", n_layers=n_layers, n_experts=n_experts, top_k=top_k),
        name="compute pulse",
    )
    ecfg = dataclasses.replace(engine, progress=False)
    t0 = time.perf_counter()
    got = Executor(
        trace, store, ReplayConfig(cache_slots=n_layers * top_k), ecfg, trace_name="compute pulse"
    ).run()
    step = engine_step_of(got.tokens, n_layers, top_k)
    return {
        "ffn_s": step.ffn_s,
        "dense_s": step.dense_s,
        "step_s": step.step_overhead_s,
        "seconds": time.perf_counter() - t0,
    }


def run_probe(cfg: ProbeConfig, log: Callable[[str], None] | None = None) -> ProbeResult:
    """Measure everything (see the module docstring); the probe file is always deleted."""
    say = log or (lambda _m: None)
    shape = get_shape(cfg.shape)
    rng = np.random.default_rng(cfg.seed)
    read_bytes = shape.slot_bytes
    if cfg.size_bytes < 2 * read_bytes:
        raise BadInput(
            f"a {cfg.size_bytes >> 20} MiB probe file holds fewer than two {cfg.shape} experts "
            f"({read_bytes >> 20} MiB each); give a larger --size-gib."
        )
    target = cfg.directory or Path.cwd()
    fstype = _fs_type(str(target))
    say(f"probe file: {cfg.size_bytes >> 20} MiB on {target} ({fstype})")
    points: list[ReadPoint] = []
    kind, direct = cfg.io, True
    with probe_file(cfg.directory, cfg.size_bytes, cfg.seed) as path:
        lat, lat90 = measure_latency(path, cfg.io, cfg.latency_reads, rng)
        say(f"latency (4 KiB, QD1): median {lat * 1e6:.0f} us, p90 {lat90 * 1e6:.0f} us")
        bursts = []
        for chunk in (cfg.engine_chunk_bytes, max(ALIGN, cfg.engine_chunk_bytes // 4)):
            got, kind, direct = measure_bursts(path, chunk, cfg.io, cfg.burst_repeats, rng)
            bursts += got
            say(
                f"bursts of {chunk >> 10} KiB chunks submitted together: "
                + ", ".join(f"{b.chunks}: {b.seconds * 1e3:.2f} ms" for b in got)
            )
        submit_s, reap_s = measure_submit(path, shape, cfg, rng)
        say(
            f"submitting one expert read: {submit_s * 1e6:.0f} us; reaping it once landed: "
            f"{reap_s * 1e6:.0f} us"
        )
        compute_s = max(0.3, cfg.seconds_per_point)
        ffn_direct, ffn_busy = measure_ffn_paths(path, shape, cfg, 2 * compute_s)
        say(
            f"expert FFN on cold weights: {ffn_direct * 1e3:.3f} ms direct, "
            f"{ffn_busy * 1e3:.3f} ms handed to a thread while a read is in flight"
        )
        wake_ffn, wake_dense = measure_wake(path, shape, cfg, compute_s)
        say(
            f"after blocking on a read: an FFN {wake_ffn * 1e6:.1f} us slower, the next "
            f"dense block {wake_dense * 1e6:.1f} us"
        )
        # The reader settings the engine uses (its default among them): steady streams of
        # a step's worth of whole-expert reads at a time; the SSD model scales its fitted
        # bandwidth by how these differ (SSDProfile.reader_scale).
        # Measured in STREAM_ROUNDS interleaved rounds, each setting a share of its budget
        # per round in a rotated order, so a disk whose speed drifts during the probe (a
        # shared one) moves every setting alike instead of skewing their ratios.
        settings = [
            (chunk, qd)
            for chunk in sorted({*cfg.chunk_sizes, cfg.engine_chunk_bytes})
            for qd in sorted({*cfg.queue_depths, cfg.engine_queue_depth})
        ]
        parts: dict[tuple[int, int], list[ReadPoint]] = {s: [] for s in settings}
        for r in range(STREAM_ROUNDS):
            shift = r * len(settings) // STREAM_ROUNDS
            for chunk, qd in settings[shift:] + settings[:shift]:
                pt, kind, direct = measure_reads(
                    path,
                    read_bytes,
                    qd,
                    chunk,
                    cfg.io,
                    cfg.seconds_per_point / STREAM_ROUNDS,
                    rng,
                    batch=shape.top_k,
                )
                parts[chunk, qd].append(pt)
        for chunk, qd in settings:
            pt = merge_points(parts[chunk, qd])
            points.append(pt)
            say(
                f"whole-expert reads ({read_bytes >> 10} KiB, {pt.batch} at a time), "
                f"chunk {chunk >> 10} KiB, QD {qd}: {pt.bandwidth / 1e9:.2f} GB/s "
                f"({pt.reads} reads; each p10 {pt.read_p10_s * 1e3:.2f} ms, p50 "
                f"{pt.read_p50_s * 1e3:.2f} ms, p90 {pt.read_p90_s * 1e3:.2f} ms, mean "
                f"{pt.read_mean_s * 1e3:.2f} ms)"
            )
    mem_bps, mem_kind = measure_memory(cfg.memory_bytes, cfg.threads)
    mem1 = mem_bps if cfg.threads == 1 else measure_memory(cfg.memory_bytes, 1)[0]
    ffn_bps, label = measure_ffn(
        shape, cfg.threads, compute_s, cfg.seed, cfg.ffn, cfg.ffn_working_set_bytes
    )
    say(
        f"q4_0 expert FFN, {label}, {cfg.threads} threads: {ffn_bps / 1e9:.2f} GB/s of weights, "
        f"{ffn_bps / mem_bps:.0%} of the memory read bandwidth ({mem_bps / 1e9:.2f} GB/s on "
        f"{cfg.threads} threads, {mem1 / 1e9:.2f} GB/s on one)"
    )
    step_s = measure_step_overhead(shape, min(compute_s, 0.5), cfg.seed)
    say(f"decision core and hidden update per step: {step_s * 1e6:.1f} us")
    dense_bps = measure_dense(shape, cfg.threads, compute_s, cfg.seed, cfg.ffn)
    say(f"dense block: {dense_bps / 1e9:.3f} GB/s of weights")
    es = measure_engine_step(target, shape, cfg, cfg.step_seconds)
    say(
        f"the engine's own steps ({es.layers} layers of {shape.name}, every expert resident, "
        f"{es.tokens} tokens): {es.step_overhead_s * 1e6:.1f} us of driver work per step, "
        f"FFN {es.ffn_s * 1e3:.3f} ms, dense block {es.dense_s * 1e3:.3f} ms "
        f"({shape.dense_bytes_per_layer / es.dense_s / 1e9:.3f} GB/s)"
        if es.dense_s > 0
        else f"the engine's own steps: {es.step_overhead_s * 1e6:.1f} us per step, "
        f"FFN {es.ffn_s * 1e3:.3f} ms"
    )
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ProbeResult(
        shape=shape.name,
        expert_read_bytes=read_bytes,
        file_bytes=cfg.size_bytes,
        filesystem=fstype,
        io_kind=kind,
        direct=direct,
        latency_s=lat,
        latency_p90_s=lat90,
        points=points,
        ffn_bytes_per_s=ffn_bps,
        dense_bytes_per_s=dense_bps,
        memory_read_bytes_per_s=mem_bps,
        threads=cfg.threads,
        ram_bytes=int(ram),
        ffn_kernel=label,
        memory_read_1thread_bytes_per_s=mem1,
        memory_read_kind=mem_kind,
        bursts=bursts,
        engine_chunk_bytes=cfg.engine_chunk_bytes,
        engine_queue_depth=cfg.engine_queue_depth,
        read_submit_s=submit_s,
        read_complete_s=reap_s,
        ffn_busy_overhead_s=max(0.0, ffn_busy - ffn_direct),
        step_overhead_s=step_s,
        ffn_direct_s=ffn_direct,
        engine_step=es.to_dict(),
        wake_ffn_s=wake_ffn,
        wake_dense_s=wake_dense,
    )


def to_profile(result: ProbeResult, name: str | None = None, ssd_model: str = "shared") -> Any:
    """The simulator's HardwareProfile for this measurement (`ssd_model`: "shared", reads
    in flight sharing the device as the bursts did, or "channels")."""
    from mer.sim.hardware import ComputeProfile, HardwareProfile, MemoryProfile, SSDProfile

    fit = result.fit_ssd(ssd_model)
    host = platform.node() or "this-machine"
    prof = HardwareProfile(
        name=name or f"probe-{host}",
        description=(
            f"measured by mer probe on {host}: {result.io_kind}"
            f"{' O_DIRECT' if result.direct else ' buffered'} reads of whole "
            f"{result.shape} experts on {result.filesystem}; {result.ffn_kernel} q4_0 FFN on "
            f"{result.threads} threads"
        ),
        source=f"mer probe, {datetime.now(UTC).isoformat(timespec='seconds')}",
        ssd=SSDProfile(
            latency_s=fit["latency_s"],
            bandwidth_bytes_per_s=fit["bandwidth_bytes_per_s"],
            channels=fit["channels"],
            chunk_bytes=fit["chunk_bytes"],
            queue_depth=fit.get("queue_depth"),
            access_latency_s=fit.get("access_latency_s", 0.0),
            reader_bandwidth=fit.get("reader_bandwidth", []),
            burst_curve=fit.get("burst_curve", []),
        ),
        compute=ComputeProfile(
            ffn_bytes_per_s=result.ffn_engine_bytes_per_s,
            dense_bytes_per_s=result.dense_engine_bytes_per_s,
            dense_s_per_layer=None,
            workers=1,  # the engine computes one expert at a time, on all threads
            kernel=result.ffn_kernel,
            step_overhead_s=result.step_engine_s,
            read_submit_s=result.read_submit_s,
            read_complete_s=result.read_complete_s,
            ffn_busy_overhead_s=result.ffn_busy_overhead_s,
            wake_ffn_s=result.wake_ffn_s,
            wake_dense_s=result.wake_dense_s,
        ),
        memory=MemoryProfile(
            ram_bytes=result.ram_bytes,
            read_bandwidth_bytes_per_s=result.memory_read_bytes_per_s,
        ),
        # The shape whose experts were read and computed: FFN bytes/s holds for it only,
        # and `mer simulate` says so when another shape is simulated with this profile.
        extra={"measured_shape": result.shape, "probe": result.to_dict()},
    )
    return prof.validate()


def read_experts(
    reader: Any, fd: int, store: Any, keys: Any, bufs: list[np.ndarray]
) -> tuple[list[float], int]:
    """Read experts `keys` (layer * n_experts + expert) one after the other, as a demand
    miss reads one (its plan's chunks submitted together), each into its buffer: the
    time of each and the bytes read."""
    times = []
    nbytes = 0
    for i, (key, buf) in enumerate(zip(keys, bufs, strict=True)):
        layer, expert = divmod(int(key), store.n_experts)
        plan = store.read_plan(layer, expert)
        t0 = time.perf_counter()
        reader.submit_reads(
            [
                (fd, r.offset, r.length, buf[r.buf_offset : r.buf_offset + r.length], ("e", i, j))
                for j, r in enumerate(plan)
            ]
        )
        for j in range(len(plan)):
            reader.wait(("e", i, j))
        times.append(time.perf_counter() - t0)
        nbytes += sum(r.length for r in plan)
    return times, nbytes


def pulse(
    store: Any,
    *,
    io: str = "auto",
    threads: int = 1,
    chunk_bytes: int = 512 * KiB,
    experts: int = 24,
    seed: int = 0,
    ffn: str = "auto",
) -> dict[str, float]:
    """A short check of this machine's speed now, on an expert file (about a second):
    the median expert-FFN time over experts read from it (direct calls), the median
    dense-block time, the median time of a burst of 4 chunks read from it, and the
    time per expert of reading `experts` experts back to back (the device's rate under
    load, which a shared disk changes from one minute to the next).
    `mer validate` compares pulses to decide whether the machine drifted since the
    profile was calibrated."""
    shape = store.shape
    rng = np.random.default_rng(seed)
    slot = int(store.slot_bytes)
    picks = rng.choice(
        store.n_layers * store.n_experts,
        size=min(experts, store.n_layers * store.n_experts),
        replace=False,
    )
    bufs = [aligned_empty(slot) for _ in picks]
    burst = aligned_empty(4 * chunk_bytes)
    burst[::ALIGN] = 0
    size = int(os.path.getsize(store.data_path))
    span = max(1, (size - chunk_bytes) // ALIGN)
    bursts = []
    with open_reader(kind=io, queue_depth=32, chunk_bytes=chunk_bytes) as reader:
        fd = reader.open(store.data_path)
        t_stream = time.perf_counter()
        read_experts(reader, fd, store, picks, bufs)
        stream_s = (time.perf_counter() - t_stream) / len(picks)
        for rep in range(6):
            offs = rng.integers(0, span, size=4) * ALIGN
            reader.submit_reads(
                [
                    (
                        fd,
                        int(o),
                        chunk_bytes,
                        burst[j * chunk_bytes : (j + 1) * chunk_bytes],
                        ("b", rep, j),
                    )
                    for j, o in enumerate(offs)
                ]
            )
            t0 = time.perf_counter()
            for j in range(4):
                reader.wait(("b", rep, j))
            if rep:
                bursts.append(time.perf_counter() - t0)
    x = rng.standard_normal(shape.d_model).astype(np.float32)
    ffn_t = []
    with make_ffn(shape, threads, ffn) as kernel:
        for rep in range(3):
            for key, buf in zip(picks, bufs, strict=True):
                layer, expert = divmod(int(key), store.n_experts)
                g, u, d = store.views(buf, layer, expert)
                t0 = time.perf_counter()
                kernel(x, g, u, d)
                if rep:
                    ffn_t.append(time.perf_counter() - t0)
        block = DenseBlock(shape, n_layers=4, seed=seed, threads=threads, kernel=kernel)
        dense_t = []
        h = x
        for i in range(24):
            t0 = time.perf_counter()
            h = block(i % 4, h)
            if i >= 4:
                dense_t.append(time.perf_counter() - t0)
    return {
        "ffn_s": float(np.median(ffn_t)),
        "dense_s": float(np.median(dense_t)),
        "burst4_s": float(np.median(bursts)),
        "expert_read_s": float(stream_s),
    }


def disk_pulse(
    store: Any,
    *,
    io: str = "auto",
    chunk_bytes: int = 512 * KiB,
    queue_depth: int = 32,
    experts: int = 32,
    seed: int | None = None,
    reader: Any = None,
) -> dict[str, float]:
    """The expert file's read rate right now: `experts` random experts read back to back
    as a demand miss reads them (one expert's chunks submitted together, then the next),
    in bytes/s, and the median time of one expert. A tenth of a second on a 1 GB/s disk,
    no CPU work: short enough to take right before every held-out run of `mer validate`,
    whose disk's rate moves from one run to the next (bench/bench_disk_noise.py).
    `reader`: an open reader to reuse (the pulse then opens no ring of its own)."""
    rng = np.random.default_rng(seed)
    n_keys = store.n_layers * store.n_experts
    picks = rng.choice(n_keys, size=min(experts, n_keys), replace=False)
    buf = aligned_empty(int(store.slot_bytes))
    with contextlib.ExitStack() as stack:
        if reader is None:
            reader = stack.enter_context(
                open_reader(kind=io, queue_depth=queue_depth, chunk_bytes=chunk_bytes)
            )
        fd = reader.open(store.data_path)
        stack.callback(reader.close_file, fd)
        t_all = time.perf_counter()
        times, nbytes = read_experts(reader, fd, store, picks, [buf] * len(picks))
        total = time.perf_counter() - t_all
    return {
        "read_bytes_per_s": nbytes / total,
        "expert_read_s": float(np.median(times)),
        "seconds": total,
    }


def cpu_pulse(seconds: float = 0.2) -> dict[str, float]:
    """How much of a core a busy thread gets right now: spin for `seconds` of wall time
    and read the kernel's run delay of this thread (schedstat: runnable, off a core).
    On a 2-core machine shared with other work, a run's driver loses that share of its
    time (bench/bench_disk_noise.py); 0.0 where schedstat is not available."""
    from mer.engine.streaming import thread_cpu_wait_s

    w0 = thread_cpu_wait_s()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        n += 1
    wall = time.perf_counter() - t0
    return {"cpu_wait_share": (thread_cpu_wait_s() - w0) / wall, "seconds": wall}
