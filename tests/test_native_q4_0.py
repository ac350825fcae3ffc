"""The native q4_0 / q8_0 kernel against its numpy emulation and against gguf's float reference.

Every instruction set the CPU runs is tested (portable C, AVX2, AVX-512 VNNI), each against
the emulation of the same integer arithmetic (1e-5 relative, the fp32 accumulation order being
the only difference) and against float64 arithmetic on weights dequantised by `gguf.quants`
(within the derived bound of `matmul_error_bound` / `ffn_error_bound`).
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gg_dequantize
from gguf.quants import quantize as gg_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer.native import q4_0 as nq

pytestmark = pytest.mark.skipif(not nq.available(), reason="the q4_0 kernel is not compiled here")

GG = {nq.Q4_0: GGMLQuantizationType.Q4_0, nq.Q8_0: GGMLQuantizationType.Q8_0}
ISAS = nq.isas() or ["none"]


def _weights(rng: np.random.Generator, rows: int, cols: int, wtype: int, dist: str = "normal"):
    """Real q4_0 / q8_0 bytes, quantised by gguf from floats of distribution `dist`."""
    shape = (rows, cols)
    if dist == "normal":
        f = rng.standard_normal(shape)
    elif dist == "uniform":
        f = rng.uniform(-1, 1, shape)
    elif dist == "laplace":
        f = rng.laplace(size=shape)
    elif dist == "student-t":  # heavy tails: a few huge weights set their block's scale
        f = rng.standard_t(2.0, size=shape)
    elif dist == "outliers":
        f = rng.standard_normal(shape)
        f.reshape(-1, 32)[:, 0] *= 50.0
    elif dist == "sparse":  # whole blocks of zeros (scale 0) among normal ones
        f = rng.standard_normal(shape)
        f.reshape(-1, 32)[rng.random(f.size // 32) < 0.3] = 0.0
    else:
        raise AssertionError(dist)
    w = gg_quantize((f * 0.02).astype(np.float32), GG[wtype])
    return np.ascontiguousarray(w.reshape(rows, -1))


def _ref(w: np.ndarray, x: np.ndarray, wtype: int) -> np.ndarray:
    wf = gg_dequantize(w, GG[wtype]).astype(np.float64)
    return np.asarray(x, np.float64) @ wf.T


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- quantisation: bit for bit -------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
def test_quantiser_equals_the_emulation_bit_for_bit(isa: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[0, :32] = 0.0  # a zero block: d = 0, codes 0
    x[1, 40] = np.nan  # a nan: its block's d is nan
    x[2, 70] = np.inf  # an inf: d = inf, codes 0 but the inf's own
    x[3] *= np.float32(1e-40)  # subnormal
    x[4] *= np.float32(1e30)
    x[5, ::2] = np.float32(0.5) * np.arange(128, dtype=np.float32)  # exact halves: ties to even
    with nq.using_isa(isa):
        qs, d, sums = nq.native_quantize_q8_0(x)
    eq, ed, esums = nq.quantize_q8_0(x)
    np.testing.assert_array_equal(qs, eq)
    np.testing.assert_array_equal(d, ed)  # nan == nan for assert_array_equal
    np.testing.assert_array_equal(sums, esums)
    assert np.isnan(d[1, 1]) and d[0, 0] == 0 and np.isinf(d[2, 2])
    assert np.abs(qs).max() <= 127


def test_emulated_quantiser_is_ggml_q8_0() -> None:
    """Codes and scales as gguf's q8_0 (which rounds half away from zero, and d to fp16)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    qs, d, _ = nq.quantize_q8_0(x)
    ref = gg_quantize(x, GGMLQuantizationType.Q8_0).reshape(4, 4, 34)
    ref_d = ref[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    ref_q = ref[:, :, 2:].view(np.int8).reshape(4, 128)
    np.testing.assert_allclose(d, ref_d, rtol=1e-3)  # fp16 rounding of ggml's stored d
    assert np.abs(qs.astype(int) - ref_q).max() <= 1  # only ties and the fp16 d differ


# ---- matmul: native vs emulation, over shapes, threads, layouts -------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    blocks=st.integers(1, 13),
    n_tok=st.integers(1, 6),
    threads=st.integers(1, 3),
    wtype=st.sampled_from([nq.Q4_0, nq.Q8_0]),
    isa=st.sampled_from(ISAS),
    w_offset=st.integers(0, 63),
    x_layout=st.sampled_from(["contiguous", "strided", "fortran", "misaligned"]),
    seed=st.integers(0, 2**31),
)
def test_matmul_equals_the_emulation(
    rows: int,
    blocks: int,
    n_tok: int,
    threads: int,
    wtype: int,
    isa: str,
    w_offset: int,
    x_layout: str,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    cols = 32 * blocks
    w = _weights(rng, rows, cols, wtype)
    # weights at any byte offset (a slot buffer's views need not be aligned)
    buf = np.zeros(w.nbytes + 64, dtype=np.uint8)
    wv = buf[w_offset : w_offset + w.nbytes]
    wv[:] = w.reshape(-1)
    x0 = rng.standard_normal((n_tok, cols)).astype(np.float32)
    if x_layout == "strided":
        wide = np.zeros((n_tok, 2 * cols), dtype=np.float32)
        wide[:, ::2] = x0
        x = wide[:, ::2]
    elif x_layout == "fortran":
        x = np.asfortranarray(x0)
    elif x_layout == "misaligned":
        raw = np.zeros(x0.nbytes + 1, dtype=np.uint8)
        x = raw[1:].view(np.float32).reshape(n_tok, cols)
        x[:] = x0
    else:
        x = x0
    with nq.using_isa(isa):
        y = nq.matmul(memoryview(wv), x, cols, wtype=wtype, threads=threads)
    ye = nq.emulate_matmul(w, x0, cols, wtype)
    assert y.shape == (n_tok, rows) and y.dtype == np.float32
    assert _rel(y, ye) <= 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", [nq.Q4_0, nq.Q8_0])
def test_rows_split_over_threads_that_do_not_divide_them(isa: str, wtype: int) -> None:
    """Big enough to be split (>= 1 MiB per thread): 2311 rows (prime) over 2, 3, 5 threads."""
    rng = np.random.default_rng(3)
    rows, cols = 2311, 4096
    w = _weights(rng, rows, cols, wtype)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    ye = nq.emulate_matmul(w, x, cols, wtype)
    with nq.using_isa(isa):
        y_one = nq.matmul(w, x, cols, wtype=wtype, threads=1)
        for threads in (1, 2, 3, 5):
            y = nq.matmul(w, x, cols, wtype=wtype, threads=threads)
            assert _rel(y, ye) <= 1e-5, threads
            # a row's arithmetic never depends on which thread, or which chunk, computed it
            assert np.array_equal(y.view(np.uint32), y_one.view(np.uint32)), threads
        # a single token, a single row
        assert _rel(nq.matmul(w, x[0], cols, wtype=wtype, threads=3), ye[0]) <= 1e-5
        y1 = nq.matmul(w[:1], x, cols, wtype=wtype, threads=3)
        assert y1.shape == (2, 1) and _rel(y1, ye[:, :1]) <= 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_ffn_is_the_same_to_the_bit_on_any_thread_count(isa: str) -> None:
    """Threads claim chunks of rows as they go: whatever the split (and the SwiGLU tail at
    a chunk's end), every output is the single-thread one; the pool's counters add up."""
    rng = np.random.default_rng(13)
    d_model, d_ff = 1024, 2016  # gate + up 2.2 MiB: split over 2 threads; the down is not
    g, u = (_weights(rng, d_ff, d_model, nq.Q4_0) for _ in range(2))
    d = _weights(rng, d_model, d_ff, nq.Q4_0)
    x = (rng.standard_normal((3, d_model)) * 4).astype(np.float32)
    with nq.using_isa(isa):
        h1 = np.empty((3, d_ff), np.float32)
        y1 = nq.expert_ffn(x, g, u, d, d_model, d_ff, threads=1, hidden=h1)
        nq.pool_stats(reset=True)
        for threads in (2, 3):
            h = np.empty((3, d_ff), np.float32)
            y = nq.expert_ffn(x, g, u, d, d_model, d_ff, threads=threads, hidden=h)
            assert np.array_equal(h.view(np.uint32), h1.view(np.uint32)), threads
            assert np.array_equal(y.view(np.uint32), y1.view(np.uint32)), threads
    st = nq.pool_stats(reset=True)
    # per call one split job: gate + up in chunks of whole 64-row tiles of <= 256 KiB
    row_bytes = 2 * d_model // 32 * 18
    chunk = (262144 // row_bytes) // 64 * 64
    assert st["jobs"] == 2
    assert st["caller_chunks"] + st["worker_chunks"] == 2 * -(-d_ff // chunk)
    assert nq.pool_stats()["jobs"] == 0


@pytest.mark.parametrize("isa", ISAS)
def test_batches_beyond_a_register_group_and_a_row_tile(isa: str) -> None:
    """9 tokens (3 groups of up to 4) over rows tiled for L2, and over rows in column chunks:
    every (token, row) once."""
    rng = np.random.default_rng(4)
    rows, cols = 700, 1024
    w = _weights(rng, rows, cols, nq.Q4_0)
    x = rng.standard_normal((9, cols)).astype(np.float32)
    with nq.using_isa(isa):
        y = nq.matmul(w, x, cols, threads=2)
    assert _rel(y, nq.emulate_matmul(w, x, cols)) <= 1e-5
    # rows longer than a column chunk (128 blocks): 130 blocks = a chunk and 2 more blocks
    for wtype in (nq.Q4_0, nq.Q8_0):
        cols = 130 * 32
        w = _weights(rng, 70, cols, wtype)
        x = rng.standard_normal((5, cols)).astype(np.float32)
        with nq.using_isa(isa):
            y = nq.matmul(w, x, cols, wtype=wtype)
        assert _rel(y, nq.emulate_matmul(w, x, cols, wtype)) <= 1e-5


# ---- against float64 arithmetic: the derived bound ------------------------------------------


@pytest.mark.parametrize("wtype", [nq.Q4_0, nq.Q8_0])
@pytest.mark.parametrize(
    "dist", ["normal", "uniform", "laplace", "student-t", "outliers", "sparse"]
)
def test_error_against_gguf_float64_within_the_derived_bound(wtype: int, dist: str) -> None:
    rng = np.random.default_rng(5)
    rows, cols = 96, 2048
    w = _weights(rng, rows, cols, wtype, dist)
    x = np.stack(
        [rng.standard_normal(cols), rng.laplace(size=cols), rng.standard_t(3, cols)]
    ).astype(np.float32)
    ref = _ref(w, x, wtype)
    worst = nq.matmul_error_bound(w, x, cols, wtype, kind="worst")
    likely = nq.matmul_error_bound(w, x, cols, wtype, kind="likely")
    # the worst case aligns every rounding error, yet stays below the outputs' own size; the
    # likely bound (Hoeffding, 1e-9) is a few percent of them
    assert np.median(worst / np.abs(ref).mean()) < 1.0
    assert np.median(likely / np.abs(ref).mean()) < 0.2
    for isa in ISAS:
        with nq.using_isa(isa):
            y = nq.matmul(w, x, cols, wtype=wtype, threads=2)
        err = np.abs(y - ref)
        assert (err <= worst).all(), (isa, float((err / worst).max()))
        assert (err <= likely).all(), (isa, float((err / likely).max()))


def test_error_statistics_are_those_of_round_to_nearest() -> None:
    """The bound is a worst case; the typical error must be rounding's: each activation off by
    a uniform +-dx/2, so var(err_r) = sum_b dw_b^2 dx_b^2 / 12 sum_j c_j^2. A kernel that
    truncated, or quantised more coarsely, would miss this by a factor >= 1.7."""
    rng = np.random.default_rng(6)
    rows, cols = 4000, 512
    w = _weights(rng, rows, cols, nq.Q4_0)
    x = rng.standard_normal(cols).astype(np.float32)
    y = nq.matmul(w, x, cols)
    err = y - _ref(w, x[None], nq.Q4_0)[0]
    dw, c = nq.weight_parts(w, cols)
    _, dx, _ = nq.quantize_q8_0(x)
    var = (
        dw.astype(np.float64) ** 2
        * (dx.astype(np.float64) ** 2 / 12)[0]
        * (c.astype(np.float64) ** 2).sum(2)
    ).sum(1)
    ratio = float(np.sqrt(np.mean(err**2) / np.mean(var)))
    assert 0.8 < ratio < 1.2, ratio


# ---- the fused FFN -------------------------------------------------------------------------


def _ffn_weights(rng, d_model, d_ff, types=(nq.Q4_0, nq.Q4_0, nq.Q4_0), dist="normal"):
    g = _weights(rng, d_ff, d_model, types[0], dist)
    u = _weights(rng, d_ff, d_model, types[1], dist)
    d = _weights(rng, d_model, d_ff, types[2], dist)
    # scale to give silu a working range (the gguf weights above have std 0.02)
    return g, u, d


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("d_model", "d_ff", "n_tok", "threads", "types"),
    [
        (128, 384, 1, 1, (nq.Q4_0,) * 3),
        (512, 1792, 3, 2, (nq.Q4_0,) * 3),
        (96, 160, 5, 3, (nq.Q4_0, nq.Q8_0, nq.Q8_0)),
        (32, 32, 1, 2, (nq.Q8_0, nq.Q4_0, nq.Q4_0)),
    ],
)
def test_ffn_stages_equal_the_emulation(isa, d_model, d_ff, n_tok, threads, types) -> None:
    """gate/up/SwiGLU -> h equals the emulation's h; down(h) equals the emulated down of that h.

    (Stage by stage: the native h differs from the emulated one by fp32 accumulation order, and
    requantising h could flip one code at a tie, which a whole-FFN comparison would count.)"""
    rng = np.random.default_rng(d_model + n_tok)
    g, u, d = _ffn_weights(rng, d_model, d_ff, types)
    x = (rng.standard_normal((n_tok, d_model)) * 30).astype(np.float32)
    h = np.empty((n_tok, d_ff), dtype=np.float32)
    with nq.using_isa(isa):
        y = nq.expert_ffn(x, g, u, d, d_model, d_ff, types=types, threads=threads, hidden=h)
    he = nq.emulate_hidden(x, g, u, d_model, types[:2])
    assert _rel(h, he) <= 1e-5
    assert _rel(y, nq.emulate_matmul(d, h, d_ff, types[2])) <= 1e-5
    assert _rel(y, nq.emulate_ffn(x, g, u, d, d_model, d_ff, types)) <= 1e-3


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
def test_ffn_error_against_gguf_float64_within_the_derived_bound(dist: str) -> None:
    """(Weights with an outlier in every block are left out here: the bound still holds for
    them, but its second-order terms, through ||G||_2, exceed the outputs.)"""
    rng = np.random.default_rng(7)
    d_model, d_ff = 256, 640
    g, u, d = _ffn_weights(rng, d_model, d_ff, dist=dist)
    x = (rng.standard_normal((2, d_model)) * 30).astype(np.float32)
    bound, ref = nq.ffn_error_bound(x, g, u, d, d_model, d_ff)
    # independent reference: gguf's dequantisation and float64
    G, Uw, D = (gg_dequantize(a, GGMLQuantizationType.Q4_0).astype(np.float64) for a in (g, u, d))
    a = x.astype(np.float64) @ G.T
    ref_gg = (a / (1 + np.exp(-a)) * (x.astype(np.float64) @ Uw.T)) @ D.T
    np.testing.assert_allclose(ref, ref_gg, rtol=1e-12, atol=1e-12 * np.abs(ref_gg).max())
    assert np.median(bound / np.abs(ref_gg).mean()) < 0.5
    for isa in ISAS:
        with nq.using_isa(isa):
            y = nq.expert_ffn(x, g, u, d, d_model, d_ff, threads=2)
        assert (np.abs(y - ref_gg) <= bound).all(), isa


# ---- nan / inf scales, concurrency, fork, bad arguments -----------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", [nq.Q4_0, nq.Q8_0])
def test_nan_and_inf_scales_are_carried_not_crashed_on(isa: str, wtype: int) -> None:
    rng = np.random.default_rng(8)
    rows, cols = 32, 256
    w = _weights(rng, rows, cols, wtype)
    blocks = w.reshape(rows, cols // 32, -1)
    bad = {0x7E00: (2, 0), 0x7C00: (5, 3), 0xFC00: (9, 7), 0x7C01: (11, 1)}  # nan, +inf, -inf, snan
    for bits, (r, b) in bad.items():
        blocks[r, b, :2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    with nq.using_isa(isa), np.errstate(all="ignore"):
        y = nq.matmul(w, x, cols, wtype=wtype, threads=2)
        ye = nq.emulate_matmul(w, x, cols, wtype)
    fin = np.isfinite(ye)
    np.testing.assert_array_equal(np.isfinite(y), fin)
    assert not fin[:, [2, 5, 9, 11]].any() and fin.sum() == 2 * (rows - 4)
    assert _rel(y[fin], ye[fin]) <= 1e-5
    # and through the FFN: the bad rows of gate make h non-finite, which down carries
    dm, dff = cols, rows
    up = _weights(rng, dff, dm, nq.Q4_0)
    down = _weights(rng, dm, dff, nq.Q4_0)
    with nq.using_isa(isa):
        yf = nq.expert_ffn(x, w, up, down, dm, dff, types=(wtype, nq.Q4_0, nq.Q4_0))
    assert yf.shape == (2, dm) and not np.isfinite(yf).all()


def test_concurrent_python_threads_get_their_own_results() -> None:
    rng = np.random.default_rng(9)
    rows, cols = 4096, 1024  # 2.4 MB: each call splits over the pool, or runs inline when busy
    ws = [_weights(rng, rows, cols, nq.Q4_0) for _ in range(3)]
    x = rng.standard_normal(cols).astype(np.float32)
    want = [nq.matmul(w, x, cols) for w in ws]
    got: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        got[i] = [nq.matmul(ws[i], x, cols, threads=2) for _ in range(20)]

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(3):
        for y in got[i]:
            np.testing.assert_array_equal(y, want[i])


def _pool_case() -> tuple[np.ndarray, np.ndarray]:
    """A 2.4 MB q4_0 matrix (split over 2 threads) and an activation."""
    rng = np.random.default_rng(10)
    w = rng.integers(0, 255, 1024 * 2304, dtype=np.uint8)
    w.reshape(-1, 18)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return w, rng.standard_normal(4096).astype(np.float32)


def _child(q) -> None:  # type: ignore[no-untyped-def]
    w, x = _pool_case()
    q.put(float(nq.matmul(w, x, 4096, threads=2).sum()))


def test_a_forked_child_rebuilds_the_pool() -> None:
    """A fork after the pool started (multiprocessing's default on Linux) must not deadlock."""
    w, x = _pool_case()
    want = float(nq.matmul(w, x, 4096, threads=2).sum())
    assert nq.lib().lib.mer_q_pool_threads() >= 2
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 0
    assert q.get(timeout=5) == want


def test_memread_sums_words() -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2**63, 100_003, dtype=np.uint64).view(np.uint8)
    tail = rng.integers(0, 255, 5, dtype=np.uint8)
    buf = np.concatenate([a, tail])
    want = (int(a.view(np.uint64).sum(dtype=np.uint64)) + int(tail.sum())) % 2**64
    for isa in ISAS:
        with nq.using_isa(isa):
            assert nq.memread(buf, threads=2) == want
    assert nq.memory_read_gbs(1 << 22, repeats=1) > 0


def test_bad_arguments_are_value_errors() -> None:
    w = np.zeros((4, 18), dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of 32"):
        nq.matmul(w, np.zeros(33, np.float32), 33)
    with pytest.raises(ValueError, match="bytes"):
        nq.matmul(w[:, :17], np.zeros(32, np.float32), 32)
    with pytest.raises(ValueError, match="shape"):
        nq.matmul(w, np.zeros((2, 64), np.float32), 32)
    with pytest.raises(ValueError, match="gate"):
        nq.expert_ffn(np.zeros(32, np.float32), w[:3], w, w, 32, 4)
    with pytest.raises(ValueError, match="type"):
        nq.matmul(w, np.zeros(32, np.float32), 32, wtype=3)
