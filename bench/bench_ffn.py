"""Expert FFN throughput against the memory read bandwidth of the same run.

    .venv/bin/python bench/bench_ffn.py [--shapes mixtral-8x7b,mixtral-small] [--threads 1,2]
        [--isas all|avx512vnni,...] [--numpy] [--batch 1,4,8] [--repeats 7]

Throughput is GB/s of q4_0 weight bytes (gate + up + down of one expert: 94.5 MiB for
mixtral-8x7b, 1.5 MiB for mixtral-small) per FFN call on one token: the unit in which an
SSD-streamed engine compares compute with I/O. Each call takes the next expert of a working
set of >= 512 MiB (synthesised, real q4_0 bytes), so weights come from RAM as a run's cache
slots do, never from the CPU caches. The physical limit is the memory read bandwidth, measured
in the same process with the C module's streaming read (wide loads with software prefetch; a
numpy sum is printed beside it), on 1 and on 2 threads. Times are the best of `--repeats`
passes over the working set (the median beside it): the machine is shared, and the best pass is
the one least disturbed. Prints Markdown tables for docs/benchmarks.md, the issue's ratios, and
the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from mer.engine import ffn as numpy_ffn
from mer.engine import q4_0
from mer.native import q4_0 as nq
from mer.shapes import SHAPES, ModelShape

WORKING_SET = 512 << 20


def cpu_busy() -> tuple[float, float, float] | None:
    """(seconds of CPU busy on the whole machine, of this process, wall clock) now; None where
    /proc/stat is missing. Two readings give how many CPUs other processes kept busy."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(v[:8]) - v[3] - v[4]) / tick  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system, time.monotonic()


def others_cpus(a: tuple[float, float, float] | None) -> str:
    b = cpu_busy()
    if a is None or b is None:
        return "unknown"
    return f"{max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]):.2f}"


def run_delay_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux
    schedstat), summed; None where it is not available. Other processes' load shows here."""
    try:
        total = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        return total / 1e9
    except (OSError, IndexError, ValueError):
        return None


def numpy_sum_gbs(a: np.ndarray, repeats: int) -> float:
    f = a.view(np.float32)
    f.sum()
    best = min(_t(lambda: f.sum()) for _ in range(repeats))
    return a.nbytes / best / 1e9


def _t(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def experts(shape: ModelShape, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    n = max(2, -(-WORKING_SET // shape.bytes_per_expert))
    out = []
    for _ in range(n):
        out.append(
            (
                q4_0.random_q4_0(rng, shape.d_ff, shape.d_model, shape.d_model**-0.5),
                q4_0.random_q4_0(rng, shape.d_ff, shape.d_model, shape.d_model**-0.5),
                q4_0.random_q4_0(rng, shape.d_model, shape.d_ff, shape.d_ff**-0.5),
            )
        )
    return out


def time_ffn(fn: Any, ex: list[tuple[np.ndarray, ...]], x: np.ndarray, repeats: int) -> list[float]:
    """Seconds per call, one value per pass over the working set."""
    for e in ex[:2]:
        fn(x, *e)
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for e in ex:
            fn(x, *e)
        passes.append((time.perf_counter() - t0) / len(ex))
    return passes


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="mixtral-8x7b,mixtral-small")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isas", default="best", help="best | all | a comma list (avx2,portable)")
    ap.add_argument("--numpy", action="store_true", help="also time the numpy reference FFN")
    ap.add_argument("--batch", default="1,4,8", help="tokens per call for the batched table")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not nq.available():
        print("the native q4_0 kernel is not compiled here; nothing to measure", file=sys.stderr)
        return 1
    threads = [int(t) for t in args.threads.split(",")]
    isas = {"best": nq.isas()[:1], "all": nq.isas()}.get(args.isas, args.isas.split(","))
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    cmd = "python " + " ".join(sys.argv)
    load0 = os.getloadavg()
    busy0 = cpu_busy()

    buf = np.ones((1 << 30) // 8, dtype=np.int64)

    def memory() -> dict[int, float]:
        return {t: nq.memory_read_gbs(threads=t, repeats=args.repeats, buf=buf) for t in (1, 2)}

    mem_runs = [memory()]
    mem_np = numpy_sum_gbs(buf, args.repeats)

    rows: list[dict[str, Any]] = []
    batch_rows: list[str] = []
    split_rows: list[str] = []
    for shape in shapes:
        ex = experts(shape)
        x = np.random.default_rng(1).standard_normal(shape.d_model).astype(np.float32)
        kernels: list[tuple[str, str | None]] = [("native", isa) for isa in isas]
        if args.numpy:
            kernels.append(("numpy", None))
        for kind, isa in kernels:
            for t in threads:
                split = None
                if kind == "native":
                    assert isa is not None
                    with nq.using_isa(isa):
                        f = nq.NativeFFN(shape.d_model, shape.d_ff, t)
                        nq.pool_stats(reset=True)
                        rd0, w0 = run_delay_s(), time.perf_counter()
                        passes = time_ffn(f, ex, x, args.repeats)
                        rd1, w1 = run_delay_s(), time.perf_counter()
                        split = nq.pool_stats(reset=True) if t > 1 else None
                        if split is not None and rd0 is not None and rd1 is not None:
                            split["waited_for_cpu"] = (rd1 - rd0) / (t * (w1 - w0))
                    label = f"native ({isa})"
                else:
                    with numpy_ffn.ExpertFFN(shape, t) as fnp:
                        passes = time_ffn(fnp, ex[: max(2, len(ex) // 8)], x, 2)
                    label = "numpy"
                best, med = min(passes), float(np.median(passes))
                rows.append(
                    dict(
                        shape=shape.name,
                        kernel=label,
                        threads=t,
                        best_ms=best * 1e3,
                        med_ms=med * 1e3,
                        gbs=shape.bytes_per_expert / best / 1e9,
                        gbs_med=shape.bytes_per_expert / med / 1e9,
                    )
                )
                if split and split["jobs"]:
                    chunks = split["caller_chunks"] + split["worker_chunks"]
                    calls = 2 + args.repeats * len(ex)
                    split_rows.append(
                        f"| {shape.name} | {label} | {t} | {split['jobs'] / calls:.1f} | "
                        f"{split['worker_chunks'] / chunks:.0%} | "
                        f"{split['wait_ns'] / split['jobs'] / 1e3:.1f} | "
                        + (f"{split['waited_for_cpu']:.0%} |" if "waited_for_cpu" in split else "|")
                    )
        # batched tokens: one call over n tokens reads each weight once
        f = nq.NativeFFN(shape.d_model, shape.d_ff, max(threads))
        single = None
        for n in [int(b) for b in args.batch.split(",")]:
            xb = np.random.default_rng(2).standard_normal((n, shape.d_model)).astype(np.float32)
            best = min(time_ffn(f, ex, xb, max(2, args.repeats // 2)))
            single = best if n == 1 else single
            per_tok = best / n
            speed = f"{single / per_tok:.2f}x" if single else ""
            batch_rows.append(
                f"| {shape.name} | {n} | {best * 1e3:.2f} | {per_tok * 1e3:.3f} | "
                f"{shape.bytes_per_expert / best / 1e9:.1f} | {speed} |"
            )
        del ex
        mem_runs.append(memory())  # again after each shape: the best of all is the limit

    mem = {t: max(m[t] for m in mem_runs) for t in (1, 2)}
    load1 = os.getloadavg()
    others = others_cpus(busy0)
    print(
        f"<!-- {cmd} | {platform.machine()}, {os.cpu_count()} CPUs, best ISA {nq.best_isa()}, "
        f"numpy {np.__version__}, load average {load0[0]:.1f} before, {load1[0]:.1f} after -->"
    )
    print(
        f"Command: `{cmd}` (load average {load0[0]:.1f} before, {load1[0]:.1f} after; other "
        f"processes kept {others} of the {os.cpu_count()} CPUs busy on average during the run)\n"
    )
    print(
        f"Memory read, same run (best of {len(mem_runs)} measurements spread over it): "
        f"{mem[1]:.1f} GB/s on 1 thread, {mem[2]:.1f} GB/s on 2 (C streaming read); numpy "
        f"float32 sum {mem_np:.1f} GB/s (1 thread).\n"
    )
    print(
        "| shape | kernel | threads | FFN ms (best) | FFN ms (median) | GB/s (best) | "
        "GB/s (median) | of memory read, same threads |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = mem[min(r["threads"], 2)]
        print(
            f"| {r['shape']} | {r['kernel']} | {r['threads']} | {r['best_ms']:.2f} | "
            f"{r['med_ms']:.2f} | {r['gbs']:.1f} | {r['gbs_med']:.1f} | {r['gbs'] / m:.0%} |"
        )
    print()
    print(
        "| shape | tokens per call | ms per call (best) | ms per token | GB/s of weights "
        "per call | per-token speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for line in batch_rows:
        print(line)
    print()
    if split_rows:
        print(
            "| shape | kernel | threads | split jobs per FFN | chunks done by the worker "
            "threads | caller's wait for the workers per job, us | the threads' time spent "
            "runnable, waiting for a CPU |"
        )
        print("|---|---|---|---|---|---|---|")
        for line in split_rows:
            print(line)
        print()
    # the targets, as ratios of this run
    best_isa = f"native ({isas[0]})"

    def g(shape: str, t: int) -> float | None:
        for r in rows:
            if r["shape"] == shape and r["kernel"] == best_isa and r["threads"] == t:
                return float(r["gbs"])
        return None

    big1, big2, small1 = g("mixtral-8x7b", 1), g("mixtral-8x7b", 2), g("mixtral-small", 1)
    print("| target | this run | met |")
    print("|---|---|---|")
    if big1:
        r = big1 / mem[1]
        print(f"| 8x7b FFN, 1 thread >= 50% of 1-thread memory read | {r:.0%} | {r >= 0.5} |")
    if big1 and big2:
        r = big2 / big1
        print(
            f"| 8x7b FFN, 2 threads >= 1.6x 1 thread | {r:.2f}x (memory read: 2 threads "
            f"{mem[2] / mem[1]:.2f}x 1) | {r >= 1.6} |"
        )
    if big1 and small1:
        r = small1 / big1
        print(f"| small FFN, 1 thread within 20% of 8x7b | {r:.0%} of it | {abs(1 - r) <= 0.2} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
