"""The executor: a trace replayed on real expert weights, real reads and real compute.

Every decision (hit, miss, victim, slot, prefetch) comes from the shared
decision core (`mer.core.replay.Replay`), the same code the simulator drives;
this module only owns the wall clock, the buffers and the I/O. Per step
(token, layer):

1. dense: the resident attention-sized block runs on the hidden vector
   (`--mode model`; `--mode seed` skips it and, as the public engine's cycle
   and the simulator's seed mode, waits for all of a step's reads before its
   FFNs).
2. `replay.step(t)`: lookups; the misses come back as Admissions naming the
   slot to read into. Their reads are submitted first (foreground).
3. `replay.prefetch(t)`: predicted experts of the next layers, submitted after
   the demand reads (background), so they queue behind them.
4. For each of the step's experts, in rank order: wait for its read if it is
   not resident (a demand miss, or a late prefetch: wait for the read already
   in flight), compute the SwiGLU FFN on the slot's q4_0 bytes. While an expert
   computes, completions are polled so background reads are fed and
   `replay.complete(key)` is called as soon as each lands.
5. The top-k outputs are combined with the trace's gate weights (uniform when
   the trace has none) and the hidden vector is carried on, normalised.

Buffers: `cache_slots` slot buffers of `store.slot_bytes` each, preallocated,
page aligned and pre-faulted, plus `top_k` scratch buffers. Scratch serves
two degenerate cases of caches smaller than a step: a bypass read (the core
found no victim: Admission.slot is None) and a step key that is a hit but
is chosen as the victim of an earlier-ranked miss of the same step (its
bytes are copied to scratch before the slot is overwritten, then computed in
rank order). Nothing else is allocated per step beyond the FFN's own
activations, so memory stays at cache + a fixed working set (peak RSS is
measured and reported).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mer.core.cache import physical_slots
from mer.core.replay import Replay, ReplayConfig
from mer.engine.aligned import aligned_empty
from mer.engine.dense import DenseBlock, rmsnorm
from mer.engine.ffn import ExpertFFN
from mer.engine.io import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, Reader, open_reader
from mer.errors import BadInput
from mer.summary import RunSummary, percentiles
from mer.validate import check_memory

F32 = npt.NDArray[np.float32]
MODES = ("model", "seed")
POLL_INTERVAL_S = 0.0005  # how often completions are reaped while an expert computes


@dataclass
class EngineConfig:
    """How the engine runs (not what it decides: that is ReplayConfig)."""

    io: str = "auto"  # auto | uring | pread
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    mode: str = "model"  # model | seed
    direct: bool = True
    seed: int = 0
    register_buffers: bool = True
    progress: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    summary: RunSummary
    tokens: pd.DataFrame  # TOKEN_COLUMNS, one row per replayed token
    hidden: F32  # the hidden vector after the last step (the data flow's end point)


def initial_hidden(d_model: int, seed: int) -> F32:
    """The hidden vector the run starts from: seeded, normalised."""
    rng = np.random.default_rng(seed)
    return rmsnorm(rng.standard_normal(d_model).astype(np.float32))


def current_rss_bytes() -> int:
    """Resident set size now (from /proc/self/statm)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def check_geometry(trace: Any, store: Any, where_trace: str, where_store: str) -> None:
    """The trace's layers and experts must be the expert file's, or the keys mean nothing."""
    if (trace.n_layers, trace.n_experts) != (store.n_layers, store.n_experts):
        raise BadInput(
            f"trace {where_trace} routes over {trace.n_layers} layers x {trace.n_experts} experts, "
            f"but the expert file {where_store} holds {store.n_layers} layers x "
            f"{store.n_experts} experts; synthesise a matching file (`mer experts synth --shape "
            f"NAME`, a shape with {trace.n_layers}x{trace.n_experts}) or use a trace of this model."
        )


class _Reads:
    """Book-keeping of outstanding expert reads: key -> outstanding tags, and when it began."""

    def __init__(self, reader: Reader, on_landed: Callable[[int, bool, float], None]) -> None:
        self.reader = reader
        self.pending: dict[Hashable, set[Hashable]] = {}  # read id -> tags not yet completed
        self.started: dict[Hashable, float] = {}
        self.on_landed = on_landed  # (key, into_slot, latency_s)

    def submit(
        self, rid: Hashable, key: int, plan: list[tuple[int, int, int]], fd: int, buf: Any
    ) -> int:
        """Submit the ranges of one expert; returns bytes requested."""
        reqs = []
        tags: set[Hashable] = set()
        total = 0
        for i, (offset, length, buf_off) in enumerate(plan):
            tag = (rid, i)
            tags.add(tag)
            reqs.append((fd, offset, length, buf[buf_off : buf_off + length], tag))
            total += length
        self.pending[rid] = tags
        self.started[rid] = time.perf_counter()
        self.reader.submit_reads(reqs)
        return total

    def _done(self, tag: Hashable) -> None:
        rid = tag[0]  # type: ignore[index]
        tags = self.pending.get(rid)
        if tags is None:
            return
        tags.discard(tag)
        if not tags:
            del self.pending[rid]
            lat = time.perf_counter() - self.started.pop(rid)
            kind, key = rid  # type: ignore[misc]
            self.on_landed(key, kind == "slot", lat)

    def poll(self) -> None:
        if self.pending:
            for tag in self.reader.poll():
                self._done(tag)

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


class Executor:
    """Replays `trace` on `store` with the decision core; `run()` returns the measurement."""

    def __init__(
        self,
        trace: Any,
        store: Any,
        replay_config: ReplayConfig,
        engine_config: EngineConfig | None = None,
        *,
        trace_name: str = "trace",
        trace_digest: str = "",
        store_path: str = "experts",
    ) -> None:
        self.cfg = engine_config or EngineConfig()
        if self.cfg.mode not in MODES:
            raise BadInput(f"--mode must be one of {', '.join(MODES)}, got {self.cfg.mode!r}.")
        check_geometry(trace, store, trace_name, store_path)
        tr = trace.select_phase(replay_config.phase)
        if replay_config.tokens is not None:
            if replay_config.tokens < 1:
                raise BadInput(f"--tokens must be >= 1, got {replay_config.tokens}.")
            tr = tr.head(min(replay_config.tokens, tr.n_tokens))
        self.trace = tr
        self.store = store
        self.shape = store.shape
        self.rcfg = replay_config
        self.trace_name = trace_name
        self.trace_digest = trace_digest
        self.store_path = store_path
        self.n_layers = self.trace.n_layers
        self.n_experts = self.trace.n_experts
        self.top_k = self.trace.top_k
        if replay_config.cache_slots < 1:
            raise BadInput(f"--cache-slots must be at least 1, got {replay_config.cache_slots}.")
        self.n_slot_buffers = physical_slots(
            replay_config.cache_slots, replay_config.scope, self.n_layers, self.n_experts
        )
        check_memory(
            (self.n_slot_buffers + self.top_k) * int(store.slot_bytes),
            f"--cache-slots {replay_config.cache_slots} ({self.n_slot_buffers} slot buffers of "
            f"{int(store.slot_bytes):,} bytes)",
        )

    # ---- set-up ------------------------------------------------------------------------
    def _allocate(self) -> None:
        slot_bytes = int(self.store.slot_bytes)
        self.slot_bytes = slot_bytes
        n = self.n_slot_buffers
        self.rss_before_buffers = current_rss_bytes()
        self.cache_buf = aligned_empty(n * slot_bytes)
        self.scratch_buf = aligned_empty(self.top_k * slot_bytes)
        # Pre-fault every page now, so the run measures reads and compute, not page faults,
        # and RSS shows the whole preallocation from the start.
        self.cache_buf[::4096] = 0
        self.scratch_buf[::4096] = 0
        self.slots = [self.cache_buf[i * slot_bytes : (i + 1) * slot_bytes] for i in range(n)]
        self.scratch = [
            self.scratch_buf[i * slot_bytes : (i + 1) * slot_bytes] for i in range(self.top_k)
        ]

    def _register(self, reader: Reader) -> tuple[bool, str]:
        if not self.cfg.register_buffers:
            return False, "disabled"
        total = self.cache_buf.nbytes + self.scratch_buf.nbytes
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and total > soft:
            return False, (
                f"{total >> 20} MiB of buffers exceed RLIMIT_MEMLOCK ({soft >> 10} KiB): "
                "plain reads into page-aligned buffers"
            )
        ok = reader.register_buffers([self.cache_buf, self.scratch_buf])
        return ok, "registered" if ok else "refused by the kernel"

    # ---- the run -----------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        replay = Replay.from_trace(self.trace, self.rcfg)
        weights = self.trace.weights()
        keys_grid = replay.steps
        n_tokens = self.trace.n_tokens
        L, K = self.n_layers, self.top_k
        if weights is None:
            gate_w = np.full((n_tokens * L, K), 1.0 / K, dtype=np.float32)
        else:
            gate_w = weights.reshape(-1, K).astype(np.float32)

        self._allocate()
        threads = max(1, int(cfg.threads))
        ffn = ExpertFFN(self.shape, threads)
        dense = (
            DenseBlock(self.shape, seed=cfg.seed + 1, threads=threads, pool=ffn._pool)
            if cfg.mode == "model"
            else None
        )
        reader = open_reader(
            kind=cfg.io,
            queue_depth=cfg.queue_depth,
            chunk_bytes=cfg.chunk_bytes,
            direct=cfg.direct,
        )
        runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-compute")
        try:
            fd = self.store.open_for(reader) if hasattr(self.store, "open_for") else None
            if fd is None:
                fd = reader.open(self.store.data_path)
            fixed, fixed_note = self._register(reader)
            result = self._loop(replay, keys_grid, gate_w, n_tokens, reader, fd, ffn, dense, runner)
            info = reader.info()
            direct = reader.is_direct(fd)
        finally:
            runner.shutdown(wait=True)
            ffn.close()
            reader.close()
        rows, timing = result
        summary = self._summary(replay, rows, timing, info, direct, fixed, fixed_note, dense)
        return RunResult(summary, rows, timing["hidden"])

    def _loop(
        self,
        replay: Replay,
        keys_grid: np.ndarray,
        gate_w: F32,
        n_tokens: int,
        reader: Reader,
        fd: int,
        ffn: ExpertFFN,
        dense: DenseBlock | None,
        runner: ThreadPoolExecutor,
    ) -> tuple[pd.DataFrame, dict[str, Any]]:
        L = self.n_layers
        store = self.store
        n_exp = self.n_experts
        slot_of: dict[int, int] = {}  # resident or in-flight key -> slot (mirrors the core)
        read_lat: list[float] = []
        counters = {"stashed": 0, "bypass_reads": 0, "reads": 0, "payload_bytes": 0}

        def landed(key: int, into_slot: bool, lat: float) -> None:
            read_lat.append(lat)
            if into_slot:
                replay.complete(key)

        reads = _Reads(reader, landed)
        x = initial_hidden(self.shape.d_model, self.cfg.seed)

        tok_rows: dict[str, list[Any]] = {
            c: []
            for c in (
                "start_s",
                "time_s",
                "io_wait_s",
                "compute_s",
                "dense_s",
                "hits",
                "misses",
                "late",
                "prefetch_issued",
                "bytes_read",
            )
        }
        it_times: list[float] = []
        it_compute: list[float] = []
        clock = time.perf_counter

        def issue(key: int, slot: int | None, rank: int) -> int:
            layer, expert = divmod(key, n_exp)
            plan = store.read_plan(layer, expert)
            if slot is None:
                counters["bypass_reads"] += 1
                rid: Hashable = ("bypass", key)
                buf = self.scratch[rank]
            else:
                rid = ("slot", key)
                buf = self.slots[slot]
            counters["reads"] += 1
            counters["payload_bytes"] += store.bytes_per_expert
            return reads.submit(rid, key, plan, fd, buf)

        def compute(buf: Any, layer: int, expert: int, xin: F32) -> F32:
            g, u, d = store.views(buf, layer, expert)
            if not reads.pending:
                return ffn(xin, g, u, d)
            fut: Future[F32] = runner.submit(ffn, xin, g, u, d)
            while True:
                done, _ = futures_wait([fut], timeout=POLL_INTERVAL_S)
                reads.poll()
                if done:
                    return fut.result()
                if not reads.pending:
                    return fut.result()

        seed_mode = self.cfg.mode == "seed"
        progress = _progress(self.cfg.progress, n_tokens)
        t_run0 = clock()
        with progress as bar:
            task = bar.add_task("mer run", total=n_tokens) if bar is not None else None
            for ti in range(n_tokens):
                tok0 = clock()
                io_wait = comp = dense_s = 0.0
                hits = misses = late_n = pf_n = 0
                nbytes = 0
                for layer in range(L):
                    t = ti * L + layer
                    it0 = clock()
                    if dense is not None:
                        d0 = clock()
                        x = dense(layer, x)
                        dense_s += clock() - d0
                    res = replay.step(t)
                    step_keys = res.keys
                    stash: dict[int, int] = {}  # step key -> scratch index holding its bytes
                    bypass: dict[int, int] = {}  # step key -> scratch index of its bypass read
                    rank_of = {k: r for r, k in enumerate(step_keys)}
                    for adm in res.reads:
                        rank = rank_of[adm.key]
                        if adm.evicted is not None:
                            old = slot_of.pop(adm.evicted)
                            if adm.evicted in rank_of:
                                # A hit of this step chosen as the victim of an earlier-ranked
                                # miss (cache smaller than a step): keep its bytes in scratch.
                                r_v = rank_of[adm.evicted]
                                self.scratch[r_v][:] = self.slots[old]
                                stash[adm.evicted] = r_v
                                counters["stashed"] += 1
                        if adm.slot is None:
                            bypass[adm.key] = rank
                        else:
                            slot_of[adm.key] = adm.slot
                        nbytes += issue(adm.key, adm.slot, rank)
                    for adm in replay.prefetch(t):
                        if adm.evicted is not None:
                            slot_of.pop(adm.evicted, None)
                        slot_of[adm.key] = adm.slot  # type: ignore[assignment]
                        nbytes += issue(adm.key, adm.slot, 0)
                        pf_n += 1
                    reads.poll()
                    hits += res.n_hits
                    misses += res.n_misses
                    late_n += sum(res.late)
                    y = np.zeros_like(x)
                    step_comp = 0.0
                    if seed_mode:
                        # The public engine's cycle: all of the step's reads, then its FFNs.
                        w0 = clock()
                        for key in step_keys:
                            reads.wait(("bypass", key) if key in bypass else ("slot", key))
                        io_wait += clock() - w0
                    for rank, key in enumerate(step_keys):
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
                        out = compute(buf, layer, expert, x)
                        step_comp += clock() - c0
                        y += np.float32(gate_w[t, rank]) * out
                    comp += step_comp
                    x = rmsnorm(x + y)
                    it_compute.append(step_comp)
                    it_times.append(clock() - it0)
                tok_rows["start_s"].append(tok0 - t_run0)
                tok_rows["time_s"].append(clock() - tok0)
                tok_rows["io_wait_s"].append(io_wait)
                tok_rows["compute_s"].append(comp)
                tok_rows["dense_s"].append(dense_s)
                tok_rows["hits"].append(hits)
                tok_rows["misses"].append(misses)
                tok_rows["late"].append(late_n)
                tok_rows["prefetch_issued"].append(pf_n)
                tok_rows["bytes_read"].append(nbytes)
                if bar is not None:
                    bar.update(task, advance=1)  # type: ignore[arg-type]
        wall = clock() - t_run0
        reads.drain()  # background reads still in flight: let them land, outside the wall clock
        table = self.trace.token_table().iloc[:n_tokens].reset_index(drop=True)
        rows = pd.DataFrame(
            {
                "step_token": np.arange(n_tokens, dtype=np.int32),
                "seq": table["seq"].to_numpy(np.int32),
                "token": table["token"].to_numpy(np.int32),
                "phase": table["phase"].astype(str).to_numpy(),
                **{k: np.asarray(v) for k, v in tok_rows.items()},
            }
        )
        timing = {
            "wall_s": wall,
            "read_lat": read_lat,
            "it_times": it_times,
            "it_compute": it_compute,
            "hidden": x,
            **counters,
        }
        return rows, timing

    # ---- the summary -------------------------------------------------------------------
    def _summary(
        self,
        replay: Replay,
        rows: pd.DataFrame,
        timing: dict[str, Any],
        info: Any,
        direct: bool,
        fixed: bool,
        fixed_note: str,
        dense: DenseBlock | None,
    ) -> RunSummary:
        st = replay.stats
        n_tokens = len(rows)
        wall = float(timing["wall_s"])
        io_wait = float(rows["io_wait_s"].sum())
        rcfg = self.rcfg
        io_desc = f"{info.kind}{', O_DIRECT' if direct else ', buffered'}"
        hardware = (
            f"this machine ({io_desc}, queue depth {info.queue_depth}, "
            f"chunk {info.chunk_bytes >> 10} KiB, {self.cfg.threads} threads)"
        )
        cache_bytes = int(self.cache_buf.nbytes)
        scratch_bytes = int(self.scratch_buf.nbytes)
        dense_bytes = dense.resident_bytes if dense is not None else 0
        extra = {
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_before_buffers_bytes": int(self.rss_before_buffers),
            "cache_buffer_bytes": cache_bytes,
            "scratch_buffer_bytes": scratch_bytes,
            "dense_resident_bytes": int(dense_bytes),
            "slot_bytes": int(self.slot_bytes),
            "bytes_per_expert": int(self.store.bytes_per_expert),
            "expert_file": self.store_path,
            "reads": int(timing["reads"]),
            "payload_bytes": int(timing["payload_bytes"]),
            "bypass_reads": int(timing["bypass_reads"]),
            "stashed_step_victims": int(timing["stashed"]),
            "evictions": st.total("evictions"),
            "io": {
                "kind": info.kind,
                "direct": bool(direct),
                "queue_depth": info.queue_depth,
                "chunk_bytes": info.chunk_bytes,
                "fixed_buffers": bool(fixed),
                "fixed_buffers_note": fixed_note,
                "fallback_reason": info.fallback_reason,
            },
            "threads": int(self.cfg.threads),
        }
        return RunSummary.from_replay(
            kind="measured",
            replay_config=rcfg,
            stats=st,
            tokens=n_tokens,
            layers=self.n_layers,
            wall_s=wall,
            io_wait_s=io_wait,
            trace=self.trace_name,
            trace_digest=self.trace_digest,
            model=str(self.trace.meta.model),
            shape=self.shape.name,
            mode=self.cfg.mode,
            hardware=hardware,
            top_k=self.top_k,
            bytes_read=int(rows["bytes_read"].sum()),
            compute_s=float(rows["compute_s"].sum()),
            dense_s=float(rows["dense_s"].sum()),
            latency={
                "read": percentiles(timing["read_lat"]),
                "compute": percentiles(timing["it_compute"]),
                "iteration": percentiles(timing["it_times"]),
                "token": percentiles(rows["time_s"].to_numpy()),
            },
            config={"replay": rcfg.to_dict(), "engine": self.cfg.to_dict()},
            extra=extra,
        )


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr, or None when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} tokens"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        yield bar
