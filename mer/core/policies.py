"""The eviction policies: one class each, registered by name.

`lru` (the reference) lives in `mer.core.policy`; this module adds fifo, lfu,
clock, sieve, s3fifo, arc, opt (Belady) and seed-lru-locality (the public
engine's policy). docs/policies.md gives each one's origin and parameters.

Conventions shared by all of them (see `mer.core.policy.EvictionPolicy`):
- `victim(protected)` never evicts a protected key. Policies whose eviction
  walk also reorganises metadata (CLOCK clears bits, SIEVE moves its hand,
  S3-FIFO moves objects between queues) compute the walk in `victim()` as a
  plan and commit it in `on_remove(victim)`, so `victim()` itself changes no
  state. A protected key met on the walk is passed over unchanged.
- Everything is deterministic: no randomness, ties broken by a stated rule.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Container, Sequence
from typing import Any, ClassVar

import numpy as np

from mer.core.policy import EvictionPolicy, register_policy
from mer.errors import BadInput

INF = 1 << 62  # "never used again" for OPT


def _param(params: dict[str, Any], name: str, default: Any, cast: type, policy: str) -> Any:
    if name not in params:
        return default
    raw = params.pop(name)
    try:
        return cast(raw)
    except (TypeError, ValueError):
        raise BadInput(
            f"policy {policy!r}: parameter {name}={raw!r} is not a {cast.__name__}."
        ) from None


@register_policy
class FIFO(EvictionPolicy):
    """First in, first out: evict the oldest admission; hits change nothing."""

    name = "fifo"

    def __init__(self, capacity: int, **params: Any) -> None:
        super().__init__(capacity, **params)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def on_insert(self, key: int) -> None:
        self._order[key] = None

    def on_remove(self, key: int) -> None:
        del self._order[key]

    def victim(self, protected: Container[int]) -> int | None:
        for key in self._order:
            if key not in protected:
                return key
        return None


@register_policy
class LRU(FIFO):
    """Least recently used, at step granularity: FIFO's queue, refreshed by use.

    Keys of one step are used together, so at the end of a step they become the
    most recent in rank order (rank 0 most recent), whether they hit or missed.
    This makes LRU a stack algorithm over steps, which the one-pass miss-ratio
    curve relies on.
    """

    name = "lru"

    def on_hit(self, key: int) -> None:
        self._order.move_to_end(key)

    def end_step(self, t: int, keys: Sequence[int]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                order.move_to_end(key)


@register_policy
class LFU(EvictionPolicy):
    """Least frequently used (in-cache counts), optionally with exponential decay.

    A key's score starts at 1 when admitted and grows by 1 per hit; with
    `decay` d < 1 every past access is worth d^(steps since it happened).
    Victim: lowest score; ties go to the least recently accessed key.
    """

    name = "lfu"
    tune_grid: ClassVar[dict[str, tuple[Any, ...]]] = {
        "decay": (1.0, 0.999, 0.995, 0.99, 0.95, 0.9)
    }

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        self.decay = _param(params, "decay", 1.0, float, self.name)
        super().__init__(capacity, **params)
        if not 0.0 < self.decay <= 1.0:
            raise BadInput(f"policy 'lfu': decay must be in (0, 1], got {self.decay}.")
        self._score: dict[int, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._tick = 0
        self._t0 = 0  # scores are stored relative to decay^-(t - t0)
        self._w = 1.0

    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        if self.decay < 1.0:
            w = self.decay ** (self._t0 - t)
            if w > 1e100:  # renormalise to keep floats finite
                scale = 1.0 / w
                self._score = {k: (s * scale, tk) for k, (s, tk) in self._score.items()}
                self._heap = [(s, tk, k) for k, (s, tk) in self._score.items()]
                heapq.heapify(self._heap)
                self._t0 = t
                w = 1.0
            self._w = w

    def _touch(self, key: int, score: float) -> None:
        self._tick += 1
        entry = (score, self._tick)
        self._score[key] = entry
        heapq.heappush(self._heap, (score, self._tick, key))

    def on_hit(self, key: int) -> None:
        self._touch(key, self._score[key][0] + self._w)

    def on_insert(self, key: int) -> None:
        self._touch(key, self._w)

    def on_remove(self, key: int) -> None:
        del self._score[key]

    def victim(self, protected: Container[int]) -> int | None:
        heap, score = self._heap, self._score
        skipped = []
        found = None
        while heap:
            s, tick, key = heap[0]
            if score.get(key) != (s, tick):
                heapq.heappop(heap)  # stale entry: not state, just garbage
                continue
            if key in protected:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "decay": self.decay}


@register_policy
class Clock(EvictionPolicy):
    """CLOCK (second chance): a ring with one reference bit per key.

    New keys enter just behind the hand with bit 0; a hit sets the bit. To
    evict, the hand sweeps: a set bit is cleared and passed, the first clear
    bit is the victim.
    """

    name = "clock"

    def __init__(self, capacity: int, **params: Any) -> None:
        super().__init__(capacity, **params)
        self._ring: OrderedDict[int, bool] = OrderedDict()  # front = under the hand
        self._plan: tuple[int, list[int], list[int]] | None = None

    def on_hit(self, key: int) -> None:
        self._ring[key] = True

    def on_insert(self, key: int) -> None:
        self._ring[key] = False

    def victim(self, protected: Container[int]) -> int | None:
        passed: list[int] = []  # keys the hand moves past, in order
        cleared: list[int] = []
        for key, bit in self._ring.items():
            if key in protected:
                passed.append(key)
            elif bit:
                passed.append(key)
                cleared.append(key)
            else:
                self._plan = (key, passed, cleared)
                return key
        # A full turn cleared every unprotected bit: the first unprotected key goes.
        passed = []
        for key in self._ring:
            if key in protected:
                passed.append(key)
            else:
                self._plan = (key, passed, cleared)
                return key
        return None

    def on_remove(self, key: int) -> None:
        ring = self._ring
        plan = self._plan
        self._plan = None
        if plan is not None and plan[0] == key:
            for k in plan[2]:
                ring[k] = False
            for k in plan[1]:
                ring.move_to_end(k)
        del ring[key]


@register_policy
class Sieve(EvictionPolicy):
    """SIEVE: a FIFO queue with a visited bit and a hand that does not move keys.

    New keys enter at the head (newest) unvisited; a hit sets visited. The hand
    walks from the tail (oldest) towards the head, clearing visited bits, and
    evicts the first unvisited key; it then rests on the next newer key and
    wraps to the tail after the head.
    """

    name = "sieve"

    def __init__(self, capacity: int, **params: Any) -> None:
        super().__init__(capacity, **params)
        self._newer: dict[int, int | None] = {}
        self._older: dict[int, int | None] = {}
        self._visited: dict[int, bool] = {}
        self._head: int | None = None  # newest
        self._tail: int | None = None  # oldest
        self._hand: int | None = None  # None = start at the tail
        self._plan: tuple[int, list[int]] | None = None

    def on_hit(self, key: int) -> None:
        self._visited[key] = True

    def on_insert(self, key: int) -> None:
        self._visited[key] = False
        self._older[key] = self._head
        self._newer[key] = None
        if self._head is not None:
            self._newer[self._head] = key
        self._head = key
        if self._tail is None:
            self._tail = key

    def victim(self, protected: Container[int]) -> int | None:
        n = len(self._visited)
        if n == 0:
            return None
        newer, visited = self._newer, self._visited
        node = self._hand if self._hand is not None else self._tail
        cleared: list[int] = []
        first_free: int | None = None
        for _ in range(n):
            assert node is not None
            if node not in protected:
                if not visited[node]:
                    self._plan = (node, cleared)
                    return node
                if first_free is None:
                    first_free = node
                cleared.append(node)
            nxt = newer[node]
            node = nxt if nxt is not None else self._tail
        if first_free is None:
            return None
        # A full lap cleared every unprotected bit; the lap restarts where it began.
        self._plan = (first_free, cleared)
        return first_free

    def on_remove(self, key: int) -> None:
        plan = self._plan
        self._plan = None
        if plan is not None and plan[0] == key:
            for k in plan[1]:
                self._visited[k] = False
            self._hand = self._newer[key]
        elif self._hand == key:
            self._hand = self._newer[key]
        older, newer = self._older.pop(key), self._newer.pop(key)
        del self._visited[key]
        if older is not None:
            self._newer[older] = newer
        else:
            self._tail = newer
        if newer is not None:
            self._older[newer] = older
        else:
            self._head = older


@register_policy
class S3FIFO(EvictionPolicy):
    """S3-FIFO: a small FIFO (S), a main FIFO (M) with 2-bit counters, a ghost FIFO (G).

    Parameters: `small_ratio` (S's share of the slots, default 0.1),
    `ghost_ratio` (G's entries per slot, default 0.9), `move_threshold`
    (accesses in S needed to move to M instead of G, default 1), `max_freq`
    (counter cap, default 3). New keys go to S, or to M if G remembers them.
    Eviction works on S when S holds at least its share, else on M.
    """

    name = "s3fifo"
    tune_grid: ClassVar[dict[str, tuple[Any, ...]]] = {
        "small_ratio": (0.05, 0.1, 0.2, 0.3),
        "move_threshold": (1, 2),
    }

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        self.small_ratio = _param(params, "small_ratio", 0.1, float, self.name)
        self.ghost_ratio = _param(params, "ghost_ratio", 0.9, float, self.name)
        self.move_threshold = _param(params, "move_threshold", 1, int, self.name)
        self.max_freq = _param(params, "max_freq", 3, int, self.name)
        super().__init__(capacity, **params)
        if not 0.0 < self.small_ratio < 1.0:
            raise BadInput(
                f"policy 's3fifo': small_ratio must be in (0, 1), got {self.small_ratio}."
            )
        self.s_cap = max(1, round(self.small_ratio * capacity))
        self.m_cap = max(0, capacity - self.s_cap)
        self.g_cap = max(1, round(self.ghost_ratio * capacity))
        self._small: deque[int] = deque()  # left = oldest (tail)
        self._main: deque[int] = deque()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        self._freq: dict[int, int] = {}
        self._where: dict[int, str] = {}
        self._plan: tuple[int, deque[int], deque[int], dict[int, int], bool] | None = None

    def on_hit(self, key: int) -> None:
        f = self._freq[key]
        if f < self.max_freq:
            self._freq[key] = f + 1

    def on_insert(self, key: int) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main.append(key)
            self._where[key] = "M"
        else:
            self._small.append(key)
            self._where[key] = "S"

    def victim(self, protected: Container[int]) -> int | None:
        small, main = deque(self._small), deque(self._main)
        freq = self._freq
        over: dict[int, int] = {}
        m_cap = self.m_cap

        def evict_main() -> int | None:
            skipped = []
            found = None
            while main:
                key = main.popleft()
                if key in protected:
                    skipped.append(key)
                    continue
                f = over.get(key, freq[key])
                if f > 0:
                    over[key] = f - 1
                    main.append(key)
                else:
                    found = key
                    break
            main.extendleft(reversed(skipped))
            return found

        def evict_small() -> tuple[int | None, bool]:
            skipped = []
            found: int | None = None
            to_ghost = False
            while small:
                key = small.popleft()
                if key in protected:
                    skipped.append(key)
                    continue
                f = over.get(key, freq[key])
                if f >= self.move_threshold:
                    over[key] = 0
                    main.append(key)
                    if len(main) > m_cap:
                        found = evict_main()
                        if found is not None:
                            break
                else:
                    found, to_ghost = key, True
                    break
            small.extendleft(reversed(skipped))
            return found, to_ghost

        to_ghost = False
        if len(small) >= self.s_cap:
            found, to_ghost = evict_small()
            if found is None:
                found = evict_main()
        else:
            found = evict_main()
            if found is None:
                found, to_ghost = evict_small()
        if found is None:
            return None
        self._plan = (found, small, main, over, to_ghost)
        return found

    def on_remove(self, key: int) -> None:
        plan = self._plan
        self._plan = None
        if plan is not None and plan[0] == key:
            _, small, main, over, to_ghost = plan
            for k, f in over.items():
                self._freq[k] = f
            for k in main:
                self._where[k] = "M"
            self._small, self._main = small, main
            if to_ghost:
                self._ghost[key] = None
                if len(self._ghost) > self.g_cap:
                    self._ghost.popitem(last=False)
        elif self._where[key] == "S":
            self._small.remove(key)
        else:
            self._main.remove(key)
        del self._freq[key]
        del self._where[key]

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "small_ratio": self.small_ratio,
            "ghost_ratio": self.ghost_ratio,
            "move_threshold": self.move_threshold,
            "max_freq": self.max_freq,
        }


@register_policy
class ARC(EvictionPolicy):
    """Adaptive Replacement Cache: recency list T1, frequency list T2, their
    ghosts B1/B2, and the adaptive target p for T1's size."""

    name = "arc"

    def __init__(self, capacity: int, **params: Any) -> None:
        super().__init__(capacity, **params)
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._incoming_in_b2 = False
        self._drop_t1 = False
        self._plan: tuple[int, OrderedDict[int, None] | None] | None = None

    def on_hit(self, key: int) -> None:
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        else:
            self.t2.move_to_end(key)

    def prepare_admit(self, key: int) -> None:
        c = self.capacity
        b1, b2 = self.b1, self.b2
        self._incoming_in_b2 = False
        self._drop_t1 = False
        if key in b1:
            self.p = min(float(c), self.p + max(len(b2) / len(b1), 1.0))
        elif key in b2:
            self._incoming_in_b2 = True
            self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))
        else:
            l1 = len(self.t1) + len(b1)
            if l1 >= c:
                if len(self.t1) < c:
                    if b1:
                        b1.popitem(last=False)
                else:
                    self._drop_t1 = True
            elif l1 + len(self.t2) + len(b2) >= 2 * c and b2:
                b2.popitem(last=False)

    @staticmethod
    def _first(od: OrderedDict[int, None], protected: Container[int]) -> int | None:
        for key in od:
            if key not in protected:
                return key
        return None

    def victim(self, protected: Container[int]) -> int | None:
        t1, t2 = self.t1, self.t2
        if self._drop_t1:
            key = self._first(t1, protected)
            if key is not None:
                self._plan = (key, None)
                return key
        from_t1 = bool(t1) and (len(t1) > self.p or (self._incoming_in_b2 and len(t1) == self.p))
        order = ((t1, self.b1), (t2, self.b2)) if from_t1 else ((t2, self.b2), (t1, self.b1))
        for lst, ghost in order:
            key = self._first(lst, protected)
            if key is not None:
                self._plan = (key, ghost)
                return key
        return None

    def on_remove(self, key: int) -> None:
        plan = self._plan
        self._plan = None
        if key in self.t1:
            del self.t1[key]
        else:
            del self.t2[key]
        if plan is not None and plan[0] == key and plan[1] is not None:
            plan[1][key] = None

    def on_insert(self, key: int) -> None:
        if key in self.b1:
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None
        # Keep the directory within 2c even when admissions bypassed the ARC cases.
        c = self.capacity
        while len(self.t1) + len(self.b1) > c and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and self.b2:
            self.b2.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "p": self.p}


@register_policy
class OPT(EvictionPolicy):
    """Belady's MIN: evict the key whose next use is farthest in the future.

    Next use is the sequential position t * k + rank of the key's next
    occurrence after the current step, so two live keys never tie; keys never
    used again tie at infinity and the largest key goes first.
    """

    name = "opt"
    needs_future = True

    def __init__(self, capacity: int, **params: Any) -> None:
        super().__init__(capacity, **params)
        self._next_pos: list[int] = []
        self._k = 1
        self._t = -1
        self._nxt: dict[int, int] = {}
        self._resident: set[int] = set()
        self._heap: list[tuple[int, int]] = []  # (-next use, -key)
        self._positions: dict[int, np.ndarray] = {}
        self._flat: np.ndarray | None = None

    def attach_future(self, steps: np.ndarray) -> None:
        steps = np.asarray(steps)
        self._k = steps.shape[1]
        flat = steps.reshape(-1).astype(np.int64)
        self._flat = flat
        self._next_pos = []  # computed at the first step: a compiled replay never needs it

    def _occurrences(self, key: int) -> np.ndarray:
        pos = self._positions.get(key)
        if pos is None:
            assert self._flat is not None
            pos = np.flatnonzero(self._flat == key)
            self._positions[key] = pos
        return pos

    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        self._t = t
        base = t * self._k
        if not self._next_pos and self._flat is not None and len(self._flat):
            self._next_pos = next_positions(self._flat).tolist()
        nxt, res, heap, next_pos = self._nxt, self._resident, self._heap, self._next_pos
        for rank, key in enumerate(keys):
            n = next_pos[base + rank]
            nxt[key] = n
            if key in res:
                heapq.heappush(heap, (-n, -key))

    def on_insert(self, key: int) -> None:
        if key not in self._nxt:
            # Admitted without being looked up this step (a prefetch): its next use
            # after the current step.
            if self._flat is None:
                raise BadInput("policy 'opt' needs the future of the trace (attach_future).")
            pos = self._occurrences(key)
            i = int(np.searchsorted(pos, (self._t + 1) * self._k))
            self._nxt[key] = int(pos[i]) if i < len(pos) else INF
        self._resident.add(key)
        heapq.heappush(self._heap, (-self._nxt[key], -key))

    def on_remove(self, key: int) -> None:
        self._resident.discard(key)
        self._nxt.pop(key, None)

    def victim(self, protected: Container[int]) -> int | None:
        heap, nxt, res = self._heap, self._nxt, self._resident
        skipped = []
        found = None
        while heap:
            negn, negk = heap[0]
            key = -negk
            if key not in res or nxt.get(key) != -negn:
                heapq.heappop(heap)
                continue
            if key in protected:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


def next_positions(flat: np.ndarray) -> np.ndarray:
    """For each position i of a flat key sequence, the next position of the same
    key (INF if none): the 'next use' Belady's OPT ranks by."""
    flat = np.asarray(flat)
    n = len(flat)
    out = np.full(n, INF, dtype=np.int64)
    if n == 0:
        return out
    order = np.argsort(flat, kind="stable")
    same = flat[order[1:]] == flat[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out


@register_policy
class SeedLRULocality(EvictionPolicy):
    """The public engine's policy: one LRU plus locality pinning (specs/seed-engine.md).

    Per step: the locality monitor appends the step's ids to a sliding window of
    W = 256 x L observations (L = n_keys / experts_per_layer); hot ids are those
    whose window count is >= max(f x window length, 1) with f = 0.10 / L, sorted
    by count descending then id ascending, and the first (slots - 1) of them are
    pinned. Hits refresh recency in lookup order, misses are inserted in rank
    order, and the victim is the least recently used key that is not pinned.
    A miss may evict another key of the same step (protects_step = False).
    """

    name = "seed-lru-locality"
    protects_step = False

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        self.experts_per_layer = _param(params, "experts_per_layer", 8, int, self.name)
        super().__init__(capacity, **params)
        if self.experts_per_layer < 1:
            raise BadInput("policy 'seed-lru-locality': experts_per_layer must be >= 1.")
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._window: deque[int] = deque()
        self._counts = np.zeros(0, dtype=np.int64)
        self._pinned: frozenset[int] = frozenset()
        self._dirty = False
        self.attach_keyspace(256)

    def attach_keyspace(self, n_keys: int) -> None:
        self.n_keys = n_keys
        self.n_layers_est = max(1, n_keys // self.experts_per_layer)
        self.window_size = 256 * self.n_layers_est
        self.fraction = 0.10 / self.n_layers_est
        self._counts = np.zeros(max(n_keys, 1), dtype=np.int64)
        self._window.clear()
        self._dirty = True

    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        window, counts, w = self._window, self._counts, self.window_size
        for key in keys:
            if key >= len(counts):
                grown = np.zeros(key + 1, dtype=np.int64)
                grown[: len(counts)] = counts
                self._counts = counts = grown
            window.append(key)
            counts[key] += 1
            if len(window) > w:
                counts[window.popleft()] -= 1
        self._dirty = True

    def pinned(self) -> frozenset[int]:
        """The current pinned set (computed lazily: only evictions need it)."""
        if self._dirty:
            counts = self._counts
            threshold = max(self.fraction * len(self._window), 1.0)
            hot = np.flatnonzero(counts >= threshold)
            hot = hot[np.lexsort((hot, -counts[hot]))]
            self._pinned = frozenset(hot[: max(self.capacity - 1, 0)].tolist())
            self._dirty = False
        return self._pinned

    def hot_ids(self) -> list[int]:
        counts = self._counts
        threshold = max(self.fraction * len(self._window), 1.0)
        hot = np.flatnonzero(counts >= threshold)
        return hot[np.lexsort((hot, -counts[hot]))].tolist()

    def on_hit(self, key: int) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: int) -> None:
        self._order[key] = None

    def on_remove(self, key: int) -> None:
        del self._order[key]

    def victim(self, protected: Container[int]) -> int | None:
        pinned = self.pinned()
        for key in self._order:
            if key not in pinned and key not in protected:
                return key
        return None

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "experts_per_layer": self.experts_per_layer}
