"""Simulator speed: simulated lookups/s, prefetch off and on, and a 100-configuration sweep.

    .venv/bin/python bench/bench_sim.py [--trace T] [--quick]

Uses the bundled Mixtral trace (traces/data/mixtral-offloading-h39s.parquet) when
present, else a generated Mixtral-shaped trace (32 x 8, top-2, Zipf-skewed).
Prints Markdown rows for docs/benchmarks.md and the command that produced them.
Each configuration runs the default path (`sim_path`: "arrays" with prefetch off,
"compiled" with prefetch on where the C step covers it) and, in the same run, the
fast engine's Python step loop it is tested equal to; the ratio is theirs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mer.core import ReplayConfig  # noqa: E402
from mer.sim.hardware import load_profile  # noqa: E402
from mer.sim.model import SimOptions, simulate  # noqa: E402
from mer.sim.sweep import SweepSpec, run_sweep  # noqa: E402
from mer.traces.format import Trace, TraceMeta, from_arrays, read_trace, write_trace  # noqa: E402

BUNDLED = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"


def mixtral_shaped(tokens: int = 800, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 9) ** 0.8
    p /= p.sum()
    experts = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(tokens * 32)])
    meta = TraceMeta(model="mixtral-8x7b", n_layers=32, n_experts=8, top_k=2)
    return from_arrays(experts.reshape(tokens, 32, 2).astype(np.int16), meta, name="generated")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", type=Path, default=BUNDLED if BUNDLED.exists() else None)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a 20-config sweep")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    if args.trace:
        trace = read_trace(args.trace)
        trace_path = args.trace
        name = args.trace.name
    else:
        trace = mixtral_shaped()
        tmp = Path(tempfile.mkdtemp()) / "mixtral-shaped.parquet"
        write_trace(trace, tmp)
        trace_path, name = tmp, "generated mixtral-shaped"
    hw = load_profile("nvme-desktop")
    lookups = trace.n_lookups
    print(
        f"# bench_sim on {platform.node()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})"
    )
    print(f"command: .venv/bin/python bench/bench_sim.py{' --quick' if args.quick else ''}")
    print(f"trace: {name}, {lookups:,} lookups\n")
    print(
        "| configuration | path | simulated lookups per CPU-second (best of 3) "
        "| Python step loop, same run | ratio | core alone (replay_counts) |"
    )
    print("|---|---|---|---|---|---|")
    from mer.core import Replay, replay_counts
    from mer.sim import model

    def python_path(*_a: object) -> None:
        return None

    repeats = 1 if args.quick else 3
    # CPU time, not wall time: the figure must not depend on what else the machine runs.
    for policy, slots, predictor in (
        ("lru", 64, "none"),
        ("lru", 64, "oracle"),
        ("lru", 64, "previous-token"),
        ("lru", 128, "oracle"),
        ("s3fifo", 64, "previous-token"),
        ("lru", 64, "popularity"),
    ):
        cfg = ReplayConfig(policy=policy, cache_slots=slots, predictor=predictor, pipeline_depth=1)
        sim_cpu, py_cpu, core_cpu = [], [], []
        path = ""
        for _ in range(repeats):
            c0 = time.process_time()
            res = simulate(trace, cfg, hw, SimOptions())
            sim_cpu.append(time.process_time() - c0)
            path = res.summary.extra["sim_path"]
            # the reference: the fast engine's Python step loop (Replay.step / prefetch)
            saved = model._run_compiled, model._run_vectorised
            model._run_compiled = model._run_vectorised = python_path
            try:
                c0 = time.process_time()
                simulate(trace, cfg, hw, SimOptions())
                py_cpu.append(time.process_time() - c0)
            finally:
                model._run_compiled, model._run_vectorised = saved
            rep = Replay.from_trace(trace, cfg)
            c0 = time.process_time()
            replay_counts(rep)
            core_cpu.append(time.process_time() - c0)
        best, py, core = min(sim_cpu), min(py_cpu), min(core_cpu)
        print(
            f"| {policy} {slots} slots, predictor {predictor} | {path} | {lookups / best:,.0f} "
            f"| {lookups / py:,.0f} | {py / best:.1f}x | {lookups / core:,.0f} |"
        )
    print(f"\nload average after the table: {os.getloadavg()[0]:.1f}")

    # 5 policies x 10 sizes x 2 predictors = 100 configurations
    # fixed (the first five built-in names when this bench was written), so the figure
    # stays comparable when policies are added
    policies = ["arc", "clock", "cycle", "fifo", "lfu"]
    sizes = [8, 16, 24, 32, 48, 64, 96, 128, 192, 224]
    predictors = ["none", "oracle"]
    if args.quick:
        policies, sizes = policies[:2], sizes[:5]
    n = len(policies) * len(sizes) * len(predictors)
    spec = SweepSpec(
        trace=str(trace_path),
        policies=policies,
        cache_slots=sizes,
        predictors=predictors,
        hardware=["nvme-desktop"],
    )
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_sweep(
            spec, Path(d) / "r.parquet", trace_digest="bench", jobs=args.jobs, progress=False
        )
        dt = time.perf_counter() - t0
    print()
    print("| sweep | configurations | jobs | wall s | configs/s |")
    print("|---|---|---|---|---|")
    print(f"| {name} | {len(res.results)} ({n} in grid) | {args.jobs} | {dt:.1f} | {n / dt:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
