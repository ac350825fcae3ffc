"""The simpy model of SSD-streamed MoE inference.

Per token, per layer (one replay step t):

1. dense time (attention-sized q4_0 block; none in `--mode seed`);
2. `replay.step(t)`: the shared core looks the step's top-k up; its misses become
   foreground reads (a bypassed miss is read too, into a scratch buffer);
3. `replay.prefetch(t)`: the core's prefetch rule picks background reads for the
   next `--pipeline-depth` steps (at most `--prefetch-inflight` in flight);
4. each expert's FFN runs on a compute worker once its weights are resident (a
   late prefetch waits only for its in-flight read); in `--mode seed` the FFNs
   start once all the step's reads are done, as the public engine did;
5. the next step starts when every FFN of this one has finished (the next layer
   needs this layer's output).

With a burst curve in the profile the SSD is shared (`SharedSSD`): the chunks in it
are served at once, each at an equal share of the aggregate rate the probe's bursts
give for that many; otherwise (the channel model) the SSD serves reads split into
equal chunks on `channels` parallel channels,
each chunk taking `latency + chunk / (bandwidth / channels)`; a free channel
takes the oldest foreground chunk, else the oldest background one (non-preemptive
priority, FIFO within a class). `replay.complete(key)` is applied at the virtual
instant a read's last chunk ends.

Two engines implement this same model:
- `simpy`: the literal one. A `simpy.PriorityResource` of `channels` serves one
  process per chunk, a `simpy.Resource` of `workers` runs one process per FFN.
  Exact but slow (a Mixtral expert is ~95 chunks of 1 MiB).
- `fast` (default): the same discipline solved analytically. Chunks all last the
  same `d`, so a greedy dispatch onto channels is a round-robin over the channels
  sorted by free time, and the start of the j-th queued chunk is
  `F[j mod C] + (j div C) * d`. The SSD state is advanced lazily to each instant
  the replay is queried; simpy keeps the clock (one timeout per step). Tests hold
  the two engines against each other.
"""

from __future__ import annotations

import functools
import heapq
import math
import time
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import simpy

from mer import native
from mer.core.cache import CacheStats
from mer.core.replay import Replay, ReplayConfig, auto_lead
from mer.errors import BadInput
from mer.shapes import SHAPES, ModelShape, get_shape
from mer.sim.hardware import HardwareProfile
from mer.summary import RunSummary, busy_seconds, percentiles, warm_figures

MODES = ("model", "seed")
#: The engines count time in integer picoseconds: instants that coincide in the
#: model (pipelined steps of equal length) coincide exactly, not up to rounding,
#: so both engines break such ties the same way.
TICKS_PER_S = 10**12


def ticks(seconds: float) -> int:
    return round(seconds * TICKS_PER_S)


ENGINES = ("fast", "simpy")


def default_shape_for(n_layers: int, n_experts: int, top_k: int) -> str:
    """The shape whose routing geometry matches the trace (mixtral-8x7b for 32x8 top-2,
    seed-flat-256 for the flat 1x256 seed stream); mixtral-8x7b when none matches."""
    for name in ("mixtral-8x7b", "seed-flat-256"):
        s = SHAPES[name]
        if (s.n_layers, s.n_experts, s.top_k) == (n_layers, n_experts, top_k):
            return name
    for s in SHAPES.values():
        if (s.n_layers, s.n_experts, s.top_k) == (n_layers, n_experts, top_k):
            return s.name
    if n_layers == 1:
        return "seed-flat-256"
    return "mixtral-8x7b"


# -- the SSD, solved analytically ------------------------------------------------------


class _Read:
    __slots__ = ("cut", "fg", "finish", "issued", "key", "left", "registered", "remaining")

    def __init__(self, key: int, fg: bool, issued: int, chunks: int, registered: bool) -> None:
        self.key = key
        self.fg = fg
        self.issued = issued
        self.remaining = chunks  # chunks not yet dispatched to a channel
        self.finish = -1  # known once the last chunk is dispatched
        self.registered = registered
        self.left = chunks  # chunks not yet served (SharedSSD)
        self.cut = False  # cancelled with chunks still queued (SharedSSD)


class _Landings:
    """What both SSDs share: the reads landed and not yet reported, by finish time."""

    done: list[tuple[int, int, _Read]]

    def pop_done(self, t: int) -> list[_Read]:
        """Reads landed by `t`, in finish order (call after commit(t))."""
        out = []
        done = self.done
        while done and done[0][0] <= t:
            out.append(heapq.heappop(done)[2])
        return out


class AnalyticSSD(_Landings):
    """Chunked reads on C channels, foreground first, solved without per-chunk events.

    The channels' free times are `free[i] + shift`, `free` sorted ascending. Their
    spread never exceeds one chunk time `d`, so greedy dispatch is a round-robin
    over the sorted channels and each channel takes n or n + 1 of the chunks that
    start before a given instant: commit() is O(log C) plus the reads it retires.
    """

    def __init__(
        self, channels: int, chunks: int, chunk_ticks: int, lag: int = 0, access: int = 0
    ) -> None:
        self.C = channels
        self.m = chunks
        self.d = chunk_ticks
        # A read lands `access` after its last chunk's service: the device's pipelined
        # latency, which occupies no channel (the next chunk is served meanwhile).
        self.access = access
        self.last_finish = 0  # latest finish of a dispatched read
        # A chunk enters the device's FIFO queue `lag` before its service starts (the
        # queue holds window - channels chunks beyond those in service); from then on
        # no later foreground chunk can overtake it.
        self.lag = lag
        self.free = [0] * self.C
        self.shift = 0
        self.fg: deque[_Read] = deque()
        self.bg: deque[_Read] = deque()
        self.queued_chunks = 0
        self.fg_chunks = 0  # undispatched foreground chunks
        self.fg_finish = 0  # finish of the latest foreground read (final at issue)
        self.done: list[tuple[int, int, _Read]] = []  # dispatched reads by finish time
        self._seq = 0

    def _start(self, j: int) -> int:
        C = self.C
        return self.free[j % C] + self.shift + (j // C) * self.d

    def commit(self, a: int) -> None:
        """Commit every queued chunk that enters the device by `a` (its service starts at
        or before `a + lag`) in priority order; idle channels wait at `a`.

        Times are integer ticks, so instants that coincide do so exactly: a chunk
        whose channel frees at `a` is dispatched before a read issued at `a`, as
        in the simpy engine (whose driver looks up after same-instant events).
        """
        free = self.free
        rel = a - self.shift
        relh = rel + self.lag
        if relh < free[0]:
            return  # every channel busy past `a + lag`: nothing enters, nothing idles
        if self.queued_chunks:
            C, d = self.C, self.d
            fmax = free[-1]
            n0 = (relh - fmax) // d + 1 if fmax <= relh else 0
            k = C * n0 + bisect_right(free, relh - n0 * d)
            if k > self.queued_chunks:
                k = self.queued_chunks
            if k:
                left = k
                pos = 0
                shift = self.shift
                for q in (self.fg, self.bg):
                    while q and left:
                        r = q[0]
                        if r.remaining <= left:
                            last = pos + r.remaining - 1
                            r.finish = free[last % C] + shift + (last // C + 1) * d + self.access
                            if r.finish > self.last_finish:
                                self.last_finish = r.finish
                            left -= r.remaining
                            pos += r.remaining
                            r.remaining = 0
                            q.popleft()
                            self._seq += 1
                            heapq.heappush(self.done, (r.finish, self._seq, r))
                        else:
                            r.remaining -= left
                            pos += left
                            left = 0
                    if not left:
                        break
                rounds, extra = divmod(k, C)
                if extra:
                    self.free = free = free[extra:] + [f + d for f in free[:extra]]
                self.shift += rounds * d
                rel = a - self.shift
                self.queued_chunks -= k
                self.fg_chunks -= min(k, self.fg_chunks)  # foreground chunks go first
        if free[0] < rel:
            i = bisect_left(free, rel)
            free[:i] = [rel] * i

    def issue(self, key: int, fg: bool, a: int, registered: bool) -> _Read:
        self.commit(a)
        r = _Read(key, fg, a, self.m, registered)
        self.queued_chunks += self.m
        if fg:
            self.fg.append(r)
            self.fg_chunks += self.m
            # a foreground read is only ever preceded by foreground chunks: its finish is final
            self.fg_finish = self._start(self.fg_chunks - 1) + self.d + self.access
        else:
            self.bg.append(r)
        return r

    def cancel(self, read: _Read, a: int) -> None:
        """Abandon `read` at `a` (a dropped prefetch): its chunks not yet in the device
        are never served; those already are run on (as the engine's do). It is never
        reported done. Call after commit(a)."""
        read.registered = False
        if read.remaining == 0:
            return  # every chunk dispatched already: it lands, unreported
        q = self.fg if read.fg else self.bg
        q.remove(read)
        self.queued_chunks -= read.remaining
        if read.fg:
            self.fg_chunks -= read.remaining
        read.remaining = 0
        read.finish = max(a, read.issued)

    def busy_until(self) -> int:
        """When the last read issued so far lands (reads are outstanding before it)."""
        if self.queued_chunks:
            return self._start(self.queued_chunks - 1) + self.d + self.access
        return self.last_finish

    def finish_of(self, read: _Read) -> int:
        """Finish time of `read` given the reads queued now (final for foreground reads)."""
        if read.remaining == 0:
            return read.finish
        pos = 0
        for q in (self.fg, self.bg):
            for r in q:
                if r is read:
                    return self._start(pos + r.remaining - 1) + self.d + self.access
                pos += r.remaining
        raise AssertionError("read not queued")  # pragma: no cover

    def drain(self) -> list[_Read]:
        """Dispatch everything still queued and return every unreported read."""
        if self.queued_chunks:
            self.commit(self._start(self.queued_chunks - 1) + self.d)
        out = [entry[2] for entry in sorted(self.done, key=lambda e: (e[0], e[1]))]
        self.done = []
        return out


#: Work units of one chunk on the shared device: its progress is counted in integers, so
#: every engine (Python, simpy, C) rounds the same way and lands reads at the same tick.
SHARE_UNITS = 1 << 30


class SharedSSD(_Landings):
    """Reads in flight share the device: the chunks in it are served all at once.

    The device holds at most W chunks (the reader's queue depth); the rest wait in
    the reader's queue, foreground first, and enter as chunks leave. With k chunks
    in it, each progresses at 1/spans[k-1] of a chunk per tick, spans[k-1] being the
    ticks k chunks submitted together take to land (the probe's bursts): two reads
    submitted together land together, and more chunks in flight read faster in
    aggregate when the curve says so. Every chunk in the device progresses
    equally, so they finish in the order they entered: progress is one integer
    `V` (work units done by every chunk since the start), advanced at each arrival
    and completion by floor(elapsed * SHARE_UNITS / span), and a chunk that
    entered at V is done at V + SHARE_UNITS. A read lands `access` after its last
    chunk. Same interface as AnalyticSSD.
    """

    def __init__(self, chunks: int, spans: tuple[int, ...], access: int = 0) -> None:
        self.m = chunks
        self.spans = spans
        self.W = len(spans)
        self.access = access
        self.V = 0
        self.t = 0  # the instant V holds at (the last arrival or completion)
        self.dev: deque[tuple[int, _Read]] = deque()  # (V when done, read), entry order
        self.fg: deque[_Read] = deque()
        self.bg: deque[_Read] = deque()
        self.queued_chunks = 0  # chunks issued and not yet served (device or reader queue)
        self.last_finish = 0
        self.done: list[tuple[int, int, _Read]] = []  # landed reads by finish time
        self._seq = 0
        self._proj: tuple[dict[_Read, int], int] | None = None

    def _fill(self) -> None:
        """Chunks enter from the reader's queue, foreground first, while there is room."""
        dev, room = self.dev, self.W - len(self.dev)
        vf = self.V + SHARE_UNITS
        for q in (self.fg, self.bg):
            while room and q:
                r = q[0]
                n = min(room, r.remaining)
                dev.extend([(vf, r)] * n)
                r.remaining -= n
                room -= n
                if not r.remaining:
                    q.popleft()

    def commit(self, a: int) -> None:
        """Serve every chunk done by `a` (a completion at `a` comes before an issue at `a`)."""
        dev, S = self.dev, SHARE_UNITS
        while dev:
            span = self.spans[len(dev) - 1]
            need = dev[0][0] - self.V
            dt = -(-need * span // S) if need > 0 else 0
            t = self.t + dt
            if t > a:
                return
            self.V += dt * S // span
            self.t = t
            self._proj = None
            while dev and dev[0][0] <= self.V:
                r = dev.popleft()[1]
                self.queued_chunks -= 1
                r.left -= 1
                if not r.left and not r.cut:
                    r.finish = t + self.access
                    if r.finish > self.last_finish:
                        self.last_finish = r.finish
                    self._seq += 1
                    heapq.heappush(self.done, (r.finish, self._seq, r))
            self._fill()

    def issue(self, key: int, fg: bool, a: int, registered: bool) -> _Read:
        self.commit(a)
        self._proj = None
        r = _Read(key, fg, a, self.m, registered)
        (self.fg if fg else self.bg).append(r)
        self.queued_chunks += self.m
        if len(self.dev) < self.W:
            # progress so far at the old share, then the new chunks join (a full device
            # changes nothing until a chunk leaves)
            if self.dev:
                self.V += (a - self.t) * SHARE_UNITS // self.spans[len(self.dev) - 1]
            self.t = a
            self._fill()
        return r

    def cancel(self, read: _Read, a: int) -> None:
        """Abandon `read` at `a`: its chunks still in the reader's queue are dropped, those
        in the device run on; it is never reported done. Call after commit(a)."""
        read.registered = False
        if read.remaining == 0:
            return  # every chunk in the device already: it lands, unreported
        self._proj = None
        (self.fg if read.fg else self.bg).remove(read)
        self.queued_chunks -= read.remaining
        read.left -= read.remaining
        read.remaining = 0
        read.cut = True
        read.finish = max(a, read.issued)

    def _project(self) -> tuple[dict[_Read, int], int]:
        """When every read not yet landed lands if nothing more is issued, and the last."""
        if self._proj is not None:
            return self._proj
        S, spans, W = SHARE_UNITS, self.spans, self.W
        V, t = self.V, self.t
        dev = deque(self.dev)
        queue = [r for q in (self.fg, self.bg) for r in q]
        rem = [r.remaining for r in queue]  # chunks of each still in the reader's queue
        left = {r: r.left for _, r in dev}
        for r in queue:
            left[r] = r.left
        out: dict[_Read, int] = {}
        last = self.last_finish
        qi = 0
        while dev:
            span = spans[len(dev) - 1]
            need = dev[0][0] - V
            dt = -(-need * span // S) if need > 0 else 0
            t += dt
            V += dt * S // span
            while dev and dev[0][0] <= V:
                r = dev.popleft()[1]
                left[r] -= 1
                if not left[r] and not r.cut:
                    out[r] = t + self.access
                    last = max(last, t + self.access)
            room = W - len(dev)
            while room and qi < len(queue):
                n = min(room, rem[qi])
                dev.extend([(V + S, queue[qi])] * n)
                rem[qi] -= n
                room -= n
                if not rem[qi]:
                    qi += 1
        self._proj = (out, last)
        return self._proj

    def busy_until(self) -> int:
        """When the last read issued so far lands (reads are outstanding before it)."""
        if self.queued_chunks:
            return self._project()[1]
        return self.last_finish

    def finish_of(self, read: _Read) -> int:
        """Finish time of `read` if nothing more is issued (final once it has landed; exact
        up to the next issue, which is all a step's schedule needs)."""
        if read.finish >= 0:
            return read.finish
        return self._project()[0][read]

    def drain(self) -> list[_Read]:
        """Serve everything still issued and return every unreported read."""
        self.commit(1 << 62)
        out = [entry[2] for entry in sorted(self.done, key=lambda e: (e[0], e[1]))]
        self.done = []
        return out


def make_ssd(tm: _Timing) -> AnalyticSSD | SharedSSD:
    """The device `tm` describes: shared when it has a burst curve, else channels."""
    if tm.share:
        return SharedSSD(tm.chunks, tm.share, tm.access)
    return AnalyticSSD(tm.channels, tm.chunks, tm.chunk, tm.lag, tm.access)


def read_alone_ticks(tm: _Timing) -> int:
    """One read alone on an idle device, issued to landed."""
    if tm.share:
        ssd = SharedSSD(tm.chunks, tm.share, tm.access)
        return ssd.finish_of(ssd.issue(0, True, 0, False))
    return math.ceil(tm.chunks / tm.channels) * tm.chunk + tm.access


# -- results ---------------------------------------------------------------------------


@dataclass
class SimOptions:
    """Timing choices of one simulation (the replay config decides hits).

    `read_ranges`, `queue_depth` and `chunk_bytes` describe how the engine
    reads: the byte lengths of the page-aligned ranges one expert read is made
    of (`ExpertStore.read_plan`, e.g. gate, up and down of a stacked GGUF:
    `read_ranges_of(store)`), and the reader's `--queue-depth` and
    `--chunk-bytes`. None: one contiguous slot of the shape, and the profile's
    queue depth and chunk size.
    """

    mode: str = "model"
    engine: str = "fast"
    shape: str | ModelShape | None = (
        None  # a name or a shape (e.g. an expert file's); None: from the trace geometry
    )
    #: steady-state window for summary.extra["warm"] (None: 32 tokens, at most half)
    warmup_tokens: int | None = None
    read_ranges: tuple[int, ...] | None = None
    queue_depth: int | None = None
    chunk_bytes: int | None = None
    #: bytes of each key's read (the file's plans differ by a page here and there when its
    #: matrices are not page multiples): bytes read are counted exactly; None: read_ranges
    key_read_bytes: tuple[int, ...] | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise BadInput(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.engine not in ENGINES:
            raise BadInput(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}.")
        if self.read_ranges is not None and (
            not self.read_ranges or any(int(r) < 1 for r in self.read_ranges)
        ):
            raise BadInput(f"read ranges must be positive byte counts, got {self.read_ranges!r}.")
        if self.queue_depth is not None and self.queue_depth < 1:
            raise BadInput(f"--queue-depth must be >= 1, got {self.queue_depth}.")
        if self.chunk_bytes is not None and self.chunk_bytes < 1:
            raise BadInput(f"--chunk-bytes must be >= 1, got {self.chunk_bytes}.")


def read_ranges_of(store: Any) -> tuple[int, ...]:
    """The range lengths of one expert read from an expert file (the most common plan)."""
    from mer.engine.store import typical_read_ranges

    return typical_read_ranges(store)


def options_like(run: RunSummary, engine: str = "fast") -> SimOptions:
    """The SimOptions that model what a measured run did: its shape and mode, the read
    ranges of its expert file, its reader's queue depth and chunk size."""
    ex = run.extra or {}
    io = ex.get("io") or {}
    ranges = ex.get("read_ranges")
    keys = ex.get("read_bytes_by_key")
    return SimOptions(
        mode=run.mode,
        engine=engine,
        shape=run.shape,
        read_ranges=tuple(int(r) for r in ranges) if ranges else None,
        key_read_bytes=tuple(int(b) for b in keys) if keys else None,
        queue_depth=io.get("queue_depth"),
        chunk_bytes=io.get("chunk_bytes"),
    )


@dataclass
class SimResult:
    summary: RunSummary
    tokens: pd.DataFrame
    stats: CacheStats
    read_latencies: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    sim_seconds: float = 0.0


@dataclass
class _Timing:
    """The model's durations in ticks: the one definition both engines run.

    A step (token, layer) on the driver's thread:
      t0 -> dense -> t1: completions are reaped, the step's keys looked up;
      `step` of driver overhead; each read (demand first, then prefetch) is
      submitted after `submit` more; -> tc: completions are reaped again.
      The FFNs then run one after the other (on `workers`): first those whose
      weights are resident at tc, in rank order, then the others in rank order,
      each after its read lands. An FFN that starts while any read is
      outstanding costs `ffn_busy` more (the engine hands it to a thread and
      reaps completions every `poll` meanwhile). An FFN that starts right after
      the driver blocked waiting for its weights costs `ffn_wake` more, and the
      dense block of the step after one in which it blocked `dense_wake` more
      (a thread that sleeps on a read computes slower when it wakes).
    The device: each read is `chunks` chunks of `chunk` ticks on `channels`
    channels; the reader keeps `window` chunks in the device (FIFO there) and
    queues the rest, foreground first.
    """

    dense: int
    ffn: int
    workers: int
    seed: bool
    channels: int
    chunks: int  # per read
    chunk: int  # service time of one chunk
    window: int = 0  # chunks the device holds (0: channels)
    access: int = 0  # a read lands this long after its last chunk's service
    step: int = 0  # driver overhead per step, before the reads are submitted
    submit: int = 0  # driver time per read submitted
    complete: int = 0  # driver time per read to reap its completion, after the submissions
    ffn_busy: int = 0  # extra per FFN started while reads are outstanding
    poll: int = 0  # completions reaped every `poll` during such an FFN (0: at its end)
    ffn_wake: int = 0  # extra per FFN started right after the driver blocked for its weights
    dense_wake: int = 0  # extra for the dense block of a step after one that blocked
    #: the shared device (SharedSSD): ticks for k = 1..W chunks submitted together to land
    #: (empty: the channel model, AnalyticSSD)
    share: tuple[int, ...] = ()

    @property
    def lag(self) -> int:
        """How long before its service a chunk enters the device's FIFO queue."""
        w = self.window or self.channels
        return (w // self.channels - 1) * self.chunk


def _ideal(k: int, ffn: int, workers: int) -> int:
    """Makespan of a step's k FFNs when all their weights are resident."""
    return math.ceil(k / workers) * ffn


def _makespan(durations: list[int], workers: int) -> int:
    """List-schedule makespan of `durations` on `workers`, all available at 0."""
    if workers == 1:
        return sum(durations)
    free = [0] * workers
    for dur in durations:
        heapq.heappush(free, heapq.heappop(free) + dur)
    return max(free)


def _compute_order(ready: list[int], tc: int) -> list[int]:
    """The engine's order: experts resident at tc first, then the rest, each in rank order."""
    k = len(ready)
    return [i for i in range(k) if ready[i] <= tc] + [i for i in range(k) if ready[i] > tc]


class _Recorder:
    """Per-step accounting both engines fill (appended lists: cheaper than numpy per step)."""

    def __init__(self, observe: bool) -> None:
        self.iter_time: list[int] = []  # step latency (dense + lookups + FFNs)
        self.io: list[int] = []  # time the step was blocked on reads
        self.comp: list[int] = []  # FFN time of the step
        self.n_busy: list[int] = []  # FFNs of the step started while reads were outstanding
        self.over: list[int] = []  # driver overhead of the step (step + submissions)
        self.dense: list[int] = []  # dense time of the step
        self.hits: list[int] = []
        self.late: list[int] = []
        self.pf: list[int] = []  # prefetch reads issued
        self.reads: list[int] = []  # all reads issued (demand + prefetch)
        self.issued: list[int] = []  # per read: issue instant, key, step ...
        self.keys: list[int] = []
        self.read_step: list[int] = []
        self.finish: list[Any] = []  # ... and something whose .finish is its last chunk's end
        # Instants at which the driver reaps completions, as [a, b] windows (a == b: one
        # poll; a < b: blocked waiting, so every completion in between is seen at once).
        self.observe = observe
        self.read_lat_ticks: np.ndarray | None = None  # set by the array path instead
        self.finish_ticks: np.ndarray | None = None  # the compiled path's read finishes
        self.read_busy_ticks = 0
        self.obs_a: list[int] = []
        self.obs_b: list[int] = []
        # obs_p > 0: the entry is an FFN's polls, at a, a + p, a + 2p, ... and at b
        self.obs_p: list[int] = []

    def look(self, a: int, b: int | None = None) -> None:
        if self.observe:
            self.obs_a.append(a)
            self.obs_b.append(a if b is None else b)
            self.obs_p.append(0)

    def ffn(self, s: int, e: int, busy: bool, poll: int) -> None:
        """The polls of one FFN: on the thread hand-off path, at its start, every `poll`
        and at its end; none on the direct path (nothing is in flight)."""
        if self.observe and busy:
            if poll:  # one entry for the whole series (a Mixtral FFN polls ~10 times)
                self.obs_a.append(s)
                self.obs_b.append(e)
                self.obs_p.append(poll)
            else:
                self.look(s)
                self.look(e)

    def observed(self) -> np.ndarray:
        """When the driver saw each read land: the first reap at or after its end."""
        if self.finish_ticks is not None:
            fin = self.finish_ticks
        else:
            fin = np.asarray([r.finish for r in self.finish], dtype=np.int64)
        if not self.observe or not self.obs_b or fin.size == 0:
            return fin
        a = np.asarray(self.obs_a, dtype=np.int64)
        b = np.asarray(self.obs_b, dtype=np.int64)
        p = np.asarray(self.obs_p, dtype=np.int64)
        idx = np.searchsorted(b, fin, side="left")
        inside = idx < b.size
        out = fin.copy()
        f, ai, bi, pi = fin[inside], a[idx[inside]], b[idx[inside]], p[idx[inside]]
        seen = np.maximum(ai, f)  # a window [a, b]: at once if blocked then, else at a
        series = (pi > 0) & (f > ai)  # within an FFN's polls: the next poll, or its end
        if series.any():
            fs, as_, ps = f[series], ai[series], pi[series]
            seen[series] = np.minimum(as_ + (fs - as_ + ps - 1) // ps * ps, bi[series])
        out[inside] = seen
        return out


@dataclass
class _Scheduled:
    """One step's FFNs as `_ffn_schedule` placed them."""

    end: int
    durs: list[int]
    n_busy: int = 0  # FFNs started while a read was outstanding
    blocked: bool = False  # the driver (a worker) waited for weights: some FFN woke


def _ffn_schedule(
    tm: _Timing,
    k: int,
    ready: list[int],
    tc: int,
    busy_until: Any,
    look: Any,
    ffn_look: Any,
) -> _Scheduled:
    """One step's k FFNs from tc, in the engine's order, each after its weights are ready
    (`ready`, clamped to >= tc). `busy_until()` is when the last outstanding read lands: an
    FFN started before it costs `ffn_busy` more; one that starts right after its worker
    waited for the weights costs `ffn_wake` more. `look(a, b)` / `ffn_look(s, e, busy,
    poll)` record when the driver reaps."""
    ffn, ffn_busy, workers, poll, wake = tm.ffn, tm.ffn_busy, tm.workers, tm.poll, tm.ffn_wake
    bu = busy_until()  # no read is issued or dispatched while the FFNs are scheduled
    if max(ready) == tc and bu <= tc:
        # everything resident and nothing in flight: FFNs back to back, no polls
        return _Scheduled(tc + _ideal(k, ffn, workers), [ffn] * k)
    durs: list[int] = []
    n_busy = 0
    blocked = False
    if workers == 1:
        w = tc
        woke = False
        if tm.seed:
            r_all = max(ready)
            if r_all > w:
                look(w, r_all)
                w = r_all
                woke = True
        for i in _compute_order(ready, tc):
            rt = ready[i]
            if rt > w:
                look(w, rt)
                w = rt
                woke = True
            busy = bu > w
            dur = ffn + ffn_busy if busy else ffn
            if woke:
                dur += wake
                blocked = True
                woke = False
            n_busy += busy
            ffn_look(w, w + dur, busy, poll)
            durs.append(dur)
            w += dur
        return _Scheduled(w, durs, n_busy, blocked)
    r_all = max(ready) if tm.seed else tc
    wfree = [tc] * workers
    end = tc
    for i in _compute_order(ready, tc):
        wk = heapq.heappop(wfree)
        st = max(wk, ready[i], r_all)
        busy = bu > st
        dur = ffn + ffn_busy if busy else ffn
        if st > wk:
            dur += wake
            blocked = True
        n_busy += busy
        durs.append(dur)
        heapq.heappush(wfree, st + dur)
        end = max(end, st + dur)
    return _Scheduled(end, durs, n_busy, blocked)


# -- the fast engine -------------------------------------------------------------------


def _run_fast(replay: Replay, tm: _Timing, rec: _Recorder) -> int:
    env = simpy.Environment()
    ssd = make_ssd(tm)
    inflight: dict[int, _Read] = {}
    k = replay.top_k
    workers, dense, dense_wake = tm.workers, tm.dense, tm.dense_wake
    step_oh, submit, reap = tm.step, tm.submit, tm.complete
    step = replay.step
    prefetch = replay.prefetch
    mark_late_hits = replay.mark_late_hits
    issue = ssd.issue
    cancel = ssd.cancel
    finish_of = ssd.finish_of
    commit = ssd.commit
    busy_until = ssd.busy_until
    done = ssd.done
    timeout = env.timeout
    r_iter, r_io, r_hits, r_comp, r_over = rec.iter_time, rec.io, rec.hits, rec.comp, rec.over
    r_busy, r_dense = rec.n_busy, rec.dense
    r_late, r_pf, r_reads = rec.late, rec.pf, rec.reads
    r_issued, r_finish, r_keys, r_step = rec.issued, rec.finish, rec.keys, rec.read_step
    look, ffn_look = rec.look, rec.ffn
    schedule = functools.partial(_ffn_schedule, tm, k)

    def finish_reads(t: int) -> None:
        # Reads landed by t leave `inflight` (the decisions had them landed already:
        # Replay._landed); a key evicted and read again keeps its newer read.
        if ssd.queued_chunks:  # else commit would only move idle channels; issue() does that
            commit(t)
        if done and done[0][0] <= t:
            for r in ssd.pop_done(t):
                if r.registered and inflight.get(r.key) is r:
                    del inflight[r.key]

    n_layers = replay.n_layers

    def run() -> Any:
        # The clock advances once per token (one simpy timeout for all its layers);
        # within a token `now` carries the step instants. Nothing else waits on simpy
        # events in this engine, so the order of decisions is the same.
        now = int(env.now)
        token_start = now
        blocked = False  # the previous step's driver waited for weights
        for t in range(replay.n_steps):
            t0 = now
            d_t = dense + dense_wake if blocked else dense
            r_dense.append(d_t)
            t1 = t0 + d_t
            finish_reads(t1)
            look(t1)
            res = step(t)
            for key in res.cancelled:  # dropped guesses: their queued chunks go unread
                r = inflight.pop(key, None)
                if r is not None:
                    cancel(r, t1)
            reads = res.reads
            keys = res.keys
            hit = res.hit
            ready = [t1] * k
            # a hit still being read (a prefetch not landed by t1): late, wait for it
            n_late = 0
            if inflight:
                late = mark_late_hits(res, inflight)
                n_late = len(late)
                for i in late:
                    ready[i] = -1 - i  # resolved once this step's reads are queued
            at = t1 + step_oh
            own: list[tuple[int, _Read]] = []  # the step's demand reads, by rank
            for adm in reads:
                at += submit
                registered = adm.slot is not None
                r = issue(adm.key, True, at, registered)
                r_issued.append(at)
                r_keys.append(adm.key)
                r_step.append(t)
                r_finish.append(r)
                if registered:
                    inflight[adm.key] = r
                own.append((keys.index(adm.key), r))
            pfs = prefetch(t)
            for adm in pfs:
                at += submit
                r = issue(adm.key, False, at, True)
                r_issued.append(at)
                r_keys.append(adm.key)
                r_step.append(t)
                r_finish.append(r)
                inflight[adm.key] = r
            tc = at + (len(reads) + len(pfs)) * reap
            look(tc)
            # when they land once the step's reads are all issued (the prefetches share a
            # shared device with them; on the channel model a demand read's is final)
            for i, r in own:
                ready[i] = finish_of(r)
            if n_late:
                for i in range(k):
                    if ready[i] < 0:
                        ready[i] = finish_of(inflight[keys[i]])
            for i in range(k):
                if ready[i] < tc:
                    ready[i] = tc
            sch = schedule(ready, tc, busy_until, look, ffn_look)
            t2, durs, blocked = sch.end, sch.durs, sch.blocked
            io = t2 - tc - _makespan(durs, workers)
            r_io.append(io if io > 0 else 0)
            r_comp.append(sum(durs))
            r_busy.append(sch.n_busy if tm.ffn_busy else 0)
            r_over.append(tc - t1)
            r_hits.append(sum(hit) - n_late)
            r_late.append(n_late)
            n_pf = len(pfs)
            r_pf.append(n_pf)
            r_reads.append(len(reads) + n_pf)
            r_iter.append(t2 - t0)
            now = t2
            if (t + 1) % n_layers == 0 or t + 1 == replay.n_steps:
                yield timeout(now - token_start)
                token_start = now

    env.process(run())
    env.run()
    end = int(env.now)
    finish_reads(end)
    ssd.drain()
    return end


# -- the fast engine, prefetch off: decisions compiled, timing vectorised ---------------


@dataclass
class StepSpan:
    """The timing of a prefetch-off step with m misses, from its lookup instant t1."""

    span: int  # t1 to step end
    io: int
    comp: int
    over: int
    n_busy: int
    read_lat: list[int]  # issue to seen, per read in issue order
    read_busy: int  # time with a read in flight
    blocked: bool = False  # the driver waited for weights (the next step's dense wakes)


def step_spans(tm: _Timing, k: int) -> list[StepSpan]:
    """For m = 0..k misses: the step's timing, by the fast engine's own step on a device
    that is idle at the lookup. With prefetch off that is every step: each read is its
    own step's and the step ends only after its last read landed (and was seen). Which
    ranks missed does not matter: resident experts run first, the others in read order."""
    out = []
    for m in range(k + 1):
        ssd = make_ssd(tm)
        rec = _Recorder(observe=tm.workers == 1)
        rec.look(0)
        ready = [0] * k
        at = tm.step
        for i in range(m):
            at += tm.submit
            r = ssd.issue(i, True, at, False)
            rec.issued.append(at)
            rec.finish.append(r)
        for i, r in enumerate(rec.finish):
            ready[k - m + i] = ssd.finish_of(r)
        tc = at + m * tm.complete
        rec.look(tc)
        ready = [r if r > tc else tc for r in ready]
        sch = _ffn_schedule(tm, k, ready, tc, ssd.busy_until, rec.look, rec.ffn)
        t2, durs = sch.end, sch.durs
        ssd.drain()
        issued = np.asarray(rec.issued, dtype=np.int64)
        seen = rec.observed()
        out.append(
            StepSpan(
                span=t2,
                io=max(0, t2 - tc - _makespan(durs, tm.workers)),
                comp=sum(durs),
                over=tc,
                n_busy=sch.n_busy if tm.ffn_busy else 0,
                read_lat=(seen - issued).tolist(),
                read_busy=round(busy_seconds(issued, seen)),
                blocked=sch.blocked,
            )
        )
    return out


def _run_vectorised(replay: Replay, tm: _Timing, rec: _Recorder) -> int | None:
    """The fast engine with prefetch off, in array operations; None if it does not apply.

    The shared core decides every lookup (its compiled loop, `replay_outcomes`);
    the timing of each step is then a table lookup on its number of misses
    (`step_spans`). Tests hold it equal to `_run_fast` and to the literal simpy engine.
    """
    from mer.core.replay import replay_outcomes

    outcome = replay_outcomes(replay)
    if outcome is None:
        return None
    k = replay.top_k
    spans = step_spans(tm, k)
    missed = outcome != 1
    misses = missed.sum(axis=1)

    def table(field_: str) -> np.ndarray:
        return np.asarray([getattr(sp, field_) for sp in spans], dtype=np.int64)[misses]

    span = table("span")
    # the dense block of a step after one that blocked wakes slower
    blocked = np.asarray([sp.blocked for sp in spans], dtype=bool)[misses]
    dense = np.full(len(misses), tm.dense, dtype=np.int64)
    dense[1:] += tm.dense_wake * blocked[:-1]
    rec.dense = dense.tolist()
    rec.iter_time = (span + dense).tolist()
    rec.io = table("io").tolist()
    rec.comp = table("comp").tolist()
    rec.over = table("over").tolist()
    rec.n_busy = table("n_busy").tolist()
    rec.hits = (k - misses).tolist()
    zeros = [0] * len(misses)
    rec.late = zeros
    rec.pf = zeros
    rec.reads = misses.tolist()
    rows = np.nonzero(missed)[0]
    rec.keys = replay.steps[missed].tolist()
    rec.read_step = rows.tolist()
    counts = np.bincount(misses, minlength=k + 1)
    lat: list[int] = []
    busy = 0
    for m in range(1, k + 1):
        if counts[m]:
            lat.extend(spans[m].read_lat * int(counts[m]))
            busy += spans[m].read_busy * int(counts[m])
    rec.read_lat_ticks = np.asarray(lat, dtype=np.int64)
    rec.read_busy_ticks = busy
    return int(span.sum()) + int(dense.sum())


# -- the fast engine, prefetch on: one compiled loop ------------------------------------


def _run_compiled(replay: Replay, tm: _Timing, rec: _Recorder) -> int | None:
    """`_run_fast` as one C loop (`mer.native.simstep`); None where it does not apply.

    It covers a fresh trace replay at step granularity with one of the built-in
    policies `simstep.POLICIES` and a built-in predictor, whose proposals are computed ahead
    (`prefetch_proposals`). Everything else runs `_run_fast`. Tests hold the two
    equal (counts exactly, times to the tick).
    """
    from mer.core.replay import compiled_policy, prefetch_proposals
    from mer.native import replay as native_replay
    from mer.native import simstep

    cfg = replay.config
    cache = replay.cache
    if (
        replay.is_live
        or cfg.prefetch_cancel  # the compiled loop has no cancellation: _run_fast's
        or replay.lookup_granularity
        or cache.state
        or cache.stats.lookups
        or replay.n_steps == 0
    ):
        return None
    pol = compiled_policy(replay)
    if pol is None or pol.name not in simstep.POLICIES:
        return None
    if native.load("simstep") is None:
        return None
    n_exp = replay.n_experts
    steps = replay.steps
    if cache.scope == "per-layer":
        layers = steps // n_exp
        if not bool((layers == layers[:, :1]).all()):
            return None
    proposals = prefetch_proposals(replay)
    if proposals is None:
        return None
    params = np.asarray(
        [native_replay.policy_params(pol, p.policy) for p in cache.partitions], dtype=np.float64
    ).reshape(len(cache.partitions), len(pol.params))
    pinned = None
    if cache.pinned:
        pinned = np.zeros(replay.n_layers * n_exp, dtype=np.uint8)
        pinned[sorted(cache.pinned)] = 1
    res = simstep.run(
        policy_index=pol.index,
        steps=steps,
        n_layers=replay.n_layers,
        n_experts=n_exp,
        global_scope=cache.scope == "global",
        caps=[p.capacity for p in cache.partitions],
        params=params,
        pinned=pinned,
        proposals=proposals,
        prefetch_slots=cfg.prefetch_slots,
        prefetch_reclaim=cfg.prefetch_reclaim,
        max_inflight=replay.rule.max_inflight,
        hold=replay.rule.hold,
        tm=tm,
    )
    if res is None:
        return None
    cols = res.per_step.T
    rec.iter_time, rec.io, rec.comp, rec.n_busy, rec.over = (c.tolist() for c in cols[:5])
    rec.hits, rec.late, rec.pf, rec.reads, rec.dense = (c.tolist() for c in cols[5:])
    rec.issued = res.read_issued.tolist()
    rec.keys = res.read_key.tolist()
    rec.read_step = res.read_step.tolist()
    rec.finish_ticks = res.read_finish
    if rec.observe:
        rec.obs_a, rec.obs_b, rec.obs_p = (o.tolist() for o in res.obs)
    stats = cache.stats
    # the compiled step has every counter but cancellation's (it never runs with it on)
    names = tuple(c for c in stats.COUNTERS if c != "prefetch_cancelled")
    for name, row in zip(names, res.stats, strict=True):
        getattr(stats, name)[:] += row
    return res.end


# -- the literal simpy engine ----------------------------------------------------------


class _AfterNow(simpy.events.Event):
    """Fires after every other event of the current instant (a lower scheduling priority),
    so the driver looks up only once same-instant completions and dispatches are done."""

    def __init__(self, env: simpy.Environment) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, cast(Any, 2))  # after NORMAL (1)


class _Landed:
    __slots__ = ("finish",)

    def __init__(self) -> None:
        self.finish = -1


class _SharedDisk:
    """The shared device, literally: each chunk in it keeps its own remaining work, and a
    server process wakes at every arrival and at the next completion, takes the progress
    since its last look (at the share of that many chunks) off every chunk, and ends
    those with none left (SharedSSD solves the same without per-chunk state)."""

    def __init__(self, env: simpy.Environment, spans: tuple[int, ...]) -> None:
        self.env = env
        self.spans = spans
        self.chunks: list[list[Any]] = []  # [remaining work, its done event]
        self.last = 0
        self.wake = env.event()
        env.process(self._serve())

    def _fold(self) -> None:
        now = int(self.env.now)
        if self.chunks:
            step = (now - self.last) * SHARE_UNITS // self.spans[len(self.chunks) - 1]
            for c in self.chunks:
                c[0] -= step
        self.last = now

    def serve(self) -> simpy.Event:
        """A chunk enters the device now; the event fires when it has been read."""
        self._fold()
        done = self.env.event()
        self.chunks.append([SHARE_UNITS, done])
        if not self.wake.triggered:
            self.wake.succeed()
        return done

    def _serve(self) -> Any:
        env = self.env
        while True:
            if self.chunks:
                span = self.spans[len(self.chunks) - 1]
                need = min(c[0] for c in self.chunks)
                dt = -(-need * span // SHARE_UNITS) if need > 0 else 0
                yield env.any_of([env.timeout(dt), self.wake])
            else:
                yield self.wake
            if self.wake.triggered:
                self.wake = env.event()
            self._fold()
            left = []
            for c in self.chunks:
                if c[0] <= 0:
                    c[1].succeed()
                else:
                    left.append(c)
            self.chunks = left


def _run_simpy(replay: Replay, tm: _Timing, rec: _Recorder) -> int:
    env = simpy.Environment()
    admit = simpy.PriorityResource(env, capacity=len(tm.share) or tm.window or tm.channels)
    disk = simpy.Resource(env, capacity=tm.channels)
    shared = _SharedDisk(env, tm.share) if tm.share else None
    cpu = simpy.Resource(env, capacity=tm.workers)
    m, d = tm.chunks, tm.chunk
    inflight: dict[int, simpy.Process] = {}
    outstanding = [0]  # reads issued and not yet landed
    landed: list[tuple[int, _Landed]] = []  # landed, not yet reaped by the driver
    logs: dict[simpy.Process, _Landed] = {}
    k = replay.top_k

    def chunk(prio: int) -> Any:
        # Enter the device (foreground first while queued in the reader), then its FIFO.
        with admit.request(priority=prio) as a:
            yield a
            if shared is not None:
                yield shared.serve()
                return
            with disk.request() as req:
                yield req
                yield env.timeout(d)

    def read(key: int, fg: bool, registered: bool, log: _Landed) -> Any:
        prio = 0 if fg else 1
        yield env.all_of([env.process(chunk(prio)) for _ in range(m)])
        if tm.access:
            yield env.timeout(tm.access)
        log.finish = int(env.now)
        outstanding[0] -= 1
        if registered:
            landed.append((key, log))  # the driver sees it when it next reaps (at a lookup)

    def start_read(t: int, key: int, fg: bool, registered: bool) -> simpy.Process:
        log = _Landed()
        rec.issued.append(int(env.now))
        rec.keys.append(key)
        rec.read_step.append(t)
        rec.finish.append(log)
        outstanding[0] += 1
        proc = env.process(read(key, fg, registered, log))
        logs[proc] = log
        return proc

    def ffn_job(
        wait: simpy.Event | None, gate: simpy.Event | None, out: list[int], flags: list[int]
    ) -> Any:
        # One FFN on a worker held from its turn (the list schedule): wait for its
        # weights, then run; an FFN started with reads outstanding costs ffn_busy more,
        # one whose worker waited for its weights ffn_wake more.
        with cpu.request() as req:
            yield req
            got = int(env.now)
            for ev in (gate, wait):
                if ev is not None and not ev.triggered:
                    yield ev
            yield _AfterNow(env)
            busy = outstanding[0] > 0
            dur = tm.ffn + tm.ffn_busy if busy else tm.ffn
            if int(env.now) > got:
                dur += tm.ffn_wake
                flags[1] = 1
            flags[0] += busy
            out.append(dur)
            yield env.timeout(dur)

    def run() -> Any:
        blocked = False  # the previous step's driver waited for weights
        for t in range(replay.n_steps):
            t0 = int(env.now)
            d_t = tm.dense + tm.dense_wake if blocked else tm.dense
            rec.dense.append(d_t)
            if d_t:
                yield env.timeout(d_t)
            yield _AfterNow(env)
            t1 = int(env.now)
            rec.look(t1)
            for key, log in landed:
                # the decisions had it landed already (Replay._landed); a key evicted and
                # read again keeps its newer read
                if key in inflight and logs[inflight[key]] is log:
                    del inflight[key]
            landed.clear()
            res = replay.step(t)
            for key in res.cancelled:
                # a dropped guess still in flight reads on here (this engine serves every
                # chunk it was given); out of `inflight`, its landing changes nothing
                inflight.pop(key, None)
            # a hit still being read: late, its FFN waits for it
            n_late = len(replay.mark_late_hits(res, inflight))
            if tm.step:
                yield env.timeout(tm.step)
            waits: list[simpy.Process | None] = [
                inflight[key] if hit and key in inflight else None
                for key, hit in zip(res.keys, res.hit, strict=True)
            ]
            for adm in res.reads:
                if tm.submit:
                    yield env.timeout(tm.submit)
                yield _AfterNow(env)
                p = start_read(t, adm.key, True, adm.slot is not None)
                if adm.slot is not None:
                    inflight[adm.key] = p
                waits[res.keys.index(adm.key)] = p
            pfs = replay.prefetch(t)
            for adm in pfs:
                if tm.submit:
                    yield env.timeout(tm.submit)
                yield _AfterNow(env)
                inflight[adm.key] = start_read(t, adm.key, False, True)
            for i in range(k):
                if res.late[i]:
                    waits[i] = inflight[res.keys[i]]
            if tm.complete and (res.reads or pfs):
                yield env.timeout(tm.complete * (len(res.reads) + len(pfs)))
            yield _AfterNow(env)
            tc = int(env.now)
            rec.look(tc)
            pending = [w for w in waits if w is not None and w.is_alive]
            gate = env.all_of(pending) if tm.seed and pending else None
            ready = [tc if w is None or not w.is_alive else tc + 1 for w in waits]
            durs: list[int] = []
            flags = [0, 0]  # FFNs started with reads outstanding, whether one woke
            if tm.workers == 1:
                w_at = tc
                woke = False
                if gate is not None:
                    yield gate
                    if int(env.now) > w_at:
                        rec.look(w_at, int(env.now))
                        woke = True
                for i in _compute_order(ready, tc):
                    yield _AfterNow(env)
                    ev = waits[i]
                    if ev is not None and ev.is_alive:
                        w_at = int(env.now)
                        yield ev
                        if int(env.now) > w_at:
                            woke = True
                        rec.look(w_at, int(env.now))
                        yield _AfterNow(env)
                    s = int(env.now)
                    busy = outstanding[0] > 0
                    dur = tm.ffn + tm.ffn_busy if busy else tm.ffn
                    if woke:
                        dur += tm.ffn_wake
                        flags[1] = 1
                        woke = False
                    flags[0] += busy
                    rec.ffn(s, s + dur, busy, tm.poll)
                    durs.append(dur)
                    yield env.timeout(dur)
            else:
                jobs = []
                for i in _compute_order(ready, tc):
                    jobs.append(env.process(ffn_job(waits[i], gate, durs, flags)))
                yield env.all_of(jobs)
            blocked = bool(flags[1])
            t2 = int(env.now)
            rec.iter_time.append(t2 - t0)
            rec.io.append(max(0, t2 - tc - _makespan(durs, tm.workers)))
            rec.comp.append(sum(durs))
            rec.n_busy.append(flags[0] if tm.ffn_busy else 0)
            rec.over.append(tc - t1)
            rec.hits.append(sum(res.hit) - n_late)
            rec.late.append(n_late)
            rec.pf.append(len(pfs))
            rec.reads.append(len(res.reads) + len(pfs))
        return env.now

    main = env.process(run())
    env.run(until=main)
    end = int(env.now)
    env.run()  # let outstanding prefetches finish, for their latencies
    return end


# -- entry point -----------------------------------------------------------------------


def timing_of(
    hardware: HardwareProfile, shape: ModelShape, opts: SimOptions
) -> tuple[_Timing, int]:
    """The model's durations for `hardware` running `shape` as `opts` says, and the bytes
    of one expert read. Shared by both engines (and by `mer validate`'s checks)."""
    from mer.engine.io import POLL_INTERVAL_S
    from mer.engine.streaming import INLINE_FFN_BYTES

    seed = opts.mode == "seed"
    ssd = hardware.ssd
    comp = hardware.compute
    ranges = opts.read_ranges or (shape.slot_bytes,)  # O_DIRECT reads whole aligned slots
    read_bytes = int(sum(ranges))
    chunk_bytes = opts.chunk_bytes or ssd.chunk_bytes
    n_chunks = sum(max(1, -(-int(r) // chunk_bytes)) for r in ranges)
    qd = opts.queue_depth if opts.queue_depth is not None else ssd.queue_depth
    channels = ssd.served_channels(qd)
    piece = read_bytes / n_chunks  # the model's chunks are equal
    tm = _Timing(
        dense=0 if seed else ticks(comp.dense_time(shape.dense_bytes_per_layer)),
        ffn=ticks(comp.ffn_time(shape.bytes_per_expert)),
        workers=comp.workers,
        seed=seed,
        channels=channels,
        chunks=n_chunks,
        chunk=ticks(ssd.chunk_time_of(read_bytes / n_chunks, qd, chunk_bytes)),
        window=ssd.window(qd),
        share=tuple(
            max(1, ticks(k * piece / rate))
            for k, rate in enumerate(ssd.shared_rates(qd, chunk_bytes, piece), start=1)
        )
        if ssd.shared
        else (),
        access=ticks(ssd.access_latency_s),
        step=ticks(comp.step_overhead_s),
        submit=ticks(comp.read_submit_s),
        complete=ticks(comp.read_complete_s),
        ffn_busy=ticks(comp.ffn_busy_overhead_s),
        ffn_wake=ticks(comp.wake_ffn_s),
        dense_wake=0 if seed else ticks(comp.wake_dense_s),
        # the engine runs a native kernel's FFN of a small expert inline (reaping only after
        # it), else hands it to a thread and reaps every POLL_INTERVAL_S meanwhile
        poll=0
        if comp.kernel.startswith("native") and shape.bytes_per_expert <= INLINE_FFN_BYTES
        else ticks(POLL_INTERVAL_S),
    )
    return tm, read_bytes


def simulate(
    trace: Any,
    config: ReplayConfig,
    hardware: HardwareProfile,
    options: SimOptions | None = None,
    *,
    trace_path: str | Path | None = None,
    trace_digest: str = "",
) -> SimResult:
    """Replay `trace` under `config` on `hardware`; the RunSummary of kind "simulated"."""
    opts = options or SimOptions()
    opts.validate()
    tr = trace.select_phase(config.phase)
    if config.tokens is not None and config.tokens < tr.n_tokens:
        tr = tr.head(max(config.tokens, 1))
    shape: ModelShape = (
        opts.shape
        if isinstance(opts.shape, ModelShape)
        else get_shape(opts.shape or default_shape_for(tr.n_layers, tr.n_experts, tr.top_k))
    )
    tm, read_bytes = timing_of(hardware, shape, opts)
    ssd = hardware.ssd
    read_alone = read_alone_ticks(tm) / TICKS_PER_S
    lead = auto_lead(read_alone, (tm.dense + _ideal(tr.top_k, tm.ffn, tm.workers)) / TICKS_PER_S)
    if config.prefetch_lead == 0:  # --prefetch-lead auto
        config = replace(config, prefetch_lead=lead)
    replay = Replay.from_trace(tr, config)
    rec = _Recorder(observe=tm.workers == 1)
    t_start = time.perf_counter()
    done = None
    path = opts.engine
    if opts.engine == "fast":
        # the fastest path that covers the run; the step-by-step Python engine otherwise
        done = _run_vectorised(replay, tm, rec)
        path = "arrays"
        if done is None:
            done = _run_compiled(replay, tm, rec)
            path = "compiled"
        if done is None:
            path = "python"
            done = _run_fast(replay, tm, rec)
    else:
        done = _run_simpy(replay, tm, rec)
    wall_ticks = done
    sim_seconds = time.perf_counter() - t_start
    stats = replay.stats

    n_steps, n_layers, k = replay.n_steps, replay.n_layers, replay.top_k
    n_tok = n_steps // n_layers
    sec = 1.0 / TICKS_PER_S
    ideal = _ideal(k, tm.ffn, tm.workers) * sec
    dense_s = tm.dense * sec
    wall = wall_ticks * sec

    def per_token(values: list[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape(n_tok, n_layers).sum(axis=1)

    iter_time = np.asarray(rec.iter_time, dtype=np.int64) * sec
    tok_ticks = per_token(rec.iter_time)
    tok_time = tok_ticks * sec
    tok_start = np.concatenate([[0], np.cumsum(tok_ticks)[:-1]]) * sec if n_tok else tok_time
    tok_hits = per_token(rec.hits)
    tok_reads = per_token(rec.reads)
    tok_io = per_token(rec.io) * sec
    tok_comp = per_token(rec.comp) * sec
    if opts.key_read_bytes is not None:
        kb = np.asarray(opts.key_read_bytes, dtype=np.int64)
        per_read = kb[np.asarray(rec.keys, dtype=np.int64)] if rec.keys else np.zeros(0, np.int64)
        tok_bytes = np.bincount(
            np.asarray(rec.read_step, dtype=np.int64) // n_layers, weights=per_read, minlength=n_tok
        ).astype(np.int64)[:n_tok]
    else:
        tok_bytes = tok_reads * read_bytes
    if rec.read_lat_ticks is not None:
        lat_ticks = rec.read_lat_ticks
        read_busy = rec.read_busy_ticks * sec
    else:
        issued = np.asarray(rec.issued, dtype=np.int64)
        seen = rec.observed()
        lat_ticks = seen - issued
        read_busy = busy_seconds(issued, seen) * sec
    # sorted: the mean must not depend on the order an engine met the reads in
    read_lat = np.sort(lat_ticks).astype(np.float64) * sec
    table = tr.token_table()
    tokens = pd.DataFrame(
        {
            "step_token": np.arange(n_tok, dtype=np.int32),
            "seq": table["seq"].to_numpy(np.int32),
            "token": table["token"].to_numpy(np.int32),
            "phase": table["phase"].astype(str).to_numpy(),
            "start_s": tok_start,
            "time_s": tok_time,
            "io_wait_s": tok_io,
            "compute_s": tok_comp,
            "dense_s": per_token(rec.dense) * sec,
            "hits": tok_hits.astype(np.int32),
            "misses": (n_layers * k - tok_hits).astype(np.int32),
            "late": per_token(rec.late).astype(np.int32),
            "prefetch_issued": per_token(rec.pf).astype(np.int32),
            "bytes_read": tok_bytes,
        }
    )
    io_wait = float(tok_io.sum())
    compute = float(tok_comp.sum())
    dense = float(np.sum(rec.dense, dtype=np.int64)) * sec
    overhead = float(np.sum(rec.over, dtype=np.int64)) * sec
    n_reads = int(tok_reads.sum())
    n_busy = int(np.sum(rec.n_busy))
    step_floor = dense_s + tm.step * sec + ideal
    compute_bound = 1.0 / (n_layers * step_floor) if step_floor > 0 else None
    ssd_time = n_reads * read_bytes / ssd.bandwidth_bytes_per_s
    lookups = stats.lookups
    summary = RunSummary.from_replay(
        kind="simulated",
        replay_config=config,
        stats=stats,
        tokens=n_tok,
        layers=replay.n_layers,
        wall_s=wall,
        io_wait_s=io_wait,
        bytes_per_read=read_bytes,
        read_busy_s=read_busy,
        trace=str(trace_path) if trace_path is not None else getattr(trace, "name", "trace"),
        trace_digest=trace_digest,
        model=str(tr.meta.model),
        shape=shape.name,
        mode=opts.mode,
        hardware=hardware.name,
        top_k=replay.top_k,
        bytes_read=int(tok_bytes.sum()),
        compute_s=compute,
        dense_s=dense,
        latency={
            "read": percentiles(read_lat),
            "compute": percentiles(np.asarray(rec.comp, dtype=np.int64) * sec),
            "iteration": percentiles(iter_time),
            "token": percentiles(tok_time),
        },
        config=config.to_dict(),
        extra={
            "engine": opts.engine,
            # which implementation ran: "arrays" (prefetch off, compiled decisions and
            # tabulated timing), "compiled" (prefetch on, one C loop), "python" (the fast
            # engine's step loop), "simpy" (the literal engine); all give equal results
            "sim_path": path,
            "evictions": stats.total("evictions"),
            "bypass": stats.total("bypass"),
            "reads": n_reads,
            "read_bytes": read_bytes,
            "chunks_per_read": tm.chunks,
            "chunk_s": tm.chunk * sec,
            "channels": tm.channels,
            "device_window": tm.window or tm.channels,
            "read_alone_s": read_alone_ticks(tm) * sec,
            "ssd_model": "shared" if tm.share else "channels",
            "auto_prefetch_lead": lead,
            "ffn_s": tm.ffn * sec,
            "dense_s_per_layer": dense_s,
            "overhead_s": overhead,
            # the engine's driver figures (mer.engine.streaming), as the model spends them
            "driver_time": {
                "ffn_direct_s": (n_steps * k - n_busy) * tm.ffn * sec,
                "ffn_direct_n": n_steps * k - n_busy,
                "ffn_busy_s": n_busy * (tm.ffn + tm.ffn_busy) * sec,
                "ffn_busy_n": n_busy,
                "submit_s": n_reads * tm.submit * sec,
                "submit_n": n_reads,
                "steps": n_steps,
                "overhead_s": overhead,
                "token_overhead_s": [float(v) for v in per_token(rec.over) * sec],
                "token_reads": [int(v) for v in tok_reads],
            },
            "read_ranges": list(opts.read_ranges or (read_bytes,)),
            "io": {"queue_depth": opts.queue_depth, "chunk_bytes": opts.chunk_bytes},
            "bound_compute_tokens_per_s": compute_bound,
            "bound_ssd_tokens_per_s": n_tok / ssd_time if ssd_time > 0 else None,
            "cache_bytes": config.cache_slots * read_bytes,
            "cache_fits_ram": config.cache_slots * read_bytes <= hardware.memory.ram_bytes,
            "sim_seconds": sim_seconds,
            "sim_lookups_per_s": lookups / sim_seconds if sim_seconds > 0 else None,
            # The shape the profile's FFN rate was measured on (None: not recorded).
            "hardware_measured_shape": (hardware.extra or {}).get("measured_shape"),
        },
    )
    summary.extra["warm"] = warm_figures(tokens, opts.warmup_tokens)
    return SimResult(summary, tokens, stats, read_lat, sim_seconds)
