"""Does prefetch pay? Simulated tokens/s with and without one prefetch rule, per trace.

    .venv/bin/python bench/bench_prefetch.py A.parquet [B.parquet ...] \\
        [--policies lru,cycle] [--cache-slots 128] [--hardware nvme-desktop] [--json]

For each trace and policy: `mer simulate` without prefetch, then with the
`cooccur` predictor under the rule below (the same for every trace), and the
gain in tokens/s with the prefetch figures (precision, recall, bytes useful,
late and wasted). Decode phase, global scope. The rule: cooccur with beta 0.4
(the token's routed layers), near 0.3 (the nearest of them weigh more: 0.3 x
0.5^(distance - 1) on top of beta) and beta_prev 0.1 (the previous token);
prefetch only guesses with calibrated probability >= 0.45, at most 2 per
layer, for layers 3 or more steps ahead (read time / step time on
nvme-desktop is 3.6: a read aimed 3 steps ahead lands a little late but hides
most of its time, one aimed 4 ahead is guessed from a layer less) up to 12,
one prefetch read in flight at a time, each guess holding its place in flight
for at most 4 steps (the steps its read takes), the most probable guess of
the layers 3 and 4 steps ahead read first (`--prefetch-window 2`). That is the
rule bench_prefetch_heldout.py chose with the bundled trace and with
humaneval_2 held out; these figures are in sample (all traces).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RULE = {
    "predictor": "cooccur",
    "predictor_params": {"beta": 0.4, "beta_prev": 0.1, "near": 0.3},
    "prefetch_min_prob": 0.45,
    "prefetch_top_n": 2,
    "pipeline_depth": 12,
    "prefetch_inflight": 1,
    "prefetch_lead": 3,
    "prefetch_hold": 4,
    "prefetch_window": 2,
}


def main(argv: list[str] | None = None) -> int:
    from mer.core import ReplayConfig
    from mer.sim.hardware import load_profile
    from mer.sim.model import simulate
    from mer.traces.format import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--policies", default="lru,cycle")
    ap.add_argument("--cache-slots", type=int, default=128)
    ap.add_argument("--hardware", default="nvme-desktop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    hw = load_profile(args.hardware)
    rows = []
    t0 = time.perf_counter()
    for path in args.traces:
        tr = read_trace(path)
        for policy in args.policies.split(","):
            base_cfg = ReplayConfig(
                policy=policy, cache_slots=args.cache_slots, phase="decode"
            ).validate()
            base = simulate(tr, base_cfg, hw).summary
            cfg = ReplayConfig(
                policy=policy, cache_slots=args.cache_slots, phase="decode", **RULE
            ).validate()
            s = simulate(tr, cfg, hw).summary
            pf = s.prefetch
            rows.append(
                {
                    "trace": path.name,
                    "policy": policy,
                    "lead": s.config.get("prefetch_lead"),
                    "tokens_per_s_none": base.tokens_per_s,
                    "tokens_per_s_prefetch": s.tokens_per_s,
                    "gain": s.tokens_per_s / base.tokens_per_s - 1,
                    "hit_rate_none": base.hit_rate,
                    "hit_rate_prefetch": s.hit_rate,
                    **{
                        k: pf[k]
                        for k in ("issued", "used", "late", "wasted", "precision", "recall")
                    },
                    **{k: pf[k] for k in ("useful_bytes", "late_bytes", "wasted_bytes")},
                }
            )
            print(f"  {path.name} {policy}: {100 * rows[-1]['gain']:+.2f}%", file=sys.stderr)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
        return 0
    gib = float(1 << 30)
    print(
        f"\n{args.hardware}, {args.cache_slots} slots, global, decode; rule: cooccur "
        "(beta 0.4, near 0.3, beta_prev 0.1), min prob 0.45, top 2, lead 3, depth 12, "
        "1 in flight, hold 4, window 2\n"
    )
    print(
        "| trace | policy | tokens/s, no prefetch | tokens/s, prefetch | gain | hit rate "
        "(none -> prefetch) | precision | recall | GiB useful / late / wasted |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['trace']} | {r['policy']} | {r['tokens_per_s_none']:.4f} | "
            f"{r['tokens_per_s_prefetch']:.4f} | {100 * r['gain']:+.2f}% | "
            f"{100 * r['hit_rate_none']:.1f}% -> {100 * r['hit_rate_prefetch']:.1f}% | "
            f"{100 * r['precision']:.1f}% | {100 * r['recall']:.1f}% | "
            f"{r['useful_bytes'] / gib:.1f} / {r['late_bytes'] / gib:.1f} / "
            f"{r['wasted_bytes'] / gib:.1f} |"
        )
    print(f"\n({seconds:.0f} s; lead {rows[0]['lead'] if rows else '-'} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
