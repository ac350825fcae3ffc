"""The expert cache: residency, slots, pinning, in-flight reads, statistics.

No clock and no I/O live here. Callers (the simulator, the engine) say what
happened - a step's lookups, a prefetch, a read that completed - and the cache
says what to read into which slot and what it evicted. Both callers therefore
take identical decisions; with prefetch off their hit rates are equal by
construction.

Scope `global` is one partition over all layer-qualified experts (the public
engine); `per-layer` splits the same total slots evenly over the layers, the
remainder to the lowest layers (mixtral-offloading), so both are compared at
equal memory.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mer.core.policy import EvictionPolicy, make_policy, not_resident
from mer.errors import BadInput

SCOPES = ("global", "per-layer")

# Entry states
READY = 1
IN_FLIGHT = 2


@dataclass(frozen=True)
class Admission:
    """One read the caller must perform: `key` into `slot` (None: bypass buffer)."""

    key: int
    slot: int | None
    evicted: int | None
    prefetch: bool


@dataclass
class StepResult:
    """What a step's lookups found and what must be read for it."""

    t: int
    keys: tuple[int, ...]
    hit: tuple[bool, ...]
    late: tuple[bool, ...]  # in flight (a prefetch not yet arrived): wait for it, no new read
    reads: list[Admission]  # demand reads to issue now (misses, in rank order)
    #: guesses dropped at this step (`prefetch_cancel`): predicted for it, not routed.
    #: Their slots are free again; a driver abandons the read of any still in flight
    #: (drops its queued chunks, lets those on the device land, never completes it).
    cancelled: tuple[int, ...] = ()

    @property
    def n_hits(self) -> int:
        return sum(self.hit)

    @property
    def n_misses(self) -> int:
        return len(self.keys) - self.n_hits


@dataclass
class CacheStats:
    """Counters per layer; totals are sums. All are ints (JSON-able via to_dict)."""

    n_layers: int
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    late: np.ndarray = field(init=False)
    evictions: np.ndarray = field(init=False)
    bypass: np.ndarray = field(init=False)
    prefetch_issued: np.ndarray = field(init=False)
    prefetch_used: np.ndarray = field(init=False)
    prefetch_wasted: np.ndarray = field(init=False)
    prefetch_cancelled: np.ndarray = field(init=False)

    COUNTERS = (
        "hits",
        "misses",
        "late",
        "evictions",
        "bypass",
        "prefetch_issued",
        "prefetch_used",
        "prefetch_wasted",
        "prefetch_cancelled",  # of the wasted: dropped at their step (`prefetch_cancel`)
    )

    def __post_init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, np.zeros(self.n_layers, dtype=np.int64))

    def total(self, name: str) -> int:
        return int(getattr(self, name).sum())

    @property
    def lookups(self) -> int:
        return self.total("hits") + self.total("misses")

    @property
    def hit_rate(self) -> float:
        n = self.lookups
        return self.total("hits") / n if n else 0.0

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.total(name) for name in self.COUNTERS}
        out["lookups"] = self.lookups
        out["hit_rate"] = self.hit_rate
        if per_layer:
            out["per_layer"] = {name: getattr(self, name).tolist() for name in self.COUNTERS}
        return out


class _Protected:
    """Membership in any of three sets, without building their union per eviction."""

    __slots__ = ("a", "b", "c")

    def __init__(self, a: Sequence[int], b: frozenset[int], c: set[int]) -> None:
        self.a, self.b, self.c = a, b, c

    def __contains__(self, key: object) -> bool:
        return key in self.a or key in self.b or key in self.c


class _ProtectedNoStep:
    """Protection for policies without step protection: pinned keys and reads in
    flight, except this step's own demand reads (the public engine inserts a miss
    at once, so a later miss of the same step may evict it)."""

    __slots__ = ("inflight", "pinned", "step_reads")

    def __init__(self, pinned: frozenset[int], inflight: set[int], step_reads: set[int]) -> None:
        self.pinned, self.inflight, self.step_reads = pinned, inflight, step_reads

    def __contains__(self, key: object) -> bool:
        return key in self.pinned or (key in self.inflight and key not in self.step_reads)


class _Partition:
    __slots__ = ("capacity", "free_slots", "policy", "resident")

    def __init__(self, policy: EvictionPolicy, capacity: int, first_slot: int, usable: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self.resident = 0
        # A partition never holds more keys than its key space, so only that many
        # slots exist, however large the capacity the policy is told.
        self.free_slots = list(range(first_slot + usable - 1, first_slot - 1, -1))


def split_slots(total: int, n_layers: int) -> list[int]:
    """Per-layer capacities: even split, the remainder to the lowest layers."""
    base, rem = divmod(total, n_layers)
    return [base + (1 if layer < rem else 0) for layer in range(n_layers)]


def physical_slots(cache_slots: int, scope: str, n_layers: int, n_experts: int) -> int:
    """Slot buffers a cache can ever fill: a partition holds at most its key space.

    A cache asked for more slots than there are experts behaves like one with
    exactly as many (the policy still sees the asked capacity), so the engine
    allocates only these.
    """
    if scope == "global":
        return min(cache_slots, n_layers * n_experts)
    return sum(min(c, n_experts) for c in split_slots(cache_slots, n_layers))


class ExpertCache:
    """Residency for layer-qualified expert keys (key = layer * n_experts + expert).

    `pinned` keys are never evicted once resident (static pinning of popular
    experts; the cache still starts empty, so they miss once). Policies with
    dynamic pinning (the public engine's) keep their own pinned set.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        n_experts: int,
        cache_slots: int,
        policy: str = "lru",
        policy_params: dict[str, Any] | None = None,
        scope: str = "global",
        pinned: Iterable[int] = (),
        policy_factory: Callable[[int], EvictionPolicy] | None = None,
        granularity: str = "step",
        prefetch_slots: int = 0,
        prefetch_reclaim: bool = False,
        prefetch_cancel: int = 0,
    ) -> None:
        if scope not in SCOPES:
            raise BadInput(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}.")
        if cache_slots < 1:
            raise BadInput(f"--cache-slots must be at least 1, got {cache_slots}.")
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.cache_slots = cache_slots
        self.scope = scope
        self.policy_name = policy
        # "lookup": each key of a step is looked up and admitted on its own, in rank
        # order, as its own policy step (t * k + rank), and may evict the reads of the
        # same step's earlier keys (which then go to the bypass buffer).
        self.lookup_granularity = granularity == "lookup"
        self.pinned = frozenset(int(k) for k in pinned)
        params = policy_params or {}
        factory = policy_factory or (lambda cap: make_policy(policy, cap, **params))
        if scope == "global":
            caps = [cache_slots]
        else:
            caps = split_slots(cache_slots, n_layers)
        self.partitions: list[_Partition] = []
        first = 0
        keyspace = n_layers * n_experts if scope == "global" else n_experts
        for cap in caps:
            pol = factory(cap)
            pol.attach_keyspace(keyspace)
            pol.attach_geometry(n_layers, n_experts)
            usable = min(cap, keyspace)
            self.partitions.append(_Partition(pol, cap, first, usable))
            first += usable
        per_part_pins = [0] * len(self.partitions)
        for key in self.pinned:
            if not 0 <= key < n_layers * n_experts:
                raise BadInput(f"pinned key {key} outside 0..{n_layers * n_experts - 1}.")
            per_part_pins[self._part_index(key)] += 1
        for i, (n_pins, part) in enumerate(zip(per_part_pins, self.partitions, strict=True)):
            if n_pins and n_pins >= part.capacity:
                raise BadInput(
                    f"{n_pins} pinned experts fill partition {i} of {part.capacity} slots; "
                    "pin fewer experts or give the cache more slots."
                )
        self.state: dict[int, int] = {}  # key -> READY | IN_FLIGHT
        self.slot_of: dict[int, int | None] = {}
        self.prefetched_unused: set[int] = set()
        self.inflight: set[int] = set()  # every key being read (demand or prefetch)
        self.inflight_prefetch: set[int] = set()  # the prefetch reads among them
        self.claimed: set[int] = set()  # prefetches looked up while in flight (late)
        # Speculative keys: prefetched, not yet looked up (in flight or landed), oldest
        # first. With a budget (`prefetch_slots` > 0 per partition) a prefetch beyond it
        # recycles the oldest landed one instead of evicting the policy's victim, so
        # wrong guesses never push out more than the budget of likely hits.
        self.prefetch_slots = int(prefetch_slots)
        self.spec: dict[int, int | None] = {}  # key -> the step it was predicted for
        # `prefetch_reclaim`: a guess whose step came and went without it is proven
        # wrong; once it has landed it is the first victim of the next admission.
        self.prefetch_reclaim = bool(prefetch_reclaim)
        self.useless: dict[int, None] = {}  # proven-wrong guesses, oldest first
        # `prefetch_cancel` N > 0: a guess whose step looked up its layer without it, and
        # whose read was issued at most N steps before, is dropped there and then, before the
        # step's misses are admitted (which may take its slot instead of the policy's
        # victim). The decision reads the trace, the cache's decisions and the steps of
        # issue and target, never whether the read has landed, so every driver drops the same
        # guesses; what a driver saves is the bandwidth of what it had not read yet. Only a
        # recent read is likely to be still in flight (N about read time / step time); an
        # older guess has landed, costs no more bandwidth, and may still hit at its layer's
        # next visit, so it stays.
        self.prefetch_cancel = int(prefetch_cancel)
        self.spec_issued: dict[int, int] = {}  # guess -> the step its read was issued at
        self.now = -1  # the step being looked up (prefetches follow it)
        # Demand reads issued by the current step: a policy without step protection
        # (the public engine's) may evict them again within the same step.
        self.step_reads: set[int] = set()
        self.stats = CacheStats(n_layers)

    # -- helpers ---------------------------------------------------------------------
    def _part_index(self, key: int) -> int:
        return 0 if self.scope == "global" else key // self.n_experts

    def partition_of(self, key: int) -> _Partition:
        return self.partitions[0 if self.scope == "global" else key // self.n_experts]

    def attach_future(self, steps: np.ndarray) -> None:
        for part in self.partitions:
            if part.policy.needs_future:
                part.policy.attach_future(steps)

    def is_resident(self, key: int) -> bool:
        return self.state.get(key) == READY

    def is_in_flight(self, key: int) -> bool:
        return self.state.get(key) == IN_FLIGHT

    @property
    def n_inflight_prefetch(self) -> int:
        return len(self.inflight_prefetch)

    def resident_keys(self) -> list[int]:
        return sorted(k for k, s in self.state.items() if s == READY)

    # -- the step ----------------------------------------------------------------------
    def access_step(self, t: int, keys: Sequence[int]) -> StepResult:
        """Look up one step's keys, then admit its misses in rank order."""
        if self.lookup_granularity:
            return self._access_lookups(t, keys)
        state = self.state
        parts = self.partitions
        glob = self.scope == "global"
        n_exp = self.n_experts
        stats = self.stats
        layer = keys[0] // n_exp
        touched: list[_Partition] = []
        for key in keys:
            part = parts[0] if glob else parts[key // n_exp]
            if part not in touched:
                touched.append(part)
                part.policy.begin_step(t, keys)
        hit = []
        late = []
        spec = self.spec
        for key in keys:
            st = state.get(key)
            if spec and key in spec:
                del spec[key]  # looked up: no longer a guess
                self.spec_issued.pop(key, None)
                self.useless.pop(key, None)
            if st == READY:
                hit.append(True)
                late.append(False)
                (parts[0] if glob else parts[key // n_exp]).policy.on_hit(key)
                if key in self.prefetched_unused:
                    self.prefetched_unused.discard(key)
                    stats.prefetch_used[layer] += 1
            else:
                hit.append(False)
                late.append(st == IN_FLIGHT)
                if st == IN_FLIGHT and key in self.inflight_prefetch and key not in self.claimed:
                    stats.late[layer] += 1
                    self.claimed.add(key)
        n_hits = sum(hit)
        stats.hits[layer] += n_hits
        stats.misses[layer] += len(keys) - n_hits
        self.now = t
        cancelled = self._cancel_missed(t) if self.prefetch_cancel and spec else ()
        reads: list[Admission] = []
        self.step_reads.clear()
        for rank, key in enumerate(keys):
            if hit[rank] or late[rank]:
                continue
            adm = self._admit(key, keys, rank, prefetch=False)
            reads.append(adm)
        if len(reads) > 1:
            # A read evicted again by a later miss of this step (only policies with
            # protects_step False do that) goes to the bypass buffer, not a slot.
            reads = [
                Admission(a.key, None, a.evicted, False)
                if a.slot is not None and a.key not in state
                else a
                for a in reads
            ]
        for part in touched:
            part.policy.end_step(t, keys)
        if self.prefetch_reclaim and spec:
            self._mark_missed(t)
        return StepResult(t, tuple(keys), tuple(hit), tuple(late), reads, cancelled)

    def _access_lookups(self, t: int, keys: Sequence[int]) -> StepResult:
        """Granularity lookup: each key a step of its own (t * k + rank), in rank order."""
        state = self.state
        stats = self.stats
        n_exp = self.n_experts
        k = len(keys)
        self.step_reads.clear()
        hit: list[bool] = []
        late: list[bool] = []
        reads: list[Admission] = []
        for rank, key in enumerate(keys):
            sub = t * k + rank
            one = [key]
            pol = self.partition_of(key).policy
            pol.begin_step(sub, one)
            layer = key // n_exp
            st = state.get(key)
            self.spec.pop(key, None)
            self.spec_issued.pop(key, None)
            self.useless.pop(key, None)
            if st == READY:
                hit.append(True)
                late.append(False)
                pol.on_hit(key)
                stats.hits[layer] += 1
                if key in self.prefetched_unused:
                    self.prefetched_unused.discard(key)
                    stats.prefetch_used[layer] += 1
            else:
                hit.append(False)
                late.append(st == IN_FLIGHT)
                stats.misses[layer] += 1
                if st == IN_FLIGHT:
                    if key in self.inflight_prefetch and key not in self.claimed:
                        stats.late[layer] += 1
                        self.claimed.add(key)
                else:
                    reads.append(self._admit(key, one, 0, prefetch=False, lookup=True))
            pol.end_step(sub, one)
        if len(reads) > 1:
            reads = [
                Admission(a.key, None, a.evicted, False)
                if a.slot is not None and a.key not in state
                else a
                for a in reads
            ]
        return StepResult(t, tuple(keys), tuple(hit), tuple(late), reads)

    def _admit(
        self,
        key: int,
        step_keys: Sequence[int],
        rank: int,
        *,
        prefetch: bool,
        lookup: bool = False,
    ) -> Admission:
        """Make room for `key` (evicting if full) and mark it in flight."""
        part = self.partition_of(key)
        layer = key // self.n_experts
        evicted: int | None = None
        part.policy.prepare_admit(key)
        if part.resident >= part.capacity:
            if (part.policy.protects_step or prefetch) and not lookup:
                protected: Container[int] = _Protected(step_keys, self.pinned, self.inflight)
            else:
                protected = _ProtectedNoStep(self.pinned, self.inflight, self.step_reads)
            victim = self._reclaim_victim(part, protected) if self.useless else None
            if victim is None:
                victim = part.policy.victim(protected)
            if victim is None and not prefetch and part.policy.protects_step:
                victim = self._step_victim(part, step_keys, rank)
            if victim is None:
                if not prefetch:
                    self.stats.bypass[layer] += 1
                return Admission(key, None, None, prefetch)
            if victim not in self.state:
                raise not_resident(part.policy, victim)
            self._evict(part, victim)
            evicted = victim
        slot = part.free_slots.pop()
        part.resident += 1
        self.state[key] = IN_FLIGHT
        self.inflight.add(key)
        if not prefetch:
            self.step_reads.add(key)
        self.slot_of[key] = slot
        part.policy.on_insert(key)
        if prefetch:
            self.inflight_prefetch.add(key)
            self.spec[key] = None
            self.stats.prefetch_issued[layer] += 1
        return Admission(key, slot, evicted, prefetch)

    def _mark_missed(self, t: int) -> None:
        """Guesses predicted for step t or earlier that step t did not look up."""
        for key, target in self.spec.items():
            if target is not None and target <= t and key not in self.useless:
                self.useless[key] = None

    def _cancel_missed(self, t: int) -> tuple[int, ...]:
        """Drop the guesses predicted for step t or earlier that step t did not look up
        (its keys left `spec` already): landed or still in flight, each is a wasted
        prefetch, and its slot is free for this step's misses."""
        oldest = t - self.prefetch_cancel
        issued = self.spec_issued
        gone = tuple(
            k
            for k, target in self.spec.items()
            if target is not None
            and target <= t
            and issued.get(k, t) >= oldest
            and k not in self.pinned
        )
        for key in gone:
            layer = key // self.n_experts
            if self.state.get(key) == IN_FLIGHT:
                self.inflight_prefetch.discard(key)
                self.claimed.discard(key)
                self.prefetched_unused.add(key)  # so _evict counts it wasted
            self._evict(self.partition_of(key), key)
            self.stats.prefetch_cancelled[layer] += 1
        return gone

    def _reclaim_victim(self, part: _Partition, protected: Container[int]) -> int | None:
        """The oldest proven-wrong guess of this partition that has landed."""
        for key in self.useless:
            if (
                self.state.get(key) == READY
                and key not in protected
                and self.partition_of(key) is part
            ):
                return key
        return None

    def _step_victim(self, part: _Partition, step_keys: Sequence[int], rank: int) -> int | None:
        """A cache smaller than the step: the worst-ranked resident step key ranked below `rank`."""
        for r in range(len(step_keys) - 1, rank, -1):
            key = step_keys[r]
            if (
                self.state.get(key) == READY
                and key not in self.pinned
                and self.partition_of(key) is part
            ):
                return key
        return None

    def _evict(self, part: _Partition, key: int) -> None:
        part.policy.on_remove(key)
        part.resident -= 1
        slot = self.slot_of.pop(key)
        if slot is not None:
            part.free_slots.append(slot)
        if self.state.pop(key) == IN_FLIGHT:  # a read of this very step, evicted again
            self.inflight.discard(key)
            self.step_reads.discard(key)
        layer = key // self.n_experts
        self.stats.evictions[layer] += 1
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            self.stats.prefetch_wasted[layer] += 1
        self.spec.pop(key, None)
        self.spec_issued.pop(key, None)
        self.useless.pop(key, None)

    # -- prefetch and completion ---------------------------------------------------------
    def prefetch(
        self, key: int, protect: Sequence[int] = (), target: int | None = None
    ) -> Admission | None:
        """Admit `key` as a background read, or None if it is resident/in flight/no room.

        `protect`: keys the victim must not be (the current step, other wanted keys);
        `target`: the step it is predicted for (a guess still pending is re-aimed).
        """
        if key in self.state:
            if key in self.spec and target is not None:
                old = self.spec[key]
                self.spec[key] = target if old is None else max(old, target)
                self.useless.pop(key, None)
            return None
        recycled: int | None = None
        if self.prefetch_slots:
            part = self.partition_of(key)
            mine = [k for k in self.spec if self.partition_of(k) is part]
            if len(mine) >= self.prefetch_slots:
                # The budget is full: recycle the oldest guess that has landed unused.
                landed = [
                    k
                    for k in mine
                    if self.state.get(k) == READY and k not in protect and k not in self.pinned
                ]
                wrong = [k for k in landed if k in self.useless]
                pool = wrong or landed
                if not pool:
                    return None
                recycled = pool[0]
                self._evict(part, recycled)
        adm = self._admit(key, protect, len(protect), prefetch=True)
        if adm.slot is None:
            return None
        self.spec[key] = target
        self.spec_issued[key] = self.now
        if recycled is not None:  # the slot the driver must reuse is the recycled guess's
            adm = Admission(adm.key, adm.slot, recycled, True)
        return adm

    def mark_late(self, key: int) -> None:
        """`key`, just counted a hit and a used prefetch, was still being read when its
        step looked it up: count it a late prefetch and a miss (`Replay.mark_late`)."""
        layer = key // self.n_experts
        st = self.stats
        st.hits[layer] -= 1
        st.misses[layer] += 1
        st.prefetch_used[layer] -= 1
        st.late[layer] += 1

    def complete(self, key: int) -> None:
        """The read of `key` finished: it is now resident."""
        if self.state.get(key) != IN_FLIGHT:
            return
        self.state[key] = READY
        self.inflight.discard(key)
        if key in self.inflight_prefetch:
            self.inflight_prefetch.discard(key)
            if key in self.claimed:
                self.claimed.discard(key)
            else:
                self.prefetched_unused.add(key)
