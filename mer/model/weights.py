"""Resident weight matrices as GGUF stores them, and their matvecs.

q4_0 and q8_0 stay in their blocks and are multiplied directly (q4_0 by the
engine's expert kernel, `mer.engine.ffn.q4_matvec`; q8_0 tile by tile,
`mer.engine.expert_types.q8_0_matvec`);
f32 is used as is; every other type (f16, bf16, q4_K, q6_K, ...) is
dequantised once at load by `gguf.quants.dequantize`, in row chunks so the
load never holds more than the result plus one chunk, and costs 4 bytes per
weight (`Matrix.dequantised_from` says from what). A matrix keeps ggml's
orientation: `rows` outputs of `cols` inputs each (ggml ne = {cols, rows}).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from mer.engine.expert_types import q8_0_matvec
from mer.engine.ffn import q4_matvec

F32 = npt.NDArray[np.float32]
NATIVE = ("Q4_0", "Q8_0", "F32")
DEQUANT_CHUNK_BYTES = 8 << 20  # raw bytes per dequantisation chunk at load


def raw_row_bytes(dtype: str, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    if cols % block:
        raise ValueError(f"{dtype} rows must be a multiple of {block} weights, got {cols}")
    return cols // block * size


@dataclass
class Matrix:
    """One resident weight matrix: `rows` x `cols` in `dtype` (raw blocks or float32)."""

    name: str
    dtype: str  # Q4_0 | Q8_0 | F32 (after any dequantisation)
    rows: int
    cols: int
    data: np.ndarray  # uint8 (rows, row_bytes) for quantised types, float32 (rows, cols) otherwise
    dequantised_from: str | None = None  # the file's type when it was dequantised at load

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def matvec(
        self,
        x: F32,
        threads: int = 1,
        pool: ThreadPoolExecutor | None = None,
        native: bool = False,
    ) -> F32:
        """W x for x of shape (cols,) or (n, cols); `native`: the C kernel for q4_0 / q8_0."""
        if self.dtype in ("Q4_0", "Q8_0") and native:
            from mer.native import q4_0 as nq

            wtype = nq.Q4_0 if self.dtype == "Q4_0" else nq.Q8_0
            return nq.matmul(self.data, x, self.cols, wtype=wtype, threads=threads)
        if self.dtype == "Q4_0":
            return q4_matvec(self.data, self.cols, x, threads, pool)
        if self.dtype == "Q8_0":
            return q8_0_matvec(self.data, self.cols, x)
        return np.asarray(x @ self.data.T, dtype=np.float32)

    def row(self, i: int) -> F32:
        """Row i as float32 (an embedding lookup): only that row is decoded."""
        if self.dtype == "F32":
            return np.array(self.data[i], dtype=np.float32)
        qt = GGMLQuantizationType[self.dtype]
        return np.asarray(dequantize(self.data[i], qt), dtype=np.float32).reshape(self.cols)


def read_raw(fh: BinaryIO, offset: int, n_bytes: int) -> npt.NDArray[np.uint8]:
    """n_bytes of the file at offset, into an owned array (not a map: RSS is what we hold)."""
    out = np.empty(n_bytes, dtype=np.uint8)
    fh.seek(offset)
    view = memoryview(out)  # type: ignore[arg-type]
    got = 0
    while got < n_bytes:
        n = fh.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise EOFError(f"file ends {n_bytes - got} bytes early at offset {offset + got}")
        got += n
    return out


def load_matrix(
    fh: BinaryIO, name: str, dtype: str, ne: tuple[int, ...], offset: int, *, keep_rows: bool
) -> Matrix:
    """Read a 2-D tensor (ggml ne = {cols, rows}); dequantise types without a native matvec.

    `keep_rows`: a table read row by row (the token embedding) keeps its quantised
    rows whatever their type, since a lookup decodes one row only.
    """
    cols = int(ne[0])
    rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    qt = GGMLQuantizationType[dtype]
    rb = raw_row_bytes(dtype, cols)
    if dtype == "F32":
        floats = read_raw(fh, offset, rows * rb).view(np.float32).reshape(rows, cols)
        return Matrix(name, "F32", rows, cols, floats)
    if dtype in ("Q4_0", "Q8_0") or keep_rows:
        raw = read_raw(fh, offset, rows * rb).reshape(rows, rb)
        return Matrix(name, dtype, rows, cols, raw)
    out = np.empty((rows, cols), dtype=np.float32)
    chunk = max(1, DEQUANT_CHUNK_BYTES // rb)
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        raw = read_raw(fh, offset + a * rb, (b - a) * rb).reshape(b - a, rb)
        out[a:b] = np.asarray(dequantize(raw, qt), dtype=np.float32).reshape(b - a, cols)
    return Matrix(name, "F32", rows, cols, out, dequantised_from=dtype)


def concat_rows(name: str, parts: list[Matrix]) -> Matrix:
    """Stack matrices of one dtype and width into one (q, k, v as one matvec)."""
    first = parts[0]
    if any(p.dtype != first.dtype or p.cols != first.cols for p in parts):
        raise ValueError("concat_rows needs one dtype and one width")
    data = np.concatenate([p.data for p in parts], axis=0)
    src = {p.dequantised_from for p in parts} - {None}
    return Matrix(
        name,
        first.dtype,
        sum(p.rows for p in parts),
        first.cols,
        data,
        dequantised_from=", ".join(sorted(s for s in src if s)) or None,
    )


def describe_bytes(matrices: list[Matrix]) -> dict[str, Any]:
    """Resident bytes by type, and the cost of what was dequantised at load."""
    by_type: dict[str, int] = {}
    deq: dict[str, int] = {}
    for m in matrices:
        by_type[m.dtype] = by_type.get(m.dtype, 0) + m.nbytes
        if m.dequantised_from:
            deq[m.dequantised_from] = deq.get(m.dequantised_from, 0) + m.nbytes
    return {"by_type": by_type, "dequantised_to_f32": deq}
