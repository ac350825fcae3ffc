"""The q4_0 SwiGLU FFN against a float64 reference computed on gguf-dequantized weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.engine import ffn, q4_0
from mer.shapes import SHAPES

Q = GGMLQuantizationType.Q4_0


def _ref_ffn(x: np.ndarray, g: np.ndarray, u: np.ndarray, d: np.ndarray) -> np.ndarray:
    gf = gg_dequantize(g, Q).astype(np.float64)
    uf = gg_dequantize(u, Q).astype(np.float64)
    df = gg_dequantize(d, Q).astype(np.float64)
    x64 = x.astype(np.float64)
    a = x64 @ gf.T
    h = a / (1.0 + np.exp(-a)) * (x64 @ uf.T)
    return h @ df.T


def _weights(seed: int, d_model: int, d_ff: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    g = q4_0.random_q4_0(rng, d_ff, d_model, d_model**-0.5)
    u = q4_0.random_q4_0(rng, d_ff, d_model, d_model**-0.5)
    d = q4_0.random_q4_0(rng, d_model, d_ff, d_ff**-0.5)
    return g, u, d


def _close(y: np.ndarray, ref: np.ndarray) -> None:
    # float32 accumulation over a few thousand terms: relative to the output scale
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@settings(max_examples=15, deadline=None)
@given(
    st.sampled_from([(32, 64), (64, 96), (128, 384), (96, 32)]),
    st.integers(1, 3),
    st.integers(0, 2**31),
)
def test_expert_ffn_matches_float64_reference(
    dims: tuple[int, int], threads: int, seed: int
) -> None:
    d_model, d_ff = dims
    g, u, d = _weights(seed, d_model, d_ff)
    x = np.random.default_rng(seed + 1).standard_normal(d_model).astype(np.float32)
    y = ffn.expert_ffn(x, g, u, d, (d_model, d_ff), threads=threads)
    assert y.shape == (d_model,) and y.dtype == np.float32
    _close(y, _ref_ffn(x[None], g, u, d)[0])


def test_expert_ffn_tiny_shape_batch_and_buffers() -> None:
    shape = SHAPES["mixtral-tiny"]
    g, u, d = _weights(7, shape.d_model, shape.d_ff)
    x = np.random.default_rng(8).standard_normal((3, shape.d_model)).astype(np.float32)
    ref = _ref_ffn(x, g, u, d)
    # batch of tokens, weights given as memoryviews over one buffer (as the store gives them)
    buf = bytearray(g.tobytes() + u.tobytes() + d.tobytes())
    mv = memoryview(buf)
    n1, n2 = g.nbytes, g.nbytes + u.nbytes
    with ffn.ExpertFFN(shape, threads=2) as f:
        y = f(x, mv[:n1], mv[n1:n2], mv[n2:])
    assert y.shape == x.shape
    _close(y, ref)


def test_matvec_many_tiles_and_chunks() -> None:
    """More rows than a tile, uneven chunking over 3 threads: every row computed once."""
    rng = np.random.default_rng(11)
    n_cols = 4096
    rows = ffn._tile_rows(n_cols) * 5 + 3
    w = q4_0.random_q4_0(rng, rows, n_cols, 0.02)
    x = rng.standard_normal(n_cols).astype(np.float32)
    ref = gg_dequantize(w, Q).astype(np.float64) @ x.astype(np.float64)
    with ThreadPoolExecutor(3) as pool:
        y = ffn.q4_matvec(w, n_cols, x, threads=3, pool=pool)
    _close(y, ref)


def test_chunks_cover_rows_exactly() -> None:
    for n, parts, tile in [(10, 3, 4), (100, 2, 7), (5, 8, 1), (1, 2, 64)]:
        ch = ffn._chunks(n, parts, tile)
        covered = [r for a, b in ch for r in range(a, b)]
        assert covered == list(range(n))
        assert all(a % tile == 0 for a, _ in ch)


def test_wrong_sizes_raise() -> None:
    g, u, d = _weights(1, 32, 64)
    x = np.zeros(32, dtype=np.float32)
    with pytest.raises(ValueError, match="gate"):
        ffn.expert_ffn(x, g[:-1], u, d, (32, 64))
    with pytest.raises(ValueError, match="x"):
        ffn.expert_ffn(np.zeros(33, np.float32), g, u, d, (32, 64))


# ---- the choice of kernel (--ffn) ----------------------------------------------------------


def test_make_ffn_gives_the_kernel_asked_for_and_says_once_when_it_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mer import native
    from mer.errors import BadInput, RuntimeFailure
    from mer.notes import reset_notes

    shape = SHAPES["mixtral-tiny"]
    with ffn.make_ffn(shape, 2, "numpy") as f:
        assert f.kind == "numpy" and ffn.ffn_label(f) == "numpy"
    if ffn.native_available():
        with ffn.make_ffn(shape, 2, "auto") as f:
            assert f.kind == "native" and ffn.ffn_label(f).startswith("native (")
    with pytest.raises(BadInput):
        ffn.resolve_ffn("fast")
    monkeypatch.setenv("MER_NO_NATIVE", "1")
    native.reset()
    reset_notes()
    try:
        with pytest.warns(Warning, match="numpy") as rec:
            assert ffn.resolve_ffn("auto") == "numpy"
            assert ffn.resolve_ffn("auto") == "numpy"
        assert len([w for w in rec if "numpy" in str(w.message)]) <= 1
        with pytest.raises(RuntimeFailure, match="--ffn numpy"):
            ffn.resolve_ffn("native")
    finally:
        monkeypatch.delenv("MER_NO_NATIVE")
        native.reset()


@pytest.mark.skipif(not ffn.native_available(), reason="the q4_0 kernel is not compiled here")
def test_native_and_numpy_kernels_agree_to_the_activation_rounding() -> None:
    """Both compute the same FFN; the native one on q8_0 activations (about 1% noise)."""
    shape = SHAPES["mixtral-small"]
    g, u, d = _weights(3, shape.d_model, shape.d_ff)
    x = np.random.default_rng(4).standard_normal(shape.d_model).astype(np.float32)
    ref = _ref_ffn(x[None], g, u, d)[0]
    with ffn.make_ffn(shape, 2, "native") as fn, ffn.make_ffn(shape, 2, "numpy") as fp:
        yn, yp = fn(x, g, u, d), fp(x, g, u, d)
        mn, mp = fn.matvec(g, shape.d_model, x), fp.matvec(g, shape.d_model, x)
    rel = float(np.sqrt(np.mean((yn - ref) ** 2) / np.mean(ref**2)))
    assert rel < 0.03
    _close(yp, ref)
    gf = gg_dequantize(g, Q).astype(np.float64) @ x.astype(np.float64)
    _close(mp, gf)
    assert float(np.sqrt(np.mean((mn - gf) ** 2) / np.mean(gf**2))) < 0.03
