"""The replay: every decision of a run, in one place, for both clocks.

`Replay` walks a trace step by step (one (token, layer) at a time) and owns the
cache, the predictor and the prefetch rule. A driver - the simpy model or the
real engine - calls, for each step t:

    result = replay.step(t)          # lookups; demand reads to issue (result.reads)
    for adm in replay.prefetch(t):   # background reads for the next steps
        ...issue adm...
    ...on every read completion: replay.complete(key)...

and finally `replay.stats`. The driver owns time and I/O; it never decides
what to read, evict or prefetch.

A trace fixes every step in advance (`Replay(steps, ...)`, `Replay.from_trace`).
A model that decodes learns its steps only as it runs: `Replay.live(...)` is
the same core with no trace behind it; the driver passes each step's keys as
they come, `replay.step(t, keys)`, in order. Everything that needs the future
(OPT, the oracle predictor, static pins from trace counts) is refused there,
and the lookahead predictor reads what the driver supplies
(`replay.supply_lookahead(t + 1, keys)` before `replay.prefetch(t)`). `replay_counts` is the driver with no clock
at all (every read completes at once), the reference the other two must match
when prefetch is off.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from mer.core.cache import READY, Admission, CacheStats, ExpertCache, StepResult
from mer.core.policies import FIFO, LRU, Clock
from mer.core.policy import POLICIES, EvictionPolicy, not_resident
from mer.core.predictor import Prediction, Predictor, ReplayContext, make_predictor
from mer.errors import BadInput

GRANULARITIES = ("step", "lookup")


@dataclass
class PrefetchRule:
    """Which predictions become reads: the top `top_n` per future step whose
    probability is at least `min_prob`, while fewer than `max_inflight`
    prefetches are outstanding (aimed at a step still ahead, not yet looked up:
    a function of the trace and the cache, never of when a read lands). top_n
    None means the model's top_k."""

    top_n: int | None = None
    min_prob: float = 0.0
    max_inflight: int = 8
    #: N > 0: a guess stops counting as outstanding N steps after it was issued (the
    #: steps its read is assumed to take), even if its step is still ahead; 0: never
    hold: int = 0
    #: W > 0: the guesses for the nearest W steps from the lead on are proposed most
    #: probable first (then the farther ones, nearest first); 0: nearest step first
    window: int = 0


@dataclass
class ReplayConfig:
    """Everything that decides hits and prefetches (not timing)."""

    policy: str = "lru"
    cache_slots: int = 64
    scope: str = "global"
    predictor: str = "none"
    pipeline_depth: int = 1
    prefetch_top_n: int | None = None
    prefetch_min_prob: float = 0.0
    prefetch_inflight: int = 8
    #: speculative-slot budget per partition: 0 = a prefetch may evict the policy's victim;
    #: N > 0 = at most N prefetched-unread keys at a time (the oldest is recycled)
    prefetch_slots: int = 0
    #: a prefetched expert whose step passed without it is the next victim (its slot goes
    #: back to the next admission instead of costing the policy's victim)
    prefetch_reclaim: bool = False
    #: N > 0: a prefetched expert whose step routed its layer without it, read from at most
    #: N steps before, is dropped at that step, landed or not: its slot goes to the step's
    #: misses and a driver stops reading it (0: never; about read time / step time)
    prefetch_cancel: int = 0
    #: prefetch only for steps at least this far ahead (1: the next step on); a read
    #: needs about read time / step time steps of lead to land before its step
    #: (0: auto, resolved by the simulator from the hardware profile: `auto_lead`)
    prefetch_lead: int = 1
    #: N > 0: a guess counts against --prefetch-inflight for at most N steps after it was
    #: issued (about read time / step time: the steps its read is assumed to take), so the
    #: next guess starts when the read would have landed instead of when its step comes;
    #: a count of steps, never a clock (0: until its step is looked up)
    prefetch_hold: int = 0
    #: W > 0: among the guesses for steps lead .. lead + W - 1 the most probable is read
    #: first (a guess for those steps must start now or never: by the next free place in
    #: flight they are nearer than the lead), then the farther ones, nearest first;
    #: 0: nearest step first
    prefetch_window: int = 0
    pin: int = 0  # static pinning of the N most popular experts (offline knowledge)
    phase: str = "all"
    tokens: int | None = None  # replay only the first N tokens (after the phase filter)
    policy_params: dict[str, Any] = field(default_factory=dict)
    predictor_params: dict[str, Any] = field(default_factory=dict)
    #: "step": a (token, layer)'s top-k is one step (docs/policies.md); "lookup": every
    #: lookup is its own step, request by request (libCacheSim's and most papers' semantics).
    granularity: str = "step"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def prefetch_on(self) -> bool:
        return self.predictor != "none"

    def validate(self) -> ReplayConfig:
        """Refuse values no replay can use, naming the command-line flag (BadInput)."""
        import math

        from mer.validate import MAX_COUNT, MAX_SLOTS

        def count(
            flag: str, v: Any, lo: int, hi: int = MAX_COUNT, *, none_ok: bool = False
        ) -> None:
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise BadInput(f"{flag} must be an integer from {lo} to {hi:,}, got {v!r}.")

        count("--cache-slots", self.cache_slots, 1, MAX_SLOTS)
        count("--pipeline-depth", self.pipeline_depth, 0, 1024)
        count("--prefetch-top-n", self.prefetch_top_n, 1, none_ok=True)
        count("--prefetch-inflight", self.prefetch_inflight, 1)
        count("--prefetch-slots", self.prefetch_slots, 0)
        count("--prefetch-lead", self.prefetch_lead, 0, 1024)
        count("--prefetch-cancel", self.prefetch_cancel, 0, 1024)
        count("--prefetch-hold", self.prefetch_hold, 0, 1024)
        count("--prefetch-window", self.prefetch_window, 0, 1024)
        count("--pin", self.pin, 0)
        count("--tokens", self.tokens, 1, none_ok=True)
        p = self.prefetch_min_prob
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not math.isfinite(p)
            or not 0 <= p <= 1
        ):
            raise BadInput(f"--prefetch-min-prob must be a probability from 0 to 1, got {p!r}.")
        if self.scope not in ("global", "per-layer"):
            raise BadInput(f"--scope must be global or per-layer, got {self.scope!r}.")
        if self.phase not in ("prefill", "decode", "all"):
            raise BadInput(f"--phase must be prefill, decode or all, got {self.phase!r}.")
        for flag, params in (
            ("--policy-param", self.policy_params),
            ("--predictor-param", self.predictor_params),
        ):
            if not isinstance(params, dict):
                raise BadInput(f"{flag}: expected KEY=VALUE pairs, got {params!r}.")
            for k, v in params.items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise BadInput(f"{flag} {k}={v}: must be a finite number.")
        return self


def auto_lead(read_s: float, step_s: float) -> int:
    """`--prefetch-lead auto`: how many steps ahead a prefetch must aim to land in time.

    A background read gets the SSD while the steps compute: a read of `read_s`
    needs about read_s / step_s steps of compute (`step_s`: a step's dense block
    and FFNs with every expert resident) to complete before its step. On the real
    traces at 128 slots (nvme-desktop: 33 ms reads, 9.3 ms steps: lead 4) the
    simulated gain peaks at this lead (docs/policies.md).
    """
    if step_s <= 0:
        return 1
    return max(1, min(1024, math.ceil(read_s / step_s)))


def popular_keys(steps: np.ndarray, n: int) -> list[int]:
    """The n most frequent keys (ties: smaller key first), for static pinning."""
    if n <= 0:
        return []
    counts = np.bincount(steps.reshape(-1))
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(k) for k in order[:n] if counts[k] > 0]


def check_cache_fits_keys(config: ReplayConfig, n_layers: int, n_experts: int) -> None:
    """Refuse a cache larger than the trace's key space, as `mer mrc` does: at n_keys
    slots every expert is resident already, so a bigger size is not another configuration."""
    n_keys = n_layers * n_experts
    if config.cache_slots > n_keys:
        raise BadInput(
            f"--cache-slots {config.cache_slots} is more than the trace's {n_keys} expert "
            f"keys ({n_layers} layers x {n_experts} experts); at {n_keys} slots every expert "
            f"is resident already. Use at most {n_keys}."
        )


class Replay:
    def __init__(
        self,
        steps: np.ndarray,
        *,
        n_layers: int,
        n_experts: int,
        config: ReplayConfig,
        lookahead: np.ndarray | None = None,
        live: bool = False,
    ) -> None:
        steps = np.ascontiguousarray(steps, dtype=np.int32)
        if steps.ndim != 2:
            raise BadInput("replay steps must be a (n_steps, top_k) array of global keys.")
        self.steps = steps
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.top_k = steps.shape[1]
        self.config = config.validate()
        self.is_live = live
        self._live_t = -1  # live: the step just looked up, and its keys
        self._live_keys: list[int] = []
        self._live_la: dict[int, np.ndarray] = {}
        if config.granularity not in GRANULARITIES:
            raise BadInput(
                f"--granularity must be one of {', '.join(GRANULARITIES)}, "
                f"got {config.granularity!r}."
            )
        self.lookup_granularity = config.granularity == "lookup"
        self.outcome: np.ndarray | None = None  # set by replay_outcomes
        self.cache = ExpertCache(
            n_layers=n_layers,
            n_experts=n_experts,
            cache_slots=config.cache_slots,
            policy=config.policy,
            policy_params=config.policy_params,
            scope=config.scope,
            pinned=popular_keys(steps, config.pin),
            granularity=config.granularity,
            prefetch_slots=config.prefetch_slots,
            prefetch_reclaim=config.prefetch_reclaim,
            prefetch_cancel=config.prefetch_cancel,
        )
        self.cache.attach_future(self.decision_steps)
        self.ctx = ReplayContext(
            n_layers,
            n_experts,
            self.top_k,
            steps,
            self._live_la if live else lookahead,
            live=live,
        )
        self.predictor: Predictor = make_predictor(
            config.predictor, self.ctx, **config.predictor_params
        )
        self.rule = PrefetchRule(
            config.prefetch_top_n,
            config.prefetch_min_prob,
            config.prefetch_inflight,
            config.prefetch_hold,
            config.prefetch_window,
        )
        # prefetched keys and the step that issued each, oldest first (see prefetch)
        self._ahead: list[tuple[int, int]] = []

    @functools.cached_property
    def _keys_list(self) -> list[list[int]]:
        # Built on first use: the compiled replay never needs it.
        return self.steps.tolist()

    @property
    def decision_steps(self) -> np.ndarray:
        """The steps the policy sees: the trace's, or one lookup per step (granularity lookup)."""
        return self.steps.reshape(-1, 1) if self.lookup_granularity else self.steps

    @functools.cached_property
    def _decision_keys_list(self) -> list[list[int]]:
        return self.decision_steps.tolist()

    @classmethod
    def from_trace(cls, trace: Any, config: ReplayConfig) -> Replay:
        """Build from a `traces.format.Trace`, honouring config.phase."""
        check_cache_fits_keys(config, trace.n_layers, trace.n_experts)
        tr = trace.select_phase(config.phase)
        epl = (getattr(tr.meta, "extra", None) or {}).get("experts_per_layer")
        if (
            config.policy == "seed-lru-locality"
            and epl
            and "experts_per_layer" not in config.policy_params
        ):
            # Flat seed ids carry the real geometry in the metadata; the policy's
            # locality window depends on it.
            config = replace(
                config, policy_params={**config.policy_params, "experts_per_layer": int(epl)}
            )
        if config.tokens is not None:
            if config.tokens < 1:
                raise BadInput(f"--tokens must be >= 1, got {config.tokens}.")
            tr = tr.head(min(config.tokens, tr.n_tokens))
        keys = tr.keys().reshape(-1, tr.top_k)
        la = tr.lookahead()
        la_keys = None
        if la is not None:
            layer = np.arange(tr.n_layers, dtype=np.int32)[None, :, None]
            la_keys = (layer * tr.n_experts + la.astype(np.int32)).reshape(-1, tr.top_k)
        return cls(
            keys, n_layers=tr.n_layers, n_experts=tr.n_experts, config=config, lookahead=la_keys
        )

    @classmethod
    def live(cls, *, n_layers: int, n_experts: int, top_k: int, config: ReplayConfig) -> Replay:
        """A replay whose steps arrive one at a time from a running model.

        Same cache, policy, predictor and prefetch rule as a trace replay; only
        what needs the future is refused, with the reason.
        """
        from mer.core.policy import policy_class
        from mer.core.predictor import predictor_class

        pol = policy_class(config.policy)  # a plugin's module:Class included
        if pol.needs_future:
            raise BadInput(
                f"policy {config.policy!r} needs the future of a trace, which a live run does "
                "not have; record the routing (-o TRACE.parquet) and replay it with `mer simulate` "
                "or `mer run`, or pick an online policy."
            )
        pred = predictor_class(config.predictor)
        if pred.offline:
            raise BadInput(
                f"predictor {config.predictor!r} reads the future of a trace, which a live run "
                "does not have; record the routing and replay it, or pick an online predictor."
            )
        if config.pin:
            raise BadInput(
                "--pin counts expert popularity over a whole trace, which a live run does not "
                "have; replay a recorded trace to pin, or leave --pin at 0."
            )
        if config.tokens is not None or config.phase != "all":
            raise BadInput("a live run has every token in order: no --tokens, no --phase.")
        empty = np.zeros((0, top_k), dtype=np.int32)
        return cls(empty, n_layers=n_layers, n_experts=n_experts, config=config, live=True)

    @property
    def n_steps(self) -> int:
        return self._live_t + 1 if self.is_live else len(self.steps)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def layer_of(self, t: int) -> int:
        return t % self.n_layers

    def step(self, t: int, keys: Sequence[int] | None = None) -> StepResult:
        """Step t's lookups; a live replay is given the step's keys (rank order).

        The step's reads land, for every later decision, as soon as it returns
        (`_landed`): no decision depends on when a read really completes."""
        if keys is None:
            if self.is_live:
                raise ValueError("a live replay needs each step's keys: step(t, keys)")
            result = self.cache.access_step(t, self._keys_list[t])
            self.predictor.observe(t, self.steps[t])
            self._landed(result.reads)
            return result
        if not self.is_live:
            raise ValueError("a trace replay takes its keys from the trace: step(t)")
        if t != self._live_t + 1:
            raise ValueError(f"live steps must come in order: got {t} after {self._live_t}")
        row = [int(k) for k in keys]
        self._live_t = t
        self._live_keys = row
        self._live_la.pop(t, None)  # consumed: the step it predicted is here
        result = self.cache.access_step(t, row)
        self.predictor.observe(t, np.asarray(row, dtype=np.int32))
        self._landed(result.reads)
        return result

    def _landed(self, reads: Sequence[Admission]) -> None:
        """Reads land, for the decisions, at the end of the call that issued them.

        The simulator and the engine must issue the same reads, evict the same keys
        and count the same hits, so no decision may depend on when a read really
        completes (a clock the two do not share). A read issued by step t (or by
        prefetch(t)) is therefore resident for every decision from the next call on:
        the "infinitely fast SSD" of `replay_counts`, which this makes every replay.
        Timing only splits the prefetches later used into on time and late: a driver
        that finds a hit of step t still being read waits for it and reports it
        (`mark_late`). `--prefetch-inflight N` bounds the guesses outstanding: aimed at
        a step still ahead and not yet looked up (`prefetch`). Drivers that still call
        `complete` change nothing."""
        cache = self.cache
        for adm in reads:
            if adm.slot is not None:
                cache.complete(adm.key)

    def mark_late(self, key: int) -> None:
        """The driver found `key`, a hit of the step just looked up (a prefetch not yet
        used), still being read: the step waits for it. Counted as a late prefetch
        and a miss instead of a used prefetch and a hit; no decision changes."""
        self.cache.mark_late(key)

    def mark_late_hits(self, result: StepResult, reading: Container[int]) -> list[int]:
        """The ranks of `result`'s hits whose key is still being read (in `reading`),
        each counted late (`mark_late`): the one rule by which every driver (the engine
        and both simulator engines) turns its own clock into late prefetches."""
        late = [
            i
            for i, (key, hit) in enumerate(zip(result.keys, result.hit, strict=True))
            if hit and key in reading
        ]
        for i in late:
            self.cache.mark_late(result.keys[i])
        return late

    def supply_lookahead(self, u: int, keys: Sequence[int]) -> None:
        """Live: the lookahead prediction of step u (read by the lookahead predictor)."""
        self._live_la[u] = np.asarray(keys, dtype=np.int32)

    def _step_keys(self, t: int) -> list[int]:
        if self.is_live:
            if t != self._live_t:
                raise ValueError(f"prefetch({t}) must follow step({t}) in a live replay")
            return self._live_keys
        return self._keys_list[t]

    def prefetch(self, t: int) -> list[Admission]:
        """Background reads for steps t+1 .. t+depth, chosen by the prefetch rule."""
        depth = self.config.pipeline_depth
        if depth == 0 or not self.config.prefetch_on:
            return []
        rule = self.rule
        wanted, target = self.proposals(t, self.predictor.predict(t, depth))
        if not wanted:
            return []
        # A prefetch never evicts the current step's keys nor another wanted key.
        protect = self._step_keys(t) + wanted
        cache = self.cache
        spec = cache.spec
        # Outstanding: guesses aimed at a step still ahead and not yet looked up (the
        # deterministic stand-in for "in flight": a read must land by the step it is for),
        # with --prefetch-hold N issued fewer than N steps ago (its read assumed to take N).
        since = t - rule.hold if rule.hold else -1
        ahead = [
            (k, s)
            for k, s in self._ahead
            if s > since and (tg := spec.get(k)) is not None and tg > t
        ]
        out: list[Admission] = []
        for key in wanted:
            if len(ahead) >= rule.max_inflight:
                break
            adm = cache.prefetch(key, protect, target[key])
            if adm is not None:
                out.append(adm)
                ahead.append((key, t))
        self._ahead = ahead
        self._landed(out)
        return out

    def proposals(self, t: int, preds: list[Prediction]) -> tuple[list[int], dict[int, int]]:
        """The prefetch rule on step t's predictions: the keys wanted, in order, and the
        (first) step each is predicted for. Nothing here reads the cache."""
        top_n = self.rule.top_n or self.top_k
        min_prob = self.rule.min_prob
        window = self.rule.window
        lead = max(1, self.config.prefetch_lead)  # 0 (auto) unresolved: no timing here
        guesses: list[tuple[int, float, int]] = []  # (distance, probability, key)
        for d, pred in enumerate(preds, 1):
            if d < lead:
                continue  # too close to arrive in time: leave it to the demand read
            for key, prob in pred[:top_n]:
                if prob < min_prob:
                    break
                guesses.append((d, prob, key))
        if window:
            # the window's guesses most probable first (stable: ties stay nearest first)
            n_near = sum(1 for d, _, _ in guesses if d < lead + window)
            guesses[:n_near] = sorted(guesses[:n_near], key=lambda g: -g[1])
        wanted: list[int] = []
        target: dict[int, int] = {}
        for d, _, key in guesses:
            if key not in target:
                wanted.append(key)
                target[key] = t + d
        return wanted, target

    def complete(self, key: int) -> None:
        """A read landed (a no-op since reads land at the end of the call that issued
        them, `_landed`; kept for drivers and callers that report landings)."""
        self.cache.complete(key)


ENGINES = ("auto", "c", "python")


def replay_counts(replay: Replay, *, fast: bool = True, engine: str = "auto") -> CacheStats:
    """Replay with no clock: every read completes the moment it is issued.

    With prefetch on this is the "infinitely fast SSD" limit; with prefetch off
    it is exactly what the simulator and the engine must reproduce. With
    prefetch off and a fresh replay, the policy's compiled loop
    (`mer.native.replay`, engine "c") runs when it builds; else a lean Python
    loop (`_counts_no_prefetch`, engine "python") makes the same policy calls in
    the same order without building per-step result objects. `fast=False`
    forces the general path. Tests hold all three equal.
    """
    if engine not in ENGINES:
        raise BadInput(f"replay engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
    if fast and _lean_ok(replay):
        if engine != "python":
            stats = _counts_compiled(replay)
            if stats is not None:
                return stats
            if engine == "c":
                raise BadInput(
                    f"policy {replay.cache.policy_name!r} has no compiled replay here "
                    "(no C compiler, or no compiled loop for it)."
                )
        return _counts_no_prefetch(replay)
    if engine == "c":
        raise BadInput("the compiled replay needs prefetch off and a fresh replay.")
    for t in range(replay.n_steps):
        res = replay.step(t)
        for adm in res.reads:
            replay.complete(adm.key)
        for adm in replay.prefetch(t):
            replay.complete(adm.key)
    return replay.stats


def _lean_ok(replay: Replay) -> bool:
    cfg = replay.config
    cache = replay.cache
    if (cfg.prefetch_on and cfg.pipeline_depth > 0) or cache.state or cache.stats.lookups:
        return False
    if replay.n_steps == 0:
        return True
    # Every step's keys must fall in one partition (true for traces: a step is one layer).
    if cache.scope == "per-layer":
        layers = replay.decision_steps // replay.n_experts
        return bool((layers == layers[:, :1]).all())
    return True


def compiled_policy(replay: Replay) -> Any:
    """The compiled twin of the replay's policy (`mer.native.replay.CompiledPolicy`), or
    None: no compiler, no C loop for this policy, or a class that is not the one
    registered under its name (a plugin's subclass runs in Python)."""
    from mer.native import replay as native_replay

    cache = replay.cache
    name = cache.policy_name
    cls = POLICIES.get(name)
    if cls is None or any(type(p.policy) is not cls for p in cache.partitions):
        return None
    return native_replay.lookup(name)


def _counts_compiled(replay: Replay, outcome: bool = False) -> CacheStats | None:
    """`_counts_no_prefetch` run by the policy's compiled loop; None if it has none.

    With `outcome`, also keeps every lookup's outcome in `replay.outcome`
    ((n_steps, k) int8, trace order: 1 hit, 0 miss read into a slot, 2 miss that
    bypassed the cache), which is all a clock needs to time a prefetch-off run.
    """
    from mer.native import replay as native_replay

    pol = compiled_policy(replay)
    if pol is None:
        return None
    cache = replay.cache
    n_layers = cache.n_layers
    dsteps = replay.decision_steps
    parts = native_replay.split_partitions(
        dsteps, n_layers, cache.n_experts, cache.scope, sorted(cache.pinned)
    )
    counts = np.zeros((4, n_layers), dtype=np.int64)
    residents: list[set[int]] = []
    out = np.zeros(dsteps.shape, dtype=np.int8) if outcome else None
    for part, cpart in zip(parts, cache.partitions, strict=True):
        params = np.asarray([native_replay.policy_params(pol, cpart.policy)], dtype=np.float64)
        res = native_replay.run_pass(
            pol, part, [cpart.capacity], params, resident=True, outcome=outcome
        )
        if part.layer is None:
            counts += res.counts[0]
        else:
            counts[:, part.layer] += res.counts[0][:, 0]
        assert res.resident is not None
        residents.append(set((np.flatnonzero(res.resident[0]) + part.key_base).tolist()))
        if out is not None and res.outcome is not None:
            if part.tidx is None:
                out[:] = res.outcome
            else:
                out[part.tidx] = res.outcome
    if out is not None:
        replay.outcome = out.reshape(replay.steps.shape)
    hits, misses, evictions, bypass = (row.tolist() for row in counts)
    return _finish(replay, residents, hits, misses, evictions, bypass)


def replay_outcomes(replay: Replay) -> np.ndarray | None:
    """Every lookup's outcome of a fresh prefetch-off replay, from its compiled loop.

    (n_steps, k) int8 in trace order: 1 hit, 0 miss read into a slot, 2 miss read
    into the bypass buffer. Fills `replay.stats` as `replay_counts` does. None when
    prefetch is on or the policy has no compiled loop here (drive `Replay.step`).
    """
    if not _lean_ok(replay) or (replay.config.prefetch_on and replay.config.pipeline_depth):
        return None
    if _counts_compiled(replay, outcome=True) is None:
        return None
    return replay.outcome


def _counts_no_prefetch(replay: Replay) -> CacheStats:
    """The prefetch-off replay as one tight loop with the cache's exact semantics.

    Same calls, same order as `ExpertCache.access_step` + immediate completion:
    begin_step; lookups (on_hit for hits, in rank order); each miss in rank
    order: prepare_admit, then if full victim(protected) (protected = the
    step's keys and the static pins, or only the pins for policies without
    step protection, since in a clockless replay the only reads in flight are
    this step's), the worst-ranked resident step key below it as a last resort,
    else bypass; on_remove / on_insert; end_step.
    """
    cache = replay.cache
    n_exp = cache.n_experts
    n_layers = cache.n_layers
    glob = cache.scope == "global"
    pinned = cache.pinned
    parts = cache.partitions
    pols = [p.policy for p in parts]
    caps = [p.capacity for p in parts]
    residents: list[set[int]] = [set() for _ in parts]
    hits = [0] * n_layers
    misses = [0] * n_layers
    evictions = [0] * n_layers
    bypass = [0] * n_layers
    steps = replay._decision_keys_list
    k = replay.decision_steps.shape[1]
    name = cache.policy_name
    if (
        name in _FUSED
        and not pinned
        and min(caps) >= k
        and all(type(p) is _FUSED[name] for p in pols)
    ):
        return _fused_clock(replay) if name == "clock" else _fused_lru_fifo(replay, name == "lru")
    base = EvictionPolicy
    # Hooks a policy leaves at the base class do nothing: skip their calls.
    has_begin = any(type(p).begin_step is not base.begin_step for p in pols)
    has_hit = any(type(p).on_hit is not base.on_hit for p in pols)
    has_end = any(type(p).end_step is not base.end_step for p in pols)
    has_prep = any(type(p).prepare_admit is not base.prepare_admit for p in pols)
    for t, keys in enumerate(steps):
        layer = keys[0] // n_exp
        pi = 0 if glob else layer
        pol = pols[pi]
        res = residents[pi]
        cap = caps[pi]
        if has_begin:
            pol.begin_step(t, keys)
        missed = []
        for key in keys:
            if key in res:
                if has_hit:
                    pol.on_hit(key)
            else:
                missed.append(key)
        nm = len(missed)
        hits[layer] += len(keys) - nm
        if nm:
            misses[layer] += nm
            protects = pol.protects_step
            for key in missed:
                if has_prep:
                    pol.prepare_admit(key)
                if len(res) >= cap:
                    if protects:
                        prot: Any = _StepPins(keys, pinned) if pinned else keys
                    else:
                        prot = pinned
                    v = pol.victim(prot)
                    if v is None and protects:
                        rank = keys.index(key)
                        for r in range(len(keys) - 1, rank, -1):
                            k2 = keys[r]
                            if k2 in res and k2 not in missed and k2 not in pinned:
                                v = k2
                                break
                    if v is None:
                        bypass[layer] += 1
                        continue
                    if v not in res:
                        raise not_resident(pol, v)
                    pol.on_remove(v)
                    res.discard(v)
                    evictions[v // n_exp] += 1
                res.add(key)
                pol.on_insert(key)
        if has_end:
            pol.end_step(t, keys)
    return _finish(replay, residents, hits, misses, evictions, bypass)


def _finish(
    replay: Replay,
    residents: list[set[int]],
    hits: list[int],
    misses: list[int],
    evictions: list[int],
    bypass: list[int],
) -> CacheStats:
    cache = replay.cache
    stats = cache.stats
    parts = cache.partitions
    stats.hits += np.asarray(hits, dtype=np.int64)
    stats.misses += np.asarray(misses, dtype=np.int64)
    stats.evictions += np.asarray(evictions, dtype=np.int64)
    stats.bypass += np.asarray(bypass, dtype=np.int64)
    # Leave the cache as the general path would (everything read is resident).
    for pi, res in enumerate(residents):
        part = parts[pi]
        for key in sorted(res):
            cache.state[key] = READY
            cache.slot_of[key] = part.free_slots.pop()
        part.resident = len(res)
    return stats


_FUSED: dict[str, type[EvictionPolicy]] = {"lru": LRU, "fifo": FIFO, "clock": Clock}


class _StepPins:
    __slots__ = ("keys", "pinned")

    def __init__(self, keys: list[int], pinned: frozenset[int]) -> None:
        self.keys, self.pinned = keys, pinned

    def __contains__(self, key: object) -> bool:
        return key in self.keys or key in self.pinned


def _fused_lru_fifo(replay: Replay, lru: bool) -> CacheStats:
    """LRU / FIFO with every hook inlined (no pins, every partition >= k slots).

    With at least k slots a non-step victim always exists, so no step victim or
    bypass can occur. For LRU the in-step refresh of hits is subsumed by the
    end-of-step reorder (step keys are protected meanwhile), so a hit costs one
    membership test. The policies' orders are handed back to them at the end.
    """
    cache = replay.cache
    n_exp = cache.n_experts
    n_layers = cache.n_layers
    glob = cache.scope == "global"
    parts = cache.partitions
    caps = [p.capacity for p in parts]
    orders: list[OrderedDict[int, None]] = [OrderedDict() for _ in parts]
    hits = [0] * n_layers
    misses = [0] * n_layers
    evictions = [0] * n_layers
    for keys in replay._decision_keys_list:
        layer = keys[0] // n_exp
        pi = 0 if glob else layer
        od = orders[pi]
        nh = 0
        for key in keys:
            if key in od:
                nh += 1
            else:
                if len(od) >= caps[pi]:
                    for v in od:
                        if v not in keys:
                            break
                    del od[v]
                    evictions[v // n_exp] += 1
                od[key] = None
        hits[layer] += nh
        misses[layer] += len(keys) - nh
        if lru:
            for key in reversed(keys):
                od.move_to_end(key)
    for part, od in zip(parts, orders, strict=True):
        part.policy._order = od  # type: ignore[attr-defined]
    residents = [set(od) for od in orders]
    return _finish(replay, residents, hits, misses, evictions, [0] * n_layers)


def _fused_clock(replay: Replay) -> CacheStats:
    """CLOCK with its hooks inlined (no pins, every partition >= k slots).

    The ring is an OrderedDict whose front is under the hand; passing a key
    moves it to the back (clearing its bit unless it is one of the step's keys),
    which is exactly the plan `Clock.victim` computes and `on_remove` commits.
    """
    cache = replay.cache
    n_exp = cache.n_experts
    n_layers = cache.n_layers
    glob = cache.scope == "global"
    parts = cache.partitions
    caps = [p.capacity for p in parts]
    rings: list[OrderedDict[int, bool]] = [OrderedDict() for _ in parts]
    hits = [0] * n_layers
    misses = [0] * n_layers
    evictions = [0] * n_layers
    for keys in replay._decision_keys_list:
        layer = keys[0] // n_exp
        pi = 0 if glob else layer
        ring = rings[pi]
        missed = []
        for key in keys:
            if key in ring:
                ring[key] = True
            else:
                missed.append(key)
        nm = len(missed)
        hits[layer] += len(keys) - nm
        if not nm:
            continue
        misses[layer] += nm
        cap = caps[pi]
        for key in missed:
            if len(ring) >= cap:
                while True:
                    v = next(iter(ring))
                    if v in keys:
                        ring.move_to_end(v)
                    elif ring[v]:
                        ring[v] = False
                        ring.move_to_end(v)
                    else:
                        del ring[v]
                        evictions[v // n_exp] += 1
                        break
            ring[key] = False
    for part, ring in zip(parts, rings, strict=True):
        part.policy._ring = ring  # type: ignore[attr-defined]
    residents = [set(r) for r in rings]
    return _finish(replay, residents, hits, misses, evictions, [0] * n_layers)


def prefetch_proposals(replay: Replay) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every step's prefetch proposals of a fresh trace replay, ahead of the run, as CSR
    arrays (offsets (n_steps + 1,), keys, target steps): what `Replay.prefetch(t)` hands
    the cache, in order. None for a predictor that is not built in (a plugin may read
    more than its context).

    Exact because no built-in predictor reads the cache or the clock: its predictions
    depend on the trace alone (`observe` gets the trace's keys). A predictor with a
    vectorised `predict_all` is read in one go; the others are driven step by step
    (observe, predict) and their predictions go through `Replay.proposals`, the rule
    itself. Consumes the replay's predictor.
    """
    from mer.core.predictor import PREDICTORS

    pred = replay.predictor
    name = replay.config.predictor
    if replay.is_live or type(pred) is not PREDICTORS.get(name):
        return None
    if not type(pred).__module__.startswith("mer.core."):
        return None
    n = replay.n_steps
    depth = replay.config.pipeline_depth
    if depth == 0 or not replay.config.prefetch_on or n == 0:
        return np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    # the vectorised form reads nearest first; a --prefetch-window goes through proposals
    arrays = None if replay.rule.window else pred.predict_all(depth)
    if arrays is not None:
        return _proposals_of_arrays(replay, *arrays)
    off = np.zeros(n + 1, dtype=np.int64)
    keys: list[int] = []
    targets: list[int] = []
    steps = replay.steps
    for t in range(n):
        pred.observe(t, steps[t])
        wanted, target = replay.proposals(t, pred.predict(t, depth))
        keys.extend(wanted)
        targets.extend(target[key] for key in wanted)
        off[t + 1] = len(keys)
    return off, np.asarray(keys, dtype=np.int32), np.asarray(targets, dtype=np.int64)


def _proposals_of_arrays(
    replay: Replay, keys: np.ndarray, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Replay.proposals` over every step at once, on padded predictions: keys and probs
    (n_steps, depth, width), key -1 where a prediction is shorter (only at its end)."""
    n, depth, _ = keys.shape
    top_n = replay.rule.top_n or replay.top_k
    keys = keys[:, :, :top_n]
    probs = probs[:, :, :top_n]
    w = keys.shape[2]
    # a prediction is read in rank order up to its first key below min_prob
    valid = (keys >= 0) & np.cumprod(probs >= replay.rule.min_prob, axis=2).astype(bool)
    lead = max(1, replay.config.prefetch_lead)
    valid[:, : lead - 1, :] = False
    flat = keys.reshape(n, depth * w)
    ok = valid.reshape(n, depth * w).copy()
    for j in range(1, depth * w):  # a key already wanted (nearer step first) is not again
        for i in range(j):
            ok[:, j] &= ~(ok[:, i] & (flat[:, i] == flat[:, j]))
    d_of_col = np.repeat(np.arange(1, depth + 1, dtype=np.int64), w)
    target = np.arange(n, dtype=np.int64)[:, None] + d_of_col[None, :]
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(ok.sum(axis=1), out=off[1:])
    return off, np.ascontiguousarray(flat[ok], dtype=np.int32), target[ok]
