"""Expert streaming: the slots, reads, waits and FFNs of routed experts, step by step.

Both drivers of the real engine use this one class: the trace replay
(`mer run`, `mer.engine.executor`) and the decoder (`mer generate`,
`mer.model.decoder`). They differ only in where a step's experts and gate
weights come from (the trace, or the model's router) and in what runs between
the steps (a dense stand-in, or real attention). Every decision (hit, miss,
victim, slot, prefetch) comes from the shared decision core
(`mer.core.replay.Replay`); this module owns the buffers and the I/O. Per step:

1. `replay.step(t[, keys])`: lookups; the misses come back as Admissions
   naming the slot to read into. Their reads are submitted first (foreground).
2. `replay.prefetch(t)`: predicted experts of the next steps, submitted after
   the demand reads (background), so they queue behind them. A live driver may
   first hand the core the lookahead prediction of step t + 1.
3. For each of the step's experts, in rank order: wait for its read if it is
   not resident (a demand miss, or a late prefetch: wait for the read already
   in flight), compute the SwiGLU FFN on the slot's q4_0 bytes. While an expert
   computes, completions are polled so background reads are fed and
   `replay.complete(key)` is called as soon as each lands.
4. The outputs are combined with the step's gate weights: y = sum_r w_r FFN_r(x).

`seed=True` is the public engine's cycle: all of a step's reads are waited for
before its FFNs.

Buffers: `cache_slots` slot buffers of `store.slot_bytes` each, preallocated,
page aligned, pre-faulted and registered with io_uring, plus `top_k` scratch
buffers. Scratch serves two degenerate cases of caches smaller than a step: a
bypass read (the core found no victim: Admission.slot is None) and a step key
that is a hit but is chosen as the victim of an earlier-ranked miss of the
same step (its bytes are copied to scratch before the slot is overwritten,
then computed in rank order). Scratch is mapped but neither pre-faulted nor
registered: a run that never needs it never holds it (for mixtral-8x7b that
is 200 MiB), and one that does pays a page fault the first time. Nothing else
is allocated per step beyond the FFN's own activations, so memory stays at
cache + a fixed working set.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from mer.core.cache import physical_slots
from mer.core.replay import Replay
from mer.engine.aligned import aligned_empty, huge_page_bytes, huge_pages_default, thp_mode
from mer.engine.ffn import ExpertFFN, ffn_label
from mer.engine.io import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_QUEUE_DEPTH,
    POLL_INTERVAL_S,
    Reader,
    open_reader,
)
from mer.engine.store import read_bytes_by_key, typical_read_ranges
from mer.notes import note_once
from mer.validate import check_memory

F32 = npt.NDArray[np.float32]
INLINE_FFN_BYTES = 4 << 20  # native FFNs of experts up to this size run on the calling thread


@dataclass
class EngineConfig:
    """How the engine runs (not what it decides: that is ReplayConfig)."""

    io: str = "auto"  # auto | uring | pread
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: prefetch chunks allowed on the device at once (None: the whole queue depth); the
    #: rest wait in the reader's queue behind every demand read
    background_depth: int | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    mode: str = "model"  # model | seed
    ffn: str = "auto"  # expert FFN kernel: auto (native where built) | native | numpy
    direct: bool = True
    seed: int = 0
    register_buffers: bool = True
    #: slot buffers on transparent huge pages (mer.engine.aligned): without them, the same
    #: run went at one of two speeds ~30% apart, by how the kernel placed its pages
    huge_pages: bool = field(default_factory=huge_pages_default)
    #: the driver thread runs its timed loop under SCHED_FIFO where permitted (see
    #: `driver_priority`): a read that lands wakes it at once instead of after another
    #: process's time slice
    realtime: bool = True
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepOutcome:
    """What one step cost and found (the drivers sum these per token)."""

    hits: int
    misses: int
    late: int
    prefetch_issued: int
    bytes_read: int
    io_wait_s: float
    compute_s: float


def current_rss_bytes() -> int:
    """Resident set size now (from /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def thread_cpu_wait_s() -> float:
    """Time this thread has spent runnable but waiting for a core (the kernel's
    schedstat run delay; 0.0 where it is not available). On a loaded machine the
    driver then sees a landed read late and looks up late: the simulator's thread
    runs at once."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            return int(fh.read().split()[1]) * 1e-9
    except (OSError, ValueError, IndexError):
        return 0.0


REALTIME_PRIORITY = (
    1  # the lowest SCHED_FIFO priority: above every normal thread, below the kernel's
)


@contextlib.contextmanager
def driver_priority(realtime: bool) -> Iterator[str]:
    """The calling (driver) thread under SCHED_FIFO for the block, then back as it was.

    Why: the driver sleeps on every read it waits for, and on a shared 2-core machine the
    wake-up then waits for a core: measured, runs of one configuration spent 5-50% of
    their time runnable but off a core, and that share decided their speed (r = -0.8 to
    -0.9 with log tokens/s). Under SCHED_FIFO a landed read wakes the driver at once
    (CPU wait ~0). It blocks on every wait and the kernel caps real-time threads at 95%
    of a core, so other processes keep running. Threads started meanwhile (FFN workers)
    start as normal threads (SCHED_RESET_ON_FORK). Yields what it did: 'realtime',
    'off' (not asked), or 'normal (why)' where the kernel refused (no CAP_SYS_NICE and
    RLIMIT_RTPRIO 0: said once)."""
    if not realtime:
        yield "off"
        return
    if not hasattr(os, "sched_setscheduler"):
        yield "normal (no sched_setscheduler here)"
        return
    try:
        old_policy = os.sched_getscheduler(0)
        old_param = os.sched_getparam(0)
        flag = getattr(os, "SCHED_RESET_ON_FORK", 0)
        os.sched_setscheduler(0, os.SCHED_FIFO | flag, os.sched_param(REALTIME_PRIORITY))
    except OSError as exc:
        why = f"normal (SCHED_FIFO refused: {exc.strerror})"
        note_once(
            "engine:realtime",
            "mer: the engine's driver thread runs at normal priority (the kernel refused "
            f"SCHED_FIFO: {exc.strerror}; grant CAP_SYS_NICE or an RLIMIT_RTPRIO of 1, or pass "
            "--no-realtime to silence this); on a busy machine runs then vary more",
        )
        yield why
        return
    try:
        yield "realtime"
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, old_policy, old_param)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Reads:
    """Book-keeping of outstanding expert reads: key -> outstanding tags, and when it began."""

    def __init__(
        self, reader: Reader, on_landed: Callable[[int, bool, float, float], None]
    ) -> None:
        self.reader = reader
        self.pending: dict[Hashable, set[Hashable]] = {}  # read id -> tags not yet completed
        self.urgent: set[Hashable] = set()  # the pending reads a step waits for (demand)
        self.started: dict[Hashable, float] = {}
        self.on_landed = on_landed  # (key, into_slot, started, landed) on the perf_counter clock

    def submit(
        self,
        rid: Hashable,
        key: int,
        plan: list[tuple[int, int, int]],
        fd: int,
        buf: Any,
        urgent: bool = False,
    ) -> int:
        """Submit the ranges of one expert; returns bytes requested.

        `urgent` (a demand read) puts its chunks ahead of prefetch chunks still
        queued in the reader; chunks already in the device are not overtaken.
        A read's latency runs from the end of its submission to the reap that sees
        it land (what the simulator models as issue and landing).
        """
        reqs = []
        tags: set[Hashable] = set()
        total = 0
        for i, (offset, length, buf_off) in enumerate(plan):
            tag = (rid, i)
            tags.add(tag)
            reqs.append((fd, offset, length, buf[buf_off : buf_off + length], tag))
            total += length
        self.pending[rid] = tags
        if urgent:
            self.urgent.add(rid)
        self.reader.submit_reads(reqs, urgent=urgent)
        self.started[rid] = time.perf_counter()
        return total

    def _done(self, tag: Hashable) -> None:
        rid = tag[0]  # type: ignore[index]
        tags = self.pending.get(rid)
        if tags is None:
            return
        tags.discard(tag)
        if not tags:
            del self.pending[rid]
            self.urgent.discard(rid)
            kind, key = rid
            self.on_landed(key, kind == "slot", self.started.pop(rid), time.perf_counter())

    def poll(self) -> None:
        if self.pending:
            for tag in self.reader.poll():
                self._done(tag)

    def expedite(self, rid: Hashable) -> None:
        """A background read is now waited for: its chunks still queued go as urgent."""
        tags = self.pending.get(rid)
        if tags:
            self.urgent.add(rid)
            self.reader.expedite(tags)

    def cancel(self, rid: Hashable) -> int:
        """Abandon read `rid` (a dropped prefetch): drop its chunks still queued, wait for
        those already on the device (its buffer is about to be reused), and never report it
        landed. Returns the bytes it did not read."""
        tags = self.pending.get(rid)
        if tags is None:
            return 0
        dropped = self.reader.cancel(tags)
        for tag in list(tags):
            self.reader.wait(tag)
        del self.pending[rid]
        self.urgent.discard(rid)
        self.started.pop(rid, None)
        return dropped

    def wait(self, rid: Hashable) -> None:
        """Block until every range of read `rid` has landed."""
        while rid in self.pending:
            tag = next(iter(self.pending[rid]))
            self.reader.wait(tag)
            self._done(tag)

    def drain(self) -> None:
        while self.pending:
            rid = next(iter(self.pending))
            self.wait(rid)


def runs_inline(ffn: Any, bytes_per_expert: int) -> bool:
    """Whether FFNs run on the driver's thread even with reads in flight (a native kernel
    on experts small enough that a hand-off costs more than the polls it allows)."""
    return getattr(ffn, "kind", "numpy") == "native" and bytes_per_expert <= INLINE_FFN_BYTES


def ffn_while_reading(
    runner: ThreadPoolExecutor, reads: _Reads, inline: bool, fn: Any, *args: Any
) -> Any:
    """fn(*args) while reads are in flight: inline then one reap, or on `runner` while
    this thread reaps completions every POLL_INTERVAL_S (so prefetches land and queued
    chunks are fed during long FFNs). `mer probe` times this very path against a
    direct call."""
    if inline:
        y = fn(*args)
        reads.poll()
        return y
    fut = runner.submit(fn, *args)
    while True:
        done, _ = futures_wait([fut], timeout=POLL_INTERVAL_S)
        reads.poll()
        if done or not reads.pending:
            return fut.result()


class ExpertStreamer:
    """Routed experts of one run: cache slots, reads and FFNs, driven by `replay`.

    Use as a context manager (buffers, reader and threads are released on exit):

        with ExpertStreamer(store, replay, cfg, ffn=ffn) as streamer:
            y, outcome = streamer.step(t, x, weights)             # a trace replay
            y, outcome = streamer.step(t, x, weights, keys=keys)  # a live replay
    """

    def __init__(
        self,
        store: Any,
        replay: Replay,
        cfg: EngineConfig,
        *,
        ffn: ExpertFFN | Any,  # mer.engine.ffn.make_ffn's: native or numpy
        seed_cycle: bool = False,
    ) -> None:
        self.store = store
        self.replay = replay
        self.cfg = cfg
        self.ffn = ffn
        # A native FFN of a small expert ends sooner than a hop to the compute thread and one
        # poll interval: run it here and poll after it.
        self.inline_ffn = runs_inline(ffn, store.bytes_per_expert)
        self.seed_cycle = seed_cycle
        self.top_k = replay.top_k
        self.n_experts = replay.n_experts
        self.slot_of: dict[int, int] = {}  # resident or in-flight key -> slot (mirrors the core)
        self.read_lat: list[float] = []
        self.read_span: list[tuple[float, float]] = []  # (submitted, seen landed) per read
        self.it_compute: list[float] = []
        self.counters = {
            "stashed": 0,
            "bypass_reads": 0,
            "reads": 0,
            "payload_bytes": 0,
            "cancelled_reads": 0,  # dropped guesses still in flight when dropped
            "cancelled_bytes": 0,  # what their queued chunks would have read
            "evicted_in_flight": 0,  # reads waited for before their slot was reused
        }
        # The driver's time by kind (what the simulator's timing model is fitted to):
        # FFNs run directly (nothing in flight) or handed to a thread while reads are
        # polled; submissions of reads.
        self.timing = {
            "ffn_direct_s": 0.0,
            "ffn_direct_n": 0,
            "ffn_busy_s": 0.0,
            "ffn_busy_n": 0,
            "submit_s": 0.0,
            "submit_n": 0,
        }
        self._open = False

    # ---- set-up ------------------------------------------------------------------------
    def __enter__(self) -> ExpertStreamer:
        self._allocate()
        cfg = self.cfg
        self.reader = open_reader(
            kind=cfg.io,
            queue_depth=cfg.queue_depth,
            chunk_bytes=cfg.chunk_bytes,
            direct=cfg.direct,
            background_depth=cfg.background_depth,
        )
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-compute")
        try:
            store = self.store
            fd = store.open_for(self.reader) if hasattr(store, "open_for") else None
            self.fd = fd if fd is not None else self.reader.open(store.data_path)
            self.fixed, self.fixed_note = self._register(self.reader)
        except BaseException:
            self._close()
            raise

        def landed(key: int, into_slot: bool, started: float, seen: float) -> None:
            # Only timing: the decisions had the read landed already (Replay._landed).
            self.read_lat.append(seen - started)
            self.read_span.append((started, seen))

        self.reads = _Reads(self.reader, landed)
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.shutdown(wait=True)
        reader = getattr(self, "reader", None)
        if reader is not None:
            if self._open:
                self.info = reader.info()
                self.direct = reader.is_direct(self.fd)
            reader.close()
        self._open = False

    def _allocate(self) -> None:
        slot_bytes = int(self.store.slot_bytes)
        self.slot_bytes = slot_bytes
        cfg = self.replay.config
        # Only the slots the cache can ever fill (a cache larger than all experts fills
        # n_layers x n_experts), and only if they fit in the memory available now.
        n = physical_slots(cfg.cache_slots, cfg.scope, self.replay.n_layers, self.n_experts)
        check_memory(
            (n + self.top_k) * slot_bytes,
            f"--cache-slots {cfg.cache_slots} ({n} slot buffers of {slot_bytes:,} bytes)",
        )
        self.rss_before_buffers = current_rss_bytes()
        huge = bool(self.cfg.huge_pages)
        self.cache_buf = aligned_empty(n * slot_bytes, huge=huge)
        self.scratch_buf = aligned_empty(self.top_k * slot_bytes, huge=huge)
        # Pre-fault every page now, so the run measures reads and compute, not page faults,
        # and RSS shows the whole preallocation from the start.
        self.cache_buf[::4096] = 0  # scratch stays untouched until a bypass or stash needs it
        self.huge_bytes = huge_page_bytes(self.cache_buf) if huge else 0
        if huge and self.cache_buf.nbytes >= 4 << 20 and self.huge_bytes == 0:
            note_once(
                "engine:huge-pages",
                f"mer: the kernel gave the slot buffers no huge pages (transparent huge pages: "
                f"{thp_mode()}); reads go into 4 KiB pages, which can run slower and vary more "
                "from run to run (enable THP in madvise or always mode to avoid it)",
            )
        self.slots = [self.cache_buf[i * slot_bytes : (i + 1) * slot_bytes] for i in range(n)]
        self.scratch = [
            self.scratch_buf[i * slot_bytes : (i + 1) * slot_bytes] for i in range(self.top_k)
        ]

    def _register(self, reader: Reader) -> tuple[bool, str]:
        if not self.cfg.register_buffers:
            return False, "disabled"
        total = self.cache_buf.nbytes
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and total > soft:
            return False, (
                f"{total >> 20} MiB of buffers exceed RLIMIT_MEMLOCK ({soft >> 10} KiB): "
                "plain reads into page-aligned buffers"
            )
        ok = reader.register_buffers([self.cache_buf])
        return ok, "registered" if ok else "refused by the kernel"

    # ---- one step ----------------------------------------------------------------------
    def _issue(self, key: int, slot: int | None, rank: int, urgent: bool) -> int:
        t0 = time.perf_counter()
        layer, expert = divmod(key, self.n_experts)
        plan = self.store.read_plan(layer, expert)
        if slot is None:
            self.counters["bypass_reads"] += 1
            rid: Hashable = ("bypass", key)
            buf = self.scratch[rank]
        else:
            rid = ("slot", key)
            buf = self.slots[slot]
        self.counters["reads"] += 1
        self.counters["payload_bytes"] += self.store.bytes_per_expert
        n = self.reads.submit(rid, key, plan, self.fd, buf, urgent=urgent)
        self.timing["submit_s"] += time.perf_counter() - t0
        self.timing["submit_n"] += 1
        return n

    def _compute(self, buf: Any, layer: int, expert: int, xin: F32) -> F32:
        """One FFN: directly when nothing is in flight, else on the runner thread while
        this thread reaps completions every POLL_INTERVAL_S (feeding queued chunks)."""
        t0 = time.perf_counter()
        g, u, d = self.store.views(buf, layer, expert)
        reads = self.reads
        reads.poll()  # see what landed: nothing in flight means the cheaper direct call
        tm = self.timing
        if not reads.pending or not reads.urgent or not self.reader.queued_urgent:
            # No demand chunk waits to be fed (nothing in flight, only prefetches, or every
            # demand chunk already on the device, which goes on by itself): a thread polling
            # meanwhile would only take a core from the FFN on a small machine, so compute
            # here and poll once after (which feeds whatever queued up).
            out = self.ffn(xin, g, u, d)
            if reads.pending:
                reads.poll()
            tm["ffn_direct_s"] += time.perf_counter() - t0
            tm["ffn_direct_n"] += 1
            return out
        out = ffn_while_reading(self.runner, reads, self.inline_ffn, self.ffn, xin, g, u, d)
        tm["ffn_busy_s"] += time.perf_counter() - t0
        tm["ffn_busy_n"] += 1
        return out

    def _settle(self, key: int) -> None:
        """Before `key`'s slot takes another read: let `key`'s own read land if it is
        still in flight (a prefetch evicted before it arrived), so that read cannot
        overwrite the new one's bytes. The decision was made without it (a timing cost
        only: the wait is the device's time for what is left of that read)."""
        rid = ("slot", key)
        if rid in self.reads.pending:
            self.reads.expedite(rid)
            self.reads.wait(rid)
            self.counters["evicted_in_flight"] += 1

    def step(
        self,
        t: int,
        x: F32,
        weights: Sequence[float] | npt.NDArray[np.floating[Any]],
        *,
        keys: Sequence[int] | None = None,
        lookahead: Sequence[int] | None = None,
    ) -> tuple[F32, StepOutcome]:
        """y = sum_r weights[r] * FFN_r(x) over step t's experts, reading what misses.

        `keys` (global, rank order) for a live replay, None for a trace replay;
        `lookahead`: a live driver's prediction of step t + 1's experts.
        """
        replay = self.replay
        clock = time.perf_counter
        n_exp = self.n_experts
        # Reap what landed first: a prefetch that is in by now is on time (the simulator
        # sees reads at the instant they land); one still being read is late.
        self.reads.poll()
        res = replay.step(t) if keys is None else replay.step(t, keys)
        for key in res.cancelled:  # dropped guesses: free their slots, stop their reads
            self.slot_of.pop(key, None)
            if ("slot", key) in self.reads.pending:
                self.counters["cancelled_reads"] += 1
                self.counters["cancelled_bytes"] += self.reads.cancel(("slot", key))
        step_keys = res.keys
        reading = {rid[1] for rid in self.reads.pending if rid[0] == "slot"}  # type: ignore[index]
        n_late = len(replay.mark_late_hits(res, reading)) if reading else 0
        layer = step_keys[0] // n_exp
        stash: dict[int, int] = {}  # step key -> scratch index holding its bytes
        bypass: dict[int, int] = {}  # step key -> scratch index of its bypass read
        rank_of = {k: r for r, k in enumerate(step_keys)}
        nbytes = 0
        slot_of = self.slot_of
        demand = {adm.key for adm in res.reads}
        for adm in res.reads:
            rank = rank_of[adm.key]
            if adm.evicted is not None:
                self._settle(adm.evicted)
                old = slot_of.pop(adm.evicted)
                if adm.evicted in rank_of:
                    # A hit of this step chosen as the victim of an earlier-ranked
                    # miss (cache smaller than a step): keep its bytes in scratch.
                    r_v = rank_of[adm.evicted]
                    self.scratch[r_v][:] = self.slots[old]
                    stash[adm.evicted] = r_v
                    self.counters["stashed"] += 1
            if adm.slot is None:
                bypass[adm.key] = rank
            else:
                slot_of[adm.key] = adm.slot
            nbytes += self._issue(adm.key, adm.slot, rank, urgent=True)
        if lookahead is not None:
            replay.supply_lookahead(t + 1, lookahead)
        pf_n = 0
        for adm in replay.prefetch(t):
            if adm.evicted is not None:
                self._settle(adm.evicted)
                slot_of.pop(adm.evicted, None)
            slot_of[adm.key] = adm.slot  # type: ignore[assignment]
            nbytes += self._issue(adm.key, adm.slot, 0, urgent=False)
            pf_n += 1
        reads = self.reads
        reads.poll()
        io_wait = 0.0
        y = np.zeros_like(x)
        step_comp = 0.0
        if self.seed_cycle:
            # The public engine's cycle: all of the step's reads, then its FFNs.
            w0 = clock()
            for key in step_keys:
                reads.wait(("bypass", key) if key in bypass else ("slot", key))
            io_wait += clock() - w0
        # Experts whose weights are here first, then the others in rank order, each after
        # its read lands: the output sum does not depend on the order, the time does.
        ranks = range(len(step_keys))
        waiting = [
            key not in stash
            and ((("bypass", key) if key in bypass else ("slot", key)) in reads.pending)
            for key in step_keys
        ]
        order = [r for r in ranks if not waiting[r]] + [r for r in ranks if waiting[r]]
        for r in ranks:
            if waiting[r] and step_keys[r] not in bypass and step_keys[r] not in demand:
                reads.expedite(("slot", step_keys[r]))  # a late prefetch: now a demand read
        outs: list[F32 | None] = [None] * len(step_keys)
        for rank in order:
            key = step_keys[rank]
            expert = key - layer * n_exp
            if key in stash:
                buf = self.scratch[stash[key]]
            elif key in bypass:
                buf = self.scratch[bypass[key]]
                w0 = clock()
                reads.wait(("bypass", key))
                io_wait += clock() - w0
            else:
                buf = self.slots[slot_of[key]]
                rid = ("slot", key)
                if rid in reads.pending:
                    w0 = clock()
                    reads.wait(rid)
                    io_wait += clock() - w0
            c0 = clock()
            out = self._compute(buf, layer, expert, x)
            step_comp += clock() - c0
            outs[rank] = out
        for rank, o in enumerate(outs):  # summed in rank order, whatever the compute order
            assert o is not None
            y += np.float32(weights[rank]) * o
        self.it_compute.append(step_comp)
        outcome = StepOutcome(
            hits=res.n_hits - n_late,
            misses=res.n_misses + n_late,
            late=sum(res.late) + n_late,
            prefetch_issued=pf_n,
            bytes_read=nbytes,
            io_wait_s=io_wait,
            compute_s=step_comp,
        )
        return y, outcome

    def drain(self) -> None:
        """Let background reads still in flight land (call outside the timed region)."""
        self.reads.drain()

    # ---- what the summary reports --------------------------------------------------------
    def hardware(self) -> str:
        info = self.info
        io_desc = f"{info.kind}{', O_DIRECT' if self.direct else ', buffered'}"
        return (
            f"this machine ({io_desc}, queue depth {info.queue_depth}, "
            f"chunk {info.chunk_bytes >> 10} KiB, {self.cfg.threads} threads, "
            f"{ffn_label(self.ffn)} FFN)"
        )

    def extra(self) -> dict[str, Any]:
        """Engine facts for RunSummary.extra (call after the `with` block)."""
        info = self.info
        return {
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_buffers_bytes": int(self.rss_before_buffers),
            "cache_buffer_bytes": int(self.cache_buf.nbytes),
            "scratch_buffer_bytes": int(self.scratch_buf.nbytes),
            "slot_bytes": int(self.slot_bytes),
            "bytes_per_expert": int(self.store.bytes_per_expert),
            "reads": int(self.counters["reads"]),
            "payload_bytes": int(self.counters["payload_bytes"]),
            "driver_time": {k: float(v) for k, v in self.timing.items()},
            "read_ranges": list(typical_read_ranges(self.store)),
            "read_bytes_by_key": list(read_bytes_by_key(self.store)),
            "bypass_reads": int(self.counters["bypass_reads"]),
            "stashed_step_victims": int(self.counters["stashed"]),
            "cancelled_reads": int(self.counters["cancelled_reads"]),
            "cancelled_bytes": int(self.counters["cancelled_bytes"]),
            "evicted_in_flight": int(self.counters["evicted_in_flight"]),
            "evictions": self.replay.stats.total("evictions"),
            "io": {
                "kind": info.kind,
                "direct": bool(self.direct),
                "queue_depth": info.queue_depth,
                "chunk_bytes": info.chunk_bytes,
                "fixed_buffers": bool(self.fixed),
                "fixed_buffers_note": self.fixed_note,
                "fallback_reason": info.fallback_reason,
                "background_depth": info.background_depth,
            },
            "threads": int(self.cfg.threads),
            "ffn": ffn_label(self.ffn),
            "huge_pages": {
                "asked": bool(self.cfg.huge_pages),
                "cache_huge_bytes": int(self.huge_bytes),
                "thp": thp_mode(),
            },
        }
