"""Trace statistics: what the routing in a trace looks like to a cache.

`trace_stats` returns one JSON-able dict (the `mer trace stats --json` object);
`format_stats` renders it as text. Everything is computed from the replay array
(tokens, layers, top_k), vectorised, so it runs in well under a second on the
bundled traces.

Definitions (also in docs/trace-statistics.md):
- popularity: per layer, the share of a layer's lookups (all ranks) that go to
  each expert; entropy in bits and normalised by log2(n_experts).
- repetition (Mixtral paper, arXiv 2401.04088 section 5, Table 5), over pairs of
  consecutive tokens of the same sequence (never across a sequence boundary):
  `first`: the rank-0 expert equals the previous token's rank-0 expert;
  `first_or_second` (top-k overlap): the two tokens' top-k sets share at least
  one expert. Its random baseline for top-2 of 8 is 1 - C(6,2)/C(8,2) = 46.4%,
  the "~46%" the paper prints, which pins the definition down.
  `first_in_prev_topk` (rank-0 among the previous token's top-k; baseline k/n)
  is reported as well because a next-token predictor cares about it.
- reuse distance of global keys (layer * n_experts + expert) in replay order:
  the number of distinct other keys accessed between two accesses of a key
  (a fully associative LRU of C slots, fed one lookup at a time, hits exactly
  when it is < C: lookup granularity, not the step granularity of `mer mrc`).
- transitions: for every token and each pair of consecutive layers, every
  (expert at l, expert at l+1) pair of its top-k sets is counted; rows are
  normalised (row a = where tokens that used a at l go at l+1, per pair).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mer.traces.format import Trace

QUANTILES = (0.5, 0.9, 0.95, 0.99)


# -- building blocks (public so that tests and generators can reuse them) -----------


def popularity_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """int64 (layers, n_experts): how often each expert is used per layer (all ranks)."""
    t, n_layers, k = experts.shape
    layer = np.repeat(np.arange(n_layers), k)[None, :].repeat(t, 0).reshape(-1)
    flat = layer * n_experts + experts.reshape(-1).astype(np.int64)
    return np.bincount(flat, minlength=n_layers * n_experts).reshape(n_layers, n_experts)


def entropy_bits(shares: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits along the last axis (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(shares > 0, -shares * np.log2(np.where(shares > 0, shares, 1.0)), 0.0)
    return np.asarray(terms.sum(axis=-1))


def consecutive_pairs(seq: np.ndarray) -> np.ndarray:
    """Boolean (tokens-1,): True where token i+1 follows token i in the same sequence."""
    seq = np.asarray(seq)
    return np.asarray(seq[1:] == seq[:-1], dtype=bool)


def repetition_shares(experts: np.ndarray, seq: np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer repetition shares over within-sequence consecutive token pairs.

    Returns arrays of shape (layers,) for first, first_or_second (top-k overlap)
    and first_in_prev_topk, plus the pair count (NaN shares when no pair).
    """
    valid = consecutive_pairs(seq)
    prev, cur = experts[:-1][valid], experts[1:][valid]
    n_pairs = int(valid.sum())
    n_layers = experts.shape[1]
    if n_pairs == 0:
        nan = np.full(n_layers, np.nan)
        return {
            "first": nan,
            "first_or_second": nan.copy(),
            "first_in_prev_topk": nan.copy(),
            "pairs": np.array(0),
        }
    first = (cur[:, :, 0] == prev[:, :, 0]).mean(axis=0)
    overlap = (cur[:, :, :, None] == prev[:, :, None, :]).any(axis=(2, 3)).mean(axis=0)
    in_prev = (cur[:, :, 0, None] == prev).any(axis=2).mean(axis=0)
    return {
        "first": first,
        "first_or_second": overlap,
        "first_in_prev_topk": in_prev,
        "pairs": np.array(n_pairs),
    }


def random_baselines(n_experts: int, top_k: int) -> dict[str, float]:
    """Repetition shares of independent uniformly random top-k sets (closed form)."""
    n, k = n_experts, top_k
    no_overlap = math.comb(n - k, k) / math.comb(n, k) if n - k >= k else 0.0
    return {"first": 1.0 / n, "first_or_second": 1.0 - no_overlap, "first_in_prev_topk": k / n}


def transition_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """int64 (layers-1, n, n): counts of (expert at l, expert at l+1) over all top-k pairs."""
    _t, n_layers, _k = experts.shape
    if n_layers < 2:
        return np.zeros((0, n_experts, n_experts), dtype=np.int64)
    e = experts.astype(np.int64)
    a = e[:, :-1, :, None]  # (t, L-1, k, 1)
    b = e[:, 1:, None, :]  # (t, L-1, 1, k)
    layer = np.arange(n_layers - 1)[None, :, None, None]
    flat = (layer * n_experts + a) * n_experts + b
    counts = np.bincount(flat.reshape(-1), minlength=(n_layers - 1) * n_experts * n_experts)
    return counts.reshape(n_layers - 1, n_experts, n_experts)


def normalise_rows(counts: np.ndarray) -> np.ndarray:
    """Row-normalise along the last axis; all-zero rows stay zero."""
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros(counts.shape, dtype=np.float64), where=sums > 0)


def reuse_distances(keys: np.ndarray) -> np.ndarray:
    """Reuse distance of every access (int64, -1 for a first access), vectorised.

    For access i of key x whose previous access is p, the distance is the number
    of distinct keys seen in (p, i), i.e. the count of positions j in (p, i)
    that are the last access of their key before i (next[j] > i). Since next[j]
    never equals i there, it is (i - p - 1) - #{j > p: next[j] < i}, and
    #{j > p: next[j] < i} = #{j: next[j] < i} - #{j <= p: next[j] < i}. The last
    term is a 2-D dominance count, done with a dyadic (Fenwick-like)
    decomposition of the prefix [0, p]: one sort and one searchsorted per bit
    level, O(N log^2 N) in numpy with no Python loop over accesses.
    """
    keys = np.asarray(keys).reshape(-1)
    n = len(keys)
    dist = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return dist
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    prev = np.full(n, -1, dtype=np.int64)
    nxt = np.full(n, n, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    nxt[order[:-1][same]] = order[1:][same]

    q = np.flatnonzero(prev >= 0)  # accesses that are reuses
    if len(q) == 0:
        return dist
    p = prev[q]
    below_i = np.searchsorted(np.sort(nxt), q, side="left")  # #{j: next[j] < i}
    prefix = np.zeros(len(q), dtype=np.int64)  # #{j <= p: next[j] < i}
    m = p + 1
    width = n + 1  # next[j] in 1..n
    j_all = np.arange(n, dtype=np.int64)
    for b in range(int(m.max()).bit_length()):
        has = ((m >> b) & 1).astype(bool)
        if not has.any():
            continue
        composite = np.sort((j_all >> b) * width + nxt)
        block = (m[has] >> b) - 1
        hi = np.searchsorted(composite, block * width + q[has], side="left")
        lo = np.searchsorted(composite, block * width, side="left")
        prefix[has] += hi - lo
    dist[q] = (q - p - 1) - (below_i - prefix)
    return dist


def reuse_summary(dist: np.ndarray, n_keys_total: int) -> dict[str, Any]:
    """Quantiles, log2 histogram, cold misses and the global-LRU hit rate by size."""
    reuses = dist[dist >= 0]
    cold = int((dist < 0).sum())
    out: dict[str, Any] = {"accesses": len(dist), "cold_misses": cold, "reuses": len(reuses)}
    if len(reuses) == 0:
        out.update(
            {"mean": None, "max": None, "quantiles": {}, "histogram": [], "lru_hit_rate": {}}
        )
        return out
    out["mean"] = round(float(reuses.mean()), 4)
    out["max"] = int(reuses.max())
    out["quantiles"] = {f"p{round(q * 100)}": float(np.quantile(reuses, q)) for q in QUANTILES}
    edges = [0, 1]
    while edges[-1] <= reuses.max():
        edges.append(edges[-1] * 2)
    counts = np.histogram(reuses, bins=np.asarray([*edges, edges[-1] * 2]) - 0.5)[0]
    out["histogram"] = [
        {"lo": lo, "hi": hi - 1 if hi - 1 >= lo else lo, "count": int(c)}
        for lo, hi, c in zip(edges, [*edges[1:], edges[-1] * 2], counts, strict=True)
        if c > 0 or lo <= reuses.max()
    ]
    sizes = [2**i for i in range(0, max(1, n_keys_total).bit_length() + 1) if 2**i <= n_keys_total]
    if n_keys_total not in sizes:
        sizes.append(n_keys_total)
    out["lru_hit_rate"] = {str(c): round(float((reuses < c).sum()) / len(dist), 6) for c in sizes}
    out["lru_hit_rate_definition"] = LRU_LOOKUP_DEFINITION
    return out


#: Mattson's stack distance gives LRU over single lookups. `mer mrc` and `mer simulate`
#: count steps (a token-layer's top-k looked up together, never evicting one another),
#: which hits more often: 32.70% against 28.59% at 64 slots on the bundled trace.
LRU_LOOKUP_DEFINITION = (
    "lookup granularity (each lookup alone, as libCacheSim counts), global scope, "
    "cold start; `mer mrc` reports step granularity, which differs"
)


def ranks_look_sorted(experts: np.ndarray, weights: np.ndarray | None) -> bool:
    """True when ranks carry no order: no weights and every top-k row ascending.

    Importers of sources that record only sets (mixtral-offloading) store the ids
    sorted; rank 0 is then the smallest id, and first-choice figures are
    meaningless. A genuinely ranked top-2 trace is all-ascending with
    probability 2^-rows, so the test is safe.
    """
    if weights is not None or experts.shape[2] < 2:
        return False
    return bool((np.diff(experts.astype(np.int32), axis=2) > 0).all())


# -- the report -------------------------------------------------------------------


def _r(x: Any, nd: int = 6) -> Any:
    if isinstance(x, np.ndarray):
        return [_r(v, nd) for v in x.tolist()]
    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, nd)
    if isinstance(x, np.floating):
        return _r(float(x), nd)
    if isinstance(x, np.integer):
        return int(x)
    return x


def trace_stats(trace: Trace, phase: str = "all", *, matrices: bool = True) -> dict[str, Any]:
    """All statistics of a trace (optionally one phase) as one JSON-able dict."""
    tr = trace.select_phase(phase)
    e = tr.experts
    n, n_layers, k = tr.n_experts, tr.n_layers, tr.top_k
    table = tr.token_table()
    seq = table["seq"].to_numpy()

    counts = popularity_counts(e, n)
    shares = counts / counts.sum(axis=1, keepdims=True)
    first_counts = popularity_counts(e[:, :, :1], n)
    first_shares = first_counts / first_counts.sum(axis=1, keepdims=True)
    ent = entropy_bits(shares)
    norm_ent = ent / math.log2(n) if n > 1 else np.zeros_like(ent)
    rep = repetition_shares(e, seq)
    trans = normalise_rows(transition_counts(e, n))
    dist = reuse_distances(tr.keys().reshape(-1))
    sorted_ranks = ranks_look_sorted(e, tr.weights())

    layers = []
    for ly in range(n_layers):
        row: dict[str, Any] = {
            "layer": ly,
            "distinct_experts": int((counts[ly] > 0).sum()),
            "popularity": _r(shares[ly]),
            "first_choice_popularity": _r(first_shares[ly]),
            "entropy_bits": _r(float(ent[ly])),
            "entropy_normalised": _r(float(norm_ent[ly])),
            "repetition": {
                "first": _r(float(rep["first"][ly])),
                "first_or_second": _r(float(rep["first_or_second"][ly])),
                "first_in_prev_topk": _r(float(rep["first_in_prev_topk"][ly])),
            },
        }
        if ly < n_layers - 1:
            # How concentrated the next layer is given this layer's expert:
            # mean over used rows of the largest transition probability.
            used = counts[ly] > 0
            row["transition_max_row_share"] = _r(float(trans[ly][used].max(axis=1).mean()))
        layers.append(row)

    reps = {name: rep[name] for name in ("first", "first_or_second", "first_in_prev_topk")}
    phases = sorted(set(table["phase"].astype(str)))
    warnings = []
    if sorted_ranks:
        warnings.append(
            "ranks look unordered (no weights, every top-k row ascending): the source recorded "
            "sets, so 'first' figures describe the smallest id, not the top choice; use "
            "first_or_second (rank-free)."
        )
    if k == 1:
        warnings.append("top_k = 1: first_or_second equals first.")
    if n_layers == 1 and trace.meta.extra.get("flat_ids"):
        warnings.append(
            "flat ids (seed stream): n_layers = 1 and expert is a flat id over all layers; "
            "there are no inter-layer transitions."
        )
    result: dict[str, Any] = {
        "trace": trace.name,
        "model": tr.meta.model,
        "phase": phase,
        "phases_present": phases,
        "tokens": tr.n_tokens,
        "sequences": len(np.unique(seq)),
        "consecutive_pairs": int(rep["pairs"]),
        "lookups": tr.n_lookups,
        "n_layers": n_layers,
        "n_experts": n,
        "top_k": k,
        "rank_order_known": not sorted_ranks,
        "totals": {
            "distinct_keys": int((counts > 0).sum()),
            "possible_keys": n_layers * n,
            "mean_entropy_normalised": _r(float(norm_ent.mean())),
            "repetition_mean": {
                name: _r(float(np.nanmean(v))) if rep["pairs"] else None for name, v in reps.items()
            },
        },
        "random_baseline": {key: _r(v) for key, v in random_baselines(n, k).items()},
        "layers": layers,
        "reuse_distance": reuse_summary(dist, n_layers * n),
        "warnings": warnings,
    }
    if matrices:
        result["transitions"] = _r(trans) if n_layers > 1 else []
    return result


def format_stats(s: dict[str, Any]) -> str:
    """Human-readable summary of `trace_stats` (matrices only in --json)."""
    lines = [
        f"trace {s['trace']}  model {s['model']}  phase {s['phase']} (present: {', '.join(s['phases_present'])})",
        f"tokens {s['tokens']}  sequences {s['sequences']}  lookups {s['lookups']}  "
        f"layers {s['n_layers']} x experts {s['n_experts']}  top-{s['top_k']}",
        f"distinct keys {s['totals']['distinct_keys']} of {s['totals']['possible_keys']}  "
        f"mean normalised entropy {s['totals']['mean_entropy_normalised']}",
    ]
    base = s["random_baseline"]
    rm = s["totals"]["repetition_mean"]

    def pct(x: float | None) -> str:
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    lines.append(
        "consecutive-token repetition (mean over layers): "
        f"first {pct(rm['first'])} (random {pct(base['first'])}), "
        f"first-or-second {pct(rm['first_or_second'])} (random {pct(base['first_or_second'])})"
    )
    lines.append("")
    lines.append("layer  distinct  entropy  first   1st-or-2nd  1st-in-prev  top expert (share)")
    for row in s["layers"]:
        pop = row["popularity"]
        top = int(np.argmax(pop))
        r = row["repetition"]
        lines.append(
            f"{row['layer']:5d}  {row['distinct_experts']:8d}  {row['entropy_normalised']:7.3f}  "
            f"{pct(r['first'])}  {pct(r['first_or_second'])}      {pct(r['first_in_prev_topk'])}     "
            f"{top} ({100 * pop[top]:.1f}%)"
        )
    rd = s["reuse_distance"]
    lines.append("")
    lines.append(
        f"reuse distance (global keys): {rd['accesses']} accesses, {rd['cold_misses']} cold misses, "
        f"{rd['reuses']} reuses"
    )
    if rd["reuses"]:
        q = "  ".join(f"{name} {val:g}" for name, val in rd["quantiles"].items())
        lines.append(f"  mean {rd['mean']:g}  max {rd['max']}  {q}")
        hist = "  ".join(
            f"{h['lo']}{'' if h['hi'] == h['lo'] else '-' + str(h['hi'])}:{h['count']}"
            for h in rd["histogram"]
        )
        lines.append(f"  histogram {hist}")
        hits = "  ".join(f"{c}:{100 * v:.1f}%" for c, v in rd["lru_hit_rate"].items())
        lines.append(f"  LRU hit rate by slots ({rd['lru_hit_rate_definition']}): {hits}")
    for w in s["warnings"]:
        lines.append(f"note: {w}")
    return "\n".join(lines)
