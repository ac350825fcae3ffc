"""Hardware profiles: the machine the simulator models, as one JSON file.

A profile says how fast the SSD serves reads (per-request latency, aggregate
bandwidth, parallel channels, chunk size), how fast the CPU runs q4_0 expert
FFNs and the dense (attention-sized) block, and how much RAM there is. The
simulator reads it; `mer probe` (the engine) measures one on the user's machine
and writes the same schema through `HardwareProfile.save`. The schema and the
bundled profiles' derivations are in docs/hardware-profile.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mer import validate
from mer.atomic import write_json_atomic
from mer.errors import BadInput
from mer.guard import check_input, parse_json

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
SCHEMA_VERSION = 1


# Plausible ranges: wide enough for any real machine, narrow enough that a typo
# (1e-300 B/s, 1e30 workers) is refused instead of simulated for hours.
RATE = (1e3, 1e15)  # bytes per second
LIMITS: dict[str, tuple[float, float]] = {
    "ssd.latency_s": (0.0, 10.0),
    "ssd.bandwidth_bytes_per_s": RATE,
    "ssd.channels": (1, 65536),
    "ssd.chunk_bytes": (512, 1 << 30),
    "ssd.queue_depth": (1, 1 << 20),
    "ssd.access_latency_s": (0.0, 10.0),
    "compute.ffn_bytes_per_s": RATE,
    "compute.dense_bytes_per_s": RATE,
    "compute.dense_s_per_layer": (0.0, 3600.0),
    "compute.workers": (1, 4096),
    "compute.step_overhead_s": (0.0, 10.0),
    "compute.read_submit_s": (0.0, 10.0),
    "compute.read_complete_s": (0.0, 10.0),
    "compute.ffn_busy_overhead_s": (0.0, 10.0),
    "compute.wake_ffn_s": (0.0, 10.0),
    "compute.wake_dense_s": (0.0, 10.0),
    "memory.ram_bytes": (1 << 20, 1 << 50),
    "memory.read_bandwidth_bytes_per_s": RATE,
}
INTEGER_FIELDS = (
    "ssd.channels",
    "ssd.chunk_bytes",
    "ssd.queue_depth",
    "compute.workers",
    "memory.ram_bytes",
)


def _field(where: str, name: str, value: Any) -> Any:
    """A field checked against LIMITS (an int for INTEGER_FIELDS), or BadInput naming it."""
    lo, hi = LIMITS[name]
    if name in INTEGER_FIELDS:
        return validate.integer(where, name, value, lo=int(lo), hi=int(hi))
    return validate.number(where, name, value, lo=lo, hi=hi)


@dataclass
class SSDProfile:
    """The storage device: every read is split into chunks served by `channels`.

    `queue_depth` is how many chunks the reader keeps submitted to the device
    (the engine's `--queue-depth`). Chunks beyond `channels` wait in the
    device's own FIFO queue, where a later foreground read can no longer
    overtake them; only chunks still in the reader's queue are reordered.
    None: the device holds only what it serves (`channels`), so every queued
    chunk can be overtaken (the model of profiles written before this field).
    """

    latency_s: float  # fixed latency paid by every request (chunk)
    bandwidth_bytes_per_s: float  # aggregate device bandwidth, shared by the channels
    channels: int  # requests served in parallel (queue depth the device sustains)
    chunk_bytes: int  # reads are split into chunks of (at most) this size
    queue_depth: int | None = None  # chunks submitted to the device at once (None: channels)
    access_latency_s: float = 0.0  # once per read, after its last chunk; occupies no channel
    # [queue depth, chunk bytes, bytes/s]: the probe's steady streams of whole-expert reads
    # at each reader setting. Only their ratios are used (reader_scale): the fit above holds
    # at (queue_depth, chunk_bytes), the table says how another setting differs from it.
    reader_bandwidth: list[list[float]] = field(default_factory=list)
    # [chunks, chunk bytes, seconds]: the probe's bursts of chunks submitted together. With
    # it the device is *shared*: the chunks in it (at most the queue depth) are served all
    # at once, each at an equal share of an aggregate rate that grows with their number as
    # these bursts did (`shared_rates`); `channels` and `latency_s` are then unused.
    burst_curve: list[list[float]] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """Whether reads in flight share the device (a burst curve) or queue for channels."""
        return bool(self.burst_curve)

    def shared_rates(
        self,
        queue_depth: int | None = None,
        chunk_bytes: int | None = None,
        piece: float | None = None,
    ) -> list[float]:
        """Aggregate bytes/s of the shared device with k = 1..W chunks in it, W the queue
        depth, for a reader at (`queue_depth`, `chunk_bytes`) (None: the fitted setting).

        The bursts give the curve's shape, k chunks submitted together landing after
        access + k * chunk / R(k); `bandwidth_bytes_per_s` is its level, the aggregate
        with the device full at the fitted setting (the reader table scales it to
        another setting, as for the channel model). `piece`: the size of the chunks the
        reads are cut into (default: `chunk_bytes`), the curve's chunk size.
        """
        qd = queue_depth if queue_depth is not None else self.queue_depth
        w = int(qd if qd is not None else self.channels)
        chunk = piece or (chunk_bytes if chunk_bytes is not None else self.chunk_bytes)
        full = self.bandwidth_bytes_per_s * self.reader_scale(queue_depth, chunk_bytes)
        top = _burst_rate(self.burst_curve, w, chunk, self.access_latency_s)
        return [
            full * _burst_rate(self.burst_curve, k, chunk, self.access_latency_s) / top
            for k in range(1, w + 1)
        ]

    def burst_seconds(
        self,
        chunks: int,
        piece: float,
        queue_depth: int | None = None,
        chunk_bytes: int | None = None,
    ) -> float:
        """Seconds for `chunks` chunks of `piece` bytes submitted together to an idle shared
        device to be served (without the access latency): whole windows of W chunks, each
        served together, then the last partial one."""
        rates = self.shared_rates(queue_depth, chunk_bytes, piece)
        w = len(rates)
        full, rest = divmod(chunks, w)
        t = full * w * piece / rates[-1]
        return t + (rest * piece / rates[rest - 1] if rest else 0.0)

    @property
    def channel_bandwidth(self) -> float:
        """Bandwidth one channel gets: the aggregate shared evenly."""
        return self.bandwidth_bytes_per_s / self.channels

    def served_channels(self, queue_depth: int | None = None) -> int:
        """Channels busy at most: the device's, or fewer when the reader submits fewer."""
        qd = queue_depth if queue_depth is not None else self.queue_depth
        return self.channels if qd is None else max(1, min(self.channels, qd))

    def window(self, queue_depth: int | None = None) -> int:
        """Chunks the device holds (served + in its FIFO queue): the queue depth rounded
        down to whole rounds of the served channels (exact when it is a multiple)."""
        qd = queue_depth if queue_depth is not None else self.queue_depth
        c = self.served_channels(qd)
        return c if qd is None else c * max(1, qd // c)

    def chunk_time_of(
        self, chunk: float, queue_depth: int | None = None, chunk_bytes: int | None = None
    ) -> float:
        """Service time of one chunk of `chunk` bytes on one of the served channels, for a
        reader at (`queue_depth`, `chunk_bytes`) (None: the setting the device was fitted at).

        Each channel gets `bandwidth / channels` whatever the reader submits: a
        reader with fewer chunks in flight than channels gets less in aggregate.
        The measured reader table (`reader_scale`) then says how much faster or
        slower the device streams at this reader setting than at the fitted one.
        """
        scale = self.reader_scale(queue_depth, chunk_bytes)
        return self.latency_s + chunk / (self.channel_bandwidth * scale)

    def reader_scale(self, queue_depth: int | None, chunk_bytes: int | None) -> float:
        """Streamed bandwidth at this reader setting over that at the fitted one (1.0
        without a table): log-linear in queue depth and in chunk size between the
        measured settings, held at the nearest one outside them."""
        if not self.reader_bandwidth:
            return 1.0
        table = self.reader_bandwidth
        ref_qd = self.queue_depth if self.queue_depth is not None else self.channels
        here = _table_bandwidth(
            table,
            queue_depth if queue_depth is not None else ref_qd,
            chunk_bytes if chunk_bytes is not None else self.chunk_bytes,
        )
        return here / _table_bandwidth(table, ref_qd, self.chunk_bytes)

    def n_chunks(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.chunk_bytes))

    def chunk_time(self, nbytes: int) -> float:
        """Service time of one chunk of a read of `nbytes` split into equal chunks."""
        n = self.n_chunks(nbytes)
        return self.latency_s + (nbytes / n) / self.channel_bandwidth

    def read_time(self, nbytes: int) -> float:
        """Time of one read alone on an idle device."""
        n = self.n_chunks(nbytes)
        if self.shared:
            return self.burst_seconds(n, nbytes / n) + self.access_latency_s
        return math.ceil(n / self.channels) * self.chunk_time(nbytes) + self.access_latency_s


def _loglinear(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the polyline through `points` (x ascending) in log2(x), clamped."""
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    lx = math.log2(x)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            w = (lx - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + w * (y1 - y0)
    return points[-1][1]  # pragma: no cover - the loop always returns


def _burst_rate(curve: list[list[float]], chunks: int, chunk_bytes: float, access: float) -> float:
    """The aggregate rate of `chunks` chunks of `chunk_bytes` submitted together, from the
    bursts (k, chunk bytes, seconds) less the access latency: log-linear in k at each
    measured chunk size, then in the chunk size (clamped outside the measured ones)."""
    rows = [(k, c, k * c / max(sec - access, 1e-12)) for k, c, sec in curve]
    return _by_chunk_loglinear(rows, chunks, chunk_bytes, _nondecreasing)


def _nondecreasing(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The least-squares non-decreasing fit of y over x (pool adjacent violators): more
    chunks in flight never read slower in aggregate on a real device, so a dip in the
    bursts is the disk's noise of the moment (a shared disk moves by 10-20% between
    bursts), not a shape to simulate."""
    blocks: list[list[float]] = []  # [sum of y, count]
    for _, y in points:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            y2, n2 = blocks.pop()
            blocks[-1][0] += y2
            blocks[-1][1] += n2
    ys = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
    return [(x, y) for (x, _), y in zip(points, ys, strict=True)]


def _table_bandwidth(table: list[list[float]], queue_depth: float, chunk_bytes: float) -> float:
    """Bandwidth of the reader table at (queue depth, chunk), interpolated (reader_scale)."""
    return _by_chunk_loglinear(table, queue_depth, chunk_bytes)


def _by_chunk_loglinear(
    rows: Any,
    x: float,
    chunk_bytes: float,
    shape: Callable[[list[tuple[float, float]]], list[tuple[float, float]]] = lambda pts: pts,
) -> float:
    """y at (x, chunk_bytes) from rows of (x, chunk bytes, y): log-linear in x at each
    measured chunk size (its points passed through `shape` first), then in the chunk size
    (clamped outside the measured ones). The reader table and the burst curve are both
    measured this way, over a few queue depths or burst sizes at a few chunk sizes."""
    by_chunk: dict[float, list[tuple[float, float]]] = {}
    for xi, chunk, y in rows:
        by_chunk.setdefault(float(chunk), []).append((float(xi), float(y)))
    at_chunk = [
        (chunk, _loglinear(shape(sorted(pts)), float(x))) for chunk, pts in sorted(by_chunk.items())
    ]
    return _loglinear(at_chunk, float(chunk_bytes))


@dataclass
class ComputeProfile:
    """The CPU: q4_0 throughput in bytes of weights per second, per worker."""

    ffn_bytes_per_s: float  # one expert FFN (gate, up, down) per worker
    dense_bytes_per_s: float  # the dense attention-sized block
    dense_s_per_layer: float | None = None  # fixed override of the dense time
    workers: int = 1  # expert FFNs that run at once
    kernel: str = ""  # the FFN kernel the figures are of: "native (avx512vnni)", "numpy", ...
    # The driver's own CPU time, on the thread that also submits and reaps reads
    # (0 in the bundled profiles; `mer probe` measures them, `mer calibrate` refits):
    step_overhead_s: float = 0.0  # per step: lookups, decisions, bookkeeping
    read_submit_s: float = 0.0  # per read: planning and submitting its chunks
    read_complete_s: float = 0.0  # per read: reaping its completions outside a wait
    ffn_busy_overhead_s: float = 0.0  # per FFN that runs while reads are in flight
    # What the driver pays for having slept: a thread blocked on a read gives its core (and
    # the caches) to whatever else runs, and its compute is slower when it wakes. Seconds
    # more for an FFN that starts right after the driver blocked waiting for its read, and
    # for the dense block of a step after one in which it blocked (0: not modelled).
    wake_ffn_s: float = 0.0
    wake_dense_s: float = 0.0

    def ffn_time(self, bytes_per_expert: int) -> float:
        return bytes_per_expert / self.ffn_bytes_per_s

    def dense_time(self, dense_bytes_per_layer: int) -> float:
        if self.dense_s_per_layer is not None:
            return float(self.dense_s_per_layer)
        return dense_bytes_per_layer / self.dense_bytes_per_s


@dataclass
class MemoryProfile:
    ram_bytes: int
    read_bandwidth_bytes_per_s: float


@dataclass
class HardwareProfile:
    name: str
    description: str
    source: str
    ssd: SSDProfile
    compute: ComputeProfile
    memory: MemoryProfile
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "hardware profile") -> HardwareProfile:
        """Build and validate; every problem is a BadInput naming the field."""
        if not isinstance(d, dict):
            raise BadInput(f"{where}: expected a JSON object, got {type(d).__name__}.")
        for section in ("ssd", "compute", "memory"):
            if not isinstance(d.get(section), dict):
                raise BadInput(f"{where}: field {section!r} is missing or not a JSON object.")

        def need(section: str, name: str) -> Any:
            sec = d[section]
            if name not in sec:
                raise BadInput(f"{where}: missing field {section}.{name}.")
            return sec[name]

        try:
            ssd = SSDProfile(
                latency_s=need("ssd", "latency_s"),
                bandwidth_bytes_per_s=need("ssd", "bandwidth_bytes_per_s"),
                channels=need("ssd", "channels"),
                chunk_bytes=need("ssd", "chunk_bytes"),
                queue_depth=d["ssd"].get("queue_depth"),
                access_latency_s=d["ssd"].get("access_latency_s", 0.0),
                reader_bandwidth=_reader_table(where, d["ssd"].get("reader_bandwidth", [])),
                burst_curve=_burst_curve(where, d["ssd"].get("burst_curve", [])),
            )
            compute = ComputeProfile(
                ffn_bytes_per_s=need("compute", "ffn_bytes_per_s"),
                dense_bytes_per_s=need("compute", "dense_bytes_per_s"),
                dense_s_per_layer=d["compute"].get("dense_s_per_layer"),
                workers=d["compute"].get("workers", 1),
                kernel=str(d["compute"].get("kernel", "")),
                step_overhead_s=d["compute"].get("step_overhead_s", 0.0),
                read_submit_s=d["compute"].get("read_submit_s", 0.0),
                read_complete_s=d["compute"].get("read_complete_s", 0.0),
                ffn_busy_overhead_s=d["compute"].get("ffn_busy_overhead_s", 0.0),
                wake_ffn_s=d["compute"].get("wake_ffn_s", 0.0),
                wake_dense_s=d["compute"].get("wake_dense_s", 0.0),
            )
            memory = MemoryProfile(
                ram_bytes=need("memory", "ram_bytes"),
                read_bandwidth_bytes_per_s=need("memory", "read_bandwidth_bytes_per_s"),
            )
        except TypeError as exc:  # pragma: no cover - guarded by need()
            raise BadInput(f"{where}: {exc}") from exc
        version = d.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise BadInput(
                f"{where}: field schema_version must be the integer {SCHEMA_VERSION}, "
                f"got {version!r}."
            )
        for key in ("name", "description", "source"):
            validate.text(where, key, d.get(key), optional=True)
        prof = cls(
            name=str(d.get("name") or where),
            description=str(d.get("description") or ""),
            source=str(d.get("source") or ""),
            ssd=ssd,
            compute=compute,
            memory=memory,
            schema_version=version,
            extra=dict(validate.obj(where, "extra", d.get("extra"))),
        )
        prof.validate(where)
        return prof

    def validate(self, where: str | None = None) -> HardwareProfile:
        w = where or f"hardware profile {self.name!r}"
        if self.schema_version != SCHEMA_VERSION:
            raise BadInput(
                f"{w}: field schema_version is {self.schema_version}, this mer reads "
                f"{SCHEMA_VERSION}; re-run `mer probe` or edit the file."
            )
        self.ssd.latency_s = _field(w, "ssd.latency_s", self.ssd.latency_s)
        self.ssd.bandwidth_bytes_per_s = _field(
            w, "ssd.bandwidth_bytes_per_s", self.ssd.bandwidth_bytes_per_s
        )
        self.ssd.channels = _field(w, "ssd.channels", self.ssd.channels)
        self.ssd.chunk_bytes = _field(w, "ssd.chunk_bytes", self.ssd.chunk_bytes)
        self.ssd.access_latency_s = _field(w, "ssd.access_latency_s", self.ssd.access_latency_s)
        if self.ssd.queue_depth is not None:
            self.ssd.queue_depth = int(_field(w, "ssd.queue_depth", self.ssd.queue_depth))
        self.compute.ffn_bytes_per_s = _field(
            w, "compute.ffn_bytes_per_s", self.compute.ffn_bytes_per_s
        )
        self.compute.dense_bytes_per_s = _field(
            w, "compute.dense_bytes_per_s", self.compute.dense_bytes_per_s
        )
        if self.compute.dense_s_per_layer is not None:
            self.compute.dense_s_per_layer = _field(
                w, "compute.dense_s_per_layer", self.compute.dense_s_per_layer
            )
        self.compute.workers = _field(w, "compute.workers", self.compute.workers)
        for name in (
            "step_overhead_s",
            "read_submit_s",
            "read_complete_s",
            "ffn_busy_overhead_s",
            "wake_ffn_s",
            "wake_dense_s",
        ):
            setattr(self.compute, name, _field(w, f"compute.{name}", getattr(self.compute, name)))
        self.memory.ram_bytes = _field(w, "memory.ram_bytes", self.memory.ram_bytes)
        self.memory.read_bandwidth_bytes_per_s = _field(
            w, "memory.read_bandwidth_bytes_per_s", self.memory.read_bandwidth_bytes_per_s
        )
        self.ssd.channels = int(self.ssd.channels)
        self.ssd.chunk_bytes = int(self.ssd.chunk_bytes)
        self.compute.workers = int(self.compute.workers)
        self.memory.ram_bytes = int(self.memory.ram_bytes)
        return self

    def save(self, path: str | Path) -> Path:
        """Write atomically (the schema of docs/hardware-profile.md)."""
        self.validate()
        write_json_atomic(path, self.to_dict())
        return Path(path)


def _triples(
    where: str, field_: str, value: Any, what: str, last: tuple[float, float]
) -> list[list[float]]:
    """A list of [integer, chunk bytes, number in `last`] rows (`what` names them)."""
    if not isinstance(value, list):
        raise BadInput(
            f"{where}: field {field_} must be a list of [{what}], got {type(value).__name__}."
        )
    out = []
    for i, row in enumerate(value):
        name = f"{field_}[{i}]"
        if not isinstance(row, list | tuple) or len(row) != 3:
            raise BadInput(f"{where}: field {name} must be [{what}], got {row!r}.")
        n = validate.integer(where, name + "[0]", row[0], lo=1, hi=1 << 20)
        chunk = validate.integer(where, name + "[1]", row[1], lo=512, hi=1 << 30)
        x = validate.number(where, name + "[2]", row[2], lo=last[0], hi=last[1])
        out.append([int(n), int(chunk), float(x)])
    return out


def _reader_table(where: str, value: Any) -> list[list[float]]:
    """ssd.reader_bandwidth: a list of [queue depth, chunk bytes, bytes/s], all positive."""
    return _triples(where, "ssd.reader_bandwidth", value, "queue depth, chunk bytes, bytes/s", RATE)


def _burst_curve(where: str, value: Any) -> list[list[float]]:
    """ssd.burst_curve: a list of [chunks, chunk bytes, seconds], all positive."""
    return _triples(where, "ssd.burst_curve", value, "chunks, chunk bytes, seconds", (1e-9, 3600.0))


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped in sim/profiles/."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A bundled profile by name, or a JSON file by path (`--hardware NAME|PATH`)."""
    text = str(name_or_path)
    if not text.strip():
        raise BadInput(
            "hardware profile: empty name; give a bundled name "
            f"({', '.join(bundled_profiles())}) or a JSON file from `mer probe -o FILE`."
        )
    path = Path(text)
    if not path.exists() and not text.endswith(".json") and "/" not in text:
        path = PROFILE_DIR / f"{text}.json"
        if not path.exists():
            raise BadInput(
                f"unknown hardware profile {text!r}: not a file and not one of the bundled "
                f"profiles ({', '.join(bundled_profiles())}); write one with `mer probe -o FILE`."
            )
    check_input(path, "hardware profile")
    size = path.stat().st_size
    if size > 1 << 20:
        raise BadInput(
            f"hardware profile {path}: {size:,} bytes is far larger than a profile; "
            "is it the right file?"
        )
    try:
        data = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise BadInput(f"hardware profile {path}: cannot be read ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"hardware profile {path}: not UTF-8 text (byte {exc.start}); give a JSON file."
        ) from None
    return HardwareProfile.from_dict(
        parse_json(data, f"hardware profile {path}"), where=f"hardware profile {path}"
    )


# Short aliases used across the project.
load = load_profile


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    return profile.save(path)
