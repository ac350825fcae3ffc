"""q4_0 SwiGLU expert FFN throughput against the memory read bandwidth of the same run.

    .venv/bin/python bench/bench_ffn.py [--shape mixtral-8x7b] [--threads 1,2] [--repeats 5]

Throughput is counted in GB/s of q4_0 weight bytes (gate + up + down of one
expert, ~94.5 MiB for mixtral-8x7b) per FFN call on one token: the unit in which
an SSD-streamed engine compares compute with I/O. The memory bound is a numpy
sum over a 1 GiB float32 array (one thread), measured in the same process, and
the ratio says how far the numpy formulation is from streaming the weights
once. Prints Markdown rows for docs/benchmarks.md and the command that made them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from mer.engine import ffn, q4_0
from mer.shapes import SHAPES


def mem_read_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    a = np.ones(n_bytes // 4, dtype=np.float32)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="mixtral-8x7b", choices=list(SHAPES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    gate = q4_0.random_q4_0(rng, shape.d_ff, shape.d_model, shape.d_model**-0.5)
    up = q4_0.random_q4_0(rng, shape.d_ff, shape.d_model, shape.d_model**-0.5)
    down = q4_0.random_q4_0(rng, shape.d_model, shape.d_ff, shape.d_ff**-0.5)
    weight_bytes = gate.nbytes + up.nbytes + down.nbytes
    x = rng.standard_normal(shape.d_model).astype(np.float32)
    mem = mem_read_gbs()
    cmd = "python " + " ".join(sys.argv)
    print(
        f"<!-- {cmd} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f} -->"
    )
    print(f"Command: `{cmd}`\n")
    print(
        "| shape | weights / expert | threads | FFN ms (best) | FFN ms (median) | q4_0 GB/s | "
        "memory read GB/s (1 thread) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        with ffn.ExpertFFN(shape, threads) as f:
            f(x, gate, up, down)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                f(x, gate, up, down)
                times.append(time.perf_counter() - t0)
        best, med = min(times), float(np.median(times))
        gbs = weight_bytes / best / 1e9
        print(
            f"| {shape.name} | {weight_bytes / 2**20:.1f} MiB | {threads} | {best * 1e3:.1f} | "
            f"{med * 1e3:.1f} | {gbs:.2f} | {mem:.1f} | {gbs / mem:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
