"""How fast `cycle` replays beside the classic policies (its compiled loop), one run.

    .venv/bin/python bench/bench_cycle.py [--lookups 1000000] [--slots 64,128] [--repeats 3]
        [--policies lru,arc,s3fifo,opt,cycle]

(`--policies lru,cycle,cotoken` adds cotoken's compiled loop; MER_NO_NATIVE=1 with
fewer lookups, e.g. `--lookups 100000`, times the Python classes.)

The same Mixtral-shaped trace and timing as bench/bench_policies.py (CPU time,
best of N, `replay_counts` under the step semantics, prefetch off, global):
lookups/s of cycle and of LRU, ARC, S3-FIFO and OPT, and each one's share of
mer's LRU speed. cycle has no libCacheSim counterpart: where libCacheSim is
installed (the `peers` extra) its LRU is timed in the same run on the trace
flattened to one request per lookup, as bench/bench_policies.py does, and is the
peer of the last column.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

POLICIES = ["lru", "arc", "s3fifo", "opt", "cycle"]


def main(argv: list[str] | None = None) -> int:
    from bench_policies import mixtral_like, time_lcs, time_mer

    from mer.sim import peers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--slots", default="64,128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES), help="lru first (the ratio's base)")
    args = ap.parse_args(argv)
    steps = mixtral_like(args.lookups)
    n = steps.size
    have_lcs = peers.available()
    print(
        f"\n{n:,} lookups (Mixtral-shaped, 32 x 8, top-2), CPU time best of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f}, "
        f"libCacheSim: {'yes' if have_lcs else 'not installed'}\n"
    )
    print("| slots | policy | hit rate | lookups/s | / lru | / libCacheSim lru |")
    print("|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.oracleGeneral"
        if have_lcs:
            peers.write_oracle_trace(steps.reshape(-1), path)
        for slots in (int(s) for s in args.slots.split(",")):
            lcs_rate = 0.0
            if have_lcs:
                ldt, _ = time_lcs(path, n, "lru", slots, args.repeats)
                lcs_rate = n / ldt if ldt > 0 else float("inf")
            lru_rate = 0.0
            for policy in args.policies.split(","):
                cpu, hit = time_mer(steps, policy, slots, args.repeats)
                rate = n / cpu if cpu > 0 else float("inf")
                lru_rate = rate if policy == "lru" else lru_rate
                peer = f"{rate / lcs_rate:.2f}x" if have_lcs else "-"
                print(
                    f"| {slots} | {policy} | {100 * hit:.2f}% | {rate:,.0f} "
                    f"| {rate / lru_rate:.2f}x | {peer} |"
                )
            if have_lcs:
                print(f"| {slots} | libCacheSim lru (lookup) | | {lcs_rate:,.0f} | | 1.00x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
