"""q4_0 held against gguf's own implementation (an independent reference) and ggml's layout."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.engine import q4_0

Q = GGMLQuantizationType.Q4_0


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**32 - 1),
)
def test_dequantize_random_blocks_equals_gguf(rows: int, blocks: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks * 18), dtype=np.uint8)
    # finite scales of any magnitude a real file may hold
    d = (rng.standard_normal(rows * blocks) * 10.0 ** rng.integers(-6, 2)).astype(np.float16)
    raw.reshape(-1, 18)[:, :2] = d.view(np.uint8).reshape(-1, 2)
    ours = q4_0.dequantize(raw)
    ref = gg_dequantize(raw, Q)
    assert ours.shape == ref.shape == (rows, blocks * 32)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=18, max_size=18 * 4).filter(lambda b: len(b) % 18 == 0))
def test_dequantize_arbitrary_bytes_equals_gguf(data: bytes) -> None:
    raw = np.frombuffer(data, dtype=np.uint8)
    np.testing.assert_array_equal(q4_0.dequantize(raw), gg_dequantize(raw, Q))


def test_layout_by_hand() -> None:
    """ggml: fp16 d, then byte j = element j (low nibble) | element j+16 (high nibble)."""
    block = np.zeros(18, dtype=np.uint8)
    block[:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    block[2] = 0x3A  # element 0 -> 0xA, element 16 -> 0x3
    block[17] = 0xF0  # element 15 -> 0x0, element 31 -> 0xF
    w = q4_0.dequantize(block)
    expect = np.full(32, -4.0, dtype=np.float32)  # (0 - 8) * 0.5 for untouched nibbles
    expect[0] = (0xA - 8) * 0.5
    expect[16] = (0x3 - 8) * 0.5
    expect[15] = (0x0 - 8) * 0.5
    expect[31] = (0xF - 8) * 0.5
    np.testing.assert_array_equal(w, expect)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**32 - 1), st.floats(1e-4, 1e3))
def test_quantize_equals_gguf(rows: int, blocks: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, blocks * 32)) * scale).astype(np.float32)
    if rows > 1:
        x[0, :32] = 0.0  # an all-zero block: d = 0
    ours = q4_0.quantize(x)
    np.testing.assert_array_equal(ours, gg_quantize(x, Q))
    # round trip: every weight within one step of its block's scale (the clamped end of
    # the range is a whole step off, and the fp16 scale rounds by up to 2^-11, which the
    # 8 steps from the block's extreme amplify to 2^-8)
    back = q4_0.dequantize(ours)
    d = np.abs(q4_0.scales(ours)).repeat(32).reshape(x.shape)
    assert np.all(np.abs(back - x) <= d * (1.0 + 2.0**-8) + 1e-6 * np.abs(x))


def test_random_q4_0_statistics() -> None:
    rng = np.random.default_rng(3)
    raw = q4_0.random_q4_0(rng, 64, 1024, scale=0.02)
    assert raw.shape == (64, q4_0.row_bytes(1024))
    w = gg_dequantize(raw, Q)
    assert np.isfinite(w).all()
    assert 0.015 < float(w.std()) < 0.025


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        q4_0.row_bytes(33)
    with pytest.raises(ValueError):
        q4_0.dequantize(np.zeros(17, dtype=np.uint8))
    with pytest.raises(ValueError):
        q4_0.quantize(np.zeros(31, dtype=np.float32))
