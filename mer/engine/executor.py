"""The executor: a trace replayed on real expert weights, real reads and real compute.

Every decision (hit, miss, victim, slot, prefetch) comes from the shared
decision core (`mer.core.replay.Replay`), the same code the simulator drives;
the streaming of the routed experts (slots, reads, waits, FFNs) is
`mer.engine.streaming.ExpertStreamer`, the same code the real decoder
(`mer generate`) drives. This module only owns what a trace replay adds. Per
step (token, layer):

1. dense: the resident attention-sized block runs on the hidden vector
   (`--mode model`; `--mode seed` skips it and, as the public engine's cycle
   and the simulator's seed mode, waits for all of a step's reads before its
   FFNs).
2. the streamer's step: lookups, demand reads, prefetches, waits, the top-k
   SwiGLU FFNs combined with the trace's gate weights (uniform when the trace
   has none).
3. the hidden vector is carried on, normalised: x = rmsnorm(x + y).

Memory stays at cache + scratch + dense + a fixed working set (peak RSS is
measured and reported).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from mer.core.replay import Replay, ReplayConfig
from mer.engine.dense import DenseBlock, rmsnorm
from mer.engine.expert_types import make_expert_ffn
from mer.engine.streaming import (
    EngineConfig,
    ExpertStreamer,
    current_rss_bytes,
    driver_priority,
    peak_rss_bytes,
    thread_cpu_wait_s,
)
from mer.errors import BadInput
from mer.summary import RunSummary, busy_seconds, percentiles, warm_figures

F32 = npt.NDArray[np.float32]
MODES = ("model", "seed")
TOKEN_TIMES = (
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

__all__ = [
    "EngineConfig",
    "Executor",
    "RunResult",
    "TokenRows",
    "check_geometry",
    "current_rss_bytes",
    "initial_hidden",
    "peak_rss_bytes",
]


@dataclass
class RunResult:
    summary: RunSummary
    tokens: pd.DataFrame  # TOKEN_COLUMNS, one row per replayed token
    hidden: F32  # the hidden vector after the last step (the data flow's end point)


def initial_hidden(d_model: int, seed: int) -> F32:
    """The hidden vector the run starts from: seeded, normalised."""
    rng = np.random.default_rng(seed)
    return rmsnorm(rng.standard_normal(d_model).astype(np.float32))


def check_geometry(trace: Any, store: Any, where_trace: str, where_store: str) -> None:
    """The trace's layers and experts must be the expert file's, or the keys mean nothing."""
    if (trace.n_layers, trace.n_experts) != (store.n_layers, store.n_experts):
        raise BadInput(
            f"trace {where_trace} routes over {trace.n_layers} layers x {trace.n_experts} experts, "
            f"but the expert file {where_store} holds {store.n_layers} layers x "
            f"{store.n_experts} experts; synthesise a matching file (`mer experts synth --shape "
            f"NAME`, a shape with {trace.n_layers}x{trace.n_experts}) or use a trace of this model."
        )


class TokenRows:
    """Per-token accumulators of a run (the `-o` table's timing and count columns)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {c: [] for c in TOKEN_TIMES}
        self.it_times: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self.io_wait = self.compute = self.dense = 0.0
        self.hits = self.misses = self.late = self.pf = self.nbytes = 0

    def add_step(self, outcome: Any, iteration_s: float) -> None:
        self.io_wait += outcome.io_wait_s
        self.compute += outcome.compute_s
        self.hits += outcome.hits
        self.misses += outcome.misses
        self.late += outcome.late
        self.pf += outcome.prefetch_issued
        self.nbytes += outcome.bytes_read
        self.it_times.append(iteration_s)

    def end_token(self, start_s: float, time_s: float) -> None:
        c = self.cols
        for name, value in (
            ("start_s", start_s),
            ("time_s", time_s),
            ("io_wait_s", self.io_wait),
            ("compute_s", self.compute),
            ("dense_s", self.dense),
            ("hits", self.hits),
            ("misses", self.misses),
            ("late", self.late),
            ("prefetch_issued", self.pf),
            ("bytes_read", self.nbytes),
        ):
            c[name].append(value)
        self._reset()

    def frame(self, seq: Any, token: Any, phase: Any) -> pd.DataFrame:
        n = len(self.cols["time_s"])
        return pd.DataFrame(
            {
                "step_token": np.arange(n, dtype=np.int32),
                "seq": np.asarray(seq, dtype=np.int32),
                "token": np.asarray(token, dtype=np.int32),
                "phase": np.asarray(phase, dtype=str),
                **{k: np.asarray(v) for k, v in self.cols.items()},
            }
        )


def measured_summary(
    streamer: ExpertStreamer,
    rows: pd.DataFrame,
    it_times: list[float],
    wall_s: float,
    **fields: Any,
) -> RunSummary:
    """The RunSummary of a measured run (trace replay or decoder): one definition for both."""
    replay = streamer.replay
    extra = {**streamer.extra(), **fields.pop("extra", {})}
    extra["warm"] = warm_figures(rows, extra.pop("warmup_tokens", None))
    span = np.asarray(streamer.read_span, dtype=np.float64).reshape(-1, 2)
    iters = len(it_times)
    accounted = float(rows[["io_wait_s", "compute_s", "dense_s"]].to_numpy().sum())
    tok_over = (
        rows["time_s"].to_numpy()
        - rows[["io_wait_s", "compute_s", "dense_s"]].to_numpy().sum(axis=1)
        if len(rows)
        else np.zeros(0)
    )
    tok_reads = (
        rows["misses"].to_numpy() - rows["late"].to_numpy() + rows["prefetch_issued"].to_numpy()
        if len(rows)
        else np.zeros(0)
    )
    extra["driver_time"] = {
        **extra.get("driver_time", {}),
        "steps": iters,
        # per-step time outside reads, FFNs and dense: lookups, submissions, bookkeeping
        "overhead_s": float(np.sum(it_times)) - accounted,
        # per token: that time and the reads issued, so calibration can tell the part
        # that grows with the reads (submitting, reaping) from the part per step
        "token_overhead_s": [float(v) for v in tok_over],
        "token_reads": [int(v) for v in tok_reads],
    }
    return RunSummary.from_replay(
        kind="measured",
        replay_config=replay.config,
        stats=replay.stats,
        tokens=len(rows),
        layers=replay.n_layers,
        wall_s=wall_s,
        io_wait_s=float(rows["io_wait_s"].sum()),
        # prefetch bytes: counts times one read of the file's most common plan (the simulator's)
        bytes_per_read=int(sum(extra.get("read_ranges") or [streamer.store.slot_bytes])),
        read_busy_s=busy_seconds(span[:, 0], span[:, 1]),
        hardware=streamer.hardware(),
        top_k=replay.top_k,
        bytes_read=int(rows["bytes_read"].sum()),
        compute_s=float(rows["compute_s"].sum()),
        dense_s=float(rows["dense_s"].sum()),
        latency={
            "read": percentiles(streamer.read_lat),
            "compute": percentiles(streamer.it_compute),
            "iteration": percentiles(it_times),
            "token": percentiles(rows["time_s"].to_numpy()),
        },
        extra=extra,
        **fields,
    )


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

    def run(self) -> RunResult:
        cfg = self.cfg
        replay = Replay.from_trace(self.trace, self.rcfg)
        weights = self.trace.weights()
        n_tokens = self.trace.n_tokens
        L, K = self.n_layers, self.top_k
        if weights is None:
            gate_w = np.full((n_tokens * L, K), 1.0 / K, dtype=np.float32)
        else:
            gate_w = weights.reshape(-1, K).astype(np.float32)
        threads = max(1, int(cfg.threads))
        ffn = make_expert_ffn(
            getattr(self.store, "expert_dtype", "Q4_0"), self.shape, threads, cfg.ffn
        )
        dense = (
            DenseBlock(self.shape, seed=cfg.seed + 1, threads=threads, kernel=ffn)
            if cfg.mode == "model"
            else None
        )
        acc = TokenRows()
        x = initial_hidden(self.shape.d_model, cfg.seed)
        clock = time.perf_counter
        try:
            with ExpertStreamer(
                self.store, replay, cfg, ffn=ffn, seed_cycle=cfg.mode == "seed"
            ) as streamer:
                progress = _progress(cfg.progress, n_tokens)
                with driver_priority(cfg.realtime) as priority, progress as bar:
                    t_run0 = clock()
                    cpu_wait0 = thread_cpu_wait_s()
                    task = bar.add_task("mer run", total=n_tokens) if bar is not None else None
                    for ti in range(n_tokens):
                        tok0 = clock()
                        for layer in range(L):
                            t = ti * L + layer
                            it0 = clock()
                            if dense is not None:
                                d0 = clock()
                                x = dense(layer, x)
                                acc.dense += clock() - d0
                            y, outcome = streamer.step(t, x, gate_w[t])
                            x = rmsnorm(x + y)
                            acc.add_step(outcome, clock() - it0)
                        acc.end_token(tok0 - t_run0, clock() - tok0)
                        if bar is not None:
                            bar.update(task, advance=1)  # type: ignore[arg-type]
                    wall = clock() - t_run0
                    # the driver's time runnable but off a core: what a loaded machine adds
                    streamer.timing["cpu_wait_s"] = thread_cpu_wait_s() - cpu_wait0
                streamer.drain()  # background reads still in flight: outside the wall clock
        finally:
            ffn.close()
        table = self.trace.token_table().iloc[:n_tokens].reset_index(drop=True)
        rows = acc.frame(table["seq"], table["token"], table["phase"].astype(str))
        summary = measured_summary(
            streamer,
            rows,
            acc.it_times,
            wall,
            trace=self.trace_name,
            trace_digest=self.trace_digest,
            model=str(self.trace.meta.model),
            shape=self.shape.name,
            mode=self.cfg.mode,
            config={"replay": self.rcfg.to_dict(), "engine": self.cfg.to_dict()},
            extra={
                "dense_resident_bytes": int(dense.resident_bytes if dense is not None else 0),
                "expert_file": self.store_path,
                "driver_priority": priority,
            },
        )
        return RunResult(summary, rows, x)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str = "tokens") -> Iterator[Any]:
    """A rich progress bar on stderr, or None when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + label),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        yield bar
