"""Where the LRU->OPT gap that `cotoken` leaves comes from, held out, one command.

    .venv/bin/python bench/bench_gap_sources.py A.parquet B.parquet C.parquet \\
        [--sizes 96,128,192] [--phase decode]

For each trace, `cotoken` is fitted on the others (`mer tune`'s fit) and replayed
with the step semantics (lookups first, then admissions in rank order, the
step's keys protected). At each eviction the script also asks which candidate
OPT would evict (the farthest next use among the same candidates) and prints:

- where the victims come from, by d (steps until the victim's layer comes
  round): cotoken's against OPT's choice among the same candidates;
- how often cotoken's victim is picked at its layer's very next visit, or
  within two tokens (OPT's choice: never at the next visit, by definition);
- the ceiling of the rule z - log d itself: the gap closed when the *true*
  answer to "picked at the layer's next visit" is added to cotoken's z with a
  strength s (z + s (2 y - 1); s = 4 makes the answer certain while the online
  z still orders the keys the answer leaves tied), with the log-likelihood per
  (step, key) of that z as a probability, so the table says how good the
  next-visit prediction must be for a given share of the gap; and when the true
  answers for the next two visits enter d + L (1 - p1) / max(p2, 0.2) (ties again
  broken by the online score). Two more columns make the answer certain for one
  group of layers only: those this token has routed (their next visit is the
  next token's) and those still to come in this token.

Only the real policy's online score is held out; the oracle rows read the
future on purpose (they are ceilings, not policies).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

#: Strengths of the true next-visit answer added to cotoken's z (the oracle columns).
STRENGTHS = (0.1, 0.2, 4.0)


def scores(
    steps: np.ndarray, n_layers: int, n_experts: int, w: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """cotoken's log-odds z and log d of every key after each step's begin_step."""
    from mer.core.cotoken import Cotoken

    pol = Cotoken(1, **w)
    pol.attach_keyspace(n_layers * n_experts)
    pol.attach_geometry(n_layers, n_experts)
    z = np.zeros((len(steps), n_layers * n_experts))
    logd = np.zeros_like(z)
    for t, keys in enumerate(steps.tolist()):
        pol.begin_step(t, keys)
        F, d = pol.features()
        z[t] = F @ pol._w
        logd[t] = np.log(d)
    return z, logd


def log_likelihood(z: np.ndarray, y: np.ndarray) -> float:
    """Mean log-likelihood of the answers y under the probabilities sigmoid(z)."""
    return float(np.mean(-np.logaddexp(0.0, np.where(y > 0, -z, z))))


def replay(steps: np.ndarray, score: np.ndarray, cap: int, nxt: np.ndarray | None = None):
    """hits, and per eviction (d, next use of the victim, d and next use of OPT's pick)."""
    n_keys = score.shape[1]
    res = np.zeros(n_keys, dtype=bool)
    n = hits = 0
    rows = []
    for t, keys in enumerate(steps):
        miss = [int(k) for k in keys if not res[k]]
        hits += len(keys) - len(miss)
        if not miss:
            continue
        sc = np.where(res, score[t], np.inf)
        sc[keys] = np.inf
        for key in miss:
            if n >= cap:
                v = int(np.argmin(sc))
                if nxt is not None:
                    cand = np.flatnonzero(np.isfinite(sc))
                    o = int(cand[np.argmax(nxt[t, cand])])
                    rows.append((v, nxt[t, v], o, nxt[t, o], t))
                res[v] = False
                sc[v] = np.inf
                n -= 1
            res[key] = True
            n += 1
    return hits, rows


def main(argv: list[str] | None = None) -> int:
    from mer.core.cotoken import fit_weights
    from mer.sim.mrc import one_pass_hits
    from mer.traces.format import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--sizes", default="96,128,192")
    ap.add_argument("--phase", default="decode")
    args = ap.parse_args(argv)
    if len(args.traces) < 2:
        ap.error("give at least two traces: each is held out while the others tune")
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    data = {}
    for p in args.traces:
        tr = read_trace(p).select_phase(args.phase)
        data[p] = (tr.keys().reshape(-1, tr.top_k).astype(np.int64), tr.n_layers, tr.n_experts)
    gap_rows, src_rows, ll_rows = [], [], []
    for held in args.traces:
        steps, L, E = data[held]
        w, _ = fit_weights([data[p] for p in args.traces if p != held])
        z, logd = scores(steps, L, E, {f"w{i}": v for i, v in enumerate(w)})
        sc = z - logd
        S, nk = len(steps), L * E
        nxt = np.full((S, nk), 10**9, dtype=np.int64)  # next use strictly after step t
        last = np.full(nk, 10**9, dtype=np.int64)
        for t in range(S - 1, -1, -1):
            nxt[t] = last
            last[steps[t]] = t
        t_idx = np.arange(S)
        d = ((np.arange(nk)[None, :] // E - (t_idx % L)[:, None] - 1) % L + 1).astype(float)
        tok = t_idx // L
        nxt_visit = np.where(
            np.arange(nk)[None, :] // E > (t_idx % L)[:, None], tok[:, None], tok[:, None] + 1
        )
        picked = np.zeros((S // L + 2, nk), dtype=bool)
        for r in range(steps.shape[1]):
            picked[tok, steps[:, r]] = True
        cols = np.arange(nk)[None, :]
        p1 = picked[nxt_visit, cols].astype(float)
        p2 = picked[nxt_visit + 1, cols].astype(float)
        known = nxt_visit < S // L  # the layer's next visit is in the trace
        y = p1[known]
        base = float(y.mean())
        lls = {"constant": base * np.log(base) + (1 - base) * np.log(1 - base)}
        lls["cotoken"] = log_likelihood(z[known], y)
        oracles = {}
        for s_ in STRENGTHS:
            zs = z + s_ * (2 * p1 - 1)
            lls[s_] = log_likelihood(zs[known], y)
            oracles[s_] = zs - logd
        # the certain answer for one group of layers only: those routed in this token
        # (next visit: the next token) or those still to come (next visit: this token)
        routed = np.arange(nk)[None, :] // E <= (t_idx % L)[:, None]
        part = {
            g: z + 4.0 * (2 * p1 - 1) * m - logd
            for g, m in (("routed", routed), ("to come", ~routed))
        }
        oracle2 = -np.log(d + L * (1 - p1) / np.maximum(p2, 0.2)) + 1e-3 * sc
        lru = one_pass_hits("lru", steps, L, E, "global")
        opt = one_pass_hits("opt", steps, L, E, "global")
        ll_rows.append((held.name, lls))
        for cap in sizes:

            def gap(h: int, lo: int = int(lru[cap]), hi: int = int(opt[cap])) -> float:
                return (h - lo) / (hi - lo)

            h, ev = replay(steps, sc, cap, nxt)
            gap_rows.append(
                (held.name, cap, gap(h),
                 [gap(replay(steps, oracles[s_], cap)[0]) for s_ in STRENGTHS],
                 [gap(replay(steps, part[g], cap)[0]) for g in ("routed", "to come")],
                 gap(replay(steps, oracle2, cap)[0]))
            )  # fmt: skip
            R = np.asarray(ev, dtype=np.int64)
            dv = d[R[:, 4], R[:, 0]]
            do = d[R[:, 4], R[:, 2]]
            at_next = R[:, 1] - R[:, 4] <= dv
            within2 = R[:, 1] - R[:, 4] <= dv + L
            shares = []
            for lo, hi in ((1, 2), (3, 8), (9, L // 2), (L // 2 + 1, L)):
                shares.append(
                    (
                        float(((dv >= lo) & (dv <= hi)).mean()),
                        float(((do >= lo) & (do <= hi)).mean()),
                    )
                )
            src_rows.append(
                (held.name, cap, len(R), shares, float(at_next.mean()), float(within2.mean()))
            )

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    print("\ngap closed, global (cotoken held out; the oracle columns read the future):\n")
    heads = " | ".join(f"z + {s_} (2y - 1)" for s_ in STRENGTHS)
    print(
        f"| trace | slots | cotoken | {heads} | certain, layers routed this token only | "
        "certain, layers to come only | true next two visits |"
    )
    print("|---|---:|---:|" + "---:|" * (len(STRENGTHS) + 3))
    for name, cap, g, o1, op, o2 in gap_rows:
        cells = " | ".join(pct(v) for v in [*o1, *op])
        print(f"| {name} | {cap} | {pct(g)} | {cells} | {pct(o2)} |")
    print("\nlog-likelihood per (step, key) of the next-visit answer y under sigmoid(z):\n")
    print(f"| trace | constant | cotoken | {heads} |")
    print("|---|---:|---:|" + "---:|" * len(STRENGTHS))
    for name, lls in ll_rows:
        cells = " | ".join(f"{lls[s_]:.3f}" for s_ in STRENGTHS)
        print(f"| {name} | {lls['constant']:.3f} | {lls['cotoken']:.3f} | {cells} |")
    print("\nwhere the victims come from (d = steps until the victim's layer comes round):\n")
    print(
        "| trace | slots | evictions | d 1-2 cotoken / OPT | d 3-8 | d 9-16 | d 17-32 | "
        "victim picked at its next visit | within two tokens |"
    )
    print("|---|---:|---:|---|---|---|---|---:|---:|")
    for name, cap, n, shares, at_next, within2 in src_rows:
        cells = " | ".join(f"{pct(a)} / {pct(b)}" for a, b in shares)
        print(f"| {name} | {cap} | {n} | {cells} | {pct(at_next)} | {pct(within2)} |")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
