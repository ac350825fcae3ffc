"""How much does one calibration vary from round to round, at two run lengths?

    .venv/bin/python bench/bench_calibration.py --experts EXPERTS.gguf [TRACE.parquet] \\
        [--rounds 4] [--tokens 32 128] [--hardware PROFILE.json]

`mer validate` calibrates from one short run of its calibration configuration (LRU, 96
slots, global, no prefetch). This runs that configuration `--rounds` times at each
length of `--tokens` (the lengths alternate within a round, so a drift of the shared
machine falls on all alike), calibrates the profile (probed once at the start, or
`--hardware`) on each run exactly as `mer validate` does, and prints per length the
run's tokens/s and the fitted SSD bandwidth and reaping cost of every round, with their
spread ((max - min) / median) and coefficient of variation. The figure to quote is the
spread of the fitted bandwidth: it is what moves every I/O-bound prediction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def spread(xs: list[float]) -> tuple[float, float]:
    med = statistics.median(xs)
    cv = statistics.pstdev(xs) / statistics.mean(xs) if len(xs) > 1 else 0.0
    return ((max(xs) - min(xs)) / med if med else 0.0), cv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", nargs="?", type=Path, default=TRACE)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--hardware", default=None, help="a profile (default: probe quickly)")
    a = ap.parse_args(argv)

    from dataclasses import replace

    from mer.analysis.calibrate import calibrate
    from mer.analysis.validate import EngineMachine
    from mer.analysis.validation_grid import CALIBRATION
    from mer.engine.executor import EngineConfig
    from mer.sim.hardware import load_profile
    from mer.summary import trace_digest
    from mer.traces.format import read_trace

    print(f"load average at start: {load()}")
    trace = read_trace(a.trace)
    machine = EngineMachine(
        trace, a.trace, a.experts, EngineConfig(progress=False), digest=trace_digest(a.trace)
    )
    if a.hardware:
        profile = load_profile(a.hardware)
    else:
        from mer.engine.probe import ProbeConfig, run_probe, to_profile

        cfg = ProbeConfig.quick(
            directory=a.experts.resolve().parent, shape=machine.store.shape.name
        )
        profile = to_profile(run_probe(cfg, log=lambda m: print(m, file=sys.stderr)), "probe")
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in a.tokens}
    for rnd in range(a.rounds):
        order = a.tokens if rnd % 2 == 0 else list(reversed(a.tokens))
        for n in order:
            cfg = replace(CALIBRATION, tokens=n)
            run = machine.run(cfg, n)
            cal = calibrate(run, profile, trace=trace)
            rows[n].append(
                {
                    "tps": run.tokens_per_s,
                    "io": run.io_wait_share,
                    "wall": run.wall_s,
                    "bw": cal.profile.ssd.bandwidth_bytes_per_s,
                    "reap": cal.profile.compute.read_complete_s,
                }
            )
            print(
                f"round {rnd} tokens {n}: {run.tokens_per_s:.2f} tokens/s, I/O "
                f"{run.io_wait_share * 100:.0f}%, bandwidth "
                f"{cal.profile.ssd.bandwidth_bytes_per_s / 1e9:.3f} GB/s ({run.wall_s:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    print()
    print(
        "| tokens | run (s) | tokens/s per round | tokens/s spread | fitted GB/s per round "
        "| bandwidth spread | bandwidth CV | reap us per round |"
    )
    print("|---:|---:|---|---:|---|---:|---:|---|")
    for n in a.tokens:
        rs = rows[n]
        tps = [r["tps"] for r in rs]
        bw = [r["bw"] for r in rs]
        s_t, _ = spread(tps)
        s_b, cv_b = spread(bw)
        print(
            f"| {n} | {statistics.median(r['wall'] for r in rs):.1f} | "
            + ", ".join(f"{x:.1f}" for x in tps)
            + f" | {s_t * 100:.0f}% | "
            + ", ".join(f"{x / 1e9:.3f}" for x in bw)
            + f" | {s_b * 100:.0f}% | {cv_b * 100:.1f}% | "
            + ", ".join(f"{r['reap'] * 1e6:.0f}" for r in rs)
            + " |"
        )
    print(f"\nload average at end: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
