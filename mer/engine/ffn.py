"""The SwiGLU expert FFN on q4_0 weights: the choice of kernel, and the numpy reference.

Two kernels compute it, chosen with `--ffn native|numpy` (`make_ffn(kind=...)`):
- native (the default wherever it was built): the C kernel of `mer.native.q4_0`, ggml's
  q4_0 x q8_0 integer arithmetic at memory speed (see docs/engine.md);
- numpy (the reference and the fallback): this module, float32 dequantised tiles.
`make_ffn` returns either behind one interface: `ffn(x, gate, up, down)`, `ffn.matvec(raw,
n_cols, x)` (the dense block's), `ffn.kind`, `ffn.close()`. Without a compiled kernel the
default says once that numpy is used; an explicit `native` then refuses.

The numpy path, for the executor:

    expert_ffn(x, gate, up, down, shape_dims, threads=1, pool=None) -> y
        x: float32 (d_model,) or (n_tokens, d_model)
        gate, up: q4_0 bytes of [d_ff rows x d_model] (GGUF order: ggml ne = {d_model, d_ff})
        down:     q4_0 bytes of [d_model rows x d_ff] (ggml ne = {d_ff, d_model})
        shape_dims: a ModelShape or (d_model, d_ff)
        y = down(silu(gate x) * up x), float32, same leading shape as x.
    ExpertFFN(shape_dims, threads): the same with a persistent thread pool; use it
        in a loop (`with ExpertFFN(shape, 2) as ffn: y = ffn(x, g, u, d)`).
    q4_matvec(raw, n_cols, x, threads=1, pool=None) -> W x for one q4_0 matrix.

Why this formulation: the full fp32 matrix is never materialised, only a tile of
rows at a time, sized so its fp32 working set stays in L2. Per tile, the nibbles
are split on the *raw bytes* (flat, contiguous uint8 ops, fast) without first
separating scales from codes: the two scale bytes of every block yield junk
nibbles that meet a zero in the matching position of the rearranged x. The
codes are then widened to fp32 and multiplied by the block scale in one mixed
uint8 x float32 pass, and one BLAS gemv does the dot; the "- 8" is folded into
a per-block correction `8 * d . sum(x_block)`. So each weight is touched by
about four vector passes in cache; BLAS needs fp32, which is what bounds this
well below memory bandwidth (see bench/bench_ffn.py and docs/benchmarks.md).

Rows are split across `threads` workers (numpy and BLAS release the GIL), each
with its own scratch buffers, reused across its tiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mer.engine.q4_0 import BLOCK, BLOCK_BYTES, row_bytes
from mer.shapes import ModelShape

F32 = npt.NDArray[np.float32]
_HALF = BLOCK // 2
TILE_TARGET_BYTES = 96 * 1024  # q4_0 bytes per tile: ~1.4 MB of fp32 working set


@dataclass(frozen=True)
class FFNDims:
    d_model: int
    d_ff: int

    @classmethod
    def of(cls, dims: ModelShape | FFNDims | tuple[int, int]) -> FFNDims:
        if isinstance(dims, FFNDims):
            return dims
        if isinstance(dims, ModelShape):
            return cls(dims.d_model, dims.d_ff)
        d_model, d_ff = dims
        return cls(int(d_model), int(d_ff))


def _as_matrix(raw: Any, n_rows: int, n_cols: int, what: str) -> npt.NDArray[np.uint8]:
    """Any buffer (ndarray, memoryview, bytes) of q4_0 bytes -> (n_rows, row_bytes) view."""
    a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    if a.dtype != np.uint8:
        a = a.view(np.uint8)
    rb = row_bytes(n_cols)
    if a.size != n_rows * rb:
        raise ValueError(
            f"{what}: expected {n_rows} x {n_cols} q4_0 weights = {n_rows * rb} bytes, got {a.size}"
        )
    return np.ascontiguousarray(a.reshape(n_rows, rb))


@dataclass
class _PreparedX:
    """x rearranged to meet the (lo | hi) nibble layout of a tile, and its block sums."""

    xcat: F32  # (2 * row_bytes,) or (2 * row_bytes, n)
    bsum: F32  # (n_blocks,) or (n_blocks, n)


def _prepare_x(x: F32, n_cols: int) -> _PreparedX:
    """x (n, n_cols) -> layout [half][block][byte]: byte 0,1 (the scale) get 0."""
    n = x.shape[0]
    nb = n_cols // BLOCK
    xb = x.reshape(n, nb, 2, _HALF)
    xcat = np.zeros((2, nb, BLOCK_BYTES, n), dtype=np.float32)
    xcat[:, :, 2:, :] = xb.transpose(2, 1, 3, 0)
    bsum = xb.sum(axis=(2, 3), dtype=np.float32).T  # (nb, n)
    return _PreparedX(np.ascontiguousarray(xcat.reshape(2 * nb * BLOCK_BYTES, n)), bsum)


def _matvec_rows(
    w: npt.NDArray[np.uint8], px: _PreparedX, out: F32, r0: int, r1: int, tile: int
) -> None:
    """out[r0:r1] = W[r0:r1] x, one tile of rows at a time, with private scratch."""
    with _one_blas_thread():
        _matvec_tiles(w, px, out, r0, r1, tile)


def _matvec_tiles(
    w: npt.NDArray[np.uint8], px: _PreparedX, out: F32, r0: int, r1: int, tile: int
) -> None:
    rb = w.shape[1]
    nb = rb // BLOCK_BYTES
    t_max = min(tile, r1 - r0)
    nib = np.empty((t_max, 2, rb), dtype=np.uint8)
    fw = np.empty((t_max, 2, rb), dtype=np.float32)
    for a in range(r0, r1, tile):
        b = min(a + tile, r1)
        t = b - a
        raw = w[a:b]
        n8 = nib[:t]
        np.bitwise_and(raw, np.uint8(0x0F), out=n8[:, 0, :])
        np.right_shift(raw, np.uint8(4), out=n8[:, 1, :])
        d = raw.reshape(-1).view(np.uint16).reshape(t, nb, BLOCK_BYTES // 2)[:, :, 0]
        d32 = d.view(np.float16).astype(np.float32)
        rep = np.repeat(d32, BLOCK_BYTES, axis=1)  # (t, rb): the scale under every byte
        f = fw[:t]
        np.multiply(n8, rep[:, None, :], out=f)
        res = f.reshape(t, 2 * rb) @ px.xcat
        res -= np.float32(8) * (d32 @ px.bsum)
        out[a:b] = res


@functools.cache
def _blas_local_threads() -> Any:
    """OpenBLAS's thread-local thread count setter, when numpy's BLAS is OpenBLAS >= 0.3.27.

    Our tiles are small gemvs already split across our own workers; OpenBLAS
    threads on top only spin against them (measured slower), so each worker asks
    for one BLAS thread for itself and restores the previous value after.
    """
    try:
        with open("/proc/self/maps") as fh:
            libs = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and "/" in ln})
        for path in libs:
            fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_int]
                return fn
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    fn = _blas_local_threads()
    if fn is None:
        yield
        return
    prev = fn(1)
    try:
        yield
    finally:
        fn(prev)


def _tile_rows(n_cols: int) -> int:
    return max(4, TILE_TARGET_BYTES // row_bytes(n_cols))


def _chunks(n_rows: int, parts: int, tile: int) -> list[tuple[int, int]]:
    """Split rows into <= parts contiguous ranges on tile boundaries."""
    n_tiles = -(-n_rows // tile)
    parts = max(1, min(parts, n_tiles))
    bounds = [min(n_rows, (n_tiles * i // parts) * tile) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _run(pool: ThreadPoolExecutor | None, jobs: list[tuple[Any, ...]], fn: Any) -> None:
    if pool is None or len(jobs) == 1:
        for job in jobs:
            fn(*job)
        return
    for fut in [pool.submit(fn, *job) for job in jobs]:
        fut.result()


def _as_2d(x: npt.ArrayLike, n: int, what: str) -> tuple[F32, bool]:
    a = np.asarray(x, dtype=np.float32)
    single = a.ndim == 1
    a2 = a.reshape(1, -1) if single else a
    if a2.ndim != 2 or a2.shape[1] != n:
        raise ValueError(f"{what}: expected shape ({n},) or (tokens, {n}), got {a.shape}")
    return np.ascontiguousarray(a2), single


def q4_matvec(
    raw: Any,
    n_cols: int,
    x: npt.ArrayLike,
    threads: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> F32:
    """W x for a q4_0 matrix W of `n_cols` columns stored row after row in `raw`."""
    rb = row_bytes(n_cols)
    size = raw.nbytes if hasattr(raw, "nbytes") else len(raw)
    w = _as_matrix(raw, size // rb, n_cols, "q4_matvec")
    x2, single = _as_2d(x, n_cols, "q4_matvec x")
    px = _prepare_x(x2, n_cols)
    out = np.empty((w.shape[0], x2.shape[0]), dtype=np.float32)
    tile = _tile_rows(n_cols)
    with _maybe_pool(pool, threads) as p:
        jobs = [(w, px, out, a, b, tile) for a, b in _chunks(w.shape[0], threads, tile)]
        _run(p, jobs, _matvec_rows)
    return out[:, 0] if single else np.ascontiguousarray(out.T)


@contextlib.contextmanager
def _maybe_pool(
    pool: ThreadPoolExecutor | None, threads: int
) -> Iterator[ThreadPoolExecutor | None]:
    if pool is not None or threads <= 1:
        yield pool
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mer-ffn") as p:
        yield p


def _silu_mul(g: F32, u: F32) -> F32:
    with np.errstate(over="ignore"):
        out = (g / (np.float32(1) + np.exp(-g))) * u
    return np.asarray(out, dtype=np.float32)


def expert_ffn(
    x: npt.ArrayLike,
    gate: Any,
    up: Any,
    down: Any,
    shape_dims: ModelShape | FFNDims | tuple[int, int],
    threads: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> F32:
    """y = down(silu(gate x) * up x) on q4_0 weights; see the module docstring."""
    dims = FFNDims.of(shape_dims)
    g = _as_matrix(gate, dims.d_ff, dims.d_model, "gate")
    u = _as_matrix(up, dims.d_ff, dims.d_model, "up")
    dn = _as_matrix(down, dims.d_model, dims.d_ff, "down")
    x2, single = _as_2d(x, dims.d_model, "x")
    n = x2.shape[0]
    px = _prepare_x(x2, dims.d_model)
    hg = np.empty((dims.d_ff, n), dtype=np.float32)
    hu = np.empty((dims.d_ff, n), dtype=np.float32)
    y = np.empty((dims.d_model, n), dtype=np.float32)
    tile_in = _tile_rows(dims.d_model)
    tile_out = _tile_rows(dims.d_ff)

    def gate_up(a: int, b: int) -> None:
        _matvec_rows(g, px, hg, a, b, tile_in)
        _matvec_rows(u, px, hu, a, b, tile_in)
        hg[a:b] = _silu_mul(hg[a:b], hu[a:b])

    with _maybe_pool(pool, threads) as p:
        _run(p, list(_chunks(dims.d_ff, threads, tile_in)), gate_up)
        ph = _prepare_x(np.ascontiguousarray(hg.T), dims.d_ff)
        jobs = [(dn, ph, y, a, b, tile_out) for a, b in _chunks(dims.d_model, threads, tile_out)]
        _run(p, jobs, _matvec_rows)
    return y[:, 0] if single else np.ascontiguousarray(y.T)


class ExpertFFN:
    """expert_ffn with a persistent pool of `threads` workers (no per-call thread start)."""

    kind = "numpy"

    def __init__(self, shape_dims: ModelShape | FFNDims | tuple[int, int], threads: int = 1):
        self.dims = FFNDims.of(shape_dims)
        self.threads = max(1, int(threads))
        self._pool = (
            ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="mer-ffn")
            if self.threads > 1
            else None
        )

    def __call__(self, x: npt.ArrayLike, gate: Any, up: Any, down: Any) -> F32:
        return expert_ffn(x, gate, up, down, self.dims, self.threads, self._pool)

    def matvec(self, raw: Any, n_cols: int, x: npt.ArrayLike) -> F32:
        """W x for one q4_0 matrix on this FFN's threads (the dense block's kernel)."""
        return q4_matvec(raw, n_cols, x, self.threads, self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ExpertFFN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the choice of kernel ------------------------------------------------------------------

FFN_KINDS = ("native", "numpy")


def native_available() -> bool:
    from mer.native import q4_0 as nq

    return nq.available()


def resolve_ffn(kind: str | None = "auto") -> str:
    """'auto' -> 'native' where the kernel is built, else 'numpy' (said once); an explicit
    'native' without the kernel is a RuntimeFailure (exit 1) naming why."""
    from mer import native
    from mer.errors import BadInput, RuntimeFailure
    from mer.notes import note_once

    k = "auto" if kind is None else kind
    if k not in ("auto", *FFN_KINDS):
        raise BadInput(f"--ffn must be auto, native or numpy, got {kind!r}")
    if k == "numpy":
        return "numpy"
    if native.load("q4_0", quiet=True) is not None:
        return "native"
    why = native.why_unavailable("q4_0")
    if k == "native":
        raise RuntimeFailure(
            f"--ffn native: the q4_0 kernel is not compiled here ({why}); install a C compiler "
            "(gcc or clang) and run again, or pass --ffn numpy."
        )
    note_once(
        "ffn:numpy",
        f"mer: the native q4_0 kernel is not compiled here ({why}); the expert FFN runs in numpy, several times slower.",
    )
    return "numpy"


def make_ffn(
    shape_dims: ModelShape | FFNDims | tuple[int, int], threads: int = 1, kind: str | None = "auto"
) -> Any:
    """The expert FFN of kernel `kind` (auto | native | numpy); see the module docstring."""
    dims = FFNDims.of(shape_dims)
    if resolve_ffn(kind) == "native":
        from mer.native.q4_0 import NativeFFN

        return NativeFFN(dims.d_model, dims.d_ff, threads)
    return ExpertFFN(dims, threads)


def ffn_label(ffn: Any) -> str:
    """'native (avx512vnni)' or 'numpy': what the summaries and the probe report."""
    if getattr(ffn, "kind", "numpy") == "native":
        from mer.native import q4_0 as nq

        return f"native ({nq.isa()})"
    return "numpy"
