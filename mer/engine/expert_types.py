"""The expert FFN for each expert type a GGUF may store.

q4_0 and q8_0 are the native kernel's (`mer.native.q4_0`, ggml's arithmetic),
q4_0 with the numpy reference `mer.engine.ffn.ExpertFFN` where the kernel is
not built (`mer.engine.ffn.make_ffn` chooses and says so once). Where native
is not in use, q8_0, and always f16 and f32, are computed here from the same
slot bytes with the same interface (`ffn(x, gate, up, down)`, `matvec`,
`close()`): q8_0 tile by tile (int8 codes times the block scale, one gemv per
tile), f16 widened to f32 per call, f32 as a zero-copy view. They exist so
that a model converted without quantisation (the test models, an f16 file)
runs on the same streaming path; q4_0 is the one built for speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mer.engine.ffn import ExpertFFN, FFNDims, make_ffn, resolve_ffn
from mer.shapes import ModelShape

F32 = npt.NDArray[np.float32]
Q8_BLOCK, Q8_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
Q8_TILE_BYTES = 64 << 10  # q8_0 bytes per tile of rows (its f32 image stays in L2)


def q8_0_matvec(raw: Any, cols: int, x: F32) -> F32:
    """W x for q8_0 rows (fp16 scale + 32 int8 codes per block); x (cols,) or (n, cols)."""
    nb = cols // Q8_BLOCK
    rb = nb * Q8_BLOCK_BYTES
    a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    w = a.reshape(-1, rb)
    rows = w.shape[0]
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, cols).T  # (cols, n)
    out = np.empty((rows, x2.shape[1]), dtype=np.float32)
    tile = max(1, Q8_TILE_BYTES // rb)
    for r0 in range(0, rows, tile):
        r1 = min(rows, r0 + tile)
        blocks = w[r0:r1].reshape(r1 - r0, nb, Q8_BLOCK_BYTES)
        d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).astype(np.float32)
        q = blocks[:, :, 2:].view(np.int8).astype(np.float32)
        q *= d
        out[r0:r1] = q.reshape(r1 - r0, cols) @ x2
    return out[:, 0] if np.ndim(x) == 1 else np.ascontiguousarray(out.T)


def float_matrix(raw: Any, rows: int, cols: int, dtype: str) -> F32:
    """An f32 (view) or f16 (widened) matrix of `rows` x `cols` from its bytes."""
    a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    np_type = np.float32 if dtype == "F32" else np.float16
    m = a.view(np_type).reshape(rows, cols)
    return np.asarray(m, dtype=np.float32)


def _silu_mul(g: F32, u: F32) -> F32:
    with np.errstate(over="ignore"):
        return np.asarray((g / (np.float32(1) + np.exp(-g))) * u, dtype=np.float32)


class TypedExpertFFN(ExpertFFN):
    """y = down(silu(gate x) * up x) for q8_0, f16 or f32 expert bytes (numpy).

    A subclass of the q4_0 numpy FFN so that the thread pool, the dense block's
    q4_0 matvec and the context-manager life cycle stay one piece of code.
    """

    def __init__(self, dims: ModelShape | FFNDims | tuple[int, int], dtype: str, threads: int = 1):
        if dtype not in ("Q8_0", "F16", "F32"):
            raise ValueError(f"TypedExpertFFN computes q8_0, f16 or f32 experts, not {dtype}")
        super().__init__(dims, threads)
        self.dtype = dtype

    def _mv(self, raw: Any, rows: int, cols: int, x: F32) -> F32:
        if self.dtype == "Q8_0":
            return q8_0_matvec(raw, cols, x)
        return float_matrix(raw, rows, cols, self.dtype) @ x

    def __call__(self, x: npt.ArrayLike, gate: Any, up: Any, down: Any) -> F32:
        d, f = self.dims.d_model, self.dims.d_ff
        xv = np.asarray(x, dtype=np.float32)
        h = _silu_mul(self._mv(gate, f, d, xv), self._mv(up, f, d, xv))
        return np.asarray(self._mv(down, d, f, h), dtype=np.float32)


class NativeQ8FFN:
    """The native kernel's fused FFN on q8_0 experts."""

    kind = "native"

    def __init__(self, dims: FFNDims, threads: int) -> None:
        self.dims = dims
        self.threads = max(1, int(threads))

    def __call__(self, x: npt.ArrayLike, gate: Any, up: Any, down: Any) -> F32:
        from mer.native import q4_0 as nq

        d = self.dims
        return nq.expert_ffn(
            x, gate, up, down, d.d_model, d.d_ff, types=(nq.Q8_0,) * 3, threads=self.threads
        )

    def matvec(self, w: Any, n_cols: int, x: npt.ArrayLike) -> F32:
        from mer.native import q4_0 as nq

        return nq.matmul(w, x, n_cols, threads=self.threads)

    def close(self) -> None:
        pass


def make_expert_ffn(
    dtype: str, dims: ModelShape | FFNDims | tuple[int, int], threads: int, kind: str = "auto"
) -> Any:
    """The FFN for experts stored as `dtype` (a store's `expert_dtype`); `kind` as --ffn."""
    if dtype == "Q4_0":
        return make_ffn(dims, threads, kind)
    if dtype == "Q8_0" and resolve_ffn(kind) == "native":
        return NativeQ8FFN(FFNDims.of(dims), threads)
    return TypedExpertFFN(dims, dtype, threads)
