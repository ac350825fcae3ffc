"""Each eviction policy against an independent brute-force reference.

The references below are written from the policies' definitions with plain
lists and a plain re-statement of the step semantics (docs/policies.md): look
all k keys up, hits refresh, then admit misses in rank order; a victim is never
a protected key (the step's keys for step-protecting policies, this step's
admissions, static pins); a cache smaller than the step evicts its worst-ranked
resident step key ranked below the incoming one; else the miss bypasses.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.core import ExpertCache, Replay, ReplayConfig, replay_counts, split_slots

# -- reference policies (lists, brute force) ------------------------------------------


class RefLRU:
    protects = True

    def __init__(self, cap, steps):
        self.order = []  # oldest first

    def begin(self, t, keys):
        pass

    def hit(self, key):
        self.order.remove(key)
        self.order.append(key)

    def prepare(self, key):
        pass

    def victim(self, prot):
        for key in self.order:
            if key not in prot:
                self.order.remove(key)
                return key
        return None

    def insert(self, key):
        self.order.append(key)

    def end(self, t, keys):
        for key in reversed(keys):
            if key in self.order:
                self.order.remove(key)
                self.order.append(key)


class RefFIFO(RefLRU):
    def hit(self, key):
        pass

    def end(self, t, keys):
        pass


class RefLFU(RefLRU):
    decay = 1.0

    def __init__(self, cap, steps):
        self.acc = {}  # key -> list of access steps since admission
        self.last = {}
        self.tick = 0
        self.t = 0

    def begin(self, t, keys):
        self.t = t

    def _touch(self, key):
        self.acc.setdefault(key, []).append(self.t)
        self.tick += 1
        self.last[key] = self.tick

    def hit(self, key):
        self._touch(key)

    def insert(self, key):
        self.acc[key] = []
        self._touch(key)

    def victim(self, prot):
        cands = [k for k in self.acc if k not in prot]
        if not cands:
            return None

        def score(k):
            return (sum(self.decay ** (self.t - s) for s in self.acc[k]), self.last[k])

        v = min(cands, key=score)
        del self.acc[v]
        return v

    def end(self, t, keys):
        pass


class RefLFUDecay(RefLFU):
    decay = 0.5  # powers of two: both sides compute exact floats


class RefClock(RefFIFO):
    def __init__(self, cap, steps):
        self.ring = []  # ring[0] is under the hand
        self.bit = {}

    def hit(self, key):
        self.bit[key] = True

    def insert(self, key):
        self.ring.append(key)
        self.bit[key] = False

    def victim(self, prot):
        if all(k in prot for k in self.ring):
            return None
        while True:
            key = self.ring[0]
            if key not in prot and not self.bit[key]:
                self.ring.pop(0)
                del self.bit[key]
                return key
            if key not in prot:
                self.bit[key] = False
            self.ring.append(self.ring.pop(0))


class RefSieve(RefFIFO):
    def __init__(self, cap, steps):
        self.q = []  # oldest first
        self.visited = {}
        self.hand = None

    def hit(self, key):
        self.visited[key] = True

    def insert(self, key):
        self.q.append(key)
        self.visited[key] = False

    def victim(self, prot):
        if all(k in prot for k in self.q):
            return None
        i = self.hand if self.hand is not None else 0
        while True:
            key = self.q[i]
            if key not in prot:
                if not self.visited[key]:
                    self.q.pop(i)
                    del self.visited[key]
                    self.hand = i if i < len(self.q) else None
                    return key
                self.visited[key] = False
            i = (i + 1) % len(self.q)


def _sieve_remove_forced(self, key):
    i = self.q.index(key)
    self.q.pop(i)
    del self.visited[key]
    if self.hand is not None:
        if i < self.hand:
            self.hand -= 1
        if self.hand >= len(self.q):
            self.hand = None


class RefS3FIFO(RefFIFO):
    def __init__(self, cap, steps):
        self.s_cap = max(1, round(0.1 * cap))
        self.m_cap = cap - self.s_cap
        self.g_cap = max(1, round(0.9 * cap))
        self.S, self.M, self.G = [], [], []
        self.freq = {}

    def hit(self, key):
        self.freq[key] = min(3, self.freq[key] + 1)

    def insert(self, key):
        self.freq[key] = 0
        if key in self.G:
            self.G.remove(key)
            self.M.append(key)
        else:
            self.S.append(key)

    def _evict_m(self, prot):
        i = 0
        while i < len(self.M):
            key = self.M[i]
            if key in prot:
                i += 1
            elif self.freq[key] > 0:
                self.freq[key] -= 1
                self.M.append(self.M.pop(i))
            else:
                self.M.pop(i)
                return key
        return None

    def _evict_s(self, prot):
        i = 0
        while i < len(self.S):
            key = self.S[i]
            if key in prot:
                i += 1
            elif self.freq[key] >= 1:
                self.S.pop(i)
                self.freq[key] = 0
                self.M.append(key)
                if len(self.M) > self.m_cap:
                    v = self._evict_m(prot)
                    if v is not None:
                        return v
            else:
                self.S.pop(i)
                self.G.append(key)
                if len(self.G) > self.g_cap:
                    self.G.pop(0)
                return key
        return None

    def victim(self, prot):
        if len(self.S) >= self.s_cap:
            v = self._evict_s(prot)
            if v is None:
                v = self._evict_m(prot)
        else:
            v = self._evict_m(prot)
            if v is None:
                v = self._evict_s(prot)
        if v is not None:
            del self.freq[v]
        return v


class RefARC(RefFIFO):
    def __init__(self, cap, steps):
        self.c = cap
        self.p = 0.0
        self.T1, self.T2, self.B1, self.B2 = [], [], [], []
        self.x_in_b2 = False
        self.drop_t1 = False

    def hit(self, key):
        if key in self.T1:
            self.T1.remove(key)
        else:
            self.T2.remove(key)
        self.T2.append(key)

    def prepare(self, x):
        c = self.c
        self.x_in_b2 = x in self.B2
        self.drop_t1 = False
        if x in self.B1:
            self.p = min(c, self.p + max(len(self.B2) / len(self.B1), 1))
        elif x in self.B2:
            self.p = max(0, self.p - max(len(self.B1) / len(self.B2), 1))
        elif len(self.T1) + len(self.B1) >= c:
            if len(self.T1) < c:
                if self.B1:
                    self.B1.pop(0)
            else:
                self.drop_t1 = True
        elif len(self.T1) + len(self.T2) + len(self.B1) + len(self.B2) >= 2 * c and self.B2:
            self.B2.pop(0)

    def victim(self, prot):
        def first(lst):
            return next((k for k in lst if k not in prot), None)

        if self.drop_t1 and first(self.T1) is not None:
            v = first(self.T1)
            self.T1.remove(v)
            return v
        use_t1 = bool(self.T1) and (
            len(self.T1) > self.p or (self.x_in_b2 and len(self.T1) == self.p)
        )
        pairs = [(self.T1, self.B1), (self.T2, self.B2)]
        for lst, ghost in pairs if use_t1 else pairs[::-1]:
            v = first(lst)
            if v is not None:
                lst.remove(v)
                ghost.append(v)
                return v
        return None

    def insert(self, x):
        if x in self.B1:
            self.B1.remove(x)
            self.T2.append(x)
        elif x in self.B2:
            self.B2.remove(x)
            self.T2.append(x)
        else:
            self.T1.append(x)
        while len(self.T1) + len(self.B1) > self.c and self.B1:
            self.B1.pop(0)
        while sum(map(len, (self.T1, self.T2, self.B1, self.B2))) > 2 * self.c and self.B2:
            self.B2.pop(0)


class RefOPT(RefFIFO):
    def __init__(self, cap, steps):
        self.flat = [k for row in steps for k in row]
        self.k = len(steps[0])
        self.res = []
        self.t = 0

    def begin(self, t, keys):
        self.t = t

    def insert(self, key):
        self.res.append(key)

    def victim(self, prot):
        start = (self.t + 1) * self.k

        def nxt(key):
            for i in range(start, len(self.flat)):
                if self.flat[i] == key:
                    return (i, key)
            return (10**18, key)

        cands = [k for k in self.res if k not in prot]
        if not cands:
            return None
        v = max(cands, key=nxt)
        self.res.remove(v)
        return v


class RefSeed(RefFIFO):
    protects = False

    def __init__(self, cap, steps, n_keys=0, epl=2):
        self.cap = cap
        self.order = []
        self.window = []
        n_l = max(1, n_keys // epl)
        self.w = 256 * n_l
        self.f = 0.10 / n_l

    def begin(self, t, keys):
        for key in keys:
            self.window.append(key)
            if len(self.window) > self.w:
                self.window.pop(0)

    def hit(self, key):
        self.order.remove(key)
        self.order.append(key)

    def victim(self, prot):
        thr = max(self.f * len(self.window), 1)
        counts = {k: self.window.count(k) for k in set(self.window)}
        hot = sorted((k for k in counts if counts[k] >= thr), key=lambda k: (-counts[k], k))
        pinned = set(hot[: self.cap - 1])
        for key in self.order:
            if key not in pinned and key not in prot:
                self.order.remove(key)
                return key
        return None


REFS = {
    "lru": (RefLRU, {}),
    "fifo": (RefFIFO, {}),
    "lfu": (RefLFU, {}),
    "clock": (RefClock, {}),
    "sieve": (RefSieve, {}),
    "s3fifo": (RefS3FIFO, {}),
    "arc": (RefARC, {}),
    "opt": (RefOPT, {}),
}


def ref_replay(steps, n_layers, n_experts, cap, scope, make, pinned=frozenset()):
    """The step semantics, restated with lists. Returns (hits, evictions, bypass)."""
    caps = [cap] if scope == "global" else split_slots(cap, n_layers)
    pols = [make(c) for c in caps]
    res = [[] for _ in caps]
    hits = evictions = bypass = 0
    for t, keys in enumerate(steps):
        pi = 0 if scope == "global" else keys[0] // n_experts
        pol, r, c = pols[pi], res[pi], caps[pi]
        pol.begin(t, keys)
        hit = [key in r for key in keys]
        for key, h in zip(keys, hit, strict=True):
            if h:
                pol.hit(key)
        hits += sum(hit)
        admitted = []
        for rank, key in enumerate(keys):
            if hit[rank]:
                continue
            pol.prepare(key)
            if len(r) >= c:
                prot = set(pinned)
                if pol.protects:
                    prot |= set(keys)
                v = pol.victim(prot)
                if v is None and pol.protects:
                    for k2 in reversed(keys[rank + 1 :]):
                        if k2 in r and k2 not in admitted and k2 not in pinned:
                            v = k2
                            pol.remove_forced(k2)
                            break
                if v is None:
                    bypass += 1
                    continue
                r.remove(v)
                evictions += 1
            r.append(key)
            admitted.append(key)
            pol.insert(key)
        pol.end(t, keys)
    return hits, evictions, bypass


def _remove_forced(self, key):
    """Generic removal of a named key from whatever lists a reference keeps."""
    for name in ("order", "ring", "q", "S", "M", "T1", "T2", "res"):
        lst = getattr(self, name, None)
        if isinstance(lst, list) and key in lst:
            lst.remove(key)  # a forced removal leaves no ghost
    for name in ("bit", "visited", "freq", "acc"):
        d = getattr(self, name, None)
        if isinstance(d, dict):
            d.pop(key, None)


for _cls in (RefLRU, RefFIFO, RefLFU, RefClock, RefSieve, RefS3FIFO, RefARC, RefOPT, RefSeed):
    _cls.remove_forced = _remove_forced
RefSieve.remove_forced = _sieve_remove_forced


# -- traces ------------------------------------------------------------------------------


@st.composite
def traces(draw, max_steps=40):
    n_layers = draw(st.integers(1, 3))
    n_experts = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, n_experts)))
    n_tokens = draw(st.integers(1, max(1, max_steps // n_layers)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    weights = rng.random(n_experts) ** 3 + 1e-3
    rows = []
    for _ in range(n_tokens):
        for layer in range(n_layers):
            ex = rng.choice(n_experts, k, replace=False, p=weights / weights.sum())
            rows.append([layer * n_experts + int(e) for e in ex])
    return np.asarray(rows, dtype=np.int32), n_layers, n_experts


def core_counts(steps, n_layers, n_experts, policy, cap, scope, *, pin=0, fast=True, params=None):
    cfg = ReplayConfig(
        policy=policy, cache_slots=cap, scope=scope, pin=pin, policy_params=params or {}
    )
    rep = Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg)
    s = replay_counts(rep, fast=fast)
    return s.total("hits"), s.total("evictions"), s.total("bypass")


@pytest.mark.parametrize("policy", sorted(REFS))
@settings(max_examples=25, deadline=None)
@given(tr=traces(), scope=st.sampled_from(["global", "per-layer"]))
def test_policy_matches_reference(policy, tr, scope):
    steps, n_layers, n_experts = tr
    cls, _ = REFS[policy]
    rows = steps.tolist()
    for cap in range(1, n_layers * n_experts + 1):
        want = ref_replay(rows, n_layers, n_experts, cap, scope, lambda c: cls(c, rows))
        got = core_counts(steps, n_layers, n_experts, policy, cap, scope)
        assert got == want, (policy, scope, cap)


@settings(max_examples=25, deadline=None)
@given(tr=traces(max_steps=30), scope=st.sampled_from(["global", "per-layer"]))
def test_lfu_decay_matches_reference(tr, scope):
    steps, n_layers, n_experts = tr
    rows = steps.tolist()
    for cap in range(1, n_layers * n_experts + 1):
        want = ref_replay(rows, n_layers, n_experts, cap, scope, lambda c: RefLFUDecay(c, rows))
        got = core_counts(steps, n_layers, n_experts, "lfu", cap, scope, params={"decay": 0.5})
        assert got == want, (scope, cap)


@settings(max_examples=30, deadline=None)
@given(tr=traces(), epl=st.integers(1, 3))
def test_seed_policy_matches_reference(tr, epl):
    steps, n_layers, n_experts = tr
    rows = steps.tolist()
    n_keys = n_layers * n_experts
    for cap in range(1, n_keys + 1):
        want = ref_replay(
            rows, n_layers, n_experts, cap, "global", lambda c: RefSeed(c, rows, n_keys, epl)
        )
        got = core_counts(
            steps,
            n_layers,
            n_experts,
            "seed-lru-locality",
            cap,
            "global",
            params={"experts_per_layer": epl},
        )
        assert got == want, cap


@pytest.mark.parametrize("policy", ["lru", "fifo", "clock", "sieve", "arc", "s3fifo", "lfu"])
@settings(max_examples=15, deadline=None)
@given(tr=traces(), data=st.data())
def test_static_pinning_matches_reference(policy, tr, data):
    steps, n_layers, n_experts = tr
    rows = steps.tolist()
    counts = np.bincount(steps.reshape(-1), minlength=n_layers * n_experts)
    order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
    n_pin = data.draw(st.integers(1, 2))
    pins = frozenset(k for k in order[:n_pin] if counts[k] > 0)
    cls, _ = REFS[policy]
    scope = data.draw(st.sampled_from(["global", "per-layer"]))
    for cap in range(1, n_layers * n_experts + 1):
        try:
            got = core_counts(steps, n_layers, n_experts, policy, cap, scope, pin=n_pin)
        except Exception as exc:  # too many pins for a partition: the core refuses
            assert "pinned" in str(exc)
            continue
        want = ref_replay(rows, n_layers, n_experts, cap, scope, lambda c: cls(c, rows), pins)
        assert got == want, (policy, scope, cap)


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "clock", "sieve", "s3fifo", "arc", "opt"])
@settings(max_examples=10, deadline=None)
@given(tr=traces(), scope=st.sampled_from(["global", "per-layer"]))
def test_lean_replay_equals_general_path(policy, tr, scope):
    steps, n_layers, n_experts = tr
    for cap in range(1, n_layers * n_experts + 1):
        cfg = ReplayConfig(policy=policy, cache_slots=cap, scope=scope)
        a = replay_counts(Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg))
        b = replay_counts(
            Replay(steps, n_layers=n_layers, n_experts=n_experts, config=cfg), fast=False
        )
        assert a.to_dict(per_layer=True) == b.to_dict(per_layer=True)


def test_pinned_keys_are_never_evicted():
    cache = ExpertCache(n_layers=1, n_experts=6, cache_slots=3, policy="fifo", pinned=[0])
    for t, keys in enumerate([[0], [1], [2], [3], [4], [5], [0]]):
        res = cache.access_step(t, keys)
        for adm in res.reads:
            assert adm.evicted != 0
            cache.complete(adm.key)
    assert cache.stats.total("hits") == 1  # the last lookup of key 0
