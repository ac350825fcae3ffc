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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.atomic import atomic_path
from mer.core import Replay, ReplayConfig, policy_names, replay_counts, split_slots
from mer.core.policies import INF, next_positions
from mer.errors import BadInput, RuntimeFailure
from mer.native.stackdist import lru_hits, opt_hits
from mer.workers import process_pool

SCOPES = ("global", "per-layer")
ONE_PASS = ("lru", "opt")
COLUMNS = ["policy", "scope", "cache_slots", "hits", "misses", "hit_rate"]
#: Beside every hit rate: the share of the LRU->OPT gap it closes, and the same after the
#: warm-up window (steady state). `warm_*` count only the lookups after the window.
GAP_COLUMNS = [
    "gap_closed",
    "warm_hits",
    "warm_misses",
    "warm_hit_rate",
    "warm_gap_closed",
]


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
    progress: Callable[[float], None] | None = None,
) -> dict[int, int]:
    """Total hits per cache size by replaying the core once per size (the reference)."""
    out: dict[int, int] = {}
    for s in sizes:
        out[s] = _replay_one((steps, n_layers, n_experts, policy, scope, s, params or {}))
        if progress:
            progress(1.0)
    return out


def _partition_caps(
    n_layers: int, n_experts: int, scope: str, sizes: Sequence[int]
) -> tuple[int, list[list[int]], list[list[int]] | None]:
    """(keyspace, cache sizes each partition replays, per-layer shares of each total).

    Global scope replays one partition at the requested sizes; per-layer scope splits
    each total over the layers (`split_slots`), so a layer replays only the distinct
    shares it gets. The shares are None under global scope.
    """
    if scope == "global":
        return n_layers * n_experts, [sorted(set(sizes))], None
    shares = [split_slots(c, n_layers) for c in sizes]
    need = [sorted({sh[layer] for sh in shares}) for layer in range(n_layers)]
    return n_experts, need, shares


def _combine_parts(
    part_hits: list[dict[int, int]], sizes: Sequence[int], shares: list[list[int]] | None
) -> dict[int, int]:
    """Total hits per requested size from the partitions' hits (see `_partition_caps`)."""
    if shares is None:
        return {c: part_hits[0][c] for c in sizes}
    return {
        c: sum(hits[sh[layer]] for layer, hits in enumerate(part_hits))
        for c, sh in zip(sizes, shares, strict=True)
    }


def _cold_hits(part: Any) -> tuple[int, int]:
    """(hits, distinct keys) of a partition whose cache never fills: every key misses once."""
    distinct = len(np.unique(part.keys)) if part.keys.size else 0
    return int(part.keys.size) - distinct, distinct


def compiled_hits(
    policy: str,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    sizes: Sequence[int],
    *,
    params: dict[str, Any] | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[int, int] | None:
    """Total hits at every size in `sizes`, all caches side by side in compiled passes.

    One read of each partition's steps replays one cache per distinct partition
    size (scope per-layer: the layer shares `split_slots` gives the requested
    totals, at most n_experts + 1 of them). A cache with at least as many slots
    as the partition has distinct keys never evicts: its hits are counted, not
    replayed. None when the policy has no compiled loop here.
    `progress(f)` receives fractions of this call's work (they sum to 1).
    """
    from mer.core.policy import make_policy
    from mer.native import replay as native_replay

    pol = native_replay.lookup(policy)
    if pol is None:
        return None
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    parts = native_replay.split_partitions(steps, n_layers, n_experts, scope)
    keyspace, need, shares = _partition_caps(n_layers, n_experts, scope, sizes)
    part_hits: list[dict[int, int]] = []
    plans = []
    for part, caps in zip(parts, need, strict=True):
        cold, distinct = _cold_hits(part)
        run = [c for c in caps if c < distinct]
        plans.append((part, caps, run, cold, distinct))
    total = sum(p.n_steps * max(len(run), 1) for p, _, run, _, _ in plans) or 1
    for part, caps, run, cold, distinct in plans:
        got = {c: cold for c in caps if c >= distinct}
        k = part.keys.shape[1] if part.keys.ndim == 2 else 1
        for grp in native_replay.cache_groups(pol, k, part.n_keys, len(run)):
            caps_g = [run[i] for i in grp]
            rows = []
            for c in caps_g:
                obj = make_policy(policy, c, **(params or {}))
                obj.attach_keyspace(keyspace)
                obj.attach_geometry(n_layers, n_experts)
                rows.append(native_replay.policy_params(pol, obj))
            par = np.asarray(rows, dtype=np.float64).reshape(len(caps_g), len(pol.params))
            tick = None
            if progress:
                w = len(caps_g) / total

                def tick(n: int, w: float = w) -> None:
                    progress(n * w)

            res = native_replay.run_pass(pol, part, caps_g, par, progress=tick)
            for i, c in enumerate(caps_g):
                got[c] = int(res.counts[i, 0].sum())
        if not run and progress:
            progress(part.n_steps / total)
        part_hits.append(got)
    return _combine_parts(part_hits, sizes, shares)


class _Ticker:
    """Sums work fractions of one (policy, scope) and forwards them as (label, done, total)."""

    def __init__(self, cb: Callable[[str, float, float], None] | None, label: str, total: float):
        self.cb, self.label, self.total, self.done = cb, label, total, 0.0

    def __call__(self, n: float) -> None:
        self.done = min(self.total, self.done + n)
        if self.cb:
            self.cb(self.label, self.done, self.total)


GRANULARITIES = ("step", "lookup")
BACKENDS = ("local", "dask", "libcachesim")
#: Below this much work (cache-steps) a process pool costs more than it saves.
IN_PROCESS_BELOW = 2e7


@dataclass
class MRCRequest:
    policies: list[str]
    scopes: list[str] = field(default_factory=lambda: list(SCOPES))
    sizes: list[int] | None = None  # None: 1 .. all keys
    # Policies without a one-pass curve only at every replay_step-th size (and the
    # smallest and largest).
    replay_step: int = 1
    processes: int | None = None  # None: every CPU
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: "step": the step semantics; "lookup": every lookup its own step (libCacheSim's).
    granularity: str = "step"
    backend: str = "local"
    scheduler: str | None = None  # dask scheduler address (backend "dask")
    #: steps (at `granularity`) before the steady state: `warm_*` count the rest
    warmup_steps: int = 0


def default_policies(n_layers: int) -> list[str]:
    """All registered policies; the public engine's only on flat (1-layer) traces, and
    those too slow in Python (`in_default_curves` False) only where their compiled
    replay runs, and those whose cost grows with the trace (`compiled_in_default_curves`
    False) only when asked."""
    from mer.core.policy import POLICIES
    from mer.native import replay as native_replay

    names = policy_names()
    return [
        p
        for p in names
        if (p != "seed-lru-locality" or n_layers == 1)
        and (
            getattr(POLICIES.get(p), "in_default_curves", True)
            or (
                getattr(POLICIES.get(p), "compiled_in_default_curves", True)
                and native_replay.lookup(p) is not None
            )
        )
    ]


def granular(steps: np.ndarray, granularity: str) -> np.ndarray:
    """The trace's steps at `granularity`: "lookup" makes every lookup a step of one key."""
    if granularity not in GRANULARITIES:
        raise BadInput(f"--granularity must be step or lookup, got {granularity!r}.")
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    return steps.reshape(-1, 1) if granularity == "lookup" else steps


@dataclass(frozen=True)
class _Job:
    """One piece of a curve: a policy, a scope and some sizes, computed one way."""

    policy: str
    scope: str
    sizes: tuple[int, ...]
    kind: str  # "one-pass" | "compiled" | "replay" | "libcachesim"
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.policy} {self.scope}"


def _cost(job: _Job, n_steps: int, n_layers: int, n_experts: int) -> float:
    """Relative work (cache-steps, roughly), to weigh progress and balance processes."""
    n = len(job.sizes)
    if job.kind == "one-pass":
        return 2.0 * n_steps
    if job.kind == "compiled":
        per = n if job.scope == "global" else min(n, n_experts + 1)
        return float(n_steps * per)
    if job.kind == "libcachesim":
        return 2.0 * n_steps * (n if job.scope == "global" else min(n, n_experts + 1))
    return 40.0 * n_steps * n  # the Python per-size replay


def run_job(
    job: _Job,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    progress: Callable[[float], None] | None = None,
) -> dict[int, int]:
    """Hits per size of one job (runs in a worker process, a dask worker, or here)."""
    params = dict(job.params)
    sizes = list(job.sizes)
    if job.kind == "one-pass":
        curve = one_pass_hits(job.policy, steps, n_layers, n_experts, job.scope)
        if progress:
            progress(1.0)
        return {s: int(curve[s]) for s in sizes}
    if job.kind == "libcachesim":
        from mer.sim import peers

        return peers.lcs_hits(
            job.policy, steps, n_layers, n_experts, job.scope, sizes, progress=progress
        )
    if job.kind == "compiled":
        got = compiled_hits(
            job.policy,
            steps,
            n_layers,
            n_experts,
            job.scope,
            sizes,
            params=params,
            progress=progress,
        )
        if got is not None:
            return got
    n = len(sizes) or 1
    return replay_hits(
        job.policy,
        steps,
        n_layers,
        n_experts,
        job.scope,
        sizes,
        params=params,
        progress=(lambda f: progress(f / n)) if progress else None,
    )


def _jobs(req: MRCRequest, sizes: list[int], n_layers: int, processes: int) -> list[_Job]:
    from mer.native import replay as native_replay

    jobs = []
    for scope in req.scopes:
        for policy in req.policies:
            params = tuple(sorted(req.policy_params.get(policy, {}).items()))
            if req.backend == "libcachesim" and policy != "opt":
                kind = "libcachesim"
            elif policy in ONE_PASS and not params:
                jobs.append(_Job(policy, scope, tuple(sizes), "one-pass", params))
                continue
            else:
                kind = "compiled" if native_replay.lookup(policy) is not None else "replay"
            policy_sizes = sizes
            if req.replay_step > 1:
                step = req.replay_step
                policy_sizes = sorted({sizes[0], *sizes[step - 1 :: step], sizes[-1]})
            # Split the global sizes over the processes (interleaved: small caches,
            # which evict most, are spread evenly); per-layer passes are small.
            n_split = processes if scope == "global" and len(policy_sizes) > 1 else 1
            if kind == "replay":
                n_split = min(len(policy_sizes), 4 * processes)
            for i in range(n_split):
                part = tuple(policy_sizes[i::n_split])
                if part:
                    jobs.append(_Job(policy, scope, part, kind, params))
    return jobs


def compute_mrc(
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    req: MRCRequest,
    progress: Callable[[str, float, float], None] | None = None,
) -> pd.DataFrame:
    """The tidy curve frame: (policy, scope, cache_slots, hits, misses, hit_rate).

    `progress(label, done, total)` is called as each (policy, scope) advances.
    """
    steps = granular(steps, req.granularity)
    n_total = n_layers * n_experts
    lookups = int(steps.size)
    sizes = sorted(set(req.sizes or range(1, n_total + 1)))
    bad = [s for s in sizes if not 1 <= s <= n_total]
    if bad:
        raise BadInput(f"cache sizes {bad[:5]} outside 1..{n_total} (all keys of this trace).")
    if req.backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got {req.backend!r}.")
    if req.backend == "libcachesim":
        from mer.sim import peers

        if req.granularity != "lookup":
            raise BadInput(
                "libCacheSim replays request by request: use --granularity lookup with "
                "--backend libcachesim."
            )
        peers.check_policies([p for p in req.policies if p != "opt"])
    else:
        known = policy_names()
        for p in req.policies:
            if p not in known:
                raise BadInput(f"unknown policy {p!r}; choose from: {', '.join(known)}.")
    for s in req.scopes:
        if s not in SCOPES:
            raise BadInput(f"unknown scope {s!r}; choose global or per-layer.")
    processes = req.processes or os.cpu_count() or 1
    if processes < 1:
        raise BadInput(f"--processes must be at least 1, got {processes}.")
    warm = int(req.warmup_steps)
    if not 0 <= warm < max(len(steps), 1):
        raise BadInput(
            f"warm-up of {warm} steps leaves nothing of this trace's {len(steps)} steps; "
            "choose a shorter --warmup."
        )
    # The gap closed needs LRU and OPT at every size, in every scope.
    asked = list(req.policies)
    policies = [*asked, *(p for p in ONE_PASS if p not in asked)]
    req = replace(req, policies=policies)
    jobs = _jobs(req, sizes, n_layers, processes)
    n_steps = len(steps)
    costs = [_cost(j, n_steps, n_layers, n_experts) for j in jobs]
    totals: dict[str, float] = {}
    for j, c in zip(jobs, costs, strict=True):
        totals[j.label] = totals.get(j.label, 0.0) + c
    tickers = {label: _Ticker(progress, label, t) for label, t in totals.items()}
    results: dict[tuple[str, str], dict[int, int]] = {}

    def done(job: _Job, hits: dict[int, int], already: float) -> None:
        results.setdefault((job.policy, job.scope), {}).update(hits)
        rest = _cost(job, n_steps, n_layers, n_experts) - already
        if rest > 0:
            tickers[job.label](rest)

    if req.backend == "dask":
        _run_dask(jobs, steps, n_layers, n_experts, req.scheduler, done)
    elif processes == 1 or len(jobs) == 1 or sum(costs) < IN_PROCESS_BELOW:
        for job, cost in zip(jobs, costs, strict=True):
            seen = [0.0]

            def tick(f: float, job: _Job = job, cost: float = cost, seen: list = seen) -> None:
                seen[0] += f * cost
                tickers[job.label](f * cost)

            done(job, run_job(job, steps, n_layers, n_experts, progress=tick), seen[0])
    else:
        _run_processes(jobs, costs, steps, n_layers, n_experts, processes, done)
    warm_hits = _warm_hits(req, results, steps, n_layers, n_experts, sizes, warm)
    warm_lookups = int(steps[warm:].size)
    rows = []
    for scope in req.scopes:
        lru, opt = results[("lru", scope)], results[("opt", scope)]
        wl, wo = warm_hits[("lru", scope)], warm_hits[("opt", scope)]
        for policy in policies:
            hits = results.get((policy, scope), {})
            for size in sizes:
                if size not in hits:
                    continue
                h = hits[size]
                w = warm_hits[(policy, scope)][size]
                rows.append(
                    (
                        policy,
                        scope,
                        size,
                        h,
                        lookups - h,
                        h / lookups if lookups else 0.0,
                        gap_share(h, lru[size], opt[size]),
                        w,
                        warm_lookups - w,
                        w / warm_lookups if warm_lookups else 0.0,
                        gap_share(w, wl[size], wo[size]),
                    )
                )
    df = pd.DataFrame(rows, columns=COLUMNS + GAP_COLUMNS)
    return df.astype(
        {
            "cache_slots": "int32",
            "hits": "int64",
            "misses": "int64",
            "warm_hits": "int64",
            "warm_misses": "int64",
        }
    )


def gap_share(hits: float, lru: float, opt: float) -> float:
    """Share of the LRU->OPT gap closed: 0 at LRU, 1 at OPT; NaN where LRU reaches OPT."""
    return (hits - lru) / (opt - lru) if opt != lru else float("nan")


def _warm_hits(
    req: MRCRequest,
    cold: dict[tuple[str, str], dict[int, int]],
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    sizes: list[int],
    warm: int,
) -> dict[tuple[str, str], dict[int, int]]:
    """Hits after the first `warm` steps, per (policy, scope) and size.

    An online policy decides its first `warm` steps from those steps alone (the
    no-future tests hold every policy to it), so its hits in the window are the
    hits of a replay of the window: warm = cold - hits(window). OPT looks ahead,
    so it is replayed whole and counted from the window's end.
    """
    if warm == 0:
        return {key: dict(val) for key, val in cold.items()}
    from mer.core.policy import POLICIES

    out: dict[tuple[str, str], dict[int, int]] = {}
    head = steps[:warm]
    for (policy, scope), hits in cold.items():
        got = sorted(hits)
        cls = POLICIES.get(policy)  # None: a libCacheSim policy (online)
        if cls is not None and cls.needs_future:
            after = future_warm_hits(policy, steps, n_layers, n_experts, scope, got, warm)
        else:
            job = _Job(policy, scope, tuple(got), _kind(req, policy), _params(req, policy))
            before = run_job(job, head, n_layers, n_experts)
            after = {c: hits[c] - before[c] for c in got}
        out[(policy, scope)] = after
    return out


def _params(req: MRCRequest, policy: str) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(req.policy_params.get(policy, {}).items()))


def _kind(req: MRCRequest, policy: str) -> str:
    from mer.native import replay as native_replay

    if req.backend == "libcachesim" and policy != "opt":
        return "libcachesim"
    if policy in ONE_PASS and not req.policy_params.get(policy):
        return "one-pass"
    return "compiled" if native_replay.lookup(policy) is not None else "replay"


def future_warm_hits(
    policy: str,
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scope: str,
    sizes: Sequence[int],
    start: int,
) -> dict[int, int]:
    """Hits of an offline policy (OPT) over steps >= start, the whole trace replayed."""
    from mer.core.policy import make_policy
    from mer.native import replay as native_replay

    pol = native_replay.lookup(policy)
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    if pol is None:
        out = {}
        for c in sizes:
            cfg = ReplayConfig(policy=policy, cache_slots=int(c), scope=scope)
            rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
            before = 0
            for t in range(rep.n_steps):
                if t == start:
                    before = rep.stats.total("hits")
                for adm in rep.step(t).reads:
                    rep.complete(adm.key)
            out[c] = rep.stats.total("hits") - before
        return out
    parts = native_replay.split_partitions(steps, n_layers, n_experts, scope)
    keyspace, need, shares = _partition_caps(n_layers, n_experts, scope, sizes)
    part_hits = []
    for part, caps in zip(parts, need, strict=True):
        cut = start if part.tidx is None else int(np.searchsorted(part.tidx, start))
        got: dict[int, int] = {}
        caps = [c for c in caps if c > 0]
        if caps:
            obj = make_policy(policy, 1)
            obj.attach_keyspace(keyspace)
            row = native_replay.policy_params(pol, obj)
            par = np.asarray([row] * len(caps), dtype=np.float64).reshape(len(caps), len(row))
            res = native_replay.run_pass(pol, part, caps, par, split=cut)
            assert res.counts_before is not None
            for i, c in enumerate(caps):
                got[c] = int(res.counts[i, 0].sum() - res.counts_before[i, 0].sum())
        got[0] = 0
        part_hits.append(got)
    return _combine_parts(part_hits, sizes, shares)


_WORKER: dict[str, Any] = {}


def _init_worker(steps: np.ndarray, n_layers: int, n_experts: int) -> None:
    _WORKER.update(steps=steps, n_layers=n_layers, n_experts=n_experts)


def _worker_job(job: _Job) -> dict[int, int]:
    return run_job(job, _WORKER["steps"], _WORKER["n_layers"], _WORKER["n_experts"])


def _run_processes(
    jobs: list[_Job],
    costs: list[float],
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    processes: int,
    done: Callable[[_Job, dict[int, int], float], None],
) -> None:
    from concurrent.futures import as_completed

    order = sorted(range(len(jobs)), key=lambda i: -costs[i])  # longest first
    with process_pool(
        min(processes, len(jobs)), initializer=_init_worker, initargs=(steps, n_layers, n_experts)
    ) as pool:
        futures = {pool.submit(_worker_job, jobs[i]): jobs[i] for i in order}
        for fut in as_completed(futures):
            done(futures[fut], fut.result(), 0.0)


def _run_dask(
    jobs: list[_Job],
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    scheduler: str | None,
    done: Callable[[_Job, dict[int, int], float], None],
) -> None:
    if not scheduler:
        raise BadInput("--backend dask needs --scheduler ADDRESS (e.g. tcp://127.0.0.1:8786).")
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise BadInput(
            f"--backend dask needs dask.distributed ({exc}); install it with "
            "pip install 'mer-moe[dist]'."
        ) from exc
    try:
        client = Client(scheduler, timeout=10)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot reach the dask scheduler at {scheduler} ({exc}); start one with "
            "`dask scheduler` or use --backend local."
        ) from exc
    try:
        data = client.scatter(steps, broadcast=True)
        futures = {
            client.submit(run_job, job, data, n_layers, n_experts, pure=False): job for job in jobs
        }
        for fut in as_completed(list(futures)):
            done(futures[fut], fut.result(), 0.0)
    finally:
        client.close()


def write_mrc(
    df: pd.DataFrame, path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Write the curves atomically; `meta` (granularity, backend, ...) goes in the file's
    metadata under `mer.mrc`, so the tidy columns stay the same for every run."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        md = dict(table.schema.metadata or {})
        md[b"mer.mrc"] = json.dumps(meta).encode()
        table = table.replace_schema_metadata(md)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
