"""The structure of the disk's noise, and whether a short pulse predicts a held-out run.

Usage (run it under the disk lock; about 3 minutes):
    .venv/bin/python bench/bench_disk_noise.py mixtral.parquet --experts experts-small.gguf \
        --hardware HW.json [--burst-seconds 60] [--runs 30] [--tokens 32]

1. Bursts: for `--burst-seconds`, back-to-back short read bursts on the expert file
   (`--burst-experts` random experts each, read as a demand miss reads them). Their
   read rate, binned, gives the autocorrelation at lags from 0.1 s to 20 s and the
   time-scale on which the rate moves (the first lag where it drops below 1/e).
2. Runs: one calibration run (LRU 96 slots global, 4x `--tokens`) calibrates HW.json
   (as `mer validate` does), between two pulses (`mer.engine.probe.disk_pulse`,
   `--pulse-experts` experts) whose geometric mean is the reference. Then `--runs`
   held-out runs, rotating over I/O-bound configurations of `mer validate`'s grid, each
   between a pulse right before and one right after. Every run is predicted twice by
   the simulator: from the calibrated profile as it is (fixed calibration), and with its
   SSD figures scaled by the ratio of the pulse before the run to the reference
   (bandwidth x ratio, device latencies / ratio). The pulse is a probe of the machine,
   never a fit to the run it predicts.

Prints Markdown tables: the autocorrelation; the correlation (Pearson, over runs) of
log(measured / fixed prediction) with log(pulse ratio) for the pulse before, after and
both; and the median |error| of tokens/s, per configuration and over all runs, of the
fixed and the pulse-scaled prediction. `--json FILE` writes every burst and run.
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

from mer.analysis.calibrate import calibrate
from mer.analysis.validate import EngineMachine, scale_ssd
from mer.analysis.validation_grid import CALIBRATION, FULL
from mer.engine.executor import EngineConfig
from mer.engine.probe import cpu_pulse, disk_pulse
from mer.sim.hardware import load_profile
from mer.sim.model import simulate
from mer.traces.format import read_trace

RUN_CONFIGS = ("lru-32-global", "fifo-64-global", "arc-128-global", "lru-64-global-chunk128k")
LAGS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


def acf(x: np.ndarray, lag: int) -> float:
    x = x - x.mean()
    if lag >= len(x) or not x.any():
        return float("nan")
    return float(np.dot(x[:-lag] if lag else x, x[lag:]) / np.dot(x, x))


def bursts(machine: EngineMachine, seconds: float, n_experts: int, rng: Any) -> list[dict]:
    from mer.engine.io import open_reader

    out = []
    eng = machine.engine
    with open_reader(kind=eng.io, queue_depth=eng.queue_depth, chunk_bytes=eng.chunk_bytes) as rd:
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < seconds:
            t0 = time.perf_counter() - t_start
            p = disk_pulse(
                machine.store, experts=n_experts, seed=int(rng.integers(1 << 31)), reader=rd
            )
            out.append({"t": t0 + p["seconds"] / 2, "rate": p["read_bytes_per_s"]})
    return out


def burst_table(rows: list[dict], bin_s: float) -> tuple[list[str], dict[str, Any]]:
    t = np.array([r["t"] for r in rows])
    rate = np.array([r["rate"] for r in rows])
    n_bins = int(t[-1] // bin_s) + 1
    idx = (t // bin_s).astype(int)
    sums = np.bincount(idx, weights=rate, minlength=n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    keep = counts > 0
    binned = np.where(keep, sums / np.maximum(counts, 1), np.nan)
    # fill the rare empty bin with its neighbour so lags stay in seconds
    for i in range(n_bins):
        if not keep[i]:
            binned[i] = binned[i - 1] if i else np.nanmean(binned)
    lags = {lag: acf(binned, round(lag / bin_s)) for lag in LAGS_S}
    scale = next((lag for lag in LAGS_S if lags[lag] < 1 / math.e), None)
    per_s = np.array(
        [binned[i : i + round(1 / bin_s)].mean() for i in range(0, n_bins, round(1 / bin_s))]
    )
    stats = {
        "bursts": len(rows),
        "seconds": float(t[-1]),
        "rate_median": float(np.median(rate)),
        "rate_cv": float(rate.std() / rate.mean()),
        "binned_cv": float(binned.std() / binned.mean()),
        "per_second_cv": float(per_s.std() / per_s.mean()),
        "per_second_min": float(per_s.min()),
        "per_second_max": float(per_s.max()),
        "adjacent_burst_corr": float(np.corrcoef(rate[:-1], rate[1:])[0, 1]),
        "acf": lags,
        "time_scale_s": scale,
    }
    lines = [
        f"{stats['bursts']} bursts in {stats['seconds']:.0f} s; read rate median "
        f"{stats['rate_median'] / 1e9:.2f} GB/s, CV {stats['rate_cv'] * 100:.0f}% per burst, "
        f"{stats['binned_cv'] * 100:.0f}% per {bin_s:g} s bin, "
        f"{stats['per_second_cv'] * 100:.0f}% per second (1-s means "
        f"{stats['per_second_min'] / 1e9:.2f} to {stats['per_second_max'] / 1e9:.2f} GB/s); "
        f"adjacent bursts correlate {stats['adjacent_burst_corr']:.2f}",
        "",
        "| lag (s) | " + " | ".join(f"{lag:g}" for lag in LAGS_S) + " |",
        "|---|" + "---:|" * len(LAGS_S),
        f"| autocorrelation of the {bin_s:g} s binned rate | "
        + " | ".join(f"{lags[lag]:.2f}" for lag in LAGS_S)
        + " |",
        "",
        "time-scale (first lag below 1/e): "
        + (f"{scale:g} s" if scale is not None else f"> {LAGS_S[-1]:g} s"),
    ]
    return lines, stats


def pearson(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--hardware", required=True, help="a profile (e.g. `mer probe --quick`)")
    ap.add_argument("--burst-seconds", type=float, default=60.0)
    ap.add_argument("--burst-experts", type=int, default=8)
    ap.add_argument("--bin", type=float, default=0.1, help="seconds per bin of the bursts")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pulse-experts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cpu-pulse-seconds", type=float, default=0.2, help="spin before each run (CPU pulse)"
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    trace = read_trace(a.trace)
    engine = EngineConfig(threads=os.cpu_count() or 1, progress=False)
    m = EngineMachine(trace, a.trace, a.experts, engine)
    load0 = os.getloadavg()[0]
    print(f"load average {load0:.2f} at the start; {m.description}\n")
    out: dict[str, Any] = {}
    if a.burst_seconds > 0:
        rows = bursts(m, a.burst_seconds, a.burst_experts, rng)
        lines, stats = burst_table(rows, a.bin)
        print(f"### Back-to-back bursts of {a.burst_experts} experts\n")
        print("\n".join(lines) + "\n")
        out["bursts"] = rows
        out["burst_stats"] = stats

    def pulse() -> float:
        return disk_pulse(m.store, experts=a.pulse_experts, seed=int(rng.integers(1 << 31)))[
            "read_bytes_per_s"
        ]

    def predict(cfg: Any, prof: Any) -> float:
        so = m.sim_options(cfg)
        so.engine = "fast"
        return simulate(trace, cfg.replay_config(a.tokens), prof, so).summary.tokens_per_s

    if a.runs > 0:
        base = load_profile(a.hardware)
        p0 = pulse()
        cal_run = m.run(CALIBRATION, 4 * a.tokens)
        p1 = pulse()
        ref = math.sqrt(p0 * p1)
        prof = calibrate(cal_run, base, trace=trace).profile
        by_name = {c.name: c for c in FULL}
        configs = [by_name[n] for n in RUN_CONFIGS]
        fixed = {c.name: predict(c, prof) for c in configs}
        runs = []
        for i in range(a.runs):
            cfg = configs[i % len(configs)]
            load = os.getloadavg()[0]
            cpu = cpu_pulse(a.cpu_pulse_seconds)["cpu_wait_share"]
            before = pulse()
            s = m.run(cfg, a.tokens)
            after = pulse()
            scaled = predict(cfg, scale_ssd(prof, before / ref))
            bracket = predict(cfg, scale_ssd(prof, math.sqrt(before * after) / ref))
            runs.append(
                {
                    "config": cfg.name,
                    "measured": s.tokens_per_s,
                    "fixed": fixed[cfg.name],
                    "scaled": scaled,
                    "bracket": bracket,
                    "before": before / ref,
                    "after": after / ref,
                    "io_wait_share": s.io_wait_share,
                    "load": load,
                    "cpu_pulse": cpu,
                    # the driver thread's time runnable but off a core: the CPU's share
                    "cpu_wait_share": s.extra.get("driver_time", {}).get("cpu_wait_s", 0.0)
                    / s.wall_s,
                }
            )
            print(
                f"run {i + 1}/{a.runs} {cfg.name}: {s.tokens_per_s:.2f} t/s, pulse ratio "
                f"{before / ref:.2f} / {after / ref:.2f}",
                file=sys.stderr,
                flush=True,
            )
        out["runs"] = runs
        out["calibration"] = {
            "pulse_before": p0,
            "pulse_after": p1,
            "tokens_per_s": cal_run.tokens_per_s,
        }
        y = [math.log(r["measured"] / r["fixed"]) for r in runs]
        xs = {
            "before": [math.log(r["before"]) for r in runs],
            "after": [math.log(r["after"]) for r in runs],
            "both (geometric mean)": [0.5 * math.log(r["before"] * r["after"]) for r in runs],
        }
        corr = {k: pearson(v, y) for k, v in xs.items()}
        # not pulses: what the machine's CPU did (the load average before the run, and the
        # run's own driver time spent waiting for a core), to tell disk noise from CPU noise
        corr["load average before the run (not a pulse)"] = pearson([r["load"] for r in runs], y)
        corr["CPU pulse before the run: log(1 - wait share)"] = pearson(
            [math.log(max(1e-3, 1 - r["cpu_pulse"])) for r in runs], y
        )
        corr["run's driver CPU-wait share (not a pulse)"] = pearson(
            [r["cpu_wait_share"] for r in runs], y
        )
        slope = float(np.polyfit(xs["before"], y, 1)[0])
        out["correlation"] = corr
        print(
            f"### {a.runs} held-out runs of {a.tokens} tokens, each between two pulses of "
            f"{a.pulse_experts} experts\n"
        )
        print(
            f"Calibration run {cal_run.tokens_per_s:.2f} tokens/s; reference pulse "
            f"{ref / 1e9:.2f} GB/s (before {p0 / 1e9:.2f}, after {p1 / 1e9:.2f}). Pulse ratios "
            f"before the runs {min(r['before'] for r in runs):.2f} to "
            f"{max(r['before'] for r in runs):.2f}.\n"
        )
        print("| pulse | Pearson r with log(measured / fixed prediction) |")
        print("|---|---:|")
        for k, v in corr.items():
            print(f"| {k} | {v:.2f} |")
        print(f"\nSlope of that log-log relation (pulse before): {slope:.2f} (1 = proportional)\n")
        print(
            "| configuration | runs | median measured t/s | spread (%) | fixed-calibration "
            "error (%) | pulse-scaled error (%) | pulse before+after error (%) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        stats: dict[str, Any] = {}
        for c in configs:
            rs = [r for r in runs if r["config"] == c.name]
            if not rs:
                continue
            med = float(np.median([r["measured"] for r in rs]))
            spread = (max(r["measured"] for r in rs) - min(r["measured"] for r in rs)) / med
            e = {
                k: float(np.median([r[k] for r in rs])) / med - 1
                for k in ("fixed", "scaled", "bracket")
            }
            stats[c.name] = e
            print(
                f"| {c.name} | {len(rs)} | {med:.2f} | {spread * 100:.1f} | {e['fixed'] * 100:+.1f} "
                f"| {e['scaled'] * 100:+.1f} | {e['bracket'] * 100:+.1f} |"
            )
        per_run = {
            k: float(np.median([abs(r[k] / r["measured"] - 1) for r in runs]))
            for k in ("fixed", "scaled", "bracket")
        }
        print(
            "\nMedian |error| per run: fixed calibration "
            f"{per_run['fixed'] * 100:.1f}%, pulse-scaled {per_run['scaled'] * 100:.1f}%, "
            f"pulse before+after {per_run['bracket'] * 100:.1f}%. Median over configurations "
            "of |error of the median|: "
            + ", ".join(
                f"{k} {np.median([abs(v[k]) for v in stats.values()]) * 100:.1f}%"
                for k in ("fixed", "scaled", "bracket")
            )
        )
        out["per_run_median_abs_error"] = per_run
        cw = [r["cpu_wait_share"] for r in runs]
        cp = [r["cpu_pulse"] for r in runs]
        print(
            f"\nCPU pulse before a run ({a.cpu_pulse_seconds:g} s spin): wait share "
            f"{min(cp) * 100:.0f}% to {max(cp) * 100:.0f}% (median {np.median(cp) * 100:.0f}%); "
            f"the runs' driver CPU-wait share {min(cw) * 100:.0f}% to {max(cw) * 100:.0f}% "
            f"(median {np.median(cw) * 100:.0f}%); r(CPU pulse, run's share) = {pearson(cp, cw):.2f}"
        )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
