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

The SSD serves reads split into equal chunks on `channels` parallel channels,
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

from mer.core.cache import CacheStats
from mer.core.replay import Replay, ReplayConfig, auto_lead
from mer.errors import BadInput
from mer.shapes import SHAPES, ModelShape, get_shape
from mer.sim.hardware import HardwareProfile
from mer.summary import RunSummary, percentiles, warm_figures

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
    __slots__ = ("fg", "finish", "issued", "key", "registered", "remaining")

    def __init__(self, key: int, fg: bool, issued: int, chunks: int, registered: bool) -> None:
        self.key = key
        self.fg = fg
        self.issued = issued
        self.remaining = chunks  # chunks not yet dispatched to a channel
        self.finish = -1  # known once the last chunk is dispatched
        self.registered = registered


class AnalyticSSD:
    """Chunked reads on C channels, foreground first, solved without per-chunk events.

    The channels' free times are `free[i] + shift`, `free` sorted ascending. Their
    spread never exceeds one chunk time `d`, so greedy dispatch is a round-robin
    over the sorted channels and each channel takes n or n + 1 of the chunks that
    start before a given instant: commit() is O(log C) plus the reads it retires.
    """

    def __init__(self, channels: int, chunks: int, chunk_ticks: int) -> None:
        self.C = channels
        self.m = chunks
        self.d = chunk_ticks
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
        """Dispatch every queued chunk that starts at or before `a`; idle channels wait at `a`.

        Times are integer ticks, so instants that coincide do so exactly: a chunk
        whose channel frees at `a` is dispatched before a read issued at `a`, as
        in the simpy engine (whose driver looks up after same-instant events).
        """
        free = self.free
        rel = a - self.shift
        if rel < free[0]:
            return  # every channel busy past `a`: nothing starts, nothing idles
        if self.queued_chunks:
            C, d = self.C, self.d
            fmax = free[-1]
            n0 = (rel - fmax) // d + 1 if fmax <= rel else 0
            k = C * n0 + bisect_right(free, rel - n0 * d)
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
                            r.finish = free[last % C] + shift + (last // C + 1) * d
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
            self.fg_finish = self._start(self.fg_chunks - 1) + self.d
        else:
            self.bg.append(r)
        return r

    def finish_of(self, read: _Read) -> int:
        """Finish time of `read` given the reads queued now (final for foreground reads)."""
        if read.remaining == 0:
            return read.finish
        pos = 0
        for q in (self.fg, self.bg):
            for r in q:
                if r is read:
                    return self._start(pos + r.remaining - 1) + self.d
                pos += r.remaining
        raise AssertionError("read not queued")  # pragma: no cover

    def pop_done(self, t: int) -> list[_Read]:
        """Reads finished by `t`, in finish order (call after commit(t))."""
        out = []
        done = self.done
        while done and done[0][0] <= t:
            out.append(heapq.heappop(done)[2])
        return out

    def drain(self) -> list[_Read]:
        """Dispatch everything still queued and return every unreported read."""
        if self.queued_chunks:
            self.commit(self._start(self.queued_chunks - 1) + self.d)
        out = [entry[2] for entry in sorted(self.done, key=lambda e: (e[0], e[1]))]
        self.done = []
        return out


# -- results ---------------------------------------------------------------------------


@dataclass
class SimOptions:
    """Timing choices of one simulation (the replay config decides hits)."""

    mode: str = "model"
    engine: str = "fast"
    shape: str | ModelShape | None = (
        None  # a name or a shape (e.g. an expert file's); None: from the trace geometry
    )
    #: steady-state window for summary.extra["warm"] (None: 32 tokens, at most half)
    warmup_tokens: int | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise BadInput(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.engine not in ENGINES:
            raise BadInput(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}.")


@dataclass
class SimResult:
    summary: RunSummary
    tokens: pd.DataFrame
    stats: CacheStats
    read_latencies: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    sim_seconds: float = 0.0


@dataclass
class _Timing:
    """The model's durations in ticks."""

    dense: int
    ffn: int
    workers: int
    seed: bool
    channels: int
    chunks: int  # per read
    chunk: int  # service time of one chunk


def _ideal(k: int, ffn: int, workers: int) -> int:
    """Makespan of a step's k FFNs when all their weights are resident."""
    return math.ceil(k / workers) * ffn


class _Recorder:
    """Per-step accounting both engines fill (appended lists: cheaper than numpy per step)."""

    def __init__(self) -> None:
        self.iter_time: list[int] = []  # step latency (dense + lookups + FFNs)
        self.io: list[int] = []  # time the step was blocked on reads
        self.hits: list[int] = []
        self.late: list[int] = []
        self.pf: list[int] = []  # prefetch reads issued
        self.reads: list[int] = []  # all reads issued (demand + prefetch)


# -- the fast engine -------------------------------------------------------------------


def _run_fast(replay: Replay, tm: _Timing, rec: _Recorder) -> tuple[int, list[int]]:
    env = simpy.Environment()
    ssd = AnalyticSSD(tm.channels, tm.chunks, tm.chunk)
    inflight: dict[int, _Read] = {}
    read_lat: list[int] = []
    k = replay.top_k
    ffn, workers, dense, seed = tm.ffn, tm.workers, tm.dense, tm.seed
    ideal = _ideal(k, ffn, workers)
    step = replay.step
    prefetch = replay.prefetch
    complete = replay.complete
    issue = ssd.issue
    finish_of = ssd.finish_of
    commit = ssd.commit
    done = ssd.done
    timeout = env.timeout
    r_iter, r_io, r_hits = rec.iter_time, rec.io, rec.hits
    r_late, r_pf, r_reads = rec.late, rec.pf, rec.reads

    def finish_reads(t: int) -> None:
        if ssd.queued_chunks:  # else commit would only move idle channels; issue() does that
            commit(t)
        if done and done[0][0] <= t:
            for r in ssd.pop_done(t):
                read_lat.append(r.finish - r.issued)
                if r.registered:
                    del inflight[r.key]
                    complete(r.key)

    n_layers = replay.n_layers

    def run() -> Any:
        # The clock advances once per token (one simpy timeout for all its layers);
        # within a token `now` carries the step instants. Nothing else waits on simpy
        # events in this engine, so the order of decisions is the same.
        now = int(env.now)
        token_start = now
        for t in range(replay.n_steps):
            t0 = now
            t1 = t0 + dense
            finish_reads(t1)
            res = step(t)
            reads = res.reads
            late = res.late
            if reads or True in late:
                ready = [t1] * k
                keys = res.keys
                for adm in reads:
                    registered = adm.slot is not None
                    r = issue(adm.key, True, t1, registered)
                    if registered:
                        inflight[adm.key] = r
                    ready[keys.index(adm.key)] = ssd.fg_finish

                pfs = prefetch(t)
                for adm in pfs:
                    inflight[adm.key] = issue(adm.key, False, t1, True)
                n_late = 0
                for i in range(k):
                    if late[i]:
                        n_late += 1
                        ready[i] = finish_of(inflight[keys[i]])
                if seed:
                    t2 = max(ready) + ideal
                elif workers == 1:
                    t2 = t1
                    for rt in sorted(ready):
                        t2 = (rt if rt > t2 else t2) + ffn
                else:
                    wfree = [t1] * workers
                    for rt in sorted(ready):
                        w = heapq.heappop(wfree)
                        heapq.heappush(wfree, (rt if rt > w else w) + ffn)
                    t2 = max(wfree)
                io = t2 - t1 - ideal
                r_io.append(io if io > 0 else 0)
                r_hits.append(sum(res.hit))
                r_late.append(n_late)
            else:
                pfs = prefetch(t)
                for adm in pfs:
                    inflight[adm.key] = issue(adm.key, False, t1, True)
                t2 = t1 + ideal
                r_io.append(0)
                r_hits.append(k)
                r_late.append(0)
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
    for r in ssd.drain():
        read_lat.append(r.finish - r.issued)
    return end, read_lat


# -- the fast engine, prefetch off: decisions compiled, timing vectorised ---------------


def step_spans(tm: _Timing, k: int) -> tuple[list[int], list[int], list[list[int]]]:
    """For m = 0..k misses in a step: (span from lookup to step end, I/O wait, read latencies).

    With prefetch off every read of a step is its own step's, issued at the lookup
    instant t1 onto idle channels (the previous step ended after its last read),
    so the r-th read's last chunk is chunk (r + 1) * chunks - 1 of a round-robin
    from t1 and the whole step's timing depends only on how many keys missed.
    The FFN schedule below is `_run_fast`'s, on those ready times.
    """
    C, m_ch, d = tm.channels, tm.chunks, tm.chunk
    ideal = _ideal(k, tm.ffn, tm.workers)
    spans, ios, lats = [], [], []
    for m in range(k + 1):
        fin = [(((r + 1) * m_ch - 1) // C + 1) * d for r in range(m)]
        ready = [0] * (k - m) + fin
        if m == 0:
            t2 = ideal
        elif tm.seed:
            t2 = max(ready) + ideal
        elif tm.workers == 1:
            t2 = 0
            for rt in sorted(ready):
                t2 = (rt if rt > t2 else t2) + tm.ffn
        else:
            wfree = [0] * tm.workers
            for rt in sorted(ready):
                w = heapq.heappop(wfree)
                heapq.heappush(wfree, (rt if rt > w else w) + tm.ffn)
            t2 = max(wfree)
        spans.append(t2)
        ios.append(max(0, t2 - ideal))
        lats.append(fin)
    return spans, ios, lats


def _run_vectorised(replay: Replay, tm: _Timing, rec: _Recorder) -> tuple[int, list[int]] | None:
    """The fast engine with prefetch off, in array operations; None if it does not apply.

    The shared core decides every lookup (its compiled loop, `replay_outcomes`);
    the timing of each step is then a table lookup on its number of misses.
    Tests hold it equal to `_run_fast` and to the literal simpy engine.
    """
    from mer.core.replay import replay_outcomes

    outcome = replay_outcomes(replay)
    if outcome is None:
        return None
    k = replay.top_k
    spans, ios, lats = step_spans(tm, k)
    misses = (outcome != 1).sum(axis=1)
    span = np.asarray(spans, dtype=np.int64)[misses]
    rec.iter_time = (span + tm.dense).tolist()
    rec.io = np.asarray(ios, dtype=np.int64)[misses].tolist()
    rec.hits = (k - misses).tolist()
    zeros = [0] * len(misses)
    rec.late = zeros
    rec.pf = zeros
    rec.reads = misses.tolist()
    end = int(span.sum()) + tm.dense * len(misses)
    counts = np.bincount(misses, minlength=k + 1)
    read_lat: list[int] = []
    for m in range(1, k + 1):
        if counts[m]:
            read_lat.extend(lats[m] * int(counts[m]))
    return end, read_lat


# -- the literal simpy engine ----------------------------------------------------------


class _AfterNow(simpy.events.Event):
    """Fires after every other event of the current instant (a lower scheduling priority),
    so the driver looks up only once same-instant completions and dispatches are done."""

    def __init__(self, env: simpy.Environment) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, cast(Any, 2))  # after NORMAL (1)


def _run_simpy(replay: Replay, tm: _Timing, rec: _Recorder) -> tuple[int, list[int]]:
    env = simpy.Environment()
    disk = simpy.PriorityResource(env, capacity=tm.channels)
    cpu = simpy.Resource(env, capacity=tm.workers)
    m, d = tm.chunks, tm.chunk
    inflight: dict[int, simpy.Process] = {}
    read_lat: list[int] = []
    k = replay.top_k
    ideal = _ideal(k, tm.ffn, tm.workers)

    def chunk(prio: int) -> Any:
        with disk.request(priority=prio) as req:
            yield req
            yield env.timeout(d)

    def read(key: int, fg: bool, registered: bool) -> Any:
        issued = int(env.now)
        prio = 0 if fg else 1
        yield env.all_of([env.process(chunk(prio)) for _ in range(m)])
        read_lat.append(int(env.now) - issued)
        if registered:
            del inflight[key]
            replay.complete(key)

    def ffn(wait: simpy.Event | None) -> Any:
        if wait is not None:
            yield wait
        with cpu.request() as req:
            yield req
            yield env.timeout(tm.ffn)

    def run() -> Any:
        for t in range(replay.n_steps):
            t0 = int(env.now)
            if tm.dense:
                yield env.timeout(tm.dense)
            yield _AfterNow(env)
            t1 = int(env.now)
            res = replay.step(t)
            waits: list[simpy.Event | None] = [None] * k
            for adm in res.reads:
                p = env.process(read(adm.key, True, adm.slot is not None))
                if adm.slot is not None:
                    inflight[adm.key] = p
                waits[res.keys.index(adm.key)] = p
            pfs = replay.prefetch(t)
            for adm in pfs:
                inflight[adm.key] = env.process(read(adm.key, False, True))
            for i in range(k):
                if res.late[i]:
                    waits[i] = inflight[res.keys[i]]
            if tm.seed:
                pending = [w for w in waits if w is not None]
                gate = env.all_of(pending) if pending else None
                jobs = [env.process(ffn(gate)) for _ in range(k)]
            else:
                jobs = [env.process(ffn(w)) for w in waits]
            yield env.all_of(jobs)
            t2 = int(env.now)
            rec.iter_time.append(t2 - t0)
            rec.io.append(max(0, t2 - t1 - ideal))
            rec.hits.append(sum(res.hit))
            rec.late.append(sum(res.late))
            rec.pf.append(len(pfs))
            rec.reads.append(len(res.reads) + len(pfs))
        return env.now

    main = env.process(run())
    env.run(until=main)
    end = int(env.now)
    env.run()  # let outstanding prefetches finish, for their latencies
    return end, read_lat


# -- entry point -----------------------------------------------------------------------


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
    seed = opts.mode == "seed"
    read_bytes = shape.slot_bytes  # O_DIRECT reads whole 4 KiB-aligned slots
    ssd = hardware.ssd
    tm = _Timing(
        dense=0 if seed else ticks(hardware.compute.dense_time(shape.dense_bytes_per_layer)),
        ffn=ticks(hardware.compute.ffn_time(shape.bytes_per_expert)),
        workers=hardware.compute.workers,
        seed=seed,
        channels=ssd.channels,
        chunks=ssd.n_chunks(read_bytes),
        chunk=ticks(ssd.chunk_time(read_bytes)),
    )
    lead = auto_lead(
        ssd.read_time(read_bytes), (tm.dense + _ideal(tr.top_k, tm.ffn, tm.workers)) / TICKS_PER_S
    )
    if config.prefetch_lead == 0:  # --prefetch-lead auto
        config = replace(config, prefetch_lead=lead)
    replay = Replay.from_trace(tr, config)
    rec = _Recorder()
    t_start = time.perf_counter()
    done = _run_vectorised(replay, tm, rec) if opts.engine == "fast" else None
    if done is None:
        runner = _run_fast if opts.engine == "fast" else _run_simpy
        done = runner(replay, tm, rec)
    wall_ticks, read_ticks = done
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
    # sorted: the mean must not depend on the order an engine met the reads in
    read_lat = np.sort(np.asarray(read_ticks, dtype=np.int64)) * sec
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
            "compute_s": np.full(n_tok, ideal * n_layers),
            "dense_s": np.full(n_tok, dense_s * n_layers),
            "hits": tok_hits.astype(np.int32),
            "misses": (n_layers * k - tok_hits).astype(np.int32),
            "late": per_token(rec.late).astype(np.int32),
            "prefetch_issued": per_token(rec.pf).astype(np.int32),
            "bytes_read": tok_reads * read_bytes,
        }
    )
    io_wait = float(tok_io.sum())
    compute = ideal * n_steps
    dense = dense_s * n_steps
    n_reads = int(tok_reads.sum())
    compute_bound = 1.0 / (n_layers * (dense_s + ideal)) if dense_s + ideal > 0 else None
    ssd_time = n_reads * read_bytes / ssd.bandwidth_bytes_per_s
    lookups = stats.lookups
    summary = RunSummary.from_replay(
        kind="simulated",
        expert_bytes=read_bytes,
        replay_config=config,
        stats=stats,
        tokens=n_tok,
        layers=replay.n_layers,
        wall_s=wall,
        io_wait_s=io_wait,
        trace=str(trace_path) if trace_path is not None else getattr(trace, "name", "trace"),
        trace_digest=trace_digest,
        model=str(tr.meta.model),
        shape=shape.name,
        mode=opts.mode,
        hardware=hardware.name,
        top_k=replay.top_k,
        bytes_read=n_reads * read_bytes,
        compute_s=compute,
        dense_s=dense,
        latency={
            "read": percentiles(read_lat),
            "compute": percentiles(np.full(n_steps, ideal)),
            "iteration": percentiles(iter_time),
            "token": percentiles(tok_time),
        },
        config=config.to_dict(),
        extra={
            "engine": opts.engine,
            "evictions": stats.total("evictions"),
            "bypass": stats.total("bypass"),
            "reads": n_reads,
            "read_alone_s": ssd.read_time(read_bytes),
            "auto_prefetch_lead": lead,
            "ffn_s": tm.ffn * sec,
            "dense_s_per_layer": dense_s,
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
