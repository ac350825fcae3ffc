"""q4_0 / q8_0 weight matmuls and the fused SwiGLU expert FFN: the C kernel, its numpy emulation.

Stable API (float32 activations, token-major; weights are ggml blocks in GGUF order, i.e. a
matrix of n_rows x n_cols is n_rows rows of n_cols / 32 blocks, ggml ne = {n_cols, n_rows}):

    available() -> bool                 the compiled kernel loaded (else use the emulation)
    isa() -> str                        "avx512vnni" | "avx2" | "portable": what calls use now
    using_isa(name)                     context manager: lower the instruction set (tests, bench)
    matmul(w, x, n_cols, *, wtype=Q4_0, threads=1, out=None) -> y
        w: any buffer of n_rows * row_bytes(n_cols, wtype) bytes (ndarray, memoryview, bytes,
           a slice of an mmap); x: (n_cols,) or (n_tokens, n_cols); y: (n_rows,) or
           (n_tokens, n_rows). Each weight is read from memory once for all tokens.
    expert_ffn(x, gate, up, down, d_model, d_ff, *, types=(Q4_0,) * 3, threads=1,
               out=None, hidden=None) -> y
        y = down(silu(gate x) * (up x)); gate, up: d_ff x d_model; down: d_model x d_ff.
        Gate and up are computed in one pass over their rows. `hidden` (float32,
        (n_tokens, d_ff)) receives silu(gate x) * (up x) when given.
    NativeFFN(d_model, d_ff, threads)   the same as a callable ffn(x, gate, up, down).
    memory_read_gbs(n_bytes, threads)   streaming memory read rate, the kernel's physical limit.
    pool_stats(reset)                   how calls split over threads went (chunks per side, waits).
    Q4_0 = 2, Q8_0 = 8                  ggml type ids; row_bytes(n_cols, wtype).

Threads: `threads` splits each matrix's rows over a persistent pthread pool inside the C
module (created on first use, grown to the largest count asked for); the call releases the
GIL. The calling thread and the workers claim chunks of about 256 KiB of rows at a time, so a
thread slowed by another process does less of the work instead of holding the call up; idle
workers spin for 0.1 ms before they sleep. A matrix of less than 1 MiB per thread uses fewer
threads (a hand-off to another thread costs more than it saves there). Calls from several Python
threads at once are safe (a second concurrent call runs on its own thread, unsplit).

Arithmetic (ggml's, which `emulate_*` below reproduce in numpy): per token and per block of 32
activations, d = max|x| / 127 and q = round-half-even(x * (1/d)) clamped to +-127 (a block
holding a nan gets d = nan; a block of zeros gets d = 0); per block an exact integer dot of the
weight codes (q4_0: code - 8, q8_0: int8) with q; that integer times the fp32 product of the
weight's fp16 scale and d; fp32 accumulation. Unlike ggml, the activation scale stays fp32
(ggml rounds it to fp16, a storage format we do not need): one rounding less.
The accumulation order is the instruction set's, so the native result equals the emulation to
fp32 rounding (tested to 1e-5 relative), not bit for bit. `matmul_error_bound` and
`ffn_error_bound` give a guaranteed bound on the error against float64 arithmetic on the
dequantised weights (docs/engine.md derives them).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from mer import native

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

Q4_0 = 2
Q8_0 = 8
BLOCK = 32
BLOCK_BYTES = {Q4_0: 18, Q8_0: 34}
TYPE_NAMES = {Q4_0: "q4_0", Q8_0: "q8_0"}
ISA_NAMES = {1: "portable", 2: "avx2", 3: "avx512vnni"}
_ISA_IDS = {v: k for k, v in ISA_NAMES.items()}
U = 2.0**-24  # unit roundoff of float32
SILU_LIPSCHITZ = 1.1  # sup |silu'(x)| = 1.0998 (at x ~ 2.40)


def lib() -> Any:
    """The compiled module, or None (`native.why_unavailable("q4_0")` says why; the caller that
    falls back says so once, as `mer.engine.ffn.resolve_ffn` does)."""
    return native.load("q4_0", quiet=True)


def available() -> bool:
    return lib() is not None


def _need_lib() -> Any:
    """The compiled module, or RuntimeError saying why it is missing."""
    m = lib()
    if m is None:
        raise RuntimeError(
            f"the q4_0 kernel is not compiled here ({native.why_unavailable('q4_0')})"
        )
    return m


def isa() -> str:
    m = lib()
    return ISA_NAMES[int(m.lib.mer_q_isa())] if m is not None else "numpy"


def best_isa() -> str:
    m = lib()
    return ISA_NAMES[int(m.lib.mer_q_isa_best())] if m is not None else "numpy"


def isas() -> list[str]:
    """Every instruction set this CPU can run, best first."""
    m = lib()
    if m is None:
        return []
    return [ISA_NAMES[i] for i in range(int(m.lib.mer_q_isa_best()), 0, -1)]


@contextlib.contextmanager
def using_isa(name: str) -> Iterator[str]:
    """Run calls with at most instruction set `name` inside the block (process-wide)."""
    m = _need_lib()
    prev = int(m.lib.mer_q_isa())
    got = int(m.lib.mer_q_set_isa(_ISA_IDS[name]))
    try:
        yield ISA_NAMES[got]
    finally:
        m.lib.mer_q_set_isa(prev)


def row_bytes(n_cols: int, wtype: int = Q4_0) -> int:
    if wtype not in BLOCK_BYTES:
        raise ValueError(f"weight type must be q4_0 ({Q4_0}) or q8_0 ({Q8_0}), got {wtype}")
    if n_cols % BLOCK:
        raise ValueError(f"rows must be a multiple of {BLOCK} weights, got {n_cols}")
    return n_cols // BLOCK * BLOCK_BYTES[wtype]


# ---- the binding -------------------------------------------------------------------------


def _weights(w: Any, n_cols: int, wtype: int, n_rows: int | None, what: str) -> tuple[Any, int]:
    """Any buffer -> (contiguous uint8 object, n_rows), checking its size."""
    if (
        n_rows is not None
        and type(w) is np.ndarray
        and w.dtype == np.uint8
        and w.flags.c_contiguous
        and w.size == n_rows * n_cols // BLOCK * BLOCK_BYTES.get(wtype, -1)
        and n_cols % BLOCK == 0
    ):
        return w, n_rows  # the engine's case, checked in one go (per-call overhead)
    a = w if isinstance(w, np.ndarray) else np.frombuffer(w, dtype=np.uint8)
    if a.dtype != np.uint8:
        a = a.view(np.uint8)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    rb = row_bytes(n_cols, wtype)
    rows = a.size // rb if n_rows is None else n_rows
    if a.size != rows * rb or (n_rows is None and a.size % rb):
        raise ValueError(
            f"{what}: expected {rows} rows x {n_cols} {TYPE_NAMES[wtype]} weights = "
            f"{rows * rb} bytes, got {a.size}"
        )
    return a, rows


def _acts(x: npt.ArrayLike, n_cols: int, what: str) -> tuple[F32, bool]:
    if (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.shape[-1:] == (n_cols,)
        and x.ndim <= 2
        and x.flags.c_contiguous
        and x.flags.aligned
    ):
        return (x.reshape(1, n_cols), True) if x.ndim == 1 else (x, False)
    a = np.asarray(x, dtype=np.float32)
    single = a.ndim == 1
    a2 = a.reshape(1, -1) if single else a
    if a2.ndim != 2 or a2.shape[1] != n_cols:
        raise ValueError(f"{what}: expected shape ({n_cols},) or (tokens, {n_cols}), got {a.shape}")
    # C order and float alignment (a misaligned float pointer is undefined behaviour in C)
    return np.require(a2, np.float32, ["C_CONTIGUOUS", "ALIGNED"]), single


def _out(out: F32 | None, shape: tuple[int, ...], what: str) -> F32:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if (
        out.dtype != np.float32
        or out.size != int(np.prod(shape))
        or not out.flags.c_contiguous
        or not out.flags.aligned
        or not out.flags.writeable
    ):
        raise ValueError(f"{what}: needs a writable C-contiguous float32 array of {shape}")
    return out


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise MemoryError(f"{what}: the kernel could not allocate its scratch")
    if rc != 0:
        raise ValueError(f"{what}: the kernel refused its arguments (code {rc})")


def matmul(
    w: Any,
    x: npt.ArrayLike,
    n_cols: int,
    *,
    wtype: int = Q4_0,
    threads: int = 1,
    out: F32 | None = None,
    n_rows: int | None = None,
) -> F32:
    """y = W x (see the module docstring); needs the compiled kernel."""
    m = _need_lib()
    wa, rows = _weights(w, n_cols, wtype, n_rows, "matmul weights")
    xa, single = _acts(x, n_cols, "matmul x")
    n_tok = xa.shape[0]
    y = _out(out, (n_tok, rows), "matmul out")
    ffi = m.ffi
    rc = m.lib.mer_q_matmul(
        wtype,
        ffi.from_buffer("uint8_t[]", wa),
        rows,
        n_cols,
        ffi.from_buffer("float[]", xa),
        n_tok,
        ffi.from_buffer("float[]", y, require_writable=True),
        int(threads),
    )
    _check(rc, "matmul")
    y = y.reshape(n_tok, rows)
    return y[0] if single else y


def expert_ffn(
    x: npt.ArrayLike,
    gate: Any,
    up: Any,
    down: Any,
    d_model: int,
    d_ff: int,
    *,
    types: tuple[int, int, int] = (Q4_0, Q4_0, Q4_0),
    threads: int = 1,
    out: F32 | None = None,
    hidden: F32 | None = None,
) -> F32:
    """y = down(silu(gate x) * (up x)) (see the module docstring); needs the compiled kernel."""
    m = _need_lib()
    tg, tu, td = types
    g, _ = _weights(gate, d_model, tg, d_ff, "gate")
    u, _ = _weights(up, d_model, tu, d_ff, "up")
    dn, _ = _weights(down, d_ff, td, d_model, "down")
    xa, single = _acts(x, d_model, "x")
    n_tok = xa.shape[0]
    y = _out(out, (n_tok, d_model), "expert_ffn out")
    ffi = m.ffi
    h_ptr = ffi.NULL
    if hidden is not None:
        hidden = _out(hidden, (n_tok, d_ff), "expert_ffn hidden")
        h_ptr = ffi.from_buffer("float[]", hidden, require_writable=True)
    rc = m.lib.mer_q_ffn(
        tg,
        ffi.from_buffer("uint8_t[]", g),
        tu,
        ffi.from_buffer("uint8_t[]", u),
        td,
        ffi.from_buffer("uint8_t[]", dn),
        d_model,
        d_ff,
        ffi.from_buffer("float[]", xa),
        n_tok,
        ffi.from_buffer("float[]", y, require_writable=True),
        h_ptr,
        int(threads),
    )
    _check(rc, "expert_ffn")
    y = y.reshape(n_tok, d_model)
    return y[0] if single else y


class NativeFFN:
    """expert_ffn bound to one shape and thread count: `ffn(x, gate, up, down)`.

    The C module's pool is process-wide, so there is nothing to close; close() exists so that
    this class and the numpy `ExpertFFN` are interchangeable.
    """

    kind = "native"

    def __init__(self, d_model: int, d_ff: int, threads: int = 1) -> None:
        _need_lib()
        self.d_model, self.d_ff = int(d_model), int(d_ff)
        self.threads = max(1, int(threads))

    def __call__(self, x: npt.ArrayLike, gate: Any, up: Any, down: Any) -> F32:
        return expert_ffn(x, gate, up, down, self.d_model, self.d_ff, threads=self.threads)

    def matvec(self, w: Any, n_cols: int, x: npt.ArrayLike) -> F32:
        return matmul(w, x, n_cols, threads=self.threads)

    def close(self) -> None:
        pass

    def __enter__(self) -> NativeFFN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool_stats(reset: bool = False) -> dict[str, int]:
    """How the calls split over threads went, since the last reset: jobs split, chunks done by
    the calling thread and by the workers, and ns the caller waited (its own chunks done) for
    the workers' last ones. A worker whose core is busy with another process takes fewer
    chunks; a worker that wakes late makes the caller wait."""
    m = _need_lib()
    out = m.ffi.new("int64_t[4]")
    m.lib.mer_q_pool_stats(out, int(reset))
    return dict(jobs=out[0], caller_chunks=out[1], worker_chunks=out[2], wait_ns=out[3])


def memread(buf: Any, threads: int = 1) -> int:
    """Sum of `buf` read as 64-bit words by the C module on `threads`: a pure streaming read."""
    m = _need_lib()
    a = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
    a = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    return int(m.lib.mer_q_memread(m.ffi.from_buffer("uint8_t[]", a), a.size, int(threads)))


def memory_read_gbs(
    n_bytes: int = 1 << 30, threads: int = 1, repeats: int = 5, buf: Any = None
) -> float:
    """Best streaming read rate of a fresh `n_bytes` buffer (GB/s): the kernel's physical limit.

    The C read (wide loads, summed) when compiled, else numpy's int64 sum. Pass `buf` to reuse
    one buffer across calls (it must be larger than the CPU caches to measure memory).
    """
    a = np.ones(n_bytes // 8, dtype=np.int64) if buf is None else buf
    native_ok = lib() is not None
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if native_ok:
            memread(a, threads)
        else:
            a.view(np.int64).sum()
        dt = time.perf_counter() - t0
        if i:  # the first pass warms page tables
            best = min(best, dt)
    return a.nbytes / best / 1e9


def native_quantize_q8_0(x: npt.ArrayLike) -> tuple[npt.NDArray[np.int8], F32, Any]:
    """The C quantiser (what every call applies to its activations), for tests."""
    m = _need_lib()
    xa, _ = _acts(x, np.shape(x)[-1], "x")
    n, c = xa.shape
    qs = np.empty((n, c), dtype=np.int8)
    d = np.empty((n, c // BLOCK), dtype=np.float32)
    sums = np.empty((n, c // BLOCK), dtype=np.int32)
    ffi = m.ffi
    rc = m.lib.mer_q_quantize_q8_0(
        ffi.from_buffer("float[]", xa),
        n,
        c,
        ffi.from_buffer("int8_t[]", qs, require_writable=True),
        ffi.from_buffer("float[]", d, require_writable=True),
        ffi.from_buffer("int32_t[]", sums, require_writable=True),
    )
    _check(rc, "quantize_q8_0")
    return qs, d, sums


# ---- the numpy emulation (the definition the kernel is tested against) -------------------


def quantize_q8_0(x: npt.ArrayLike) -> tuple[npt.NDArray[np.int8], F32, npt.NDArray[np.int32]]:
    """x (n, n_cols) float32 -> codes (n, n_cols) int8, scales (n, nb), code sums (n, nb)."""
    a = np.asarray(x, dtype=np.float32)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    n, c = a.shape
    xb = a.reshape(n, c // BLOCK, BLOCK)
    ab = np.abs(xb)
    bad = np.isnan(ab).any(axis=2)
    amax = np.where(np.isnan(ab), np.float32(0), ab).max(axis=2, initial=np.float32(0))
    with np.errstate(all="ignore"):
        d = np.where(bad, np.float32(np.nan), amax / np.float32(127)).astype(np.float32)
        ok = (d != 0) & ~bad
        inv = np.where(ok, np.float32(1) / np.where(ok, d, np.float32(1)), np.float32(0))
        v = xb * inv.astype(np.float32)[:, :, None]
    v = np.where(np.isnan(v), np.float32(0), v)
    v = np.clip(v, np.float32(-127), np.float32(127))
    q = np.rint(v).astype(np.int8)
    return q.reshape(n, c), d, q.sum(axis=2, dtype=np.int32)


def weight_parts(w: Any, n_cols: int, wtype: int = Q4_0) -> tuple[F32, npt.NDArray[np.int8]]:
    """Weights -> block scales (rows, nb) float32 and signed codes (rows, nb, 32) int8."""
    a, rows = _weights(w, n_cols, wtype, None, "weights")
    nb = n_cols // BLOCK
    blocks = a.reshape(rows, nb, BLOCK_BYTES[wtype])
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    qs = blocks[:, :, 2:]
    if wtype == Q4_0:
        codes = np.empty((rows, nb, BLOCK), dtype=np.int8)
        codes[:, :, :16] = (qs & np.uint8(15)).astype(np.int8) - np.int8(8)
        codes[:, :, 16:] = (qs >> np.uint8(4)).astype(np.int8) - np.int8(8)
    else:
        codes = np.ascontiguousarray(qs).view(np.int8)
    return d, codes


def _block_terms(w: Any, x: npt.ArrayLike, n_cols: int, wtype: int) -> F32:
    """The fp32 per-block terms fl(fl(dw * dx) * isum), shape (tokens, rows, nb)."""
    dw, cw = weight_parts(w, n_cols, wtype)
    qx, dx, _ = quantize_q8_0(np.asarray(x, dtype=np.float32).reshape(-1, n_cols))
    nb = n_cols // BLOCK
    qx3 = qx.reshape(-1, nb, BLOCK).astype(np.int32)
    isum = np.einsum("rbj,tbj->trb", cw.astype(np.int32), qx3)  # exact integers
    with np.errstate(all="ignore"):
        s = (dw[None, :, :] * dx[:, None, :]).astype(np.float32)
        return (s * isum.astype(np.float32)).astype(np.float32)


def emulate_matmul(w: Any, x: npt.ArrayLike, n_cols: int, wtype: int = Q4_0) -> F32:
    """The kernel's arithmetic in numpy; the block terms are summed in float64 (exactly enough).

    Same leading shape as `matmul` returns.
    """
    single = np.ndim(x) == 1
    terms = _block_terms(w, x, n_cols, wtype)
    with np.errstate(all="ignore"):
        y = terms.sum(axis=2, dtype=np.float64).astype(np.float32)
    return y[0] if single else y


def silu_mul(g: npt.ArrayLike, u: npt.ArrayLike) -> F32:
    """silu(g) * u in float32, as the kernel computes it (g / (1 + exp(-g)) * u)."""
    g32 = np.asarray(g, dtype=np.float32)
    with np.errstate(all="ignore"):
        e = np.exp(-g32.astype(np.float64)).astype(np.float32)
        return np.asarray((g32 / (np.float32(1) + e)) * np.asarray(u, np.float32), np.float32)


def emulate_hidden(
    x: npt.ArrayLike, gate: Any, up: Any, d_model: int, types: tuple[int, int] = (Q4_0, Q4_0)
) -> F32:
    """silu(gate x) * (up x) through the emulated matmuls, (tokens, d_ff)."""
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, d_model)
    g = emulate_matmul(gate, x2, d_model, types[0])
    u = emulate_matmul(up, x2, d_model, types[1])
    return silu_mul(g, u)


def emulate_ffn(
    x: npt.ArrayLike,
    gate: Any,
    up: Any,
    down: Any,
    d_model: int,
    d_ff: int,
    types: tuple[int, int, int] = (Q4_0, Q4_0, Q4_0),
) -> F32:
    """The kernel's FFN in numpy (the fallback's definition of the native path)."""
    single = np.ndim(x) == 1
    h = emulate_hidden(x, gate, up, d_model, (types[0], types[1]))
    y = emulate_matmul(down, h, d_ff, types[2])
    return y[0] if single else y


# ---- error bounds against float64 arithmetic on the dequantised weights -------------------


def dequantize(w: Any, n_cols: int, wtype: int = Q4_0) -> F64:
    """Weights -> float64 (rows, n_cols), exactly (fp16 scale x small integer)."""
    d, c = weight_parts(w, n_cols, wtype)
    with np.errstate(all="ignore"):
        return (d.astype(np.float64)[:, :, None] * c.astype(np.float64)).reshape(d.shape[0], -1)


DELTA = 1e-9  # failure probability per output of the "likely" bounds
_HOEFF = math.sqrt(math.log(2 / DELTA) / 2)  # Hoeffding: t = this * sqrt(sum of ranges^2)


def _x_blocks(x: npt.ArrayLike, n_cols: int, amax: npt.ArrayLike | None) -> tuple[F64, F64]:
    """|x| as (tokens, nb, 32) and the activation scales dx (tokens, nb), float64."""
    xb = np.abs(np.asarray(x, dtype=np.float64)).reshape(-1, n_cols // BLOCK, BLOCK)
    am = xb.max(axis=2) if amax is None else np.asarray(amax, np.float64).reshape(xb.shape[:2])
    return xb, am / 127.0 * (1 + 2 * U)


def _gamma(nb: int) -> float:
    m = 8 * nb + 3  # fp32 operations a result passes through: lanes + reductions + 2 products
    return m * U / (1 - m * U)


def _fp32_part(abs_c: F64, abs_dw: F64, xb: F64, dx: F64) -> F64:
    """Worst case of the fp32 arithmetic: gamma_m * sum |dw c| (|x| + dx), (tokens, rows)."""
    g = _gamma(abs_dw.shape[1])
    out = np.empty((xb.shape[0], abs_dw.shape[0]), dtype=np.float64)
    for t in range(xb.shape[0]):  # tokens one at a time keeps memory at (rows, nb)
        per_block = np.einsum("rbj,bj->rb", abs_c, xb[t] + dx[t][:, None])
        out[t] = g * (per_block * abs_dw).sum(axis=1)
    return out


def matmul_error_bound(
    w: Any,
    x: npt.ArrayLike,
    n_cols: int,
    wtype: int = Q4_0,
    *,
    kind: str = "worst",
    amax: npt.ArrayLike | None = None,
) -> F64:
    """A bound on |matmul(w, x) - dequantize(w) @ x| (float64 arithmetic), per output.

    Output r, block b: weight scale dw, codes c_j; activation scale dx = max|x| / 127.
    Quantising x moves each element by e_j, |e_j| <= dx (1/2 + 256 u) (rounding to the nearest
    code, plus the fp32 error of x * (1 / dx); u = 2^-24); the fp32 sums add at most
    gamma_m sum |dw c_j| (|x_j| + dx) (m = 8 nb + 3 operations deep, gamma_m = m u / (1 - m u)).

    kind="worst": every e_j at its extreme with the sign that adds up, guaranteed:
        sum_b |dw| dx (1/2 + 256 u) sum_j |c_j|  +  the fp32 term.
    kind="likely": the e_j independent with mean zero (rounding errors of data that is not
        aligned to the code grid), Hoeffding's inequality: exceeded with probability < 1e-9:
        sqrt(ln(2e9) / 2 * sum_b dw^2 dx^2 (1 + 512 u)^2 sum_j c_j^2)  +  the fp32 term.
    Only |x| enters, so x may be an upper bound of |x| and `amax` (tokens, nb) of each block's
    max|x|.
    """
    xb, dx = _x_blocks(x, n_cols, amax)
    dw, cw = weight_parts(w, n_cols, wtype)
    adw = np.abs(dw.astype(np.float64))
    ac = np.abs(cw.astype(np.float64))
    fp = _fp32_part(ac, adw, xb, dx)
    if kind == "worst":
        sum_c = ac.sum(axis=2)  # (rows, nb)
        q = (adw * sum_c) @ (dx.T * (0.5 + 256 * U))  # (rows, tokens)
        b = q.T + fp
    elif kind == "likely":
        sum_c2 = (ac**2).sum(axis=2)
        s = (adw**2 * sum_c2) @ (dx.T * (1 + 512 * U)) ** 2
        b = _HOEFF * np.sqrt(s.T) + fp
    else:
        raise ValueError(f"kind must be 'worst' or 'likely', got {kind!r}")
    return b[0] if np.ndim(x) == 1 else b


def ffn_reference(x: npt.ArrayLike, gate: F64, up: F64, down: F64) -> tuple[F64, F64, F64, F64]:
    """float64 FFN on dequantised weights: (y, g, u, h) with h = silu(g) * u, 2-D."""
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, gate.shape[1])
    g = x2 @ gate.T
    u = x2 @ up.T
    h = g / (1.0 + np.exp(-g)) * u
    return h @ down.T, g, u, h


def _silu2_bound(lo: F64, hi: F64) -> F64:
    """An upper bound of |silu''| on [lo, hi]: |silu''(x)| <= s'(x) (2 + |x|) =: f(|x|), with s
    the logistic; f rises to < 0.6 near |x| = 1 and falls for |x| >= 2."""
    a = np.where((lo <= 0) & (hi >= 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))  # min |x|
    sig = 1.0 / (1.0 + np.exp(-a))
    f = sig * (1 - sig) * (2 + a)
    return np.where(a < 2.0, 0.6, f)


def ffn_error_bound(
    x: npt.ArrayLike,
    gate: Any,
    up: Any,
    down: Any,
    d_model: int,
    d_ff: int,
    types: tuple[int, int, int] = (Q4_0, Q4_0, Q4_0),
) -> tuple[F64, F64]:
    """(bound, reference): |expert_ffn(...) - reference| <= bound per output, with probability
    > 1 - 1e-9 under the rounding model of matmul_error_bound(kind="likely").

    With e the rounding errors of x, e' those of the kernel's own h, and f the fp32 errors:
    g~ = g + G e + f_g, u~ = u + U e + f_u, and exactly
        h~ - h = s'(g) u (g~ - g) + silu(g) (u~ - u) + s'(g) (g~ - g)(u~ - u) + silu''(xi) (g~ - g)^2 u~ / 2
    (s' = silu'). The part linear in e, J e with J = D (diag(s'(g) u) G + diag(silu(g)) U),
    plus D e', is bounded by Hoeffding (ranges dx, dxh); the fp32 parts and the 8 u |h| of
    silu and the product pass through |D| as worst cases; the two second-order terms are bounded
    by max_j |D_rj s'(g_j)| |g~ - g| |u~ - u| and max_j |D_rj| |silu''| |u~_j| |g~ - g|^2 / 2
    (2-norms; |g~ - g| <= min(||G||_2 |e|, |likely bound of g|) + |f_g|, with
    |e|^2 <= sum dx^2 (1/2 + 256 u)^2 for sure). Failure probability: 1e-9 per output and per
    gate/up row.
    """
    x2 = np.asarray(x, dtype=np.float32).reshape(-1, d_model)
    G = dequantize(gate, d_model, types[0])
    Uw = dequantize(up, d_model, types[1])
    D = dequantize(down, d_ff, types[2])
    y, g, u, h = ffn_reference(x2, G, Uw, D)
    wg = matmul_error_bound(gate, x2, d_model, types[0], kind="worst")
    wu = matmul_error_bound(up, x2, d_model, types[1], kind="worst")
    bg = matmul_error_bound(gate, x2, d_model, types[0], kind="likely")
    bu = matmul_error_bound(up, x2, d_model, types[1], kind="likely")
    sig = 1.0 / (1.0 + np.exp(-g))
    silu = g * sig
    ds = sig * (1.0 + g * (1.0 - sig))
    # worst case of h~ - h, only for the size of the kernel's h (its quantisation scales)
    L = SILU_LIPSCHITZ
    dh = (
        L * wg * (np.abs(u) + wu)
        + np.abs(silu) * wu
        + 8 * U * (np.abs(silu) + L * wg) * (np.abs(u) + wu)
    )
    hu = np.abs(h) + dh
    xb, dx = _x_blocks(x2, d_model, None)
    hb, dxh = _x_blocks(hu, d_ff, None)
    rx = np.repeat(dx, BLOCK, axis=1) * (1 + 512 * U)  # (tokens, d_model): ranges of e
    rh = np.repeat(dxh, BLOCK, axis=1) * (1 + 512 * U)  # (tokens, d_ff): ranges of e'
    parts = [
        weight_parts(a, n, t)
        for a, n, t in ((gate, d_model, types[0]), (up, d_model, types[1]), (down, d_ff, types[2]))
    ]
    fps = [
        _fp32_part(np.abs(c.astype(np.float64)), np.abs(dw.astype(np.float64)), b, sc)
        for (dw, c), b, sc in zip(parts, (xb, xb, hb), (dx, dx, dxh), strict=True)
    ]
    fp_g, fp_u, fp_d = fps
    norm_g, norm_u = np.linalg.norm(G, 2), np.linalg.norm(Uw, 2)
    e_norm = np.sqrt(((rx / 2) ** 2).sum(axis=1))  # |e| <= this, for sure
    absD = np.abs(D)
    out = np.empty_like(y)
    for t in range(x2.shape[0]):
        J = D @ ((ds[t] * u[t])[:, None] * G + silu[t][:, None] * Uw)
        lin = _HOEFF * np.sqrt((J**2) @ rx[t] ** 2 + (D**2) @ rh[t] ** 2)
        fp_h = np.abs(ds[t] * u[t]) * fp_g[t] + np.abs(silu[t]) * fp_u[t] + 8 * U * hu[t]
        eg = min(norm_g * e_norm[t], float(np.linalg.norm(bg[t]))) + np.linalg.norm(fp_g[t])
        eu = min(norm_u * e_norm[t], float(np.linalg.norm(bu[t]))) + np.linalg.norm(fp_u[t])
        m2 = _silu2_bound(g[t] - wg[t], g[t] + wg[t])
        cross = np.abs(D * ds[t]).max(axis=1) * eg * eu
        quad = 0.5 * (absD * (m2 * (np.abs(u[t]) + wu[t]))).max(axis=1) * eg**2
        out[t] = lin + absD @ fp_h + fp_d[t] + cross + quad
    if np.ndim(x) == 1:
        return out[0], y[0]
    return out, y
