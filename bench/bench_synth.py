"""Speed of the seed-skewed generator (ids only, and as a validated trace).

Run: .venv/bin/python bench/bench_synth.py
Prints one line per configuration: best-of-5 wall seconds and draws per second.
"""

from __future__ import annotations

import time

from mer.traces.synth.seed_skewed import SeedSkewed, SkewedParams, generate_ids

CONFIGS = {
    "mixtral n=256 k=2 10k it": SkewedParams(),
    "qwen n=6144 k=8 10k it": SkewedParams(experts=6144, top_k=8, experts_per_layer=128),
    "mixtral n=256 k=2 1M it": SkewedParams(iterations=1_000_000),
}


def best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    for name, p in CONFIGS.items():
        reps = 1 if p.iterations >= 1_000_000 else 5
        ids_s = best_of(lambda p=p: generate_ids(p), reps)
        line = f"{name:28s} ids {ids_s * 1e3:8.1f} ms ({p.iterations / ids_s:,.0f} iterations/s)"
        if p.iterations <= 10_000:
            tr_s = best_of(lambda p=p: SeedSkewed(p).generate(), reps)
            line += f"   trace {tr_s * 1e3:8.1f} ms"
        print(line)


if __name__ == "__main__":
    main()
