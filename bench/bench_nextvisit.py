"""An online nearest-neighbour model of the routing, held out: next-visit log-likelihood
and the LRU->OPT gap it closes, against cotoken's, one command.

    .venv/bin/python bench/bench_nextvisit.py A.parquet B.parquet C.parquet \\
        [--sizes 96,128,192] [--phase decode] [--beta 0.5] [--window 0] [--visits 3]

The protocol is bench_gap_sources.py's: each trace is held out in turn, every
weight is fitted on the others (logistic, maximum likelihood, every 5th step),
y = "the key is picked at its layer's next visit" over every (step, key) whose
next visit is in the trace, and the replay has the step semantics (lookups
first, admissions in rank order, the step's keys protected, the lowest score
evicted).

The model (online, past only). Text repeats itself (code, numbers, phrases), and
a token whose routing repeats a past token's tends to be followed by what
followed that one. At step (tau, c) the similarity of a past token sigma to the
current one is the number of picks they share over layers 0..c (this token's
routed layers); the vote for key (l, e) is the softmax(beta * similarity)-weighted
share of the past tokens' successors sigma + a that picked it: for a layer
already routed in this token (l <= c), its j-th visit from now is token tau + j,
so a = j; for a layer still to come (l > c) the next visit is this token (no
vote: cotoken's terms only) and the j-th is token tau + j - 1, so a = j - 1. A
successor is used only where it has already been routed: sigma + a < tau, or
sigma + a = tau and l <= c. `--window N` keeps the last N tokens only (0: all).
For each visit j, log(vote + 0.02) is stacked onto cotoken's nine features (one
column per group of layers) and the weights are fitted for that visit's answer.

Printed: the log-likelihood per (step, key) of the next-visit answer (all keys,
and the layers routed in this token, where the gap's ceiling is), and of the
visit after next, cotoken's features alone and with the vote; then the gap
closed, global, by cotoken's rule z - log d, the same z with the vote, and the
hit density summed over the next j visits, log(sum_i p_i / (d + (i - 1) L)),
with cotoken's features alone (two visits) and with the votes (j = 2..--visits).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gap_sources import log_likelihood, replay

#: Added to a vote before its logarithm (a vote of 0 is a weak "no", not a sure one).
VOTE_EPS = 0.02
#: Fit on every FIT_STRIDE-th step, as cotoken's own fit.
FIT_STRIDE = 5


def knn_votes(
    picked: np.ndarray,
    n_layers: int,
    *,
    beta: float = 0.5,
    window: int = 0,
    visits: int = 2,
    context: float = 0.0,
) -> dict[tuple[int, bool], np.ndarray]:
    """The votes at every step (tau, c), per key, for the successors sigma + a:
    (a, True) for a = 1..visits, a layer routed in this token (l <= c), whose a-th
    visit from now is token tau + a; (a, False) for a = 1..visits - 1, a layer still
    to come (l > c), whose visit after the next is token tau + a. The other group's
    keys hold 0.

    picked: (T, L * E) bool, token tau's picks. Only tokens 0..tau-1 and token
    tau's layers 0..c enter the vote at step (tau, c) (module doc). A step with no
    eligible past token votes the uninformed share k / E. `context` > 0 (`knnctx`)
    adds context x the picks token sigma - 1 shares with token tau - 1 to the
    similarity of sigma (0 for sigma = 0).
    """
    T, nk = picked.shape
    L = n_layers
    E = nk // L
    P = picked.reshape(T, L, E).astype(np.float64)
    Pf = picked.astype(np.float64)
    prior = float(picked[0].sum()) / nk if T else 0.0
    lay = np.arange(nk) // E
    routed = lay[None, :] <= np.arange(L)[:, None]  # (c, key): l <= c
    groups = [(a, True) for a in range(1, visits + 1)] + [(a, False) for a in range(1, visits)]
    out = {g: np.where(np.tile(routed if g[1] else ~routed, (T, 1)), prior, 0.0) for g in groups}
    for tau in range(1, T):
        lo = max(0, tau - window) if window else 0
        sig = np.arange(lo, tau)
        m = np.einsum("le,sle->sl", P[tau], P[sig])  # shared picks per layer
        shared = np.cumsum(m, axis=1).T  # (c, sigma): over layers 0..c
        if context:
            prev = np.zeros(len(sig))
            prev[sig >= 1] = Pf[sig[sig >= 1] - 1] @ Pf[tau - 1]
            shared = shared + context * prev[None, :]
        sim = beta * shared
        for a, is_routed in groups:
            # successor sigma + a: usable for a routed layer once <= tau, else once < tau
            ok = sig <= (tau - a if is_routed else tau - a - 1)
            if not ok.any():
                continue
            s = sim[:, ok]
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            V = w @ Pf[sig[ok] + a]  # (c, nk)
            mask = routed if is_routed else ~routed
            out[a, is_routed][tau * L : (tau + 1) * L][mask] = V[mask]
    return out


def cotoken_features(steps: np.ndarray, L: int, E: int, w: tuple[float, ...]) -> np.ndarray:
    """cotoken's nine features of every key after each step's begin_step (float32)."""
    from mer.core.cotoken import Cotoken

    pol = Cotoken(1, **{f"w{i}": v for i, v in enumerate(w)})
    pol.attach_keyspace(L * E)
    pol.attach_geometry(L, E)
    F = np.zeros((len(steps), L * E, 9), dtype=np.float32)
    for t, keys in enumerate(steps.tolist()):
        pol.begin_step(t, keys)
        F[t] = pol.features()[0]
    return F


def prepare(
    steps: np.ndarray, L: int, E: int, beta: float, window: int, visits: int, context: float = 0.0
) -> dict[str, np.ndarray]:
    """Features and answers of one trace: for visit j = 1..visits from now, y{j} (picked
    there), known{j} (that visit is in the trace) and knn{j} (cotoken's features and
    the vote for it, one column per group of layers)."""
    from mer.core.cotoken import DEFAULT_WEIGHTS

    S, nk = len(steps), L * E
    T = S // L
    t_idx = np.arange(S)
    tok = t_idx // L
    routed = np.arange(nk)[None, :] // E <= (t_idx % L)[:, None]
    nxt = np.where(routed, tok[:, None] + 1, tok[:, None])
    picked = np.zeros((T + visits + 1, nk), dtype=bool)
    for r in range(steps.shape[1]):
        picked[tok, steps[:, r]] = True
    cols = np.arange(nk)[None, :]
    F = cotoken_features(steps, L, E, DEFAULT_WEIGHTS)  # the weights are refitted below
    votes = knn_votes(picked[:T], L, beta=beta, window=window, visits=visits, context=context)
    out = {
        "steps": steps,
        "d": ((np.arange(nk)[None, :] // E - (t_idx % L)[:, None] - 1) % L + 1).astype(float),
        "routed": routed,
        "cot": F,
    }
    for j in range(1, visits + 1):
        out[f"y{j}"] = picked[nxt + j - 1, cols]
        out[f"known{j}"] = nxt + j - 1 < T
        extra = [np.where(routed, np.log(votes[j, True] + VOTE_EPS), 0.0)]
        if j > 1:  # a layer still to come: its j-th visit is token tau + j - 1
            extra.append(np.where(routed, 0.0, np.log(votes[j - 1, False] + VOTE_EPS)))
        out[f"knn{j}"] = np.concatenate(
            [F, *(x[..., None].astype(np.float32) for x in extra)], axis=-1
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from mer.core.cycle import logistic_fit
    from mer.sim.mrc import one_pass_hits
    from mer.traces.format import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--sizes", default="96,128,192")
    ap.add_argument("--phase", default="decode")
    ap.add_argument("--beta", type=float, default=0.5, help="similarity sharpness (0.5)")
    ap.add_argument("--window", type=int, default=0, help="past tokens voting (0: all)")
    ap.add_argument("--visits", type=int, default=3, help="visits ahead scored (2 or more; 3)")
    ap.add_argument(
        "--context",
        type=float,
        default=0.0,
        help="weight of the previous token's match in the similarity (knnctx: 0.5; 0: knn)",
    )
    args = ap.parse_args(argv)
    if len(args.traces) < 2:
        ap.error("give at least two traces: each is held out while the others tune")
    if args.visits < 2:
        ap.error("--visits must be 2 or more")
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    data, geo = {}, {}
    for p in args.traces:
        tr = read_trace(p).select_phase(args.phase)
        steps = tr.keys().reshape(-1, tr.top_k).astype(np.int64)
        data[p] = prepare(
            steps, tr.n_layers, tr.n_experts, args.beta, args.window, args.visits, args.context
        )
        geo[p] = (tr.n_layers, tr.n_experts)
    ll_rows, gap_rows = [], []
    for held in args.traces:
        h = data[held]
        L, E = geo[held]
        others = [p for p in args.traces if p != held]

        def fit(feat: str, y: str, known: str, others: list[Path] = others) -> np.ndarray:
            Xs, ys = [], []
            for p in others:
                x = data[p]
                sel = np.zeros(len(x["steps"]), dtype=bool)
                sel[geo[p][0] :: FIT_STRIDE] = True  # from the second token on
                k = x[known][sel]
                Xs.append(x[feat][sel][k].astype(np.float64))
                ys.append(x[y][sel][k].astype(np.float64))
            return logistic_fit(np.concatenate(Xs), np.concatenate(ys))[0]

        V = args.visits
        zc = {j: h["cot"].astype(np.float64) @ fit("cot", f"y{j}", f"known{j}") for j in (1, 2)}
        zk = {
            j: h[f"knn{j}"].astype(np.float64) @ fit(f"knn{j}", f"y{j}", f"known{j}")
            for j in range(1, V + 1)
        }
        k1, k2, r = h["known1"], h["known2"], h["routed"]
        y1, y2 = h["y1"], h["y2"]
        base = float(y1[k1].mean())
        ll_rows.append(
            (
                held.name,
                base * np.log(base) + (1 - base) * np.log(1 - base),
                log_likelihood(zc[1][k1], y1[k1]),
                log_likelihood(zk[1][k1], y1[k1]),
                log_likelihood(zc[1][k1 & r], y1[k1 & r]),
                log_likelihood(zk[1][k1 & r], y1[k1 & r]),
                log_likelihood(zc[2][k2], y2[k2]),
                log_likelihood(zk[2][k2], y2[k2]),
            )
        )
        d = h["d"]

        def density(zs: list[np.ndarray], d: np.ndarray = d, L: int = L) -> np.ndarray:
            """log of the hit density summed over the next len(zs) visits."""
            return np.log(sum(1.0 / (1.0 + np.exp(-z)) / (d + i * L) for i, z in enumerate(zs)))

        rules = {
            "cotoken": zc[1] - np.log(d),
            "+kNN": zk[1] - np.log(d),
            "two visits": density([zc[1], zc[2]]),
            **{
                f"{j} visits, kNN": density([zk[i] for i in range(1, j + 1)])
                for j in range(2, V + 1)
            },
        }
        lru = one_pass_hits("lru", h["steps"], L, E, "global")
        opt = one_pass_hits("opt", h["steps"], L, E, "global")
        for cap in sizes:
            lo, hi = int(lru[cap]), int(opt[cap])
            gaps = [(replay(h["steps"], sc, cap)[0] - lo) / (hi - lo) for sc in rules.values()]
            gap_rows.append((held.name, cap, gaps))

    print(f"\nnext-visit log-likelihood per (step, key), held out (beta {args.beta}, window "
          f"{args.window or 'all'}, context {args.context}):\n")  # fmt: skip
    print(
        "| trace | constant | cotoken | cotoken + kNN | routed layers: cotoken | "
        "routed layers: cotoken + kNN | visit after next: cotoken | visit after next: + kNN |"
    )
    print("|---|" + "---:|" * 7)
    for name, *v in ll_rows:
        print(f"| {name} | " + " | ".join(f"{x:.4f}" for x in v) + " |")
    print("\ngap closed, global, held out:\n")
    print("| trace | slots | " + " | ".join(rules) + " |")
    print("|---|---:|" + "---:|" * len(rules))
    for name, cap, gaps in gap_rows:
        print(f"| {name} | {cap} | " + " | ".join(f"{100 * g:.1f}%" for g in gaps) + " |")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
