"""Does prefetch pay in a measured run? `mer run` with and without one prefetch rule, alternating.

    .venv/bin/python bench/bench_prefetch_run.py --experts EXPERTS.gguf [TRACE.parquet] \\
        [--rounds 3] [--tokens 60] [--cache-slots 128] [--policy cycle] [--prefetch "ARGS"]

Each round runs `mer run TRACE --experts EXPERTS --policy P --cache-slots N --phase decode
--tokens T` once without prefetch and once with the rule (`--prefetch`, default the rule
below), the order alternating from round to round so that a drift of the shared machine
falls on both alike. Prints one row per round (tokens/s of both, their ratio, hit rates,
prefetch reads used / late / wasted) and the median ratio with its spread, and the load
average before and after. The ratio of each round is taken within the round (two runs a
few seconds apart): on a shared machine that is the figure to quote, not tokens/s.

The default rule: cooccur (beta 0.4, beta_prev 0.1, near 0.3), one guess per step, for the
next layer only (depth 1, lead 1: the guess with the most of the token's own routing behind
it), only at calibrated probability >= 0.5, one prefetch read in flight, at most 2
prefetch chunks on the device (`--background-depth 2`: a demand read never queues behind
more than 1 MiB of prefetch), and the guess dropped at the next step if that step's router
did not pick it (`--prefetch-cancel 1`: its chunks not yet read are never read). In an
I/O-bound run the disk is idle only while the last expert of a step computes; the rule
spends that idle time on the next layer's likeliest expert and gives back at once what
the router proves useless, so a wrong guess costs almost no bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
RULE = (
    "--predictor cooccur --predictor-param beta=0.4 --predictor-param beta_prev=0.1 "
    "--predictor-param near=0.3 --prefetch-min-prob 0.5 --prefetch-top-n 1 --pipeline-depth 1 "
    "--prefetch-lead 1 --prefetch-inflight 1 --background-depth 2 --prefetch-cancel 1"
)


def run(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mer", "run", *args, "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"mer run failed (exit {proc.returncode}): {shlex.join(args)}")
    return dict(json.loads(proc.stdout))


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", nargs="?", type=Path, default=TRACE)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--cache-slots", type=int, default=128)
    ap.add_argument("--policy", default="cycle")
    ap.add_argument("--prefetch", default=RULE, help="the rule's `mer run` flags")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    base = [
        str(args.trace),
        "--experts",
        str(args.experts),
        "--policy",
        args.policy,
        "--cache-slots",
        str(args.cache_slots),
        "--phase",
        "decode",
        "--tokens",
        str(args.tokens),
    ]
    pf = shlex.split(args.prefetch)
    print(f"$ mer run {shlex.join(base)}  [without, and with: {args.prefetch}]", file=sys.stderr)
    load0 = load()
    rows = []
    for r in range(args.rounds):
        order = ["none", "prefetch"] if r % 2 == 0 else ["prefetch", "none"]
        got: dict[str, dict[str, Any]] = {}
        for name in order:
            got[name] = run(base + (pf if name == "prefetch" else []))
        n, p = got["none"], got["prefetch"]
        rows.append(
            {
                "round": r + 1,
                "tokens_per_s_none": n["tokens_per_s"],
                "tokens_per_s_prefetch": p["tokens_per_s"],
                "ratio": p["tokens_per_s"] / n["tokens_per_s"],
                "hit_rate_none": n["hit_rate"],
                "hit_rate_prefetch": p["hit_rate"],
                **{k: p["prefetch"][k] for k in ("issued", "used", "late", "wasted")},
                "cancelled": p["prefetch"].get("cancelled", 0),
                "cancelled_reads": p["extra"].get("cancelled_reads", 0),
                "cancelled_gib": p["extra"].get("cancelled_bytes", 0) / float(1 << 30),
                "gib_read_none": n["bytes_read"] / float(1 << 30),
                "gib_read_prefetch": p["bytes_read"] / float(1 << 30),
                "io_wait_share_none": n["io_wait_share"],
                "io_wait_share_prefetch": p["io_wait_share"],
                "hidden_read_share_none": n.get("hidden_read_share"),
                "hidden_read_share_prefetch": p.get("hidden_read_share"),
                "load": load(),
            }
        )
        print(f"  round {r + 1}: {rows[-1]['ratio']:.3f}x", file=sys.stderr, flush=True)
    ratios = [row["ratio"] for row in rows]
    summary = {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "load_before": load0,
        "load_after": load(),
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.json:
        print(json.dumps({"rows": rows, **summary}, indent=1))
        return 0
    print(
        f"\n{args.trace.name}, {args.experts.name}, {args.policy}, {args.cache_slots} slots, "
        f"{args.tokens} decode tokens; load average {load0} before, {summary['load_after']} "
        f"after ({summary['time']})\n"
    )
    print(
        "| round | tokens/s, no prefetch | tokens/s, prefetch | ratio | hit rate (none -> "
        "prefetch) | prefetch reads used / late / wasted (cancelled) | GiB requested, none -> "
        "prefetch (not read: cancelled) | I/O wait share, none -> prefetch | load |"
    )
    print("|---:|---:|---:|---:|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['round']} | {row['tokens_per_s_none']:.2f} | "
            f"{row['tokens_per_s_prefetch']:.2f} | {row['ratio']:.3f}x | "
            f"{100 * row['hit_rate_none']:.1f}% -> {100 * row['hit_rate_prefetch']:.1f}% | "
            f"{row['used']} / {row['late']} / {row['wasted']} ({row['cancelled']}) | "
            f"{row['gib_read_none']:.1f} -> {row['gib_read_prefetch']:.1f} "
            f"({row['cancelled_gib']:.1f}) | {100 * row['io_wait_share_none']:.0f}% -> "
            f"{100 * row['io_wait_share_prefetch']:.0f}% | {row['load']} |"
        )
    print(
        f"\nmedian {summary['median_ratio']:.3f}x (rounds {summary['min_ratio']:.3f}x to "
        f"{summary['max_ratio']:.3f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
