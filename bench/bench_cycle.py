"""How fast `cycle` replays beside the classic policies (its compiled loop), one run.

    .venv/bin/python bench/bench_cycle.py [--lookups 1000000] [--slots 64,128] [--repeats 3]
        [--policies lru,arc,s3fifo,opt,cycle]

(`cotoken` has no compiled loop: time it with fewer lookups, e.g.
`--lookups 100000 --policies lru,cycle,cotoken`.)

The same Mixtral-shaped trace and timing as bench/bench_policies.py (CPU time,
best of N, `replay_counts` under the step semantics, prefetch off, global):
lookups/s of cycle and of LRU, ARC, S3-FIFO and OPT, and cycle's share of
LRU's speed. cycle has no libCacheSim counterpart; LRU's row there is the peer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

POLICIES = ["lru", "arc", "s3fifo", "opt", "cycle"]


def main(argv: list[str] | None = None) -> int:
    from bench_policies import mixtral_like, time_mer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--slots", default="64,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES), help="lru first (the ratio's base)")
    args = ap.parse_args(argv)
    steps = mixtral_like(args.lookups)
    n = steps.size
    print(f"\n{n:,} lookups (Mixtral-shaped, 32 x 8, top-2), CPU time best of {args.repeats}\n")
    print("| slots | policy | hit rate | lookups/s | / lru |")
    print("|---:|---|---:|---:|---:|")
    for slots in (int(s) for s in args.slots.split(",")):
        lru_rate = 0.0
        for policy in args.policies.split(","):
            cpu, hit = time_mer(steps, policy, slots, args.repeats)
            rate = n / cpu if cpu > 0 else float("inf")
            lru_rate = rate if policy == "lru" else lru_rate
            print(
                f"| {slots} | {policy} | {100 * hit:.2f}% | {rate:,.0f} | {rate / lru_rate:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
