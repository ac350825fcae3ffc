"""ExpertStore and synth/pack against gguf's own reader (an independent view of the same file)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gg_dequantize

from mer.cli import main as cli_main
from mer.engine import ffn
from mer.engine.gguf_synth import plan_tensors, synth_gguf, write_gguf
from mer.engine.pack import pack_experts
from mer.engine.store import ExpertStore
from mer.errors import BadInput
from mer.shapes import SHAPES, ModelShape

SMALL = ModelShape("test-small", 2, 4, 2, 64, 96, n_heads=2, n_kv_heads=1)
TINY = SHAPES["mixtral-tiny"]


def _read(store: ExpertStore, layer: int, expert: int) -> np.ndarray:
    """Follow the read plan with plain preads into one buffer, as the engine would."""
    buf = np.zeros(store.bytes_needed, dtype=np.uint8)
    fd = os.open(store.data_path, os.O_RDONLY)
    try:
        for r in store.read_plan(layer, expert):
            assert r.offset % 4096 == 0 and r.length % 4096 == 0 and r.buf_offset % 4096 == 0
            assert r.offset + r.length <= store.file_size
            data = os.pread(fd, r.length, r.offset)
            buf[r.buf_offset : r.buf_offset + len(data)] = np.frombuffer(data, np.uint8)
    finally:
        os.close(fd)
    return buf


def _gguf_expert(reader: GGUFReader, layout: str, layer: int, expert: int) -> list[np.ndarray]:
    by = {t.name: t for t in reader.tensors}
    out = []
    for k in ("gate", "up", "down"):
        if layout == "stacked":
            out.append(np.asarray(by[f"blk.{layer}.ffn_{k}_exps.weight"].data[expert]).reshape(-1))
        else:
            out.append(np.asarray(by[f"blk.{layer}.ffn_{k}.{expert}.weight"].data).reshape(-1))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("experts")
    out = {}
    for layout in ("stacked", "per-expert"):
        out[layout] = d / f"tiny-{layout}.gguf"
        synth_gguf(out[layout], TINY, seed=5, layout=layout, dense=True)
    out["packed"] = d / "packed"
    pack_experts(out["stacked"], out["packed"])
    return out


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_synth_metadata_and_tensor_shapes(files: dict[str, Path], layout: str) -> None:
    r = GGUFReader(files[layout])

    def val(key: str) -> int:
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert val("llama.expert_count") == 8 and val("llama.expert_used_count") == 2
    assert val("llama.block_count") == 32
    assert val("llama.embedding_length") == 128 and val("llama.feed_forward_length") == 384
    by = {t.name: t for t in r.tensors}
    if layout == "stacked":
        # ggml ne order: ne[0] is the contiguous (input) dimension, experts outermost
        assert by["blk.31.ffn_gate_exps.weight"].shape.tolist() == [128, 384, 8]
        assert by["blk.0.ffn_up_exps.weight"].shape.tolist() == [128, 384, 8]
        assert by["blk.0.ffn_down_exps.weight"].shape.tolist() == [384, 128, 8]
    else:
        assert by["blk.0.ffn_gate.7.weight"].shape.tolist() == [128, 384]
        assert by["blk.0.ffn_down.0.weight"].shape.tolist() == [384, 128]
    assert by["blk.0.attn_q.weight"].shape.tolist() == [128, 128]
    assert by["blk.0.attn_k.weight"].shape.tolist() == [128, 64]  # 2 kv heads of 32
    for t in r.tensors:
        if "ffn_gate_inp" not in t.name:
            assert t.tensor_type == GGMLQuantizationType.Q4_0
    # weights decode to finite values of the fan-in scale
    w = gg_dequantize(
        by["blk.3.ffn_gate_exps.weight" if layout == "stacked" else "blk.3.ffn_gate.1.weight"].data,
        GGMLQuantizationType.Q4_0,
    )
    assert np.isfinite(w).all() and 0.5 * 128**-0.5 < float(w.std()) < 1.5 * 128**-0.5
    assert os.path.getsize(files[layout]) % 4096 == 0


@pytest.mark.parametrize("layout", ["stacked", "per-expert", "packed"])
def test_views_equal_gguf_reader_data(files: dict[str, Path], layout: str) -> None:
    store = ExpertStore.open(files[layout])
    assert store.shape == TINY and (store.n_layers, store.n_experts) == (32, 8)
    src_layout = "stacked" if layout == "packed" else layout
    reader = GGUFReader(files[src_layout])
    n_reads = {"stacked": 3, "per-expert": 1, "packed": 1}[layout]
    for layer, expert in [(0, 0), (0, 7), (13, 3), (31, 7)]:
        plan = store.read_plan(layer, expert)
        assert len(plan) == n_reads
        buf = _read(store, layer, expert)
        views = store.views(buf, layer, expert)
        for got, want in zip(views, _gguf_expert(reader, src_layout, layer, expert), strict=True):
            np.testing.assert_array_equal(got, want)
            assert np.shares_memory(got, buf)  # sliced, not copied
        ranges = store.expert_ranges(layer, expert)
        assert [r.length for r in ranges] == [TINY.bytes_per_expert // 3] * 3
        spans = store.aligned_span(layer, expert)
        for r in ranges:
            assert any(s.offset <= r.offset and r.end <= s.offset + s.length for s in spans)
    assert store.dense_present


def test_both_layouts_hold_identical_experts(files: dict[str, Path]) -> None:
    a, b = ExpertStore.open(files["stacked"]), ExpertStore.open(files["per-expert"])
    for key in (5, 100, 255):
        layer, expert = divmod(key, 8)
        va = a.views(_read(a, layer, expert), layer, expert)
        vb = b.views(_read(b, layer, expert), layer, expert)
        for x, y in zip(va, vb, strict=True):
            np.testing.assert_array_equal(x, y)


def test_pack_manifest_and_digest(files: dict[str, Path]) -> None:
    m = json.loads((files["packed"] / "manifest.json").read_text())
    assert m["slot_bytes"] == TINY.slot_bytes and m["slot_bytes"] % 4096 == 0
    assert m["slot_offsets"] == [i * TINY.slot_bytes for i in range(256)]
    reader = GGUFReader(files["stacked"])
    h = hashlib.sha256()
    for key in range(256):
        for part in _gguf_expert(reader, "stacked", *divmod(key, 8)):
            h.update(part.tobytes())
    by = {t.name: t for t in reader.tensors}
    for layer in range(32):
        for k in ("q", "k", "v", "output"):
            h.update(np.asarray(by[f"blk.{layer}.attn_{k}.weight"].data).tobytes())
    assert m["source"]["payload_sha256"] == h.hexdigest()
    store = ExpertStore.open(files["packed"])
    plan = store.dense_read_plan(4)
    fd = os.open(store.dense_path, os.O_RDONLY)
    buf = np.zeros(sum(r.length for r in plan), np.uint8)
    for r in plan:
        buf[r.buf_offset : r.buf_offset + r.length] = np.frombuffer(
            os.pread(fd, r.length, r.offset), np.uint8
        )
    os.close(fd)
    np.testing.assert_array_equal(
        store.dense_views(buf, 4)["v"], np.asarray(by["blk.4.attn_v.weight"].data).reshape(-1)
    )


def test_ffn_on_store_views_matches_reference(files: dict[str, Path]) -> None:
    store = ExpertStore.open(files["stacked"])
    reader = GGUFReader(files["stacked"])
    layer, expert = 9, 6
    g, u, d = store.views(_read(store, layer, expert), layer, expert)
    x = np.random.default_rng(0).standard_normal(TINY.d_model).astype(np.float32)
    y = ffn.expert_ffn(x, g, u, d, store.shape, threads=2)
    by = {t.name: t for t in reader.tensors}
    q = GGMLQuantizationType.Q4_0
    gf = gg_dequantize(by[f"blk.{layer}.ffn_gate_exps.weight"].data, q)[expert].astype(np.float64)
    uf = gg_dequantize(by[f"blk.{layer}.ffn_up_exps.weight"].data, q)[expert].astype(np.float64)
    df = gg_dequantize(by[f"blk.{layer}.ffn_down_exps.weight"].data, q)[expert].astype(np.float64)
    a = gf @ x
    ref = df @ (a / (1 + np.exp(-a)) * (uf @ x))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


# ---- bad files: one clear BadInput each ----------------------------------------------
def _bad(path: Path, *needles: str) -> None:
    with pytest.raises(BadInput) as ei:
        ExpertStore.open(path)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    _bad(p, "not a GGUF file")
    assert cli_main(["experts", "info", str(p)]) == 2


def test_truncated(tmp_path: Path) -> None:
    p = tmp_path / "t.gguf"
    write_gguf(p, SMALL, plan_tensors(SMALL))
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size - 8192)
    _bad(p, "truncated", "blk.1.ffn_down_exps.weight")
    with open(p, "r+b") as fh:
        fh.truncate(200)  # cut inside the tensor table
    _bad(p, "cannot parse the GGUF header")


def test_missing_expert_tensor(tmp_path: Path) -> None:
    p = tmp_path / "m.gguf"
    specs = [s for s in plan_tensors(SMALL, "per-expert") if s.name != "blk.1.ffn_up.2.weight"]
    write_gguf(p, SMALL, specs)
    _bad(p, "missing expert tensors", "blk.1.ffn_up.2.weight")
    p2 = tmp_path / "none.gguf"
    write_gguf(p2, SMALL, [s for s in plan_tensors(SMALL) if "gate_inp" in s.name])
    _bad(p2, "no expert tensors")


def test_wrong_dtype(tmp_path: Path) -> None:
    p = tmp_path / "d.gguf"
    specs = plan_tensors(SMALL)
    specs = [
        type(s)(s.name, s.shape, GGMLQuantizationType.Q8_0, s.layer, s.kind)
        if s.name == "blk.1.ffn_up_exps.weight"
        else s
        for s in specs
    ]
    write_gguf(p, SMALL, specs)
    _bad(p, "mix types", "Q4_0, Q8_0")
    p2 = tmp_path / "k.gguf"
    specs = [
        type(s)(s.name, s.shape, GGMLQuantizationType.Q5_0, s.layer, s.kind)
        if s.kind in ("gate", "up", "down")
        else s
        for s in plan_tensors(SMALL)
    ]
    write_gguf(p2, SMALL, specs)
    _bad(p2, "ffn_gate_exps.weight is Q5_0", "q4_0")


def test_inconsistent_shapes(tmp_path: Path) -> None:
    p = tmp_path / "s.gguf"
    specs = [
        type(s)(s.name, (s.shape[0], s.shape[1] - 32, s.shape[2]), s.dtype, s.layer, s.kind)
        if s.name == "blk.0.ffn_up_exps.weight"
        else s
        for s in plan_tensors(SMALL)
    ]
    write_gguf(p, SMALL, specs)
    _bad(p, "inconsistent shapes", "blk.0.ffn_up_exps.weight")


def test_custom_shape_roundtrip(tmp_path: Path) -> None:
    """A geometry not in SHAPES is still read, from the tensors and metadata alone."""
    p = tmp_path / "c.gguf"
    write_gguf(p, SMALL, plan_tensors(SMALL))
    s = ExpertStore.open(p)
    assert (s.n_layers, s.n_experts, s.shape.d_model, s.shape.d_ff) == (2, 4, 64, 96)
    assert s.bytes_per_expert == 3 * 64 * 96 // 32 * 18


def test_cli_synth_pack_info_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = tmp_path / "cli.gguf"
    assert (
        cli_main(
            [
                "experts",
                "synth",
                "--shape",
                "mixtral-tiny",
                "-o",
                str(g),
                "--layout",
                "per-expert",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "per-expert" and out["file_bytes"] == g.stat().st_size
    assert cli_main(["experts", "pack", str(g), "-o", str(tmp_path / "pk"), "--json"]) == 0
    capsys.readouterr()
    assert cli_main(["experts", "info", str(tmp_path / "pk"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "packed" and info["bytes_per_expert"] == TINY.bytes_per_expert
    assert info["reads_per_expert"] == 1 and info["dense_present"] is False
