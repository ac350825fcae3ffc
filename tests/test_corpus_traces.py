"""Corpus: malformed trace files, through every command that reads a trace.

Each case writes one broken file (bytes, parquet structure, metadata, columns,
values, file kinds) and asserts the contract of corpus_kit.assert_bad: exit 2,
one message naming the file, no traceback, no hang.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_kit import Kit, assert_bad, replace_column, write_raw_trace

from mer.traces.format import META_KEY


def _meta(**changes: Any) -> Callable[[Kit, Path], Path]:
    """The good trace with metadata fields replaced (None deletes a field)."""

    def make(k: Kit, p: Path) -> Path:
        m = k.meta()
        for key, v in changes.items():
            if v is _DELETE:
                m.pop(key, None)
            else:
                m[key] = v
        return write_raw_trace(p, k.table(), m)

    return make


_DELETE = object()


def _raw_meta(raw: bytes) -> Callable[[Kit, Path], Path]:
    return lambda k, p: write_raw_trace(p, k.table(), raw_meta=raw)


def _column(
    name: str, fn: Callable[[pa.Table], Any], typ: Any = None
) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        t = k.table()
        return write_raw_trace(p, replace_column(t, name, fn(t), typ), k.meta())

    return make


def _drop(name: str) -> Callable[[Kit, Path], Path]:
    return lambda k, p: write_raw_trace(p, k.table().drop_columns([name]), k.meta())


def _values(
    name: str, edit: Callable[[np.ndarray], np.ndarray], typ: Any = None
) -> Callable[[Kit, Path], Path]:
    """Column `name` with its values edited (numpy in, numpy out)."""

    def fn(t: pa.Table) -> Any:
        col = t.column(name).to_numpy(zero_copy_only=False)
        return edit(col.copy())

    return _column(name, fn, typ)


def _set(i: int | slice, v: Any) -> Callable[[np.ndarray], np.ndarray]:
    def edit(a: np.ndarray) -> np.ndarray:
        a[i] = v
        return a

    return edit


def _bytes(data: bytes) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        p.write_bytes(data)
        return p

    return make


def _truncated(fraction: float) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        data = k.trace.read_bytes()
        p.write_bytes(data[: int(len(data) * fraction)])
        return p

    return make


def _rows(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Kit, Path], Path]:
    return lambda k, p: write_raw_trace(p, fn(k.table()), k.meta())


def _nulls(name: str, typ: Any) -> Callable[[Kit, Path], Path]:
    def fn(t: pa.Table) -> Any:
        vals = t.column(name).to_pylist()
        vals[3] = None
        return vals

    return _column(name, fn, typ)


def _logits(kind: str) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        t = k.table()
        n = t.num_rows
        rank0 = np.asarray(t.column("rank")) == 0
        if kind == "strings":
            vals = [["a"] * 8 if r else None for r in rank0]
            arr = pa.array(vals, pa.list_(pa.string()))
        elif kind == "short":
            arr = pa.array([[0.1] * 3 if r else None for r in rank0], pa.list_(pa.float32()))
        elif kind == "every-row":
            arr = pa.array([[0.1] * 8 for _ in range(n)], pa.list_(pa.float32()))
        else:  # a scalar column named logits
            arr = pa.array(np.zeros(n, np.float32))
        return write_raw_trace(p, t.append_column("logits", arr), k.meta())

    return make


def _symlink_loop(k: Kit, p: Path) -> Path:
    q = p.with_name(p.name + ".b")
    if os.path.lexists(q):
        q.unlink()
    p.symlink_to(q)
    q.symlink_to(p)
    return p


def _dir(k: Kit, p: Path) -> Path:
    p.mkdir()
    return p


def _swap_phase(t: pa.Table) -> pa.Table:
    ph = t.column("phase").to_pylist()
    per_token = 8
    ph[:per_token] = ["decode"] * per_token  # token 0 decode, token 1 prefill: prefill after decode
    return replace_column(t, "phase", ph, pa.string())


def _dup_row(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t, t.slice(5, 1)])


def _drop_row(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t.slice(0, 9), t.slice(10)])


def _same_expert(a: np.ndarray) -> np.ndarray:
    a[1] = a[0]
    return a


def _weights_sum(a: np.ndarray) -> np.ndarray:
    a[0:2] = [0.6, 0.6]
    return a


TRACE_CASES: dict[str, Callable[[Kit, Path], Path]] = {
    # the file itself
    "empty-file": _bytes(b""),
    "text-file": _bytes(b"seq,token,layer\n0,0,0\n"),
    "random-bytes": _bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
    "parquet-magic-only": _bytes(b"PAR1PAR1"),
    "truncated-half": _truncated(0.5),
    "truncated-tail": _truncated(0.97),
    "truncated-head": lambda k, p: (p.write_bytes(k.trace.read_bytes()[100:]), p)[1],
    "json-file": _bytes(b'{"seq": [0]}'),
    "gguf-file": lambda k, p: (p.write_bytes(k.gguf.read_bytes()[:65536]), p)[1],
    "directory": _dir,
    "symlink-loop": _symlink_loop,
    "fifo": lambda k, p: (os.mkfifo(p), p)[1],
    # metadata
    "no-metadata": lambda k, p: write_raw_trace(p, k.table()),
    "meta-not-json": _raw_meta(b"{not json"),
    "meta-not-utf8": _raw_meta(b"\xff\xfe\x00"),
    "meta-list": _raw_meta(b"[1, 2, 3]"),
    "meta-string": _raw_meta(b'"trace"'),
    "meta-number": _raw_meta(b"42"),
    "meta-deep": _raw_meta(b"[" * 100_000 + b"]" * 100_000),
    "meta-empty-object": _raw_meta(b"{}"),
    "schema-missing": _meta(schema_version=_DELETE),
    "schema-string": _meta(schema_version="one"),
    "schema-negative": _meta(schema_version=-5),
    "schema-zero": _meta(schema_version=0),
    "schema-future": _meta(schema_version=2),
    "schema-bool": _meta(schema_version=True),
    "schema-float": _meta(schema_version=1.5),
    "model-missing": _meta(model=_DELETE),
    "model-number": _meta(model=123),
    "n_layers-missing": _meta(n_layers=_DELETE),
    "n_layers-zero": _meta(n_layers=0),
    "n_layers-negative": _meta(n_layers=-4),
    "n_layers-string": _meta(n_layers="4"),
    "n_layers-float": _meta(n_layers=4.5),
    "n_layers-bool": _meta(n_layers=True),
    "n_layers-huge": _meta(n_layers=10**9),
    "n_layers-wrong": _meta(n_layers=3),
    "n_experts-zero": _meta(n_experts=0),
    "n_experts-huge": _meta(n_experts=100_000_000),
    "n_experts-int16": _meta(n_experts=40_000),
    "n_experts-null": _meta(n_experts=None),
    "n_experts-small": _meta(n_experts=4),
    "top_k-zero": _meta(top_k=0),
    "top_k-gt-experts": _meta(top_k=9),
    "top_k-huge": _meta(top_k=200),
    "top_k-wrong": _meta(top_k=1),
    "keys-too-many": _meta(n_layers=30_000, n_experts=30_000),
    "extra-list": _meta(extra=[1, 2]),
    "extra-string": _meta(extra="x"),
    "source-list": _meta(source=["a"]),
    "provenance-number": _meta(provenance=5),
    "licence-object": _meta(licence={"a": 1}),
    "experts_per_layer-zero": _meta(extra={"experts_per_layer": 0}),
    "experts_per_layer-string": _meta(extra={"experts_per_layer": "8"}),
    # columns
    **{
        f"missing-{c}": _drop(c)
        for c in ("seq", "token", "phase", "layer", "rank", "expert", "weight", "lookahead")
    },
    "expert-float": _values("expert", lambda a: a.astype(np.float64) + 0.5, pa.float64()),
    "expert-string": _values("expert", lambda a: a.astype(str), pa.string()),
    "expert-null": _nulls("expert", pa.int16()),
    "layer-null": _nulls("layer", pa.int16()),
    "seq-null": _nulls("seq", pa.int32()),
    "token-string": _values("token", lambda a: a.astype(str), pa.string()),
    "rank-float": _values("rank", lambda a: a.astype(np.float32), pa.float32()),
    "phase-int": _values("phase", lambda a: np.zeros(len(a), np.int8), pa.int8()),
    "phase-unknown": _values("phase", lambda a: np.array(["generate"] * len(a)), pa.string()),
    "phase-null": _nulls("phase", pa.string()),
    "weight-string": _values("weight", lambda a: a.astype(str), pa.string()),
    "weight-nan": _values("weight", _set(4, np.nan), pa.float32()),
    "weight-all-nan": _values("weight", lambda a: np.full(len(a), np.nan), pa.float32()),
    "weight-inf": _values("weight", _set(4, np.inf), pa.float32()),
    "weight-negative": _values("weight", _set(0, -0.2), pa.float32()),
    "weight-above-one": _values("weight", _set(0, 1.5), pa.float32()),
    "weight-sum": _values("weight", _weights_sum, pa.float32()),
    "weight-partial-null": _nulls("weight", pa.float32()),
    "lookahead-string": _values("lookahead", lambda a: np.array(["x"] * len(a)), pa.string()),
    "lookahead-float": _values("lookahead", lambda a: np.full(len(a), 0.5), pa.float64()),
    "lookahead-out-of-range": _values("lookahead", lambda a: np.full(len(a), 99), pa.int16()),
    "logits-strings": _logits("strings"),
    "logits-short": _logits("short"),
    "logits-every-row": _logits("every-row"),
    "logits-scalar": _logits("scalar"),
    # values
    "expert-negative": _values("expert", _set(0, -1), pa.int16()),
    "expert-too-large": _values("expert", _set(0, 8), pa.int16()),
    "expert-int32-overflow": _values("expert", lambda a: a.astype(np.int64) + 70_000, pa.int64()),
    "seq-int64-overflow": _values("seq", lambda a: _set(0, 2**40)(a.astype(np.int64)), pa.int64()),
    "layer-too-large": _values("layer", _set(0, 7), pa.int16()),
    "rank-negative": _values("rank", _set(1, -1), pa.int8()),
    "rank-too-large": _values("rank", _set(1, 5), pa.int8()),
    "same-expert-twice": _values("expert", _same_expert, pa.int16()),
    "duplicate-row": _rows(_dup_row),
    "incomplete-token": _rows(_drop_row),
    "prefill-after-decode": _rows(_swap_phase),
    "no-rows": _rows(lambda t: t.slice(0, 0)),
}


def _make(kit: Kit, name: str) -> Path:
    p = kit.path(f"trace-{name}.parquet")
    return TRACE_CASES[name](kit, p)


@pytest.mark.parametrize("name", list(TRACE_CASES))
def test_trace_validate_refuses(kit: Kit, name: str, capsys) -> None:
    path = _make(kit, name)
    assert_bad(["trace", "validate", path], capsys)


# A sample of the cases through every other command that reads a trace.
SAMPLE = [
    "truncated-half",
    "fifo",
    "meta-deep",
    "n_experts-huge",
    "extra-list",
    "expert-null",
    "weight-nan",
    "logits-strings",
    "incomplete-token",
]
COMMANDS: dict[str, Callable[[Kit, Path], list[Any]]] = {
    "info": lambda k, t: ["trace", "info", t],
    "stats": lambda k, t: ["trace", "stats", t],
    "mrc": lambda k, t: ["mrc", t, "-o", k.path("mrc.parquet"), "--sizes", "4"],
    "predict-eval": lambda k, t: ["predict-eval", t],
    "simulate": lambda k, t: ["simulate", t, "--hardware", k.profile, "--shape", "mixtral-tiny"],
    "sweep": lambda k, t: [
        "sweep",
        t,
        "-o",
        k.path("sweep.parquet"),
        "--jobs",
        "1",
        "--no-progress",
    ],
    "run": lambda k, t: ["run", t, "--experts", k.gguf, "--no-progress"],
    "synth-fitted": lambda k, t: [
        "trace",
        "synth",
        "fitted",
        "--from",
        t,
        "-o",
        k.path("f.parquet"),
    ],
    "plot-popularity": lambda k, t: ["plot", "popularity", t, "-o", k.path("pop.png")],
    "plot-layer-hits": lambda k, t: ["plot", "layer-hits", t, "-o", k.path("lh.png")],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", SAMPLE)
def test_every_trace_reader_refuses(kit: Kit, name: str, command: str, capsys) -> None:
    path = _make(kit, name)
    assert_bad(COMMANDS[command](kit, path), capsys)
    # nothing was written next to the outputs
    assert not list((kit.root / "cases").glob(".*.tmp"))


def test_messages_name_the_problem(kit: Kit, capsys) -> None:
    """A few messages checked word for word where the issue found them unclear."""
    cases = {
        "expert-null": "has nulls",
        "weight-nan": "NaN",
        "n_experts-huge": "more than format v1 holds",
        "extra-list": "extra must be a JSON object",
        "schema-negative": "schema_version must be >= 1",
        "logits-strings": "list of float32",
        "fifo": "FIFO",
        "meta-deep": "nested too deeply",
    }
    for name, words in cases.items():
        path = _make(kit, name)
        r = assert_bad(["trace", "validate", path], capsys)
        assert words in r.err and str(path.name) in r.err, (name, r.err)


def test_proc_files_and_devices_as_traces(kit: Kit, capsys) -> None:
    for path in ("/proc/self/mem", "/proc/self/status", "/dev/zero", "/dev/null"):
        assert_bad(["trace", "validate", path], capsys, match="kernel interface")
        assert_bad(["mrc", path, "-o", kit.path("m.parquet")], capsys)


def test_the_good_trace_is_fine(kit: Kit, capsys) -> None:
    """The corpus's base file passes: every refusal above is the edit's doing."""
    from corpus_kit import assert_ok

    assert_ok(["trace", "validate", kit.trace], capsys)
    meta = json.loads(pq.read_schema(kit.trace).metadata[META_KEY])
    assert meta["n_layers"] == 4
