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

It then fits the simulator's SSD model (`sim.hardware.SSDProfile`: a chunk costs
latency + chunk / (bandwidth / channels)): `latency_s` is the QD1 4 KiB latency,
`chunk_bytes` the chunk size of the best bandwidth, `channels` the smallest queue
depth reaching 90% of the best bandwidth (counting only queue depths one read of
the shape's expert can fill: at most its number of chunks), and
`bandwidth_bytes_per_s` is chosen
so that the model reproduces the bandwidth measured at that queue depth. The raw
grid goes into the profile's `extra` so the fit can be checked.
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
SATURATION = 0.9  # channels: the smallest queue depth reaching this share of the best bandwidth


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

    @classmethod
    def quick(cls, **kw: Any) -> ProbeConfig:
        """A probe of a few seconds (tests): small file, small shape, fewer points."""
        base: dict[str, Any] = dict(
            size_bytes=64 * MiB,
            shape="mixtral-small",
            queue_depths=[1, 4, 16, 64],
            chunk_sizes=[128 * KiB, 512 * KiB],
            seconds_per_point=0.15,
            latency_reads=50,
            memory_bytes=64 * MiB,
            ffn_working_set_bytes=96 * MiB,
        )
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


@dataclass
class ReadPoint:
    queue_depth: int
    chunk_bytes: int
    reads: int
    bytes: int
    seconds: float

    @property
    def bandwidth(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_bytes_per_s"] = self.bandwidth
        return d


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

    def observable(self) -> list[ReadPoint]:
        """The points whose queue depth one read could fill.

        Reads are timed one at a time, so a read of n chunks never has more than n in flight:
        queue depths beyond the first >= n repeat that measurement and say nothing about how
        many requests the device serves at once (on small experts they are noise, and taking
        their plateau as channels credits the device with parallelism nobody saw).
        """
        out = []
        for chunk in {p.chunk_bytes for p in self.points}:
            n = max(1, -(-self.expert_read_bytes // chunk))
            qds = sorted(p.queue_depth for p in self.points if p.chunk_bytes == chunk)
            cap = next((q for q in qds if q >= n), qds[-1])
            out += [p for p in self.points if p.chunk_bytes == chunk and p.queue_depth <= cap]
        return out

    def best(self) -> ReadPoint:
        return max(self.observable(), key=lambda p: p.bandwidth)

    def fit_ssd(self) -> dict[str, Any]:
        """latency, chunk, channels and the model bandwidth reproducing the measurement."""
        best = self.best()
        same_chunk = sorted(
            (p for p in self.observable() if p.chunk_bytes == best.chunk_bytes),
            key=lambda p: p.queue_depth,
        )
        sat = next(p for p in same_chunk if p.bandwidth >= SATURATION * best.bandwidth)
        n_chunks = max(1, -(-self.expert_read_bytes // best.chunk_bytes))
        channels = min(sat.queue_depth, n_chunks)
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


def measure_reads(
    path: Path,
    read_bytes: int,
    queue_depth: int,
    chunk_bytes: int,
    io: str,
    seconds: float,
    rng: np.random.Generator,
    buf: np.ndarray,
) -> tuple[ReadPoint, str, bool]:
    """Whole reads of `read_bytes` at random aligned offsets, one at a time, for ~`seconds`."""
    size = path.stat().st_size
    n_slots = max(1, size // read_bytes)
    with open_reader(kind=io, queue_depth=queue_depth, chunk_bytes=chunk_bytes) as reader:
        fd = reader.open(path)
        direct = reader.is_direct(fd)
        reader.read(fd, 0, min(read_bytes, ALIGN * 16), buf)  # warm the ring / pool
        order = rng.permutation(n_slots)
        total = 0
        reads = 0
        t0 = time.perf_counter()
        while True:
            off = int(order[reads % n_slots]) * read_bytes
            reader.read(fd, off, read_bytes, buf)
            total += read_bytes
            reads += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and reads >= 2:
                break
        kind = reader.kind
    return ReadPoint(queue_depth, chunk_bytes, reads, total, elapsed), kind, direct


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
        buf = aligned_empty(read_bytes)
        buf[::ALIGN] = 0
        lat, lat90 = measure_latency(path, cfg.io, cfg.latency_reads, rng)
        say(f"latency (4 KiB, QD1): median {lat * 1e6:.0f} us, p90 {lat90 * 1e6:.0f} us")
        for chunk in cfg.chunk_sizes:
            for qd in cfg.queue_depths:
                pt, kind, direct = measure_reads(
                    path, read_bytes, qd, chunk, cfg.io, cfg.seconds_per_point, rng, buf
                )
                points.append(pt)
                say(
                    f"whole-expert reads ({read_bytes >> 10} KiB), chunk {chunk >> 10} KiB, "
                    f"QD {qd}: {pt.bandwidth / 1e9:.2f} GB/s ({pt.reads} reads)"
                )
    compute_s = max(0.3, cfg.seconds_per_point)
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
    dense_bps = measure_dense(shape, cfg.threads, compute_s, cfg.seed, cfg.ffn)
    say(f"dense block: {dense_bps / 1e9:.3f} GB/s of weights")
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
    )


def to_profile(result: ProbeResult, name: str | None = None) -> Any:
    """The simulator's HardwareProfile for this measurement."""
    from mer.sim.hardware import ComputeProfile, HardwareProfile, MemoryProfile, SSDProfile

    fit = result.fit_ssd()
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
        ),
        compute=ComputeProfile(
            ffn_bytes_per_s=result.ffn_bytes_per_s,
            dense_bytes_per_s=result.dense_bytes_per_s,
            dense_s_per_layer=None,
            workers=1,  # the engine computes one expert at a time, on all threads
            kernel=result.ffn_kernel,
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
