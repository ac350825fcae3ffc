"""q4_0 exactly as ggml defines it, vectorised in numpy.

A q4_0 block holds 32 weights in 18 bytes: a little-endian fp16 scale `d`, then
16 bytes of 4-bit codes. Byte j carries element j in its low nibble and element
j + 16 in its high nibble; the weight is `(q - 8) * d`. A row of n weights
(n a multiple of 32) is n / 32 consecutive blocks, rows follow each other with
no padding, which is how GGUF stores a q4_0 tensor (ggml ne[0] is the row).

`quantize` follows ggml's `quantize_row_q4_0_ref` (scale from the signed value
of largest magnitude divided by -8, truncation after +8.5, clamp to 15), so
files we write are bit-identical to what ggml would produce from the same
floats; the tests hold both functions against `gguf.quants`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from mer.shapes import Q4_0_BLOCK, Q4_0_BLOCK_BYTES

BLOCK = Q4_0_BLOCK
BLOCK_BYTES = Q4_0_BLOCK_BYTES
_HALF = BLOCK // 2

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


def row_bytes(n_cols: int) -> int:
    """Bytes of one q4_0 row of `n_cols` weights."""
    if n_cols % BLOCK:
        raise ValueError(f"q4_0 rows must be a multiple of {BLOCK} weights, got {n_cols}")
    return n_cols // BLOCK * BLOCK_BYTES


def tensor_bytes(n_rows: int, n_cols: int) -> int:
    return n_rows * row_bytes(n_cols)


def _as_blocks(raw: npt.ArrayLike) -> U8:
    a = np.asarray(raw)
    if a.dtype != np.uint8:
        raise ValueError(f"q4_0 data must be uint8 bytes, got {a.dtype}")
    if a.shape[-1] % BLOCK_BYTES:
        raise ValueError(f"q4_0 rows must be a multiple of {BLOCK_BYTES} bytes, got {a.shape[-1]}")
    return a.reshape(-1, BLOCK_BYTES)


def scales(raw: npt.ArrayLike) -> F32:
    """The fp16 scale of every block, as float32, shape (n_blocks,)."""
    blocks = _as_blocks(raw)
    return np.ascontiguousarray(blocks[:, :2]).view(np.float16)[:, 0].astype(np.float32)


def codes(raw: npt.ArrayLike) -> U8:
    """The unsigned 4-bit codes q (0..15) in element order, shape (n_blocks, 32)."""
    blocks = _as_blocks(raw)
    qs = blocks[:, 2:]
    out = np.empty((blocks.shape[0], BLOCK), dtype=np.uint8)
    np.bitwise_and(qs, np.uint8(0x0F), out=out[:, :_HALF])
    np.right_shift(qs, np.uint8(4), out=out[:, _HALF:])
    return out


def dequantize(raw: npt.ArrayLike) -> F32:
    """q4_0 bytes (..., k * 18) -> float32 weights (..., k * 32)."""
    a = np.asarray(raw)
    blocks = _as_blocks(a)
    q = codes(blocks).astype(np.int8)
    q -= np.int8(8)
    w = q.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # arbitrary bytes may hold inf/nan scales
        w *= scales(blocks)[:, None]
    return w.reshape(*a.shape[:-1], a.shape[-1] // BLOCK_BYTES * BLOCK)


def quantize(values: npt.ArrayLike) -> U8:
    """float weights (..., k * 32) -> q4_0 bytes (..., k * 18), as ggml's reference does."""
    x = np.asarray(values, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"q4_0 rows must be a multiple of {BLOCK} weights, got {x.shape[-1]}")
    blocks = x.reshape(-1, BLOCK)
    imax = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(blocks.shape[0]), imax]
    d = (vmax / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(blocks * inv[:, None] + np.float32(8.5)).astype(np.uint8)
    np.minimum(q, np.uint8(15), out=q)
    out = np.empty((blocks.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :_HALF] | (q[:, _HALF:] << np.uint8(4))
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * BLOCK_BYTES)


def _symmetric_table() -> U8:
    b = np.arange(256, dtype=np.uint8)
    t = b.copy()
    t[(b & 0x0F) == 0] |= 0x08
    t[(b & 0xF0) == 0] |= 0x80
    return t


_SYMMETRIC = _symmetric_table()


def random_q4_0(
    rng: np.random.Generator,
    n_rows: int,
    n_cols: int,
    scale: float,
    out: U8 | None = None,
    *,
    symmetric: bool = False,
) -> U8:
    """Random q4_0 rows whose weights have standard deviation about `scale`.

    Codes are uniform on 0..15, so (q - 8) has standard deviation ~4.61; block
    scales are drawn around scale / 4.61 (x0.5..1.5) so blocks differ as in a real
    model. Generated directly in block form: quantising floats would cost far
    more than writing them, and the bytes are valid q4_0 either way.

    `symmetric`: code 0 becomes 8, so (q - 8) is symmetric about 0 (-7..7, 0 twice
    as likely; standard deviation sqrt(17.5) ~ 4.18). Whole random models need it
    (`mer experts synth --full`): with uniform codes every weight has a mean of
    -0.5 d, every matrix adds a common direction to its output, and that direction
    piles up in the residual stream (RMSNorm does not remove a mean) until every
    token routes to the same experts.
    """
    rb = row_bytes(n_cols)
    if out is None:
        out = np.empty((n_rows, rb), dtype=np.uint8)
    flat = out.reshape(-1)
    flat[:] = np.frombuffer(rng.bytes(flat.size), dtype=np.uint8)  # codes (scales overwritten)
    spread = 4.61
    if symmetric:
        np.take(_SYMMETRIC, flat, out=flat)  # each nibble 0 -> 8, one pass
        spread = 4.18
    blocks = out.reshape(-1, BLOCK_BYTES)
    n_blocks = blocks.shape[0]
    base = np.float32(scale / spread)
    d = (base * rng.uniform(0.5, 1.5, size=n_blocks).astype(np.float32)).astype(np.float16)
    blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    return out
