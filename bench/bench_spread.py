"""Run-to-run spread of real engine runs of one configuration, arrangement against arrangement.

Usage (run it under the disk lock; about 2 minutes with the defaults):
    .venv/bin/python bench/bench_spread.py mixtral.parquet --experts experts-small.gguf \
        [--configs arc-128-global,lru-64-global-chunk128k] [--runs 10] [--tokens 32] \
        [--arrangements huge,plain] [--json FILE]

Each configuration (names from `mer validate`'s full grid) is run `--runs` times in every
arrangement, interleaved (A B, then B A, ...: drift of the machine falls on every
arrangement alike), in this one process. Arrangements (EngineConfig overrides):
    default          slot buffers on transparent huge pages, driver under SCHED_FIFO
    huge             huge pages, normal priority (`--no-realtime`)
    realtime         4 KiB pages (`--no-huge-pages`), SCHED_FIFO
    old              4 KiB pages, normal priority (the arrangement before both)
    default-1thread  default, `--threads 1`
    old-1thread      old, `--threads 1`

Per run it records tokens/s, the I/O wait share, the read p50, the FFN time, and the
driver thread's scheduler figures over the run (/proc/thread-self/schedstat: time
runnable but off a core, and how many times it was put on a core, i.e. its wake-ups),
plus the CPU time of the process's other threads (FFN workers, io_uring workers). Prints
one Markdown table per configuration: median tokens/s, spread ((max - min) / median),
coefficient of variation, the medians of the recorded figures, and the ratio of each
arrangement's median to the first one's (a speed ratio within one run). Then the Pearson
r, over all runs of an arrangement, of log(tokens/s / its median) with the driver's CPU
wait share and with its wake-ups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mer.analysis.validate import EngineMachine
from mer.analysis.validation_grid import FULL
from mer.engine.executor import EngineConfig
from mer.traces.format import read_trace

ARRANGEMENTS: dict[str, dict[str, Any]] = {
    "default": {"huge_pages": True, "realtime": True},
    "huge": {"huge_pages": True, "realtime": False},
    "realtime": {"huge_pages": False, "realtime": True},
    "old": {"huge_pages": False, "realtime": False},
    "default-1thread": {"huge_pages": True, "realtime": True, "threads": 1},
    "old-1thread": {"huge_pages": False, "realtime": False, "threads": 1},
}
DEFAULT_CONFIGS = "arc-128-global,lru-64-global-chunk128k"


def task_stats() -> dict[int, tuple[int, int, int]]:
    """tid -> (run ns, runnable-but-waiting ns, times put on a core) for every thread."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/schedstat") as fh:
                f = fh.read().split()
            out[int(t)] = (int(f[0]), int(f[1]), int(f[2]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def one_run(trace: Any, a: argparse.Namespace, cfg: Any, arrangement: str) -> dict[str, Any]:
    engine = EngineConfig(threads=os.cpu_count() or 1, progress=False)
    for k, v in ARRANGEMENTS[arrangement].items():
        setattr(engine, k, v)
    m = EngineMachine(trace, a.trace, a.experts, engine)
    me = threading_native_id()
    before = task_stats()
    t0 = time.perf_counter()
    s = m.run(cfg, a.tokens)
    wall = time.perf_counter() - t0
    after = task_stats()
    d_run, d_wait, d_slices = (after[me][i] - before.get(me, (0, 0, 0))[i] for i in range(3))
    others = sum(v[0] - before.get(tid, (0, 0, 0))[0] for tid, v in after.items() if tid != me)
    return {
        "config": cfg.name,
        "arrangement": arrangement,
        "tokens_per_s": s.tokens_per_s,
        "wall_s": wall,
        "io_wait_share": s.io_wait_share,
        "read_p50_s": s.latency.get("read", {}).get("p50", float("nan")),
        "ffn_s_per_token": s.compute_s / max(1, s.tokens),
        "driver_run_s": d_run * 1e-9,
        # the engine's own figure: over its timed loop (what the driver spent runnable but
        # off a core), as `mer validate` and bench_disk_noise report it
        "driver_cpu_wait_share": s.extra.get("driver_time", {}).get("cpu_wait_s", 0.0)
        / max(s.wall_s, 1e-9),
        "driver_cpu_wait_s_whole_call": d_wait * 1e-9,
        "driver_wakeups": d_slices,
        "other_threads_cpu_s": others * 1e-9,
        "cache_huge_bytes": s.extra.get("huge_pages", {}).get("cache_huge_bytes", 0),
        "cache_bytes": s.extra.get("cache_buffer_bytes", 0),
        "driver_priority": s.extra.get("driver_priority", ""),
        "load": os.getloadavg()[0],
    }


def threading_native_id() -> int:
    import threading

    return threading.get_native_id()


def table(runs: list[dict[str, Any]], arrangements: list[str]) -> list[str]:
    lines = [
        "| arrangement | runs | median t/s | ratio to "
        + arrangements[0]
        + " | spread (%) | CV (%) | I/O wait (%) | read p50 (ms) | FFN ms/token | driver "
        "wake-ups | driver CPU wait (%) | other threads CPU (s) | huge-page share (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = None
    for arr in arrangements:
        rs = [r for r in runs if r["arrangement"] == arr]
        if not rs:
            continue
        t = np.array([r["tokens_per_s"] for r in rs])
        med = float(np.median(t))
        base = med if base is None else base

        def m(k: str, rs: list[dict[str, Any]] = rs) -> float:
            return float(np.median([r[k] for r in rs]))

        cache = [r for r in rs if r.get("cache_bytes")]
        huge = (
            100 * float(np.median([r["cache_huge_bytes"] / r["cache_bytes"] for r in cache]))
            if cache
            else float("nan")
        )
        lines.append(
            f"| {arr} | {len(rs)} | {med:.2f} | {med / base:.3f} | "
            f"{(t.max() - t.min()) / med * 100:.1f} | {t.std() / t.mean() * 100:.1f} | "
            f"{m('io_wait_share') * 100:.0f} | {m('read_p50_s') * 1e3:.2f} | "
            f"{m('ffn_s_per_token') * 1e3:.1f} | {m('driver_wakeups'):.0f} | "
            f"{m('driver_cpu_wait_share') * 100:.1f} | {m('other_threads_cpu_s'):.3f} | "
            f"{huge:.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated grid names")
    ap.add_argument("--runs", type=int, default=10, help="runs per arrangement and config")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--arrangements", default="default,old", help=", ".join(ARRANGEMENTS))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    by_name = {c.name: c for c in FULL}
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    arrs = [n.strip() for n in a.arrangements.split(",") if n.strip()]
    bad = [n for n in names if n not in by_name] + [n for n in arrs if n not in ARRANGEMENTS]
    if bad or a.runs < 1 or a.tokens < 1:
        print(
            f"bench_spread: unknown configuration or arrangement {bad} (configs: "
            f"{', '.join(by_name)}; arrangements: {', '.join(ARRANGEMENTS)}), or --runs / "
            "--tokens below 1",
            file=sys.stderr,
        )
        return 2
    trace = read_trace(a.trace)
    print(
        f"load average {os.getloadavg()[0]:.2f} at the start; {a.runs} runs of {a.tokens} "
        f"tokens per arrangement, interleaved; expert file {a.experts.name}\n"
    )
    runs: list[dict[str, Any]] = []
    for name in names:
        cfg = by_name[name]
        for i in range(a.runs):
            for arr in arrs if i % 2 == 0 else arrs[::-1]:
                r = one_run(trace, a, cfg, arr)
                runs.append(r)
                print(
                    f"{name} {i + 1}/{a.runs} {arr}: {r['tokens_per_s']:.2f} t/s, "
                    f"{r['driver_wakeups']} wake-ups, CPU wait "
                    f"{r['driver_cpu_wait_share'] * 100:.1f}%, load {r['load']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        print(f"### {name}\n")
        print("\n".join(table(rs, arrs)) + "\n")
    print("| arrangement | r(log t/s, driver CPU wait) | r(log t/s, driver wake-ups) |")
    print("|---|---:|---:|")
    for arr in arrs:
        ys, cw, wk = [], [], []
        for name in names:
            rs = [r for r in runs if r["config"] == name and r["arrangement"] == arr]
            med = float(np.median([r["tokens_per_s"] for r in rs]))
            ys += [math.log(r["tokens_per_s"] / med) for r in rs]
            cw += [r["driver_cpu_wait_share"] for r in rs]
            wk += [math.log(max(1, r["driver_wakeups"])) for r in rs]
        print(f"| {arr} | {pearson(cw, ys):.2f} | {pearson(wk, ys):.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
