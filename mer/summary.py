"""The run summary that `mer simulate` and `mer run` both print.

One dataclass and one formatter, so a predicted and a measured run can be held
side by side field by field (`mer compare`). The text block follows the public
engine's run log (counts, bytes, wall, rate, per-read / compute / cycle latency
percentiles, average I/O wait and compute, I/O share) so the two read together.

Units (DESIGN.md): `tokens_per_s` counts whole-model tokens (all layers);
`layer_iterations_per_s` counts (token, layer) steps, the public engine's
"sustained_tps". Hit rate = hits / lookups; a late prefetch is a miss.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.atomic import atomic_path, write_json_atomic
from mer.errors import BadInput
from mer.guard import check_input, load_json_input, parse_json

PERCENTILES = (50, 95, 99)

#: Columns of the per-token table (`-o` parquet) both drivers write.
TOKEN_COLUMNS = {
    "step_token": "int32",  # replayed token index (0..tokens-1)
    "seq": "int32",
    "token": "int32",
    "phase": "string",
    "start_s": "float64",  # token start on the run's clock
    "time_s": "float64",  # token latency (all layers)
    "io_wait_s": "float64",  # time blocked on expert reads
    "compute_s": "float64",  # expert FFN time
    "dense_s": "float64",  # dense (attention-sized) time
    "hits": "int32",
    "misses": "int32",
    "late": "int32",
    "prefetch_issued": "int32",
    "bytes_read": "int64",
}


def percentiles(values: Any) -> dict[str, float]:
    """p50/p95/p99/max in seconds (empty input gives zeros)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["max"] = float(arr.max())
    out["mean"] = float(arr.mean())
    return out


def busy_seconds(start: np.ndarray, end: np.ndarray) -> float:
    """Length of the union of the intervals [start_i, end_i] (time with a read in flight)."""
    if len(start) == 0:
        return 0.0
    order = np.argsort(start, kind="stable")
    s = np.asarray(start, dtype=np.float64)[order]
    e = np.maximum.accumulate(np.asarray(end, dtype=np.float64)[order])
    # a new busy period starts where an interval begins after every earlier one ended
    new = np.empty(len(s), dtype=bool)
    new[0] = True
    new[1:] = s[1:] > e[:-1]
    starts = s[new]
    idx = np.flatnonzero(new)
    ends = np.append(e[idx[1:] - 1], e[-1])
    return float((ends - starts).sum())


@dataclass
class RunSummary:
    """Identity of the run, its counts, its rates and its latency distributions."""

    kind: str  # "simulated" or "measured"
    trace: str
    trace_digest: str
    model: str
    shape: str
    mode: str  # "model" (whole tokens, dense time) or "seed" (one iteration = one layer)
    policy: str
    scope: str
    cache_slots: int
    predictor: str
    pipeline_depth: int
    phase: str
    hardware: str
    tokens: int
    layers: int
    top_k: int
    hits: int
    misses: int
    hit_rate: float
    bytes_read: int
    wall_s: float
    tokens_per_s: float
    layer_iterations_per_s: float
    io_wait_s: float
    compute_s: float
    dense_s: float
    io_wait_share: float
    #: issued, used, late, wasted, unused (counts); precision, recall; the counts in bytes
    #: (issued_bytes, used_bytes, ...) and useful_bytes (used + late; see prefetch_figures)
    prefetch: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # read, compute, token, iteration
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Time with at least one read in flight (issue to landing, as the driver saw it), and
    #: the share of it the driver was not blocked on a read: read time hidden by compute.
    read_busy_s: float = 0.0
    hidden_read_share: float = 0.0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @classmethod
    def from_replay(
        cls,
        *,
        kind: str,
        replay_config: Any,  # mer.core.ReplayConfig
        stats: Any,  # mer.core.CacheStats
        tokens: int,
        layers: int,
        wall_s: float,
        io_wait_s: float,
        bytes_per_read: int = 0,
        read_busy_s: float = 0.0,
        **fields: Any,
    ) -> RunSummary:
        """The summary of a replay, with every derived figure computed here, once.

        The simulator and the engine both end with this call, so hit counts,
        prefetch counts, rates and the I/O share are defined in one place.
        Prefetch bytes are the counts times the bytes of one expert read, so
        they agree wherever the counts do (`prefetch_figures`).
        `fields` are the remaining RunSummary fields (identity, bytes, times).
        """
        hidden = 1.0 - io_wait_s / read_busy_s if read_busy_s > 0 else 0.0
        return cls(
            kind=kind,
            policy=replay_config.policy,
            scope=replay_config.scope,
            cache_slots=replay_config.cache_slots,
            predictor=replay_config.predictor,
            pipeline_depth=replay_config.pipeline_depth,
            phase=replay_config.phase,
            tokens=tokens,
            layers=layers,
            hits=stats.total("hits"),
            misses=stats.total("misses"),
            hit_rate=stats.hit_rate,
            wall_s=wall_s,
            tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
            layer_iterations_per_s=tokens * layers / wall_s if wall_s > 0 else 0.0,
            io_wait_s=io_wait_s,
            io_wait_share=io_wait_s / wall_s if wall_s > 0 else 0.0,
            prefetch=prefetch_figures(stats, bytes_per_read),
            read_busy_s=float(read_busy_s),
            hidden_read_share=min(1.0, max(0.0, hidden)),
            **fields,
        )

    def _warm_line(self) -> list[str]:
        w = self.extra.get("warm")
        if not isinstance(w, dict):
            return []
        return [
            f"steady state (after the first {w.get('warmup_tokens', 0)} tokens): hit rate "
            f"{100 * float(w.get('hit_rate', 0.0)):.2f}% of {int(w.get('hits', 0)) + int(w.get('misses', 0)):,} lookups"
        ]

    @property
    def whole_model(self) -> bool:
        """Whether tokens_per_s counts whole-model tokens: timed with the dense block
        (--mode model) over a trace of more than one layer."""
        return self.mode == "model" and self.layers > 1

    def tokens_per_s_label(self) -> str:
        """What tokens/s counts here, said where it is printed (never 'whole model' when not)."""
        if self.whole_model:
            return "tokens/s (whole model)"
        why = []
        if self.mode != "model":
            why.append(f"--mode {self.mode}: expert reads and FFNs only, no dense time")
        if self.layers <= 1:
            why.append("a 1-layer trace: one token is one layer iteration")
        return f"tokens/s (NOT whole-model: {'; '.join(why)})"

    def hit_rate_definition(self) -> str:
        """Granularity, scope and start of this hit rate (docs/policies.md, "Hit rates"):
        a step is one (token, layer) whose top-k are looked up together."""
        granularity = str(self.config.get("granularity", "step"))
        return f"{granularity} granularity, {self.scope} scope, cold start"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lookups"] = self.lookups
        d["hit_rate_definition"] = self.hit_rate_definition()
        d["tokens_per_s_whole_model"] = self.whole_model
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "run summary") -> RunSummary:
        """Build from a JSON object, checking every field's presence and type (BadInput)."""
        hint = "write one with `mer simulate` or `mer run` (--summary or --json)"
        if not isinstance(d, dict):
            raise BadInput(
                f"{where}: not a mer run summary (a JSON {type(d).__name__}, not an object); {hint}."
            )
        fields_ = cls.__dataclass_fields__
        required = [
            k for k, f in fields_.items() if f.default is MISSING and f.default_factory is MISSING
        ]  # type: ignore[misc]
        missing = [k for k in required if k not in d]
        if missing:
            shown = ", ".join(missing[:6]) + (
                f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            )
            raise BadInput(f"{where}: not a mer run summary (no {shown}); {hint}.")
        kw: dict[str, Any] = {}
        for k, f in fields_.items():
            if k not in d:
                continue
            v = d[k]
            t = str(f.type)
            ok = (
                (t == "str" and isinstance(v, str))
                or (t == "int" and isinstance(v, int) and not isinstance(v, bool))
                or (
                    t == "float"
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and not math.isnan(v)
                )
                or (t.startswith("dict") and isinstance(v, dict))
            )
            if not ok:
                raise BadInput(
                    f"{where}: field {k} must be {t.split('[')[0].replace('dict', 'an object')}, "
                    f"got {v!r:.60}; {hint}."
                )
            kw[k] = v
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        p = Path(path)
        return cls.from_dict(load_json_input(p, "run summary"), where=str(p))

    def format_text(self) -> str:
        """The text block, laid out like the public engine's run summary."""
        mib = 1 << 20
        pf = self.prefetch
        lat = self.latency
        iters = self.tokens * self.layers

        def ms(block: str, key: str) -> str:
            return f"{lat.get(block, {}).get(key, 0.0) * 1e3:.2f} ms"

        lines = [
            f"=== mer {self.kind} run: {self.trace} ({self.model}, shape {self.shape}, mode {self.mode}) ===",
            f"policy {self.policy} ({self.scope}), cache {self.cache_slots} slots, predictor {self.predictor} "
            f"(depth {self.pipeline_depth}), phase {self.phase}, hardware {self.hardware}",
            f"tokens: {self.tokens:,}   layer iterations: {iters:,}   lookups: {self.lookups:,}",
            f"hits: {self.hits:,}   misses: {self.misses:,}   hit rate: {self.hit_rate * 100:.2f}% "
            f"({self.hit_rate_definition()})",
            *self._warm_line(),
            f"prefetch: issued {pf.get('issued', 0):,}, used {pf.get('used', 0):,}, "
            f"late {pf.get('late', 0):,}, wasted {pf.get('wasted', 0):,}, "
            f"unused {pf.get('unused', 0):,}; precision {100 * pf.get('precision', 0.0):.1f}%, "
            f"recall {100 * pf.get('recall', 0.0):.1f}%",
            f"prefetch bytes: useful {pf.get('useful_bytes', 0) / mib:,.1f} MiB "
            f"(of which late {pf.get('late_bytes', 0) / mib:,.1f}), "
            f"wasted {pf.get('wasted_bytes', 0) / mib:,.1f} MiB, "
            f"unused at the end {pf.get('unused_bytes', 0) / mib:,.1f} MiB; "
            f"read time hidden behind compute: {self.hidden_read_share * 100:.1f}% of "
            f"{self.read_busy_s:.3f} s with reads in flight",
            f"bytes read: {self.bytes_read / mib:,.0f} MiB   wall: {self.wall_s:.3f} s",
            f"{self.tokens_per_s_label()}: {self.tokens_per_s:.3f}   "
            f"layer iterations/s (the seed's sustained_tps): {self.layer_iterations_per_s:.2f}",
            f"per-read latency: p50 {ms('read', 'p50')}, p95 {ms('read', 'p95')}, p99 {ms('read', 'p99')}",
            f"compute per iteration: p50 {ms('compute', 'p50')}, p95 {ms('compute', 'p95')}, p99 {ms('compute', 'p99')}",
            f"iteration (cycle) latency: p50 {ms('iteration', 'p50')}, p99 {ms('iteration', 'p99')}, max {ms('iteration', 'max')}",
            f"token latency: p50 {ms('token', 'p50')}, p95 {ms('token', 'p95')}, p99 {ms('token', 'p99')}",
            f"average per iteration: I/O wait {self.io_wait_s / max(iters, 1) * 1e3:.2f} ms, "
            f"compute {self.compute_s / max(iters, 1) * 1e3:.2f} ms, dense {self.dense_s / max(iters, 1) * 1e3:.2f} ms; "
            f"I/O share {self.io_wait_share * 100:.2f}%",
            f"average throughput: {self.bytes_read / mib / self.wall_s if self.wall_s > 0 else 0.0:.1f} MiB/s",
        ]
        return "\n".join(lines)


def trace_digest(trace: Any) -> str:
    """Content digest naming the trace a result came from (a path or a read `Trace`).

    It covers the routing rows and the geometry, never the file's bytes: the
    metadata holds the import time, so two imports of one file would otherwise
    count as different experiments (see `mer.traces.format.content_digest`).
    """
    from mer.traces.format import Trace, content_digest, read_trace

    if not isinstance(trace, Trace):
        check_input(trace, "trace")
        trace = read_trace(trace)
    return content_digest(trace)


def write_token_table(rows: pd.DataFrame, path: str | Path, summary: RunSummary) -> None:
    """Per-token parquet with the summary as file metadata (key `mer.summary`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = rows.copy()
    for col, dtype in TOKEN_COLUMNS.items():
        if col in df.columns:
            df[col] = df[col].astype(dtype)  # type: ignore[call-overload]
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta.pop(b"pandas", None)
    meta[b"mer.summary"] = json.dumps(summary.to_dict(), default=str).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_token_table(path: str | Path) -> tuple[pd.DataFrame, RunSummary | None]:
    import pyarrow.parquet as pq

    check_input(path, "per-token table")
    try:
        table = pq.read_table(path)
        df = table.to_pandas()
    except Exception as exc:
        raise BadInput(f"{path}: not a per-token parquet ({exc}).") from None
    raw = (table.schema.metadata or {}).get(b"mer.summary")
    summary = (
        RunSummary.from_dict(parse_json(raw, f"{path}: metadata 'mer.summary'"), where=str(path))
        if raw
        else None
    )
    return df, summary


def prefetch_figures(stats: Any, bytes_per_read: int = 0) -> dict[str, Any]:
    """What prefetch did, from the core's counters (one definition for both clocks).

    Every prefetch read ends one of four ways: *used* (resident when its step
    looked it up: a hit), *late* (still in flight then: the step waited for it,
    a miss with a shorter wait), *wasted* (evicted unused), or *unused* (neither
    by the end of the run); *cancelled* counts the wasted ones dropped at the
    step that routed their layer without them (`--prefetch-cancel`). precision = (used + late) / issued: the share of
    prefetch reads the router then asked for. recall = (used + late) / (used +
    misses): the share of the lookups that were not resident without prefetch
    that a prefetch had already started to read. Bytes are the counts times one
    expert's read (`bytes_per_read`); useful_bytes = used_bytes + late_bytes.
    """
    b = int(bytes_per_read)
    issued = stats.total("prefetch_issued")
    used = stats.total("prefetch_used")
    late = stats.total("late")
    wasted = stats.total("prefetch_wasted")
    # of the wasted, those dropped at their step (`--prefetch-cancel`); older results lack it
    cancelled = stats.total("prefetch_cancelled") if hasattr(stats, "prefetch_cancelled") else 0
    misses = stats.total("misses")
    unused = max(0, issued - used - late - wasted)
    need = used + misses
    return {
        "issued": issued,
        "used": used,
        "late": late,
        "wasted": wasted,
        "cancelled": cancelled,
        "unused": unused,
        "precision": (used + late) / issued if issued else 0.0,
        "recall": (used + late) / need if need else 0.0,
        "issued_bytes": issued * b,
        "used_bytes": used * b,
        "useful_bytes": (used + late) * b,
        "late_bytes": late * b,
        "wasted_bytes": wasted * b,
        "unused_bytes": unused * b,
    }


#: Default steady-state window: 32 tokens, at most half of the run.
DEFAULT_WARMUP_TOKENS = 32


def warm_figures(tokens: Any, warmup_tokens: int | None = None) -> dict[str, Any]:
    """Hit rate in the steady state: the lookups after the first `warmup_tokens` tokens.

    `tokens` is a run's per-token table (columns hits, misses), the simulator's or the
    engine's. Default window: 32 tokens, at most half of the run. The cold hit rate
    (every lookup from an empty cache) is the summary's own `hit_rate`.
    """
    n = len(tokens)
    w = min(DEFAULT_WARMUP_TOKENS, n // 2) if warmup_tokens is None else min(warmup_tokens, n)
    hits = int(tokens["hits"].to_numpy()[w:].sum()) if n else 0
    misses = int(tokens["misses"].to_numpy()[w:].sum()) if n else 0
    look = hits + misses
    return {
        "warmup_tokens": int(w),
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / look if look else 0.0,
    }
