"""Policy throughput and miss-ratio-curve wall time on a Mixtral-shaped trace.

    .venv/bin/python bench/bench_policies.py [--lookups 1000000] [--slots 64]

Trace: 32 layers x 8 experts, top-2, 15,625 tokens = 1,000,000 lookups. Each
layer has its own Dirichlet(0.7) expert popularity and repeats the previous
token's pair with probability 0.5 (temporal locality), seed 0. Every policy is
replayed through the core (`replay_counts`, prefetch off, scope global) at
`--slots` slots; then the full LRU + OPT curves (all 256 sizes, both scopes)
are timed. Prints Markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from mer import native
from mer.core import Replay, ReplayConfig, policy_names, replay_counts
from mer.sim.mrc import one_pass_hits


def mixtral_like(n_lookups: int, seed: int = 0) -> np.ndarray:
    n_layers, n_experts, k = 32, 8, 2
    n_tokens = n_lookups // (n_layers * k)
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(n_experts, 0.7), size=n_layers)
    ex = np.empty((n_tokens, n_layers, k), dtype=np.int32)
    for layer in range(n_layers):
        draws = np.stack(
            [rng.choice(n_experts, k, replace=False, p=pop[layer]) for _ in range(n_tokens)]
        )
        repeat = rng.random(n_tokens) < 0.5
        repeat[0] = False
        src = np.maximum.accumulate(np.where(repeat, 0, np.arange(n_tokens)))
        ex[:, layer] = draws[src]
    keys = np.arange(n_layers, dtype=np.int32)[None, :, None] * n_experts + ex
    return keys.reshape(-1, k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--policies", default=",".join(policy_names()))
    args = ap.parse_args()
    steps = mixtral_like(args.lookups)
    n = steps.size
    print(
        f"command: .venv/bin/python bench/bench_policies.py --lookups {args.lookups} "
        f"--slots {args.slots}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
        f"C kernels: {'yes' if native.load('stackdist') is not None else 'no'}"
    )
    print()
    print("| policy | slots | lookups | hit rate | wall s | CPU s | lookups/s (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for pol in args.policies.split(","):
        cfg = ReplayConfig(policy=pol, cache_slots=args.slots, scope="global")
        t0, c0 = time.perf_counter(), time.process_time()
        rep = Replay(steps, n_layers=32, n_experts=8, config=cfg)
        stats = replay_counts(rep)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"| {pol} | {args.slots} | {n:,} | {stats.hit_rate:.4f} | {dt:.2f} | {dc:.2f} "
            f"| {n / dc:,.0f} |"
        )
    print()
    print("| curve | scope | sizes | wall s | CPU s |")
    print("|---|---|---|---|---|")
    total = 0.0
    for scope in ("global", "per-layer"):
        for pol in ("lru", "opt"):
            t0, c0 = time.perf_counter(), time.process_time()
            curve = one_pass_hits(pol, steps, 32, 8, scope)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            total += dt if scope == "global" else 0.0
            print(f"| {pol} | {scope} | {len(curve) - 1} | {dt:.2f} | {dc:.2f} |")
    print(f"\nLRU + OPT curves, all 256 sizes, scope global: {total:.2f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
