"""Policy replay speed against libCacheSim in the same run, and curves for every size.

    .venv/bin/python bench/bench_policies.py [--lookups 1000000] [--slots 64] [--quick]

Trace: 32 layers x 8 experts, top-2, 15,625 tokens = 1,000,000 lookups. Each
layer has its own Dirichlet(0.7) expert popularity and repeats the previous
token's pair with probability 0.5 (temporal locality), seed 0.

1. Every built-in policy through the core (`replay_counts`, prefetch off, scope
   global, `--slots` slots, mer's step semantics with k = 2: the compiled
   replay), beside libCacheSim's same policy on the same trace flattened to one
   request per lookup (`process_trace` over an oracleGeneral file, in its C
   loop), CPU time of each (`time.process_time`). Policies libCacheSim lacks are
   set against its LRU (the public engine's policy is an LRU with pinning, and
   the layer-aware `cycle` and `cotoken` have no counterpart there).
2. The full curve: all sizes x every built-in policy x both scopes (`compute_mrc`,
   2 processes), wall time.
3. `mer mrc` on the bundled trace, every policy and size, wall time of the command.
4. `knn`, whose cost per step grows with the tokens seen (every past token votes:
   `window` 0), on a trace of a real length: the bundled trace (773 tokens, 49,472
   lookups), `--slots` slots, global scope: its compiled twin, its Python class (the
   lean loop, one run), cotoken's twin and libCacheSim's LRU on the same lookups, CPU
   time of each. `--knn-lookups N` takes the first N lookups of the synthetic trace
   instead (the cost per lookup grows about linearly with N).

Prints the Markdown tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mer import native
from mer.core import Replay, ReplayConfig, replay_counts
from mer.sim.mrc import MRCRequest, compute_mrc

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
BUILTIN = ["lru", "fifo", "lfu", "clock", "sieve", "s3fifo", "arc", "opt", "seed-lru-locality"]
#: mer's layer-aware policies (compiled twins of mer/core/cycle.py and cotoken.py): rows
#: of the first table, left out of the full curve so that it stays comparable
LAYER_AWARE = ["cycle", "cotoken"]
#: mer policy (and config) -> the libCacheSim policy it is timed against
PEER = {
    "lru": "lru",
    "fifo": "fifo",
    "lfu": "lfu",
    "clock": "clock",
    "sieve": "sieve",
    "s3fifo": "s3fifo",
    "arc": "arc",
    "opt": "belady",
    "seed-lru-locality": "lru",
    "lru --pin 16": "lru",
    "cycle": "lru",
    "cotoken": "lru",
}


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


def _cpu() -> float:
    """CPU seconds of this process and of every child it waited for."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_mer(steps: np.ndarray, label: str, slots: int, repeats: int) -> tuple[float, float]:
    policy, _, pin = label.partition(" --pin ")
    best, rate = 1e9, 0.0
    for _ in range(repeats):
        cfg = ReplayConfig(policy=policy, cache_slots=slots, pin=int(pin or 0))
        c0 = time.process_time()
        stats = replay_counts(Replay(steps, n_layers=32, n_experts=8, config=cfg))
        best = min(best, time.process_time() - c0)
        rate = stats.hit_rate
    return best, rate


def time_lcs(path: Path, n: int, policy: str, slots: int, repeats: int) -> tuple[float, float]:
    from mer.sim import peers

    lcs = peers.module()
    best, rate = 1e9, 0.0
    for _ in range(repeats):
        reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
        cache = peers.make_cache(policy, slots)
        c0 = time.process_time()
        miss, _ = cache.process_trace(reader)
        best = min(best, time.process_time() - c0)
        rate = 1.0 - miss
    return best, rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N CPU times (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, no full curve")
    ap.add_argument(
        "--knn-lookups",
        type=int,
        default=0,
        help="knn's table on the first N lookups of the synthetic trace (default: the "
        "bundled trace); 0 with no bundled trace: skip it",
    )
    ap.add_argument("--no-knn-python", action="store_true", help="leave knn's Python row out")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    steps = mixtral_like(args.lookups)
    n = steps.size
    from mer.sim import peers

    have_lcs = peers.available()
    print(
        f"command: .venv/bin/python bench/bench_policies.py --lookups {args.lookups} "
        f"--slots {args.slots}{' --quick' if args.quick else ''}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}, "
        f"compiled replays: {'yes' if native.load('replay') is not None else 'no'}, "
        f"libCacheSim: {'yes' if have_lcs else 'not installed'}"
    )
    print()
    print(
        "| policy | mer hit rate (step, k=2) | mer lookups/s (CPU) | libCacheSim policy "
        "| its hit rate (lookup) | its lookups/s (CPU) | mer / libCacheSim |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.oracleGeneral"
        if have_lcs:
            peers.write_oracle_trace(steps.reshape(-1), path)
        for label in [*BUILTIN, "lru --pin 16", *LAYER_AWARE]:
            dt, rate = time_mer(steps, label, args.slots, repeats)
            row = f"| {label} | {100 * rate:.2f}% | {n / dt:,.0f} |"
            if have_lcs:
                ldt, lrate = time_lcs(path, n, PEER[label], args.slots, repeats)
                row += f" {PEER[label]} | {100 * lrate:.2f}% | {n / ldt:,.0f} | {ldt / dt:.2f}x |"
            else:
                row += " - | - | - | - |"
            print(row, flush=True)
    knn_table(args, steps, repeats, have_lcs)
    if args.quick:
        return 0
    print()
    print("| full curve | sizes | policies | scopes | processes | wall s | CPU s (all processes) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    req = MRCRequest(policies=BUILTIN, processes=2)
    t0, c0 = time.perf_counter(), _cpu()
    df = compute_mrc(steps, 32, 8, req)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    print(
        f"| {n:,} lookups, step granularity | 256 | {df.policy.nunique()} | 2 | 2 | "
        f"{dt:.1f} | {dc:.1f} |",
        flush=True,
    )
    if BUNDLED.exists():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "m.parquet"
            mer = [sys.executable, "-m", "mer", "mrc", str(BUNDLED), "-o", str(out)]
            for extra in ([], ["--granularity", "lookup"]):
                t0, c0 = time.perf_counter(), _cpu()
                subprocess.run([*mer, *extra, "--no-progress"], check=True, capture_output=True)
                dt, dc = time.perf_counter() - t0, _cpu() - c0
                print(
                    f"| `mer mrc` bundled trace {' '.join(extra) or '(step)'} | 256 | all | 2 "
                    f"| {os.cpu_count()} | {dt:.1f} | {dc:.1f} |"
                )
    return 0


def time_engine(steps: np.ndarray, policy: str, slots: int, engine: str) -> tuple[float, float]:
    cfg = ReplayConfig(policy=policy, cache_slots=slots)
    c0 = time.process_time()
    stats = replay_counts(Replay(steps, n_layers=32, n_experts=8, config=cfg), engine=engine)
    return time.process_time() - c0, stats.hit_rate


def knn_table(args: argparse.Namespace, steps: np.ndarray, repeats: int, have_lcs: bool) -> None:
    """knn's rows (module doc, 4), all against libCacheSim LRU on the same lookups."""
    from mer.sim import peers

    if args.knn_lookups:
        n_steps = max(1, args.knn_lookups // steps.shape[1])
        ksteps = np.ascontiguousarray(steps[:n_steps])
        what = f"synthetic trace, first {ksteps.size:,} lookups"
    elif BUNDLED.exists():
        from mer.traces.format import read_trace

        tr = read_trace(BUNDLED)
        ksteps = np.ascontiguousarray(tr.keys().reshape(-1, tr.top_k), dtype=np.int32)
        what = f"bundled trace, {tr.n_tokens} tokens, {ksteps.size:,} lookups"
    else:
        return
    n = ksteps.size
    print()
    print(f"knn ({what}, {args.slots} slots, global):")
    print()
    print(
        "| policy | engine | hit rate (step, k=2) | lookups/s (CPU) | vs libCacheSim LRU "
        "| vs knn in Python |"
    )
    print("|---|---|---:|---:|---:|---:|")
    lru_rate = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "knn.oracleGeneral"
        if have_lcs:
            peers.write_oracle_trace(ksteps.reshape(-1), path)
            ldt, lrate = time_lcs(path, n, "lru", args.slots, repeats)
            lru_rate = n / ldt
    rows = [("knn", "c", repeats), ("cotoken", "c", repeats)]
    if not args.no_knn_python:
        rows.append(("knn", "python", 1))
    timed = []
    for policy, engine, reps in rows:
        best, rate = 1e9, 0.0
        for _ in range(reps):
            dt, rate = time_engine(ksteps, policy, args.slots, engine)
            best = min(best, dt)
        timed.append((policy, engine, n / best, rate))
    py = next((r for p, e, r, _ in timed if p == "knn" and e == "python"), None)
    for policy, engine, r, rate in timed:
        vs_lcs = f"{r / lru_rate:.4f}x" if lru_rate else "-"
        vs_py = f"{r / py:.1f}x" if py and policy == "knn" else "-"
        print(f"| {policy} | {engine} | {100 * rate:.2f}% | {r:,.0f} | {vs_lcs} | {vs_py} |")
    if lru_rate:
        print(f"| lru (libCacheSim) | C | {100 * lrate:.2f}% (lookup) | {lru_rate:,.0f} | 1x | - |")


if __name__ == "__main__":
    sys.exit(main())
