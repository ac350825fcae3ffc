"""Held-out evaluation of the tuned policies: leave one trace out, tune on the others.

    .venv/bin/python bench/bench_heldout.py A.parquet B.parquet C.parquet \\
        [--policy cycle] [--sizes 64,96,128,192] [--phase decode] [--warmup 32] [--json]

For each trace: the policy (`cycle` or `cotoken`) is fitted (`mer tune`'s fit)
on the other traces only, then every classic policy and the tuned one are
replayed on it (`mer mrc`'s curves), cold and after the warm-up window. Prints
one markdown table per scope: LRU, the best classic online policy at that size,
the tuned policy, OPT, and the share of the LRU->OPT gap it closes, cold and
warm. Everything printed for the tuned policy is held out: the trace was not
used to fit it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CLASSIC = ["lru", "fifo", "lfu", "clock", "sieve", "s3fifo", "arc"]


def main(argv: list[str] | None = None) -> int:
    from mer.sim.mrc import MRCRequest, compute_mrc
    from mer.sim.tune import tune_policy
    from mer.traces.format import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--policy", default="cycle", help="the tuned policy (default cycle)")
    ap.add_argument("--sizes", default="64,96,128,192")
    ap.add_argument("--phase", default="decode")
    ap.add_argument("--warmup", type=int, default=32, help="tokens (default 32)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if len(args.traces) < 2:
        ap.error("give at least two traces: each is held out while the others tune")
    sizes = [int(s) for s in args.sizes.split(",")]
    pol = args.policy
    traces = {p: read_trace(p) for p in args.traces}
    rows = []
    t0 = time.perf_counter()
    for held in args.traces:
        others = [(p, traces[p]) for p in args.traces if p != held]
        tuned = tune_policy(pol, others, phase=args.phase, sizes=sizes)
        tr = traces[held].select_phase(args.phase)
        steps = tr.keys().reshape(-1, tr.top_k)
        req = MRCRequest(
            policies=[*CLASSIC, pol, "opt"],
            sizes=sizes,
            policy_params={pol: tuned.params},
            warmup_steps=min(args.warmup, tr.n_tokens // 2) * tr.n_layers,
        )
        df = compute_mrc(steps, tr.n_layers, tr.n_experts, req)
        for (scope, size), g in df.groupby(["scope", "cache_slots"]):
            g = g.set_index("policy")
            classic = g.loc[[p for p in CLASSIC if p != "lru"]]
            best = str(classic["hit_rate"].idxmax())
            rows.append(
                {
                    "trace": held.name,
                    "tuned_on": [t.name for t in tuned.tuned_on],
                    "scope": scope,
                    "cache_slots": int(size),
                    "lru": float(g.loc["lru", "hit_rate"]),
                    "best_classic": best,
                    "best_classic_hit_rate": float(g.loc[best, "hit_rate"]),
                    "best_classic_gap_closed": float(g.loc[best, "gap_closed"]),
                    "policy": pol,
                    "hit_rate": float(g.loc[pol, "hit_rate"]),
                    "opt": float(g.loc["opt", "hit_rate"]),
                    "gap_closed": float(g.loc[pol, "gap_closed"]),
                    "warm_hit_rate": float(g.loc[pol, "warm_hit_rate"]),
                    "warm_gap_closed": float(g.loc[pol, "warm_gap_closed"]),
                    "vs_lru_points": 100 * float(g.loc[pol, "hit_rate"] - g.loc["lru", "hit_rate"]),
                }
            )
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
        return 0

    def pct(v: float) -> str:
        return "-" if v != v else f"{100 * v:.1f}%"

    for scope in ("global", "per-layer"):
        print(f"\nscope {scope} (phase {args.phase}; {pol} tuned on the other traces):\n")
        print(
            f"| trace | slots | LRU | best classic | {pol} | OPT | gap closed (cold) | "
            "gap closed (warm) |"
        )
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            if r["scope"] != scope:
                continue
            print(
                f"| {r['trace']} | {r['cache_slots']} | {pct(r['lru'])} | "
                f"{r['best_classic']} {pct(r['best_classic_hit_rate'])} "
                f"({pct(r['best_classic_gap_closed'])}) | {pct(r['hit_rate'])} | {pct(r['opt'])} | "
                f"{pct(r['gap_closed'])} | {pct(r['warm_gap_closed'])} |"
            )
    print(f"\n({seconds:.1f} s; warm = after the first {args.warmup} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
