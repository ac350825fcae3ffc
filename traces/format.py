"""Trace format v1: one parquet file, one row per routed expert.

The trace is the contract between every part of mer (see DESIGN.md), so this
module is the only place that knows the on-disk layout. Readers always validate:
a bad file is reported once, naming the file and the first offending rows, as a
`TraceError` (a `BadInput`, exit code 2 in the CLI), never as a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mer.atomic import atomic_path
from mer.errors import BadInput
from mer.guard import check_input

SCHEMA_VERSION = 1
META_KEY = b"mer.trace"
LOGITS_META_KEY = b"mer.trace.logits"
PHASES = ("prefill", "decode")
WEIGHT_SUM_TOL = 1e-3

COLUMNS: dict[str, pa.DataType] = {
    "seq": pa.int32(),
    "token": pa.int32(),
    "phase": pa.dictionary(pa.int8(), pa.string()),
    "layer": pa.int16(),
    "rank": pa.int8(),
    "expert": pa.int16(),
    "weight": pa.float32(),
    "lookahead": pa.int16(),
}
NULLABLE = {"weight", "lookahead"}
ARROW_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=name in NULLABLE) for name, typ in COLUMNS.items()]
)
SORT_KEYS = ["seq", "token", "layer", "rank"]
_INT_TARGETS = {
    "seq": "int32",
    "token": "int32",
    "layer": "int16",
    "rank": "int8",
    "expert": "int16",
}
# float32 rounding of a normalised weight may land a hair above 1.
WEIGHT_BOUND_TOL = 1e-6
# What the columns' types hold (expert int16, rank int8), and the key space mer replays.
MAX_LAYERS = 1 << 15
MAX_EXPERTS = 1 << 15
MAX_TOP_K = 127
MAX_KEYS = 1 << 22


class TraceError(BadInput):
    """A trace file or frame that breaks format v1."""


@dataclass
class TraceMeta:
    """File-level metadata, stored as JSON under the parquet key `mer.trace`."""

    model: str
    n_layers: int
    n_experts: int
    top_k: int
    source: dict[str, Any] = field(default_factory=dict)
    provenance: str | None = None
    licence: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    # Anything else a producer wants to keep (e.g. experts_per_layer for flat seed ids).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "trace") -> TraceMeta:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceError(f"{where}: metadata 'mer.trace' is not valid JSON ({exc}).") from None
        except RecursionError:
            raise TraceError(f"{where}: metadata 'mer.trace' is nested too deeply.") from None
        if not isinstance(raw, dict):
            raise TraceError(f"{where}: metadata 'mer.trace' must be a JSON object.")
        version = raw.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise TraceError(f"{where}: metadata has no integer schema_version (got {version!r}).")
        if version < 1:
            raise TraceError(f"{where}: metadata schema_version must be >= 1, got {version}.")
        if version > SCHEMA_VERSION:
            raise TraceError(
                f"{where}: trace schema_version {version} is newer than this mer understands "
                f"({SCHEMA_VERSION}); upgrade mer to read it."
            )
        missing = [k for k in ("model", "n_layers", "n_experts", "top_k") if k not in raw]
        if missing:
            raise TraceError(f"{where}: metadata lacks {', '.join(missing)}.")
        for name, hi in (
            ("n_layers", MAX_LAYERS),
            ("n_experts", MAX_EXPERTS),
            ("top_k", MAX_TOP_K),
        ):
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(
                    f"{where}: metadata {name} must be a positive integer, got {value!r}."
                )
            if value > hi:
                raise TraceError(
                    f"{where}: metadata {name} is {value:,}, more than format v1 holds ({hi:,}); "
                    "the file is corrupt or not a router trace."
                )
        if raw["n_layers"] * raw["n_experts"] > MAX_KEYS:
            raise TraceError(
                f"{where}: metadata n_layers x n_experts is {raw['n_layers'] * raw['n_experts']:,}, "
                f"more than mer replays ({MAX_KEYS:,} expert keys)."
            )
        if not isinstance(raw["model"], str):
            raise TraceError(f"{where}: metadata model must be a string, got {raw['model']!r}.")
        for name in ("source", "extra"):
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise TraceError(
                    f"{where}: metadata {name} must be a JSON object, got "
                    f"{type(raw[name]).__name__}."
                )
        for name in ("provenance", "licence", "created"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise TraceError(
                    f"{where}: metadata {name} must be a string, got {type(raw[name]).__name__}."
                )
        known = {f for f in cls.__dataclass_fields__}
        extra = dict(raw.get("extra") or {})
        extra.update({k: v for k, v in raw.items() if k not in known})
        kwargs = {k: v for k, v in raw.items() if k in known and k != "extra" and v is not None}
        meta = cls(**kwargs, extra=extra)
        if meta.top_k > meta.n_experts:
            raise TraceError(f"{where}: metadata top_k {meta.top_k} > n_experts {meta.n_experts}.")
        epl = meta.extra.get("experts_per_layer")
        if epl is not None and (isinstance(epl, bool) or not isinstance(epl, int) or epl < 1):
            raise TraceError(
                f"{where}: metadata extra.experts_per_layer must be a positive integer, "
                f"got {epl!r}."
            )
        return meta


class Trace:
    """A validated trace: the tidy DataFrame, its metadata and replay arrays.

    Rows are kept sorted by (seq, token, layer, rank), which is replay order.
    The numpy views are built once, lazily, because replays call them in loops.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        meta: TraceMeta,
        logits: np.ndarray | None = None,
        name: str = "trace",
        validate: bool = True,
    ) -> None:
        self.name = name
        if validate:
            # The same checks as a file's metadata: a producer's TraceMeta is no more trusted.
            TraceMeta.from_json(meta.to_json(), name)
        self.meta = meta
        self.df = _normalise_frame(df, name)
        self.logits = logits
        if validate:
            validate_frame(self.df, meta, name)
        self._experts: np.ndarray | None = None

    # -- shape -----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.meta.n_layers

    @property
    def n_experts(self) -> int:
        return self.meta.n_experts

    @property
    def top_k(self) -> int:
        return self.meta.top_k

    @property
    def n_tokens(self) -> int:
        return len(self.df) // (self.n_layers * self.top_k)

    @property
    def n_lookups(self) -> int:
        return len(self.df)

    # -- replay views ------------------------------------------------------------
    def _grid(self, column: str, dtype: Any, fill: Any = None) -> np.ndarray:
        values = (
            self.df[column].to_numpy(dtype=dtype, na_value=fill)
            if fill is not None
            else self.df[column].to_numpy(dtype=dtype)
        )
        return values.reshape(self.n_tokens, self.n_layers, self.top_k)

    @property
    def experts(self) -> np.ndarray:
        """int16 array (tokens, layers, top_k) of local expert ids, replay order."""
        if self._experts is None:
            self._experts = self._grid("expert", np.int16)
            self._experts.setflags(write=False)
        return self._experts

    def keys(self) -> np.ndarray:
        """int32 array (tokens, layers, top_k) of global keys layer * n_experts + expert."""
        layer = np.arange(self.n_layers, dtype=np.int32)[None, :, None]
        return layer * self.n_experts + self.experts.astype(np.int32)

    def weights(self) -> np.ndarray | None:
        """float32 (tokens, layers, top_k) gate weights, or None if the source lacks them."""
        if self.df["weight"].isna().any():
            return None
        return self._grid("weight", np.float32)

    def lookahead(self) -> np.ndarray | None:
        """int16 (tokens, layers, top_k) recorded lookahead experts, or None.

        None unless every row has one: replay turns these into cache keys, so a
        partial prediction must not pass for a whole one.
        """
        if self.df["lookahead"].isna().any():
            return None
        return self._grid("lookahead", np.int16)

    def token_table(self) -> pd.DataFrame:
        """One row per replayed token: seq, token, phase (replay order)."""
        first = self.df.iloc[:: self.n_layers * self.top_k]
        return first[["seq", "token", "phase"]].reset_index(drop=True)

    def phase_mask(self, phase: str) -> np.ndarray:
        """Boolean mask over replayed tokens for --phase prefill|decode|all."""
        phases = self.token_table()["phase"].astype(str).to_numpy()
        if phase == "all":
            return np.ones(len(phases), dtype=bool)
        if phase not in PHASES:
            raise BadInput(f"--phase must be prefill, decode or all, got {phase!r}.")
        return phases == phase

    def select_phase(self, phase: str) -> Trace:
        """A trace restricted to one phase (replay commands start from it)."""
        if phase == "all":
            return self
        mask = self.df["phase"].astype(str) == phase
        if not mask.any():
            raise BadInput(f"{self.name}: no {phase} tokens in this trace; use --phase all.")
        logits = None
        if self.logits is not None:
            logits = np.asarray(self.logits).reshape(self.n_tokens, self.n_layers, -1)
            logits = logits[self.phase_mask(phase)]
        return Trace(
            self.df[mask.to_numpy()].reset_index(drop=True),
            self.meta,
            logits,
            self.name,
            validate=False,
        )

    def head(self, n_tokens: int) -> Trace:
        """The first n tokens in replay order (for quick runs)."""
        rows = n_tokens * self.n_layers * self.top_k
        logits = None
        if self.logits is not None:
            logits = np.asarray(self.logits).reshape(self.n_tokens, self.n_layers, -1)[:n_tokens]
        return Trace(
            self.df.iloc[:rows].reset_index(drop=True), self.meta, logits, self.name, validate=False
        )

    def __repr__(self) -> str:
        return (
            f"Trace({self.name!r}, model={self.meta.model!r}, tokens={self.n_tokens}, "
            f"layers={self.n_layers}, experts={self.n_experts}, top_k={self.top_k})"
        )


# -- construction ------------------------------------------------------------------


def from_arrays(
    experts: np.ndarray,
    meta: TraceMeta,
    *,
    weights: np.ndarray | None = None,
    lookahead: np.ndarray | None = None,
    seq: np.ndarray | None = None,
    token: np.ndarray | None = None,
    phase: np.ndarray | list[str] | None = None,
    name: str = "trace",
) -> Trace:
    """Build a trace from a (tokens, layers, top_k) expert array.

    `seq`, `token`, `phase` are per replayed token (length tokens); defaults are
    one sequence of decode tokens numbered from 0.
    """
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise TraceError(
            f"{name}: experts must have shape (tokens, layers, top_k), got {experts.shape}."
        )
    t, n_layers, k = experts.shape
    if (n_layers, k) != (meta.n_layers, meta.top_k):
        raise TraceError(
            f"{name}: experts array has {n_layers} layers x top-{k}, metadata says "
            f"{meta.n_layers} x top-{meta.top_k}."
        )
    per_token = n_layers * k
    seq_arr = np.zeros(t, np.int32) if seq is None else np.asarray(seq, np.int32)
    tok_arr = np.arange(t, dtype=np.int32) if token is None else np.asarray(token, np.int32)
    ph = (
        np.array(["decode"] * t, dtype=object) if phase is None else np.asarray(phase, dtype=object)
    )
    data = {
        "seq": np.repeat(seq_arr, per_token),
        "token": np.repeat(tok_arr, per_token),
        "phase": np.repeat(_phase_categorical(pd.Series(ph), name), per_token),
        "layer": np.tile(np.repeat(np.arange(n_layers, dtype=np.int16), k), t),
        "rank": np.tile(np.arange(k, dtype=np.int8), t * n_layers),
        "expert": experts.reshape(-1).astype(np.int16),
        "weight": _nullable(
            np.asarray(weights, np.float32).reshape(-1) if weights is not None else None,
            np.float32,
            t * per_token,
        ),
        "lookahead": _nullable(
            np.asarray(lookahead).reshape(-1) if lookahead is not None else None,
            np.int16,
            t * per_token,
        ),
    }
    return Trace(pd.DataFrame(data), meta, name=name)


def _normalise_frame(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Cast to the v1 dtypes and sort into replay order (without judging values)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TraceError(
            f"{where}: missing column(s) {', '.join(missing)}; format v1 needs "
            f"{', '.join(COLUMNS)} (see docs/trace-format.md)."
        )
    out = pd.DataFrame(index=range(len(df)))
    for name in ("seq", "token", "layer", "rank", "expert"):
        col = df[name]
        if col.isna().any():
            bad = np.flatnonzero(col.isna().to_numpy())[:5].tolist()
            raise TraceError(
                f"{where}: column {name!r} has nulls (rows {bad}); every row needs a value there."
            )
        if not pd.api.types.is_integer_dtype(col.dtype):
            raise TraceError(f"{where}: column {name!r} must be integer, found {col.dtype}.")
        target = np.dtype(_INT_TARGETS[name])
        values = col.to_numpy(dtype=np.int64)
        info = np.iinfo(target)
        over = (values < info.min) | (values > info.max)
        if over.any():
            rows = np.flatnonzero(over)[:5].tolist()
            raise TraceError(
                f"{where}: column {name!r} has values outside the {target} range "
                f"(rows {rows}, e.g. {values[rows[0]]})."
            )
        out[name] = values.astype(target)
    out["phase"] = _phase_categorical(df["phase"], where)
    weight = df["weight"]
    if not (pd.api.types.is_float_dtype(weight.dtype) or weight.isna().all()):
        raise TraceError(f"{where}: column 'weight' must be float, found {weight.dtype}.")
    wv = weight.to_numpy(dtype=np.float64, na_value=np.nan)
    out["weight"] = pd.arrays.FloatingArray(wv.astype(np.float32), np.isnan(wv))
    la = df["lookahead"]
    if not (pd.api.types.is_integer_dtype(la.dtype) or la.isna().all()):
        raise TraceError(f"{where}: column 'lookahead' must be integer, found {la.dtype}.")
    la_mask = la.isna().to_numpy(dtype=bool)
    lv = la.to_numpy(dtype=np.int64, na_value=0) if len(la) else np.zeros(0, np.int64)
    info = np.iinfo(np.int16)
    over = (lv < info.min) | (lv > info.max)
    if over.any():
        rows = np.flatnonzero(over)[:5].tolist()
        raise TraceError(
            f"{where}: column 'lookahead' has values outside the int16 range (rows {rows})."
        )
    out["lookahead"] = pd.arrays.IntegerArray(lv.astype(np.int16), la_mask)
    out = out[list(COLUMNS)]
    if not _is_sorted(out):
        out = out.sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)
    return out


def _is_sorted(df: pd.DataFrame) -> bool:
    """Whether rows are already in (seq, token, layer, rank) order (the usual case)."""
    if len(df) < 2:
        return True
    eq = np.ones(len(df) - 1, bool)  # row i+1 == row i on the keys compared so far
    lt_any = np.zeros(len(df) - 1, bool)
    for k in SORT_KEYS:
        v = df[k].to_numpy()
        a, b = v[:-1], v[1:]
        lt_any |= eq & (b < a)
        eq &= b == a
    return not lt_any.any()


def _nullable(values: np.ndarray | None, dtype: Any, n: int) -> Any:
    """A pandas masked array (Float32 / Int16), all null when values is None."""
    if values is None:
        data, mask = np.zeros(n, dtype), np.ones(n, bool)
    else:
        data, mask = values.astype(dtype), np.zeros(n, bool)
    if np.dtype(dtype).kind == "f":
        return pd.arrays.FloatingArray(data, mask)
    return pd.arrays.IntegerArray(data, mask)


def _phase_categorical(col: pd.Series, where: str) -> Any:
    """The phase column as a Categorical over PHASES, via codes (fast on large traces)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in col.cat.categories]
        lut = np.array([PHASES.index(c) if c in PHASES else -1 for c in cats] + [-1], np.int8)
        codes = lut[col.cat.codes.to_numpy()]  # code -1 (null) picks the trailing -1
    else:
        text = col.astype("string").fillna("")
        codes = np.full(len(col), -1, np.int8)
        for i, name in enumerate(PHASES):
            codes[(text == name).to_numpy(dtype=bool)] = i
    bad = codes < 0
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise TraceError(f"{where}: column 'phase' must be 'prefill' or 'decode' (rows {rows}).")
    return pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(list(PHASES)))


# -- validation --------------------------------------------------------------------


def _fail(where: str, what: str, rows: pd.DataFrame, fix: str) -> TraceError:
    shown = rows.head(5)[
        [c for c in ("seq", "token", "layer", "rank", "expert", "weight") if c in rows.columns]
    ]
    return TraceError(
        f"{where}: {what}; first offending rows:\n{shown.to_string(index=False)}\n{fix}"
    )


def _adjacent_duplicates(df: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Rows equal to a neighbour on `keys` (df sorted by them): like duplicated(keep=False)."""
    n = len(df)
    same_next = np.ones(max(n - 1, 0), bool)
    for k in keys:
        v = df[k].to_numpy()
        same_next &= v[1:] == v[:-1]
    out = np.zeros(n, bool)
    out[:-1] |= same_next
    out[1:] |= same_next
    return out


def validate_frame(df: pd.DataFrame, meta: TraceMeta, where: str = "trace") -> None:
    """Check a normalised frame against its metadata; raise TraceError on the first problem."""
    if len(df) == 0:
        raise TraceError(
            f"{where}: the trace is empty (no rows); record or import some routing first."
        )
    bad = df[(df["expert"] < 0) | (df["expert"] >= meta.n_experts)]
    if len(bad):
        raise _fail(
            where,
            f"expert outside 0..{meta.n_experts - 1}",
            bad,
            "Check n_experts in the metadata or the source ids.",
        )
    bad = df[(df["layer"] < 0) | (df["layer"] >= meta.n_layers)]
    if len(bad):
        raise _fail(
            where, f"layer outside 0..{meta.n_layers - 1}", bad, "Check n_layers in the metadata."
        )
    bad = df[(df["rank"] < 0) | (df["rank"] >= meta.top_k)]
    if len(bad):
        raise _fail(
            where,
            f"rank outside 0..{meta.top_k - 1} (top_k mismatch)",
            bad,
            "top_k in the metadata must match the rows.",
        )
    dup = _adjacent_duplicates(df, SORT_KEYS)
    if dup.any():
        raise _fail(
            where,
            "duplicate (seq, token, layer, rank)",
            df[dup],
            "Each routed expert must appear once.",
        )
    # Completeness: every (seq, token) must have all layers x ranks.
    per_token = meta.n_layers * meta.top_k
    counts = df.groupby(["seq", "token"], sort=False, observed=True).size()
    short = counts[counts != per_token]
    if len(short):
        seq, tok = short.index[0]
        rows = df[(df["seq"] == seq) & (df["token"] == tok)]
        have = set(zip(rows["layer"].tolist(), rows["rank"].tolist(), strict=True))
        gaps = [
            (ly, r) for ly in range(meta.n_layers) for r in range(meta.top_k) if (ly, r) not in have
        ]
        raise _fail(
            where,
            f"token (seq {seq}, token {tok}) is missing (layer, rank) {gaps[:5]} "
            f"({len(short)} incomplete token(s) in all)",
            rows,
            "Every token needs all layers and all top_k ranks; drop incomplete tokens when importing.",
        )
    # Complete and sorted now: each (token, layer) is top_k consecutive rows.
    ex = np.sort(df["expert"].to_numpy().reshape(-1, meta.top_k), axis=1)
    same = (ex[:, 1:] == ex[:, :-1]).any(axis=1)
    dup_e = np.repeat(same, meta.top_k)
    if dup_e.any():
        raise _fail(
            where,
            "the same expert twice in one (token, layer)",
            df[dup_e],
            "Top-k experts must be distinct.",
        )
    w = df["weight"]
    has_w = w.notna()
    if has_w.any():
        if not has_w.all():
            raise _fail(
                where,
                "weights present on some rows and null on others",
                df[~has_w.to_numpy()],
                "Give weights for all rows or none.",
            )
        wv = w.to_numpy(dtype=np.float64)
        bad_w = (wv < 0) | (wv > 1 + WEIGHT_BOUND_TOL) | ~np.isfinite(wv)
        if bad_w.any():
            raise _fail(
                where,
                "weight outside [0, 1]",
                df[bad_w],
                "Gate weights must be normalised probabilities.",
            )
        sums = wv.reshape(-1, meta.top_k).sum(axis=1)
        off = np.abs(sums - 1.0) > WEIGHT_SUM_TOL
        if off.any():
            first = int(np.flatnonzero(off)[0])
            rows = df.iloc[first * meta.top_k : (first + 1) * meta.top_k]
            raise _fail(
                where,
                f"weights of a (token, layer) sum to {sums[first]:.4f}, not 1 "
                f"({int(off.sum())} such groups)",
                rows,
                "Normalise the top-k gate weights per (token, layer).",
            )
    la = df["lookahead"]
    has_la = la.notna()
    if has_la.any():
        lv = la.to_numpy(dtype=np.float64, na_value=np.nan)
        bad_la = has_la.to_numpy() & ((lv < 0) | (lv >= meta.n_experts))
        if bad_la.any():
            raise _fail(
                where,
                f"lookahead outside 0..{meta.n_experts - 1}",
                df[bad_la],
                "Lookahead is a local expert id.",
            )
    # Within a sequence, prompt (prefill) tokens come before generated (decode) ones.
    tt = df.iloc[::per_token].reset_index(drop=True)
    is_decode = (tt["phase"].astype(str) == "decode").astype(np.int8)
    seen_decode = is_decode.groupby(tt["seq"]).cummax().to_numpy(dtype=bool)
    late = seen_decode & ~is_decode.to_numpy(dtype=bool)
    if late.any():
        rows = tt[late]
        seq = int(rows["seq"].iloc[0])
        raise _fail(
            where,
            f"prefill token after a decode token in seq {seq}",
            rows,
            "Prompt tokens come first in a sequence.",
        )


# -- identity ----------------------------------------------------------------------

DIGEST_COLUMNS = ("seq", "token", "phase", "layer", "rank", "expert", "weight", "lookahead")


def content_digest(trace: Trace) -> str:
    """A 16-hex-digit digest of what a replay sees: the routing rows and the geometry.

    Two files with the same routing have the same digest whatever their creation
    time, source, provenance or model name (those are metadata about the rows,
    and `mer compare` checks the model separately), so re-importing a file names
    the same experiment and a resumed sweep skips what it already ran.
    """
    import hashlib

    h = hashlib.sha256()
    m = trace.meta
    h.update(f"mer-trace-v1 {m.n_layers} {m.n_experts} {m.top_k} {len(trace.df)}\n".encode())
    df = trace.df
    for name in DIGEST_COLUMNS:
        col = df[name]
        h.update(name.encode())
        if name == "phase":
            h.update(np.ascontiguousarray(col.cat.codes.to_numpy(dtype=np.int8)).tobytes())
            continue
        if name in NULLABLE:
            mask = col.isna().to_numpy(dtype=bool)
            h.update(np.packbits(mask).tobytes())
            h.update(col.to_numpy(dtype=np.float64, na_value=0.0).tobytes())
        else:
            h.update(np.ascontiguousarray(col.to_numpy(dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


# -- I/O ---------------------------------------------------------------------------


def write_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write atomically; returns the path.

    Router logits, when present, go in an optional list column `logits` filled
    on rank-0 rows only, so they are stored once per (seq, token, layer).
    """
    path = Path(path)
    table = pa.Table.from_pandas(trace.df, schema=ARROW_SCHEMA, preserve_index=False)
    if trace.logits is not None:
        logits = np.asarray(trace.logits, np.float32).reshape(-1, trace.n_experts)
        if len(logits) * trace.top_k != len(trace.df):
            raise TraceError(
                f"{trace.name}: logits have {len(logits)} rows, expected one per (token, layer)."
            )
        k = trace.top_k
        offsets = np.zeros(len(trace.df) + 1, np.int32)
        sizes = np.zeros(len(trace.df), np.int32)
        sizes[::k] = trace.n_experts
        offsets[1:] = np.cumsum(sizes)
        mask = np.ones(len(trace.df), bool)
        mask[::k] = False
        arr = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(logits.reshape(-1)), mask=pa.array(mask)
        )
        table = table.append_column(pa.field("logits", pa.list_(pa.float32()), nullable=True), arr)
    metadata = dict(table.schema.metadata or {})
    metadata.pop(b"pandas", None)
    metadata[META_KEY] = trace.meta.to_json().encode()
    table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:  # permissions: the umask's, like open() (mer.atomic)
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_meta(path: str | os.PathLike[str]) -> TraceMeta:
    """Only the metadata (cheap: reads the footer)."""
    where = str(path)
    try:
        check_input(path, "trace")
    except BadInput as exc:
        raise TraceError(str(exc)) from None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TraceError(f"{where}: not a parquet file ({exc}).") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(
            f"{where}: parquet file has no 'mer.trace' metadata; it is not a mer trace."
        )
    return TraceMeta.from_json(raw, where)


def _read_logits(table: pa.Table, meta: TraceMeta, where: str) -> np.ndarray:
    """(tokens, layers, n_experts) logits in replay order, from the rank-0 rows."""
    if not pa.types.is_list(table.schema.field("logits").type) and not pa.types.is_large_list(
        table.schema.field("logits").type
    ):
        raise TraceError(f"{where}: column 'logits' must be a list of floats.")
    missing = [k for k in SORT_KEYS if k not in table.column_names]
    if missing:
        raise TraceError(f"{where}: missing column(s) {', '.join(missing)}.")
    # Replay order, whatever order the writer used.
    table = table.sort_by([(k, "ascending") for k in SORT_KEYS])
    col = table.column("logits").combine_chunks()
    rank0 = np.asarray(table.column("rank").combine_chunks()) == 0
    present = np.asarray(col.is_valid())
    if not np.array_equal(present, rank0):
        rows = np.flatnonzero(present != rank0)[:5].tolist()
        raise TraceError(
            f"{where}: 'logits' must be set on every rank-0 row and only there (sorted rows {rows})."
        )
    valid = col.drop_null()
    lengths = np.asarray(valid.value_lengths())
    if len(lengths) and (lengths != meta.n_experts).any():
        bad = int(np.flatnonzero(lengths != meta.n_experts)[0])
        raise TraceError(
            f"{where}: router logits have {lengths[bad]} values at (token, layer) #{bad}, "
            f"expected n_experts {meta.n_experts}."
        )
    flat = np.asarray(valid.flatten(), np.float32)
    if len(valid) % meta.n_layers:
        raise TraceError(f"{where}: logits rows ({len(valid)}) are not whole tokens.")
    return flat.reshape(-1, meta.n_layers, meta.n_experts)


def read_trace(path: str | os.PathLike[str], *, with_logits: bool = False) -> Trace:
    """Read and validate a trace file; every problem is a TraceError naming the file."""
    path = Path(path)
    where = str(path)
    try:
        check_input(path, "trace")
    except BadInput as exc:
        raise TraceError(str(exc)) from None
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TraceError(
            f"{where}: not a parquet file ({exc}). Convert it with `mer trace import`."
        ) from None
    raw_meta = (schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise TraceError(
            f"{where}: parquet file has no 'mer.trace' metadata; it is not a mer trace. "
            "Convert it with `mer trace import csv` or write it with traces.format.write_trace."
        )
    meta = TraceMeta.from_json(raw_meta, where)
    try:
        columns = [c for c in schema.names if c != "logits" or with_logits]
        table = pf.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TraceError(
            f"{where}: the parquet data cannot be read ({exc}); the file is corrupt or truncated."
        ) from None
    for name, typ in COLUMNS.items():
        if name not in schema.names:
            continue
        actual = schema.field(name).type
        if name == "phase":
            ok = (
                pa.types.is_dictionary(actual)
                or pa.types.is_string(actual)
                or pa.types.is_large_string(actual)
            )
        elif name == "weight":
            ok = pa.types.is_floating(actual) or pa.types.is_null(actual)
        else:
            ok = pa.types.is_integer(actual) or (name == "lookahead" and pa.types.is_null(actual))
        if not ok:
            raise TraceError(f"{where}: column {name!r} has type {actual}, expected {typ}.")
    if "logits" in schema.names:
        lt = schema.field("logits").type
        if not (
            (pa.types.is_list(lt) or pa.types.is_large_list(lt))
            and pa.types.is_floating(lt.value_type)
        ):
            raise TraceError(
                f"{where}: column 'logits' has type {lt}, expected a list of float32 "
                "(router logits)."
            )
    if "weight" in table.column_names and pa.types.is_floating(table.schema.field("weight").type):
        nan = pc.is_nan(table.column("weight"))
        if pc.any(nan).as_py():
            rows = np.flatnonzero(nan.to_numpy(zero_copy_only=False) == True)[:5].tolist()  # noqa: E712
            raise TraceError(
                f"{where}: column 'weight' holds NaN (rows {rows}); a gate weight is a number "
                "in [0, 1], or null when the source lacks it."
            )
    logits = None
    if with_logits and "logits" in table.column_names:
        logits = _read_logits(table, meta, where)
        table = table.drop_columns(["logits"])
    try:
        df = table.to_pandas()
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise TraceError(f"{where}: the columns cannot be converted ({exc}).") from None
    return Trace(df, meta, logits=logits, name=path.name)
