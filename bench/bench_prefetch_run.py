"""Does prefetch pay in a measured run, and as much as the simulator says? `mer run` with and
without prefetch rules, interleaved, beside `mer simulate` of the same runs.

    .venv/bin/python bench/bench_prefetch_run.py --experts EXPERTS.gguf [TRACE.parquet] \\
        [--rounds 5] [--tokens 60] [--cache-slots 128] [--policy cycle] \\
        [--prefetch "ARGS" [--prefetch "ARGS" ...]] [--hardware PROFILE.json]

Each round runs `mer run TRACE --experts EXPERTS --policy P --cache-slots N --phase decode
--tokens T` once without prefetch and once with each rule (`--prefetch`, repeatable; default
the rule below), the order rotating from round to round so that a drift of the shared
machine falls on all alike. Prints one row per round (tokens/s without prefetch, and per
rule its tokens/s and ratio) and, per rule, the median ratio with its range, hit rates,
prefetch reads used / late / wasted / cancelled, and the load average. The ratio of each
round is taken within the round (runs a few seconds apart): on a shared machine that is
the figure to quote, not tokens/s.

With `--hardware PROFILE` (a profile `mer probe` wrote on this machine, or a bundled name)
each configuration is also simulated (`mer simulate` with the same decision flags, the
runs' expert file, queue depth and chunk size), and the table puts the predicted gain
beside the measured one. It also checks that the engine executed the rule the simulator
simulated: prefetches issued, wasted and cancelled, used (on time + late), hits + late and
reads must be equal in the run and the simulation (only the split of used prefetches into
on time and late is the clock's). A mismatch is printed and makes the exit status 1.
Run-only flags in a rule (`--background-depth`, `--io`, `--ffn`, `--threads`) are not
passed to the simulator.

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
#: `mer run` flags that change how the engine executes, not what it decides (each takes a value)
RUN_ONLY = ("--background-depth", "--io", "--ffn", "--threads")


def mer(command: str, args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mer", command, *args, "--json"]
    if command == "run":
        cmd.append("--no-progress")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        print(f"mer {command} failed (exit {proc.returncode}): {shlex.join(args)}", file=sys.stderr)
        raise SystemExit(proc.returncode)  # 2: bad input (mer's message above), 1: a failure
    return dict(json.loads(proc.stdout))


def decision_flags(flags: list[str]) -> list[str]:
    """A rule's flags without the run-only ones (the simulator takes the decision flags)."""
    out: list[str] = []
    skip = False
    for f in flags:
        if skip:
            skip = False
        elif f in RUN_ONLY:
            skip = True
        elif not any(f.startswith(o + "=") for o in RUN_ONLY):
            out.append(f)
    return out


def decisions(s: dict[str, Any]) -> dict[str, int]:
    """The counts the decision core fixes, whatever the clock: equal in a run and its
    simulation (a used prefetch that lands late counts as a miss in `hits`, so hits + late)."""
    pf = s["prefetch"]
    return {
        "issued": int(pf["issued"]),
        "used + late": int(pf["used"]) + int(pf["late"]),
        "wasted": int(pf["wasted"]),
        "cancelled": int(pf.get("cancelled", 0)),
        "hits + late": int(s["hits"]) + int(pf["late"]),
        "reads": int(s["extra"].get("reads", -1)),
    }


def overhead_us(runs: list[dict[str, Any]]) -> float:
    """Median driver time per step outside reads, FFNs and dense (lookups, submissions, the
    decision core and the predictor): what a rule's own computing costs the run."""
    per = [
        1e6 * r["extra"]["driver_time"]["overhead_s"] / max(r["extra"]["driver_time"]["steps"], 1)
        for r in runs
        if "driver_time" in r.get("extra", {})
    ]
    return statistics.median(per) if per else float("nan")


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", nargs="?", type=Path, default=TRACE)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--cache-slots", type=int, default=128)
    ap.add_argument("--policy", default="cycle")
    ap.add_argument(
        "--prefetch",
        action="append",
        help="a rule's `mer run` flags (repeatable: every rule runs in every round; "
        "default: the rule above)",
    )
    ap.add_argument(
        "--hardware",
        help="simulate every configuration on this profile (`mer probe -o FILE` on this "
        "machine) and check the run's decisions against the simulation's",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1:
        ap.error("--rounds and --tokens must be at least 1")
    rules = args.prefetch or [RULE]
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
    flags = {"none": []} | {f"rule {i + 1}": shlex.split(r) for i, r in enumerate(rules)}
    names = list(flags)
    print(f"$ mer run {shlex.join(base)}", file=sys.stderr)
    for name in names[1:]:
        print(f"  {name}: {shlex.join(flags[name])}", file=sys.stderr)
    load0 = load()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(mer("run", base + flags[name]))
        loads.append(load())
        got = ", ".join(
            f"{n} {runs[n][-1]['tokens_per_s'] / runs['none'][-1]['tokens_per_s']:.3f}x"
            for n in names[1:]
        )
        print(f"  round {r + 1}: {got}", file=sys.stderr, flush=True)
    sims: dict[str, dict[str, Any]] = {}
    mismatches = []
    if args.hardware:
        io = runs["none"][0]["extra"].get("io") or {}
        like = ["--hardware", args.hardware]
        for key, flag in (("queue_depth", "--queue-depth"), ("chunk_bytes", "--chunk-bytes")):
            if io.get(key):
                like += [flag, str(io[key])]
        for name in names:
            sims[name] = mer("simulate", base + like + decision_flags(flags[name]))
            for s in runs[name]:
                want, have = decisions(sims[name]), decisions(s)
                if want != have:
                    mismatches.append((name, want, have))
    rows = []
    for name in names[1:]:
        ratios = [
            p["tokens_per_s"] / n["tokens_per_s"]
            for p, n in zip(runs[name], runs["none"], strict=True)
        ]
        last = runs[name][-1]
        pf = last["prefetch"]
        row: dict[str, Any] = {
            "rule": name,
            "flags": shlex.join(flags[name]),
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios),
            "max_ratio": max(ratios),
            "above_1": sum(x > 1 for x in ratios),
            "hit_rate_none": runs["none"][-1]["hit_rate"],
            "hit_rate_prefetch": last["hit_rate"],
            **{k: pf[k] for k in ("issued", "used", "late", "wasted")},
            "cancelled": pf.get("cancelled", 0),
            "io_wait_share_none": statistics.median(x["io_wait_share"] for x in runs["none"]),
            "io_wait_share_prefetch": statistics.median(x["io_wait_share"] for x in runs[name]),
            "overhead_us_none": overhead_us(runs["none"]),
            "overhead_us_prefetch": overhead_us(runs[name]),
        }
        if sims:
            sp, sn = sims[name], sims["none"]
            row["predicted_ratio"] = sp["tokens_per_s"] / sn["tokens_per_s"]
            row["predicted_late"] = sp["prefetch"]["late"]
            row["decisions_equal"] = not any(m[0] in (name, "none") for m in mismatches)
        rows.append(row)
    summary = {
        "rounds": [
            {
                "round": r + 1,
                "tokens_per_s": {n: runs[n][r]["tokens_per_s"] for n in names},
                "load": loads[r],
            }
            for r in range(args.rounds)
        ],
        "rules": rows,
        "hardware": args.hardware,
        "mismatches": [{"rule": m[0], "simulated": m[1], "measured": m[2]} for m in mismatches],
        "load_before": load0,
        "load_after": load(),
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 1 if mismatches else 0
    print(
        f"\n{args.trace.name}, {args.experts.name}, {args.policy}, {args.cache_slots} slots, "
        f"{args.tokens} decode tokens; load average {load0} before, {summary['load_after']} "
        f"after ({summary['time']})\n"
    )
    for row in rows:
        print(f"- {row['rule']}: {row['flags']}")
    print(
        "\n| round | tokens/s, no prefetch | "
        + " | ".join(f"{n}: tokens/s (ratio)" for n in names[1:])
        + " | load |"
    )
    print("|---:|---:|" + "---:|" * (len(names) - 1) + "---|")
    for r in range(args.rounds):
        none = runs["none"][r]["tokens_per_s"]
        cells = " | ".join(
            f"{runs[n][r]['tokens_per_s']:.2f} ({runs[n][r]['tokens_per_s'] / none:.3f}x)"
            for n in names[1:]
        )
        print(f"| {r + 1} | {none:.2f} | {cells} | {loads[r]} |")
    pred = " predicted ratio (simulator) |" if sims else ""
    print(
        f"\n| rule | measured ratio, median (range) | rounds above 1.0x |{pred} hit rate "
        "(none -> prefetch) | prefetches issued: used / late / wasted (cancelled) | "
        "I/O wait share, none -> prefetch | driver time per step outside reads and compute "
        "(median), none -> prefetch |" + (" decisions equal to the simulation |" if sims else "")
    )
    print(
        "|---|---:|---:|"
        + ("---:|" if sims else "")
        + "---|---|---|---|"
        + ("---|" if sims else "")
    )
    for row in rows:
        p = f" {row['predicted_ratio']:.3f}x |" if sims else ""
        eq = (" yes |" if row["decisions_equal"] else " **no** |") if sims else ""
        print(
            f"| {row['rule']} | {row['median_ratio']:.3f}x ({row['min_ratio']:.3f}x to "
            f"{row['max_ratio']:.3f}x) | {row['above_1']} of {args.rounds} |{p} "
            f"{100 * row['hit_rate_none']:.1f}% -> {100 * row['hit_rate_prefetch']:.1f}% | "
            f"{row['issued']}: {row['used']} / {row['late']} / {row['wasted']} "
            f"({row['cancelled']}) | {100 * row['io_wait_share_none']:.0f}% -> "
            f"{100 * row['io_wait_share_prefetch']:.0f}% | {row['overhead_us_none']:.0f} -> "
            f"{row['overhead_us_prefetch']:.0f} us |{eq}"
        )
    for name, want, have in mismatches:
        print(f"\nmismatch, {name}: simulated {want}, measured {have}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
