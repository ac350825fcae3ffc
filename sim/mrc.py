"""Miss-ratio curves: hit rate at every cache size, per policy and scope, no prefetch.

LRU and OPT are stack algorithms over steps (docs/policies.md): the cache of C
slots always holds the top C entries of one ordering of the keys, so one pass
over the trace gives every size at once.

- LRU: the stack is recency; after a step its keys sit on top in rank order
  (rank 0 on top). A key hits at size C iff its depth at the step's start is
  < C, so the curve is the cumulative histogram of depths.
- OPT: the stack keeps, for every C, exactly the keys the core's `opt` policy
  holds at C slots. After a step with keys K, size C < k holds K[:C]; size
  C >= k holds K plus the C - k keys with the nearest next use among the keys
  the C-cache held before (outside K). Walking the old stack downwards with a
  small pool of carried keys (Mattson's OPT stack, generalised to k misses per
  step) yields a new ordering whose every prefix is that set.

Other policies are replayed once per size (`replay_counts`), in up to two
processes. Scope `per-layer` uses the core's split (`split_slots`): the curve
at C total slots is the sum of each layer's own curve at its share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.atomic import atomic_path
from mer.core import Replay, ReplayConfig, policy_names, replay_counts, split_slots
from mer.core.policies import INF, next_positions
from mer.errors import BadInput
from mer.native.stackdist import lru_hits, opt_hits
from mer.workers import process_pool

SCOPES = ("global", "per-layer")
ONE_PASS = ("lru", "opt")
COLUMNS = ["policy", "scope", "cache_slots", "hits", "misses", "hit_rate"]


# -- curves per scope ---------------------------------------------------------------------


def _layer_split(steps: np.ndarray, n_experts: int) -> list[np.ndarray]:
    """Indices of each layer's steps, in replay order."""
    layers = steps[:, 0] // n_experts
    return [np.flatnonzero(layers == layer) for layer in range(int(layers.max()) + 1)]


def _cum(hist: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size + 1, dtype=np.int64)
    out[1:] = np.cumsum(hist[:size])
    return out


def one_pass_hits(
    policy: str,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    *,
    engine: str = "auto",
) -> np.ndarray:
    """hits[C] for C = 0..n_layers * n_experts, LRU or OPT, one pass per partition.

    engine: "c" (the compiled loops of `mer.native.stackdist`), "python", or
    "auto" (C when it builds, else Python). Both compute the same stacks.
    """
    from mer import native
    from mer.native import stackdist

    if policy not in ONE_PASS:
        raise BadInput(f"no one-pass curve for policy {policy!r} (only {', '.join(ONE_PASS)}).")
    n_total = n_layers * n_experts
    steps = np.ascontiguousarray(steps, dtype=np.int64)
    k = steps.shape[1]
    nxt = next_positions(steps.reshape(-1)) if policy == "opt" else None
    if engine == "c" and native.load("stackdist") is None:
        raise BadInput("the compiled stack-distance kernels are unavailable (no C compiler?).")
    use_c = engine != "python"

    def part_hits(idx: np.ndarray | None, size: int) -> np.ndarray:
        sub = steps if idx is None else steps[idx]
        nval: np.ndarray | None = None
        if nxt is not None:
            flat_idx = (np.arange(len(steps)) if idx is None else idx)[:, None] * k + np.arange(k)
            nv = nxt[flat_idx.reshape(-1)]
            nval = np.where(nv >= INF, INF + sub.reshape(-1), nv)
        if use_c:
            hist = (
                stackdist.lru_hist(sub, size)
                if nval is None
                else stackdist.opt_hist(sub, nval, size)
            )
            if hist is not None:
                return _cum(hist, size)
        rows = sub.tolist()
        if nval is None:
            return lru_hits(rows, size)
        return opt_hits(rows, np.where(nval >= INF, INF, nval).tolist(), size)

    if scope == "global":
        return part_hits(None, n_total)
    per_layer = [part_hits(idx, n_experts + 1) for idx in _layer_split(steps, n_experts)]
    out = np.zeros(n_total + 1, dtype=np.int64)
    for c in range(1, n_total + 1):
        shares = split_slots(c, n_layers)
        out[c] = sum(int(h[min(s, len(h) - 1)]) for h, s in zip(per_layer, shares, strict=False))
    return out


def _replay_one(args: tuple[np.ndarray, int, int, str, str, int, dict[str, Any]]) -> int:
    steps, n_layers, n_experts, policy, scope, size, params = args
    cfg = ReplayConfig(policy=policy, cache_slots=size, scope=scope, policy_params=params)
    stats = replay_counts(Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg))
    return stats.total("hits")


def replay_hits(
    policy: str,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    sizes: Sequence[int],
    *,
    params: dict[str, Any] | None = None,
    processes: int = 2,
    progress: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Total hits per cache size by replaying the core once per size."""
    jobs = [(steps, n_layers, n_experts, policy, scope, s, params or {}) for s in sizes]
    out: dict[int, int] = {}
    if processes <= 1 or len(jobs) < 4:
        for job in jobs:
            out[job[5]] = _replay_one(job)
            if progress:
                progress(1)
        return out
    with process_pool(min(processes, 2)) as pool:
        for size, hits in zip(sizes, pool.map(_replay_one, jobs, chunksize=4), strict=True):
            out[size] = hits
            if progress:
                progress(1)
    return out


class _Ticker:
    """Counts finished sizes and forwards them to a (label, done, total) callback."""

    def __init__(self, cb: Callable[[str, int, int], None] | None, label: str, total: int):
        self.cb, self.label, self.total, self.done = cb, label, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.cb:
            self.cb(self.label, self.done, self.total)


@dataclass
class MRCRequest:
    policies: list[str]
    scopes: list[str] = field(default_factory=lambda: list(SCOPES))
    sizes: list[int] | None = None  # None: 1 .. all keys
    # Replayed (not one-pass) policies only at every replay_step-th size (and the
    # largest): their cost is one replay per size, the one-pass curves are free.
    replay_step: int = 1
    processes: int = 2
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)


def default_policies(n_layers: int) -> list[str]:
    """All registered policies; the public engine's only on flat (1-layer) traces."""
    names = policy_names()
    return [p for p in names if p != "seed-lru-locality" or n_layers == 1]


def compute_mrc(
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    req: MRCRequest,
    progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """The tidy curve frame: (policy, scope, cache_slots, hits, misses, hit_rate)."""
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    n_total = n_layers * n_experts
    lookups = int(steps.size)
    sizes = req.sizes or list(range(1, n_total + 1))
    bad = [s for s in sizes if not 1 <= s <= n_total]
    if bad:
        raise BadInput(f"cache sizes {bad[:5]} outside 1..{n_total} (all keys of this trace).")
    known = policy_names()
    for p in req.policies:
        if p not in known:
            raise BadInput(f"unknown policy {p!r}; choose from: {', '.join(known)}.")
    for s in req.scopes:
        if s not in SCOPES:
            raise BadInput(f"unknown scope {s!r}; choose global or per-layer.")
    rows = []
    for scope in req.scopes:
        for policy in req.policies:
            params = req.policy_params.get(policy, {})
            if policy in ONE_PASS and not params:
                curve = one_pass_hits(policy, steps, n_layers, n_experts, scope)
                hits = {s: int(curve[s]) for s in sizes}
                if progress:
                    progress(f"{policy} {scope}", len(sizes), len(sizes))
            else:
                policy_sizes = sizes
                if req.replay_step > 1:
                    step = req.replay_step
                    policy_sizes = sorted({sizes[0], *sizes[step - 1 :: step], sizes[-1]})
                hits = replay_hits(
                    policy,
                    steps,
                    n_layers,
                    n_experts,
                    scope,
                    policy_sizes,
                    params=params,
                    processes=req.processes,
                    progress=_Ticker(progress, f"{policy} {scope}", len(policy_sizes)),
                )
            for size in sizes:
                if size not in hits:
                    continue
                h = hits[size]
                rows.append((policy, scope, size, h, lookups - h, h / lookups if lookups else 0.0))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"cache_slots": "int32", "hits": "int64", "misses": "int64"})


def write_mrc(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path
