"""mer run: the executor against clock-free replay counts, a float64 reference, and strace.

Fast by construction: the mixtral-tiny shape (81 KiB experts) and a few tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from mer.core import Replay, ReplayConfig, replay_counts
from mer.engine.executor import EngineConfig, Executor, initial_hidden
from mer.engine.ffn import native_available
from mer.engine.gguf_synth import synth_gguf
from mer.engine.store import ExpertStore
from mer.errors import BadInput
from mer.shapes import get_shape
from mer.traces.format import TraceMeta, from_arrays, write_trace

SHAPE = get_shape("mixtral-tiny")
FFN_KINDS = ["numpy"] + (["native"] if native_available() else [])
BUNDLED = (
    Path(__file__).resolve().parents[1] / "traces" / "data" / "mixtral-offloading-h39s.parquet"
)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experts") / "tiny.gguf"
    synth_gguf(path, SHAPE, seed=3)
    return path


def _trace(n_tokens: int, seed: int, weights: bool, n_layers: int = 32, n_experts: int = 8):
    """A routed trace with skew (so caches hit), optionally with gate weights."""
    rng = np.random.default_rng(seed)
    k = 2
    p = np.arange(n_experts, 0, -1, dtype=float) ** 2
    p /= p.sum()
    experts = np.empty((n_tokens, n_layers, k), dtype=np.int16)
    for t in range(n_tokens):
        for layer in range(n_layers):
            experts[t, layer] = rng.choice(n_experts, size=k, replace=False, p=p)
    w = None
    if weights:
        raw = rng.uniform(0.2, 1.0, size=(n_tokens, n_layers, k)).astype(np.float32)
        raw.sort(axis=-1)
        w = (raw[..., ::-1] / raw.sum(axis=-1, keepdims=True)).astype(np.float32)
    meta = TraceMeta(
        model="synthetic-test", n_layers=n_layers, n_experts=n_experts, top_k=k, source={}
    )
    return from_arrays(experts, meta, weights=w, name="test-trace")


def _engine(**kw: object) -> EngineConfig:
    base: dict[str, object] = dict(threads=2, mode="seed", io="auto", queue_depth=8)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def _run(trace, store, rcfg: ReplayConfig, **kw: object):
    return Executor(trace, store, rcfg, _engine(**kw)).run()


# -- counts: the engine takes exactly the decision core's decisions ------------------------


@pytest.mark.parametrize(
    ("policy", "scope", "slots"),
    [
        ("lru", "global", 40),
        ("lru", "per-layer", 64),
        ("lfu", "global", 24),
        ("opt", "global", 40),
        ("fifo", "per-layer", 40),
        ("cycle", "global", 40),
        ("cycle", "per-layer", 64),
        ("knn", "global", 40),
        ("knn", "per-layer", 64),
        ("knnctx", "global", 40),
        ("lru", "global", 1),  # smaller than a step: bypass reads and step victims
        ("lru", "global", 2),
    ],
)
def test_prefetch_off_counts_equal_replay_counts(
    gguf_file: Path, policy: str, scope: str, slots: int
) -> None:
    tr = read_bundled(6)
    store = ExpertStore.open(gguf_file)
    rcfg = ReplayConfig(policy=policy, scope=scope, cache_slots=slots, predictor="none")
    res = _run(tr, store, rcfg)
    # the clock-free replay, reading nothing: every read completes at once
    rep = Replay.from_trace(tr, ReplayConfig(**rcfg.to_dict()))
    want_bytes = 0
    for t in range(rep.n_steps):
        for adm in rep.step(t).reads:
            layer, expert = divmod(adm.key, 8)
            want_bytes += sum(r.length for r in store.read_plan(layer, expert))
            rep.complete(adm.key)
    ref = rep.stats
    s = res.summary
    assert (s.hits, s.misses) == (ref.total("hits"), ref.total("misses"))
    assert s.hit_rate == ref.hit_rate
    assert s.extra["evictions"] == ref.total("evictions")
    assert s.extra["bypass_reads"] == ref.total("bypass")
    assert s.extra["reads"] == s.misses
    assert s.bytes_read == want_bytes
    assert s.kind == "measured" and s.tokens == 6 and s.layers == 32


def read_bundled(n: int):
    from mer.traces.format import read_trace

    return read_trace(BUNDLED).head(n)


# -- the data flow: what was computed is what the weights say ---------------------------------


def _reference_hidden(trace, gguf_path: Path, seed: int) -> np.ndarray:
    """float64 replay of the data flow on weights read by gguf's own reader and dequantizer."""
    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}

    def deq(name: str) -> np.ndarray:
        t = tensors[name]
        assert t.tensor_type == GGMLQuantizationType.Q4_0
        return dequantize(np.asarray(t.data), GGMLQuantizationType.Q4_0).astype(np.float64)

    L = trace.n_layers
    gate = [deq(f"blk.{i}.ffn_gate_exps.weight") for i in range(L)]  # (E, d_ff, d_model)
    up = [deq(f"blk.{i}.ffn_up_exps.weight") for i in range(L)]
    down = [deq(f"blk.{i}.ffn_down_exps.weight") for i in range(L)]
    experts = trace.experts
    w = trace.weights()
    x = initial_hidden(SHAPE.d_model, seed).astype(np.float64)
    for t in range(trace.n_tokens):
        for layer in range(L):
            y = np.zeros_like(x)
            for r in range(trace.top_k):
                e = int(experts[t, layer, r])
                g = gate[layer][e] @ x
                u = up[layer][e] @ x
                h = g / (1 + np.exp(-g)) * u
                wr = 1.0 / trace.top_k if w is None else float(w[t, layer, r])
                y += wr * (down[layer][e] @ h)
            z = x + y
            x = z / np.sqrt(np.mean(z * z) + 1e-6)
    return x


@pytest.mark.parametrize(
    ("scope", "slots", "predictor", "io"),
    [
        ("global", 40, "none", "auto"),
        # one slot per layer: bypass reads, and hits evicted by their own step's miss
        ("per-layer", 32, "none", "auto"),
        ("global", 24, "oracle", "auto"),
        ("global", 16, "previous-token", "pread"),
    ],
)
@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_hidden_vector_matches_a_float64_reference(
    gguf_file: Path, scope: str, slots: int, predictor: str, io: str, ffn: str
) -> None:
    tr = _trace(4, seed=11, weights=True)
    store = ExpertStore.open(gguf_file)
    rcfg = ReplayConfig(cache_slots=slots, scope=scope, predictor=predictor, pipeline_depth=2)
    res = _run(tr, store, rcfg, io=io, seed=5, ffn=ffn)
    assert res.summary.extra["ffn"].startswith(ffn)
    ref = _reference_hidden(tr, gguf_file, seed=5)
    if ffn == "numpy":  # float32 on the dequantised weights: the data flow to fp32 rounding
        np.testing.assert_allclose(res.hidden, ref, rtol=2e-3, atol=2e-3)
    else:
        # The native kernel multiplies q8_0-quantised activations (ggml's arithmetic): each
        # expert output carries ~1% rounding noise (docs/engine.md), and the hidden vector
        # (unit rms) that noise; a wrong expert, slot or gate weight moves it by > 0.1.
        assert float(np.sqrt(np.mean((res.hidden - ref) ** 2))) < 1e-2
        np.testing.assert_allclose(res.hidden, ref, atol=5e-2)
    if scope == "per-layer":
        assert res.summary.extra["bypass_reads"] > 0
        assert res.summary.extra["stashed_step_victims"] > 0
    if predictor != "none":
        pf = res.summary.prefetch
        assert pf["issued"] > 0
        assert pf["used"] + pf["wasted"] <= pf["issued"]


def test_prefetch_run_counts_are_consistent(gguf_file: Path) -> None:
    tr = read_bundled(8)
    store = ExpertStore.open(gguf_file)
    rcfg = ReplayConfig(cache_slots=48, predictor="oracle", pipeline_depth=1)
    res = _run(tr, store, rcfg, mode="model")
    s = res.summary
    lookups = 8 * 32 * 2
    assert s.hits + s.misses == lookups
    assert int(res.tokens["hits"].sum()) == s.hits
    assert int(res.tokens["misses"].sum()) == s.misses
    assert int(res.tokens["prefetch_issued"].sum()) == s.prefetch["issued"]
    # reads = demand misses that were not waiting on a prefetch + prefetches
    assert s.extra["reads"] == s.misses - s.prefetch["late"] + s.prefetch["issued"]
    # an oracle with room never does worse than no prefetch on the same cache
    base = replay_counts(Replay.from_trace(tr, ReplayConfig(cache_slots=48)))
    assert s.hits >= base.total("hits") - s.prefetch["late"]
    assert s.dense_s > 0 and s.mode == "model"


def test_prefetch_bytes_and_hidden_share_in_a_run_and_its_simulation(gguf_file: Path) -> None:
    """Prefetch bytes are the counts times one read of the file's plan, in the run and in
    the simulation that chunks reads by the same plan; with prefetch off the two read
    exactly the same bytes, and a run's hidden read share is what its times say."""
    from mer.sim.hardware import load_profile
    from mer.sim.model import options_like, simulate

    tr = read_bundled(6)
    store = ExpertStore.open(gguf_file)
    per_read = sum(r.length for r in store.read_plan(0, 0))
    for rcfg in (
        ReplayConfig(cache_slots=48, predictor="oracle", pipeline_depth=2),
        ReplayConfig(cache_slots=24),
    ):
        s = _run(tr, store, rcfg, mode="model").summary
        sim = simulate(tr, rcfg, load_profile("ci-tiny"), options_like(s)).summary
        for out in (s, sim):
            pf = out.prefetch
            for k in ("issued", "used", "late", "wasted"):
                assert pf[f"{k}_bytes"] == pf[k] * per_read, (out.kind, k)
            assert 0.0 <= out.hidden_read_share <= 1.0
            assert out.read_busy_s > 0
            assert out.hidden_read_share == pytest.approx(
                max(0.0, 1 - out.io_wait_s / out.read_busy_s)
            )
        assert sim.extra["read_ranges"] == s.extra["read_ranges"]
        if not rcfg.prefetch_on:
            assert (sim.hits, sim.misses, sim.bytes_read) == (s.hits, s.misses, s.bytes_read)
        drv = s.extra["driver_time"]
        assert drv["ffn_direct_n"] + drv["ffn_busy_n"] == s.lookups
        assert drv["submit_n"] == s.extra["reads"] and drv["steps"] == 6 * 32


def test_geometry_mismatch_is_bad_input(gguf_file: Path) -> None:
    tr = _trace(2, seed=1, weights=False, n_layers=4, n_experts=8)
    with pytest.raises(BadInput, match=r"4 layers x 8 experts.*32 layers x 8 experts"):
        Executor(tr, ExpertStore.open(gguf_file), ReplayConfig(cache_slots=8), _engine())


# -- the CLI -------------------------------------------------------------------------------


def _mer(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mer", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_json_parquet_and_summary(gguf_file: Path, tmp_path: Path) -> None:
    out, summ = tmp_path / "tok.parquet", tmp_path / "s.json"
    proc = _mer(
        "run",
        str(BUNDLED),
        "--experts",
        str(gguf_file),
        "--cache-slots",
        "64",
        "--tokens",
        "4",
        "--threads",
        "2",
        "--json",
        "-o",
        str(out),
        "--summary",
        str(summ),
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    ref = replay_counts(Replay.from_trace(read_bundled(4), ReplayConfig(cache_slots=64)))
    assert (d["hits"], d["misses"]) == (ref.total("hits"), ref.total("misses"))
    for key in (
        "hit_rate",
        "tokens_per_s",
        "layer_iterations_per_s",
        "io_wait_share",
        "bytes_read",
        "prefetch",
        "latency",
    ):
        assert key in d
    assert d["extra"]["peak_rss_bytes"] >= d["extra"]["cache_buffer_bytes"]
    from mer.summary import read_token_table

    rows, s = read_token_table(out)
    assert len(rows) == 4 and s is not None and s.hits == d["hits"]
    assert json.loads(summ.read_text())["misses"] == d["misses"]


def test_cli_text_and_bad_trace(gguf_file: Path, tmp_path: Path) -> None:
    proc = _mer("run", str(BUNDLED), "--experts", str(gguf_file), "--tokens", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "=== mer measured run" in proc.stdout and "hit rate" in proc.stdout
    other = tmp_path / "wide.parquet"
    write_trace(_trace(2, seed=2, weights=False, n_layers=32, n_experts=16), other)
    proc = _mer("run", str(other), "--experts", str(gguf_file), "--tokens", "2")
    assert proc.returncode == 2
    assert "16 experts" in proc.stderr and "Traceback" not in proc.stderr
    proc = _mer("run", str(BUNDLED), "--experts", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_strace_expert_reads_go_through_io_uring(gguf_file: Path, tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    log = tmp_path / "strace.log"
    cmd = [
        "strace", "-f", "-y", "-o", str(log),
        "-e", "trace=io_uring_setup,io_uring_enter,pread64,preadv,preadv2,read",
        sys.executable, "-m", "mer", "run", str(BUNDLED), "--experts", str(gguf_file),
        "--cache-slots", "16", "--tokens", "3", "--io", "uring", "--json", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and (
        "ptrace" in proc.stderr or "Operation not permitted" in proc.stderr
    ):
        pytest.skip(f"strace can not trace here: {proc.stderr.strip()[:200]}")
    if proc.returncode == 1 and "io_uring" in proc.stderr:
        pytest.skip(f"io_uring is not available here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    misses = json.loads(proc.stdout)["misses"]
    text = log.read_text()
    name = re.escape(gguf_file.name)
    enters = re.findall(r"io_uring_enter\(", text)
    # No pread/preadv of the expert file at all, and plain read() of it only for the header
    # (the store checks the magic): every byte of expert data came through the ring.
    preads = [
        ln for ln in text.splitlines() if re.search(rf"\b(pread64|preadv2?)\(\d+<[^>]*{name}>", ln)
    ]
    read_bytes = sum(
        int(m.group(1))
        for m in re.finditer(rf"\bread\(\d+<[^>]*{name}>.*= (\d+)$", text, flags=re.M)
    )
    store = ExpertStore.open(gguf_file)
    first_expert = min(
        r.offset for layer in range(32) for e in range(8) for r in store.expert_ranges(layer, e)
    )
    assert "io_uring_setup(" in text
    assert misses > 0
    assert len(enters) >= 1
    assert preads == [], preads[:3]
    assert read_bytes < first_expert


@pytest.mark.parametrize("io", ["auto", "pread"])
def test_background_depth_changes_timing_only(gguf_file: Path, io: str) -> None:
    """Prefetch chunks held back behind demand reads (background depth 1) and late
    prefetches expedited: the data flow is the float64 reference's, the counts add up."""
    tr = _trace(4, seed=11, weights=True)
    store = ExpertStore.open(gguf_file)
    rcfg = ReplayConfig(
        cache_slots=24, predictor="previous-token", pipeline_depth=4, prefetch_inflight=8
    )
    res = _run(tr, store, rcfg, io=io, seed=5, ffn="numpy", background_depth=1)
    ref = _reference_hidden(tr, gguf_file, seed=5)
    np.testing.assert_allclose(res.hidden, ref, rtol=2e-3, atol=2e-3)
    s = res.summary
    assert s.extra["io"]["background_depth"] == 1
    assert s.prefetch["issued"] > 0
    assert s.extra["reads"] == s.misses - s.prefetch["late"] + s.prefetch["issued"]


@pytest.mark.parametrize(
    "rcfg",
    [
        ReplayConfig(cache_slots=24, predictor="oracle", pipeline_depth=2, prefetch_inflight=2),
        ReplayConfig(policy="fifo", cache_slots=40, predictor="markov"),
        ReplayConfig(
            cache_slots=20,
            predictor="previous-token",
            pipeline_depth=4,
            prefetch_inflight=3,
            prefetch_reclaim=True,
        ),
        ReplayConfig(
            policy="lfu", scope="per-layer", cache_slots=64, predictor="oracle", pipeline_depth=3
        ),
        ReplayConfig(
            cache_slots=48,
            predictor="markov",
            pipeline_depth=3,
            prefetch_lead=2,
            prefetch_top_n=1,
            prefetch_cancel=2,
        ),
        ReplayConfig(
            cache_slots=40,
            predictor="cooccur",
            pipeline_depth=6,
            prefetch_lead=2,
            prefetch_inflight=2,
            prefetch_hold=1,
            prefetch_window=2,
        ),
    ],
    ids=[
        "oracle-inflight2",
        "fifo-markov",
        "prev-token-reclaim",
        "lfu-per-layer-oracle",
        "markov-cancel",
        "cooccur-hold-window",
    ],
)
def test_prefetch_on_engine_and_simulator_take_the_same_decisions(
    gguf_file: Path, rcfg: ReplayConfig
) -> None:
    """With prefetch on, the engine (real reads) and the simulator (a model disk that is far
    slower than this one) issue, use and waste exactly the prefetches of the clock-free
    replay (every read landed at once, `replay_counts`): no decision depends on when a read
    lands. Only the split of the used prefetches into on time and late is the clock's."""
    from mer.sim.hardware import load_profile
    from mer.sim.model import options_like, simulate

    tr = read_bundled(6)
    store = ExpertStore.open(gguf_file)
    ref = replay_counts(Replay.from_trace(tr, ReplayConfig(**rcfg.to_dict())), fast=False)
    assert ref.total("late") == 0  # nothing is ever in flight at a lookup there
    eng = _run(tr, store, rcfg, mode="model").summary
    slow = load_profile("ci-tiny")
    slow.ssd.bandwidth_bytes_per_s /= 50  # every prefetch lands late in the model
    runs = [eng]
    for engine in ("fast", "simpy"):
        opts = options_like(eng, engine=engine)
        runs.append(simulate(tr, rcfg, slow, opts).summary)
    assert ref.total("prefetch_issued") > 0
    assert (ref.total("prefetch_cancelled") > 0) == (rcfg.prefetch_cancel > 0)
    for s in runs:
        pf = s.prefetch
        assert pf["issued"] == ref.total("prefetch_issued"), s.kind
        assert pf["wasted"] == ref.total("prefetch_wasted"), s.kind
        assert pf["cancelled"] == ref.total("prefetch_cancelled"), s.kind
        assert pf["used"] + pf["late"] == ref.total("prefetch_used"), s.kind
        assert s.hits + pf["late"] == ref.total("hits"), s.kind
        assert s.extra["evictions"] == ref.total("evictions"), s.kind
        assert s.extra["reads"] == ref.total("misses") + ref.total("prefetch_issued"), s.kind
    assert runs[1].bytes_read == eng.bytes_read
    # the slow model disk: late prefetches happen, and the split is all that moves (with
    # cancellation the guesses aimed 2 steps ahead are few and land in the disk's idle time)
    assert runs[1].prefetch["late"] > 0 or rcfg.prefetch_cancel
