"""Corpus: malformed expert files (GGUF and packed dirs), through `experts info`,
`experts pack` and `run`.

GGUF cases are written with gguf's own writer (mer.engine.gguf_synth) from
edited tensor plans and metadata, or patched at byte level; packed cases edit
a real pack's manifest and data file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from corpus_kit import Kit, assert_bad
from gguf import GGMLQuantizationType

from mer.engine.gguf_synth import plan_tensors, write_gguf
from mer.shapes import ModelShape

TINY = ModelShape("corpus-tiny", 2, 4, 2, 64, 128, n_heads=2, n_kv_heads=1)


def _gguf(
    specs_edit: Callable[[list[Any]], list[Any]] = lambda s: s,
    shape: ModelShape = TINY,
    written_shape: ModelShape | None = None,
    layout: str = "stacked",
) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        write_gguf(
            p, written_shape or shape, specs_edit(plan_tensors(shape, layout)), layout=layout
        )
        return p

    return make


def _patched(offset: int, fmt: str, value: int) -> Callable[[Kit, Path], Path]:
    """A valid tiny GGUF with one header field overwritten."""

    def make(k: Kit, p: Path) -> Path:
        _gguf()(k, p)
        data = bytearray(p.read_bytes())
        struct.pack_into(fmt, data, offset, value)
        p.write_bytes(bytes(data))
        return p

    return make


def _cut(fraction: float) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        data = k.gguf.read_bytes()
        p.write_bytes(data[: int(len(data) * fraction)])
        return p

    return make


def _bytes(data: bytes) -> Callable[[Kit, Path], Path]:
    return lambda k, p: (p.write_bytes(data), p)[1]


def _drop(name: str) -> Callable[[list[Any]], list[Any]]:
    return lambda specs: [s for s in specs if s.name != name]


def _retype(dtype: GGMLQuantizationType) -> Callable[[list[Any]], list[Any]]:
    return lambda specs: [replace(s, dtype=dtype) if "_exps" in s.name else s for s in specs]


def _reshape(name: str, shape: tuple[int, ...]) -> Callable[[list[Any]], list[Any]]:
    return lambda specs: [replace(s, shape=shape) if s.name == name else s for s in specs]


GGUF_CASES: dict[str, Callable[[Kit, Path], Path]] = {
    "empty": _bytes(b""),
    "three-bytes": _bytes(b"GGU"),
    "magic-only": _bytes(b"GGUF"),
    "wrong-magic": _bytes(b"GGUX" + b"\0" * 4092),
    "text": _bytes(b"this is not a model\n" * 100),
    "parquet": lambda k, p: (p.write_bytes(k.trace.read_bytes()), p)[1],
    "header-only": _cut(0.000001),
    "cut-in-table": _cut(0.001),
    "cut-half": _cut(0.5),
    "cut-last-byte": lambda k, p: (p.write_bytes(k.gguf.read_bytes()[:-5000]), p)[1],
    "version-99": _patched(4, "<I", 99),
    "tensor-count-huge": _patched(8, "<Q", 2**40),
    "kv-count-huge": _patched(16, "<Q", 2**40),
    "tensor-count-zero": _patched(8, "<Q", 0),
    "no-expert-tensors": _gguf(lambda specs: [s for s in specs if "_exps" not in s.name]),
    "missing-up-of-layer-1": _gguf(_drop("blk.1.ffn_up_exps.weight")),
    "q4_1-experts": _gguf(_retype(GGMLQuantizationType.Q4_1)),
    "q5_0-experts": _gguf(_retype(GGMLQuantizationType.Q5_0)),
    "gate-other-width": _gguf(_reshape("blk.1.ffn_gate_exps.weight", (4, 256, 64))),
    "gate-2d": _gguf(_reshape("blk.0.ffn_gate_exps.weight", (128, 64))),
    "block-count-huge": _gguf(written_shape=replace(TINY, n_layers=10**9)),
    "block-count-more-than-tensors": _gguf(written_shape=replace(TINY, n_layers=3)),
    "expert-count-huge": _gguf(written_shape=replace(TINY, n_experts=4_000_000_000)),
    "expert-used-count-huge": _gguf(written_shape=replace(TINY, top_k=1000)),
    "both-layouts": lambda k, p: (
        write_gguf(
            p,
            TINY,
            plan_tensors(TINY, "stacked")
            + [s for s in plan_tensors(TINY, "per-expert") if "gate_inp" not in s.name][:3],
        ),
        p,
    )[1],
    "per-expert-missing-one": _gguf(_drop("blk.1.ffn_down.3.weight"), layout="per-expert"),
    "fifo": lambda k, p: (os.mkfifo(p), p)[1],
    "symlink-to-missing": lambda k, p: (p.symlink_to(p.with_name("nowhere.gguf")), p)[1],
    "proc-mem": lambda k, p: Path("/proc/self/mem"),
    "dev-urandom": lambda k, p: Path("/dev/urandom"),
    "empty-dir": lambda k, p: (p.mkdir(), p)[1],
}


def _pack(
    edit: Callable[[dict[str, Any]], Any] | None = None, files: Callable[[Path], None] | None = None
) -> Callable[[Kit, Path], Path]:
    def make(k: Kit, p: Path) -> Path:
        shutil.copytree(k.packed, p)
        if edit is not None:
            m = json.loads((p / "manifest.json").read_text())
            new = edit(m)
            (p / "manifest.json").write_text(new if isinstance(new, str) else json.dumps(new))
        if files is not None:
            files(p)
        return p

    return make


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(m: dict[str, Any]) -> dict[str, Any]:
        node = m
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        if value is _DEL:
            node.pop(last)
        else:
            node[last] = value
        return m

    return edit


_DEL = object()


def _offsets(fn: Callable[[list[int]], list[Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(m: dict[str, Any]) -> dict[str, Any]:
        m["slot_offsets"] = fn(m["slot_offsets"])
        return m

    return edit


def _first(v: Any) -> Callable[[list[int]], list[Any]]:
    return lambda offs: [v, *offs[1:]]


def _truncate_data(p: Path) -> None:
    f = p / "experts.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _fifo_data(p: Path) -> None:
    (p / "experts.bin").unlink()
    os.mkfifo(p / "experts.bin")


PACKED_CASES: dict[str, Callable[[Kit, Path], Path]] = {
    "manifest-not-json": _pack(lambda m: "{oops"),
    "manifest-list": _pack(lambda m: [m]),
    "manifest-deep": _pack(lambda m: "[" * 100_000 + "]" * 100_000),
    "manifest-binary": _pack(
        files=lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe\x00\x01")
    ),
    "manifest-fifo": _pack(
        files=lambda p: ((p / "manifest.json").unlink(), os.mkfifo(p / "manifest.json"))
    ),
    "format-wrong": _pack(_set("format", "gguf")),
    "version-2": _pack(_set("version", 2)),
    "no-shape": _pack(_set("shape", _DEL)),
    "shape-list": _pack(_set("shape", [1, 2])),
    "zero-layers": _pack(_set("shape.n_layers", 0)),
    "layers-string": _pack(_set("shape.n_layers", "32")),
    "layers-huge": _pack(_set("shape.n_layers", 10**9)),
    "experts-float": _pack(_set("shape.n_experts", 8.5)),
    "d_model-odd": _pack(_set("shape.d_model", 130)),
    "top_k-above-experts": _pack(_set("shape.top_k", 9)),
    "slot-bytes-zero": _pack(_set("slot_bytes", 0)),
    "slot-bytes-misaligned": _pack(_set("slot_bytes", 4097)),
    "slot-bytes-string": _pack(_set("slot_bytes", "big")),
    "matrix-bytes-huge": _pack(_set("matrix_bytes.gate", 10**12)),
    "matrix-bytes-negative": _pack(_set("matrix_bytes.up", -1)),
    "matrix-bytes-missing": _pack(_set("matrix_bytes.down", _DEL)),
    "matrix-bytes-list": _pack(_set("matrix_bytes", [1, 2, 3])),
    "offsets-short": _pack(_offsets(lambda o: o[:-1])),
    "offsets-negative": _pack(_offsets(_first(-4096))),
    "offsets-misaligned": _pack(_offsets(_first(100))),
    "offsets-string": _pack(_offsets(_first("0"))),
    "offsets-beyond-file": _pack(_offsets(_first(2**50))),
    "offsets-not-list": _pack(_set("slot_offsets", {"0": 0})),
    "dense-key-not-numeric": _pack(_set("dense", {"abc": {}})),
    "dense-not-object": _pack(_set("dense", [1])),
    "data-missing": _pack(files=lambda p: (p / "experts.bin").unlink()),
    "data-truncated": _pack(files=_truncate_data),
    "data-fifo": _pack(files=_fifo_data),
    "data-directory": _pack(
        files=lambda p: ((p / "experts.bin").unlink(), (p / "experts.bin").mkdir())
    ),
    "no-manifest": _pack(files=lambda p: (p / "manifest.json").unlink()),
}


def _make(kit: Kit, table: dict[str, Callable[[Kit, Path], Path]], name: str, suffix: str) -> Path:
    return table[name](kit, kit.path(f"experts-{name}{suffix}"))


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_experts_info_refuses_bad_gguf(kit: Kit, name: str, capsys) -> None:
    assert_bad(["experts", "info", _make(kit, GGUF_CASES, name, ".gguf")], capsys)


@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_experts_info_refuses_bad_pack(kit: Kit, name: str, capsys) -> None:
    assert_bad(["experts", "info", _make(kit, PACKED_CASES, name, "")], capsys)


RUN_SAMPLE = [
    "cut-half",
    "fifo",
    "q4_1-experts",
    "block-count-huge",
    "tensor-count-huge",
    "proc-mem",
]
PACK_SAMPLE = [
    "matrix-bytes-huge",
    "offsets-negative",
    "zero-layers",
    "dense-key-not-numeric",
    "data-fifo",
    "manifest-deep",
]


@pytest.mark.parametrize("name", RUN_SAMPLE)
def test_run_and_pack_refuse_bad_gguf(kit: Kit, name: str, capsys) -> None:
    path = _make(kit, GGUF_CASES, name, ".gguf")
    assert_bad(["run", kit.mix, "--experts", path, "--no-progress"], capsys)
    assert_bad(["experts", "pack", path, "-o", kit.path("repack")], capsys)
    assert not kit.path("repack").exists() or not any(kit.path("repack").iterdir())


@pytest.mark.parametrize("name", PACK_SAMPLE)
def test_run_refuses_bad_pack(kit: Kit, name: str, capsys) -> None:
    assert_bad(
        ["run", kit.mix, "--experts", _make(kit, PACKED_CASES, name, ""), "--no-progress"], capsys
    )


def test_messages_for_manifests_name_the_field(kit: Kit, capsys) -> None:
    for name, words in {
        "matrix-bytes-huge": "matrix_bytes.gate",
        "offsets-negative": "slot_offsets[0]",
        "zero-layers": "shape.n_layers",
        "dense-key-not-numeric": "not a layer number",
    }.items():
        r = assert_bad(["experts", "info", _make(kit, PACKED_CASES, name, "")], capsys)
        assert words in r.err, (name, r.err)


def test_pack_into_its_own_source_is_refused(kit: Kit, capsys) -> None:
    gguf = kit.path("self.gguf")
    shutil.copy(kit.gguf, gguf)
    before = gguf.stat().st_size
    assert_bad(["experts", "pack", gguf, "-o", gguf], capsys)
    assert gguf.stat().st_size == before
