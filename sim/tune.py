"""Tuning a policy on some traces, and saying which: the held-out protocol.

`mer tune` fits a policy's parameters on *tuning* traces and writes them, with
the traces' routing digests, to a JSON file (`TunedPolicy`). `mer mrc`,
`mer sweep`, `mer simulate` and `mer report` take that file (`--tuned`) and mark
every result with the traces the parameters were fitted on and whether the
trace being evaluated is one of them (`held_out`). A result that is not held
out is an in-sample figure and is labelled so.

A trace is recognised by its routing, not its file: `routing_digest` hashes the
geometry and every expert key, so a re-import or a copy of a tuning trace is
still recognised, and metadata (creation time, provenance) does not matter.

How a policy is tuned is the policy's own business:
- a policy with a `fit` classmethod (`cycle`: maximum likelihood of its model)
  fits on the traces' steps directly;
- otherwise its `tune_grid` is searched exhaustively for the highest mean share
  of the LRU->OPT gap closed at the requested cache sizes and scope.
Policies whose defaults were fitted on some trace say so in `tuned_on` (class
attribute), so that their defaults are held to the same protocol.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mer.atomic import write_json_atomic
from mer.core import Replay, ReplayConfig, replay_counts
from mer.core.policy import POLICIES, policy_names
from mer.errors import BadInput

TUNED_KIND = "mer.tuned-policy"
TUNED_VERSION = 1
DEFAULT_SIZES = (64, 96, 128, 192)


def routing_digest(trace: Any) -> str:
    """A short hash of a trace's routing (geometry and every key, all phases)."""
    keys = np.ascontiguousarray(trace.keys(), dtype="<i4")
    h = hashlib.sha256(f"{trace.n_layers}x{trace.n_experts}x{trace.top_k}:".encode())
    h.update(keys.tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TraceRef:
    """A tuning trace: its file name, the path it was read from, its routing digest."""

    name: str
    routing_digest: str
    path: str = ""
    phase: str = "all"
    lookups: int = 0


@dataclass
class TunedPolicy:
    """A policy's fitted parameters and the traces they were fitted on."""

    policy: str
    params: dict[str, Any]
    tuned_on: list[TraceRef]
    method: str
    scope: str = "global"
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    phase: str = "all"
    train: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: str = TUNED_KIND
    version: int = TUNED_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())

    @property
    def digests(self) -> set[str]:
        return {t.routing_digest for t in self.tuned_on}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TunedPolicy:
        """Read and check a `mer tune` output; one clear message if it is not one."""
        p = Path(path)
        fix = "pass a file written by `mer tune` (-o TUNED.json)."
        from mer.guard import load_json_input

        try:
            obj = load_json_input(p, "--tuned")
        except BadInput as exc:
            raise BadInput(f"{exc} {fix[0].upper()}{fix[1:]}") from None
        if not isinstance(obj, dict) or obj.get("kind") != TUNED_KIND:
            raise BadInput(f"--tuned {p}: not a tuned-policy file (kind {TUNED_KIND!r}); {fix}")
        if obj.get("version") != TUNED_VERSION:
            raise BadInput(
                f"--tuned {p}: version {obj.get('version')!r}, this mer reads {TUNED_VERSION}; "
                "re-run `mer tune`."
            )
        try:
            refs = [TraceRef(**t) for t in obj["tuned_on"]]
            out = cls(
                policy=str(obj["policy"]),
                params=dict(obj["params"]),
                tuned_on=refs,
                method=str(obj["method"]),
                scope=str(obj.get("scope", "global")),
                sizes=[int(s) for s in obj.get("sizes", DEFAULT_SIZES)],
                phase=str(obj.get("phase", "all")),
                train=list(obj.get("train", [])),
                diagnostics=dict(obj.get("diagnostics", {})),
                created=str(obj.get("created", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"--tuned {p}: malformed ({type(exc).__name__}: {exc}); {fix}") from None
        if out.policy not in policy_names():
            raise BadInput(
                f"--tuned {p}: policy {out.policy!r} is not registered here; "
                f"choose a file for one of: {', '.join(policy_names())}."
            )
        # The parameters must build a policy (a bad value fails here, not mid-run).
        for k, v in out.params.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise BadInput(f"--tuned {p}: parameter {k} is {v}; {fix}")
        try:
            POLICIES[out.policy](8, **out.params)
        except BadInput as exc:
            raise BadInput(f"--tuned {p}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise BadInput(
                f"--tuned {p}: the parameters do not make a {out.policy} policy ({exc}); {fix}"
            ) from None
        return out


# -- which traces a result's parameters were fitted on ----------------------------------------


def tuned_on_for(
    policy: str, params: dict[str, Any] | None, tuned: TunedPolicy | None = None
) -> list[TraceRef]:
    """The traces behind `policy`'s parameters: the tuned file's, or the defaults' (a
    policy class's `tuned_on`) when no tuned parameter is overridden; else none."""
    if tuned is not None and tuned.policy == policy:
        return list(tuned.tuned_on)
    policy_names()
    cls = POLICIES.get(policy)
    if cls is None:
        return []
    overridden = set(params or {}) & set(getattr(cls, "tunable", ()))
    if overridden:
        return []
    return [TraceRef(**t) for t in getattr(cls, "tuned_on", ())]


def held_out(digest: str, refs: Sequence[TraceRef]) -> bool:
    """True when the trace (by routing digest) is none of the tuning traces."""
    return digest not in {r.routing_digest for r in refs}


def provenance(trace: Any, policy: str, params: dict[str, Any] | None, tuned: TunedPolicy | None):
    """(tuned_on names joined by ',', held_out) for one result row."""
    refs = tuned_on_for(policy, params, tuned)
    return ",".join(r.name for r in refs), held_out(routing_digest(trace), refs)


# -- scoring and fitting ----------------------------------------------------------------------


def gap_closed(hits: float, lru: float, opt: float) -> float:
    """Share of the LRU->OPT gap closed; NaN where LRU already reaches OPT."""
    return (hits - lru) / (opt - lru) if opt != lru else float("nan")


def _curves(steps: np.ndarray, n_layers: int, n_experts: int, scope: str) -> dict[str, Any]:
    from mer.sim.mrc import one_pass_hits

    return {p: one_pass_hits(p, steps, n_layers, n_experts, scope) for p in ("lru", "opt")}


def score(
    policy: str,
    params: dict[str, Any],
    data: Sequence[tuple[str, np.ndarray, int, int]],
    sizes: Sequence[int],
    scope: str,
    curves: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Hit rate and gap closed of `policy` with `params` on each trace and size."""
    rows = []
    for name, steps, n_layers, n_experts in data:
        n = steps.size
        for size in sizes:
            cfg = ReplayConfig(
                policy=policy, cache_slots=int(size), scope=scope, policy_params=params
            )
            hits = replay_counts(Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg))
            h = hits.total("hits")
            lru = int(curves[name]["lru"][size])
            opt = int(curves[name]["opt"][size])
            rows.append(
                {
                    "trace": name,
                    "cache_slots": int(size),
                    "hit_rate": h / n if n else 0.0,
                    "lru_hit_rate": lru / n if n else 0.0,
                    "opt_hit_rate": opt / n if n else 0.0,
                    "gap_closed": gap_closed(h, lru, opt),
                }
            )
    return rows


def _mean_gap(rows: Sequence[dict[str, Any]]) -> float:
    vals = [r["gap_closed"] for r in rows if r["gap_closed"] == r["gap_closed"]]
    return float(np.mean(vals)) if vals else float("nan")


def tune_policy(
    policy: str,
    traces: Sequence[tuple[str | os.PathLike[str], Any]],
    *,
    phase: str = "all",
    scope: str = "global",
    sizes: Sequence[int] = DEFAULT_SIZES,
    options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TunedPolicy:
    """Fit `policy`'s parameters on `traces` ((path, Trace) pairs)."""
    names = policy_names()
    if policy not in names:
        raise BadInput(f"unknown policy {policy!r}; choose one of: {', '.join(names)}.")
    if not traces:
        raise BadInput("mer tune needs at least one tuning trace.")
    cls = POLICIES[policy]
    if cls.needs_future:
        raise BadInput(f"policy {policy!r} reads the future: it has nothing to tune.")
    fit = getattr(cls, "fit", None)
    grid: dict[str, Sequence[Any]] = dict(getattr(cls, "tune_grid", {}) or {})
    if fit is None and not grid:
        tunable = [n for n in names if POLICIES[n].tune_grid or getattr(POLICIES[n], "fit", None)]
        raise BadInput(
            f"policy {policy!r} has no parameters to tune; tunable: {', '.join(sorted(tunable))}."
        )
    opts = dict(options or {})
    if fit is None and opts:
        raise BadInput(f"policy {policy!r} takes no tuning options ({', '.join(opts)}).")
    refs, data, curves = [], [], {}
    geometry = None
    for path, trace in traces:
        tr = trace.select_phase(phase)
        geo = (tr.n_layers, tr.n_experts, tr.top_k)
        if geometry is not None and geo != geometry:
            raise BadInput(
                f"{path}: {geo[0]} layers x {geo[1]} experts top-{geo[2]}, the first tuning "
                f"trace {geometry[0]} x {geometry[1]} top-{geometry[2]}; tune on traces of "
                "one model."
            )
        geometry = geo
        name = Path(str(path)).name
        if name in curves:
            raise BadInput(f"{path}: the same trace name twice; pass each tuning trace once.")
        steps = np.ascontiguousarray(tr.keys().reshape(-1, tr.top_k), dtype=np.int32)
        refs.append(TraceRef(name, routing_digest(trace), str(path), phase, int(steps.size)))
        data.append((name, steps, tr.n_layers, tr.n_experts))
        curves[name] = _curves(steps, tr.n_layers, tr.n_experts, scope)
    assert geometry is not None
    n_total = geometry[0] * geometry[1]
    bad = [s for s in sizes if not 1 <= s <= n_total]
    if bad:
        raise BadInput(f"--sizes {bad}: outside 1..{n_total} (all keys of these traces).")
    diagnostics: dict[str, Any] = {}
    if fit is not None:
        if progress:
            progress(f"fitting {policy} on {len(data)} trace(s)")
        params, diagnostics = fit([(s, n_l, n_e) for _, s, n_l, n_e in data], **opts)
        method = f"{policy}.fit: " + str(diagnostics.get("method", "maximum likelihood"))
    else:
        keys = sorted(grid)
        best: tuple[float, dict[str, Any]] | None = None
        combos = list(itertools.product(*(grid[k] for k in keys)))
        for i, combo in enumerate(combos):
            cand = dict(zip(keys, combo, strict=True))
            m = _mean_gap(score(policy, cand, data, sizes, scope, curves))
            if progress:
                progress(f"{policy} {i + 1}/{len(combos)} {cand}: mean gap closed {m:.4f}")
            if best is None or (m == m and (best[0] != best[0] or m > best[0])):
                best = (m, cand)
        assert best is not None
        params = best[1]
        diagnostics = {"candidates": len(combos), "mean_gap_closed": best[0]}
        method = "grid search: " + ", ".join(f"{k} in {list(grid[k])}" for k in keys)
    train = score(policy, params, data, sizes, scope, curves)
    diagnostics["train_mean_gap_closed"] = _mean_gap(train)
    return TunedPolicy(
        policy=policy,
        params=params,
        tuned_on=refs,
        method=method,
        scope=scope,
        sizes=[int(s) for s in sizes],
        phase=phase,
        train=train,
        diagnostics=diagnostics,
    )
