"""Every tensor type the decoder reads, against gguf's own dequantisation.

References: `gguf.quants.quantize` / `dequantize` (the gguf library's
implementation of ggml's formats) and float64 arithmetic on the dequantised
values; for the native q8_0 expert FFN, the kernel's numpy emulation; for the
whole decoder on a file of mixed types, transformers running exactly the
values the file holds.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.engine.expert_types import TypedExpertFFN, make_expert_ffn, q8_0_matvec

RNG = np.random.default_rng(0)


def _silu(a: np.ndarray) -> np.ndarray:
    return a / (1 + np.exp(-a))


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 40), blocks=st.integers(1, 6), n=st.integers(1, 3), seed=st.integers(0, 99)
)
def test_q8_0_matvec_equals_dequantised_float64(rows: int, blocks: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cols = 32 * blocks
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3)).astype(np.float32)
    raw = gg_quantize(w, Q.Q8_0)
    ref_w = np.asarray(gg_dequantize(raw, Q.Q8_0), dtype=np.float64)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    got = q8_0_matvec(raw, cols, x)
    want = x.astype(np.float64) @ ref_w.T
    # float32 dot of length cols: |error| <= cols * 2^-24 * sum |w x| (and a little slack)
    bound = 2 * cols * 2.0**-24 * (np.abs(x) @ np.abs(ref_w).T) + 1e-30
    assert (np.abs(got - want) <= bound).all()
    one = q8_0_matvec(raw, cols, x[0])
    assert one.shape == (rows,) and (np.abs(one - want[0]) <= bound[0]).all()


@pytest.mark.parametrize("dtype", ["Q8_0", "F16", "F32"])
def test_typed_expert_ffn_equals_float64(dtype: str) -> None:
    d_model, d_ff = 64, 96
    mats = {
        "gate": RNG.standard_normal((d_ff, d_model)).astype(np.float32) / 8,
        "up": RNG.standard_normal((d_ff, d_model)).astype(np.float32) / 8,
        "down": RNG.standard_normal((d_model, d_ff)).astype(np.float32) / 10,
    }
    qt = Q[dtype]
    raw = {k: gg_quantize(v, qt) for k, v in mats.items()}
    f64 = {k: np.asarray(gg_dequantize(r, qt), dtype=np.float64) for k, r in raw.items()}
    x = RNG.standard_normal(d_model).astype(np.float32)
    h = _silu(f64["gate"] @ x) * (f64["up"] @ x)
    want = f64["down"] @ h
    with TypedExpertFFN((d_model, d_ff), dtype, threads=2) as ffn:
        b = {k: np.ascontiguousarray(r).view(np.uint8).reshape(-1) for k, r in raw.items()}
        got = ffn(x, b["gate"], b["up"], b["down"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_native_q8_0_expert_ffn_equals_the_kernel_emulation() -> None:
    from mer.native import q4_0 as nq

    if not nq.available():
        pytest.skip("the native q4_0 kernel is not compiled here")
    d_model, d_ff = 128, 96
    mats = [
        RNG.standard_normal((d_ff, d_model)).astype(np.float32) / 10,
        RNG.standard_normal((d_ff, d_model)).astype(np.float32) / 10,
        RNG.standard_normal((d_model, d_ff)).astype(np.float32) / 10,
    ]
    raw = [gg_quantize(m, Q.Q8_0).reshape(-1) for m in mats]
    x = RNG.standard_normal((3, d_model)).astype(np.float32)
    ffn = make_expert_ffn("Q8_0", (d_model, d_ff), 2, "native")
    assert ffn.kind == "native"
    got = ffn(x, *raw)
    want = nq.emulate_ffn(x, *raw, d_model, d_ff, types=(nq.Q8_0,) * 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_load_dequantises_other_types_and_says_so(tmp_path: Path) -> None:
    from mer.engine.gguf_synth import TensorSpec, write_gguf_file
    from mer.model.weights import load_matrix

    w = RNG.standard_normal((12, 64)).astype(np.float32)
    specs = []
    data = {}
    for name, qt in (("a.weight", Q.F16), ("b.weight", Q.Q5_0), ("c.weight", Q.Q8_0)):
        raw = gg_quantize(w, qt)
        specs.append(TensorSpec(name, w.shape, qt, 0, "gate"))
        data[name] = raw
    p = tmp_path / "t.gguf"
    write_gguf_file(p, specs, lambda s: data[s.name], lambda _w: None)
    from mer.engine.store import _TableReader

    table = {t.name: t for t in _TableReader(str(p)).table}
    with open(p, "rb") as fh:
        for name, qt in (("a.weight", Q.F16), ("b.weight", Q.Q5_0), ("c.weight", Q.Q8_0)):
            t = table[name]
            m = load_matrix(fh, name, t.dtype, t.ne, t.offset, keep_rows=False)
            ref = np.asarray(gg_dequantize(data[name], qt), dtype=np.float32)
            if qt == Q.Q8_0:
                assert m.dtype == "Q8_0" and m.dequantised_from is None  # kept, native
            else:
                assert m.dtype == "F32" and m.dequantised_from == qt.name
                np.testing.assert_array_equal(m.data, ref)
            np.testing.assert_allclose(m.matvec(w[0]), ref @ w[0], rtol=1e-5, atol=1e-5)
            rows = load_matrix(fh, name, t.dtype, t.ne, t.offset, keep_rows=True)
            np.testing.assert_array_equal(rows.row(5), ref[5])  # an embedding lookup: one row


TYPES = {
    "attn_q": "Q8_0",
    "attn_k": "Q8_0",
    "attn_v": "Q5_0",  # q, k, v of different types: three matvecs, v dequantised at load
    "attn_output": "F16",
    "token_embd": "Q5_0",  # rows decoded one at a time
    "output.weight": "F16",
}


def test_decoder_on_mixed_types_equals_transformers_on_the_same_values(tmp_path: Path) -> None:
    """q8_0 experts and attention, q5_0 / f16 tensors dequantised at load, a q5_0 embedding."""
    import test_model_decoder as tmd
    import tiny_mixtral as tm

    tm.deps()
    d = tm.tokenizer_dir(tmp_path)
    tok = tm.hf_tokenizer(d)
    model = tm.hf_model(d, len(tok), seed=1)
    path = tmp_path / "mixed.gguf"
    tensors = tm.write_gguf(model, d, path, "Q8_0", TYPES)
    tm.set_hf_weights(model, tensors)
    from mer.model.gguf_model import MoeModel

    m = MoeModel.open(path)
    assert m.store.expert_dtype == "Q8_0"
    mem = m.memory()["dequantised_to_f32"]
    assert set(mem) == {"Q5_0", "F16"}
    assert m.layers[0].qkv is None and m.embedding.dtype == "Q5_0"
    ids = tmd._sequence({"tok": tok})[:24]
    ours = tmd._mer_teacher_forced(path, ids, "numpy")
    ref32 = tmd._hf_teacher_forced(model, ids)
    ref64 = tmd._hf_teacher_forced(copy.deepcopy(model).double(), ids)
    near: Any = tmd._hold(ours, ref32, ref64)
    assert len(near) <= 1, near
