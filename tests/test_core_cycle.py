"""The `cycle` policy against a brute-force restatement of its definition.

The reference recomputes every expert's features from the raw prefix of the
trace at each eviction (no incremental state), applies the victim rule as
docs/policies.md states it, and runs the duel's two shadow directories as
plain lists. The step semantics come from `test_core_policies.ref_replay`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_policies import core_counts, ref_replay, traces

from mer.core import Replay, ReplayConfig, replay_counts
from mer.core.cycle import DEFAULT_WEIGHTS, EPS, FEATURES, GAP_CAP, fit_weights, visit_features
from mer.errors import BadInput

RATES = (0.05, 0.2, 0.5)


def brute_z(history, key, n_experts, k, w, prior=2.0):
    """Log-odds of `key` from the steps of its layer seen so far (rank-ordered key lists)."""
    layer = key // n_experts
    visits = [keys for keys in history if keys[0] // n_experts == layer]
    base = k / n_experts
    x = [1.0 if key in v else 0.0 for v in visits]
    emas = []
    for r in RATES:
        e = base
        for xi in x:
            e = (1.0 - r) * e + r * xi
        emas.append(e)
    picked = [i + 1 for i, xi in enumerate(x) if xi]
    gap = min(len(visits) - picked[-1], GAP_CAP) if picked else GAP_CAP
    used = 1.0 if gap == 0 else 0.0
    if visits:
        latest = visits[-1]
        pk = prior * (k / n_experts)
        rep = 0.0
        for a in latest:
            n_a = sum(1 for v in visits[:-1] if a in v)
            c_ab = sum(1 for v, nxt in itertools.pairwise(visits) if a in v and key in nxt)
            rep += (c_ab + pk) * (1.0 / (n_a + prior))
        rep /= len(latest)
    else:
        rep = base
    f = [
        None,
        math.log(emas[0] + EPS),
        math.log(emas[1] + EPS),
        math.log(emas[2] + EPS),
        used,
        math.log1p(gap),
        math.log(rep + EPS),
    ]
    z = w[0]
    for i in range(1, len(FEATURES)):
        if w[i]:
            z += w[i] * f[i]
    return z


def rule(cands, z, cur, n_layers, n_experts):
    """Per layer the lowest z (ties: smaller key); then the lowest z - log d (ties: lower layer)."""
    best = None
    for layer in range(n_layers):
        mine = sorted(c for c in cands if c // n_experts == layer)
        if not mine:
            continue
        cand = min(mine, key=lambda c: (z[c], c))
        d = (layer - cur - 1) % n_layers + 1
        val = z[cand] - math.log(d)
        if best is None or val < best[0]:
            best = (val, cand)
    return None if best is None else best[1]


class RefCycle:
    protects = True

    def __init__(self, cap, n_layers, n_experts, w, duel=0, decay=0.995):
        self.cap, self.L, self.E, self.w = cap, n_layers, n_experts, w
        self.history = []
        self.res = []
        self.order = []  # real residents, least recent first (for the duel's LRU mode)
        self.duel, self.decay = duel, decay
        self.sh_lru, self.sh_res = [], []
        self.hl = self.hc = 0.0
        self.lru_mode = False

    def z_all(self, k):
        return {
            key: brute_z(self.history, key, self.E, k, self.w) for key in range(self.L * self.E)
        }

    def begin(self, t, keys):
        self.history.append(list(keys))
        self.cur = keys[0] // self.E
        self.z = self.z_all(len(keys))
        if not self.duel:
            return
        hl = sum(1 for key in keys if key in self.sh_lru)
        for key in keys:
            if key in self.sh_lru:
                continue
            if len(self.sh_lru) >= self.cap:
                v = next((x for x in self.sh_lru if x not in keys), None)
                if v is None:
                    continue
                self.sh_lru.remove(v)
            self.sh_lru.append(key)
        for key in reversed(keys):
            if key in self.sh_lru:
                self.sh_lru.remove(key)
                self.sh_lru.append(key)
        hc = sum(1 for key in keys if key in self.sh_res)
        for key in keys:
            if key in self.sh_res:
                continue
            if len(self.sh_res) >= self.cap:
                v = rule(
                    [x for x in self.sh_res if x not in keys], self.z, self.cur, self.L, self.E
                )
                if v is None:
                    continue
                self.sh_res.remove(v)
            self.sh_res.append(key)
        self.hl = self.decay * self.hl + hl
        self.hc = self.decay * self.hc + hc
        self.lru_mode = self.hl > self.hc

    def hit(self, key):
        pass

    def prepare(self, key):
        pass

    def victim(self, prot):
        if self.lru_mode:
            v = next((x for x in self.order if x not in prot), None)
        else:
            v = rule([x for x in self.res if x not in prot], self.z, self.cur, self.L, self.E)
        if v is not None:
            self.res.remove(v)
            self.order.remove(v)
        return v

    def remove_forced(self, key):
        self.res.remove(key)
        self.order.remove(key)

    def insert(self, key):
        self.res.append(key)
        self.order.append(key)

    def end(self, t, keys):
        for key in reversed(keys):
            if key in self.order:
                self.order.remove(key)
                self.order.append(key)


@st.composite
def cycle_traces(draw):
    """Traces with several layers, so that the layer distance decides evictions."""
    n_layers = draw(st.integers(2, 5))
    n_experts = draw(st.integers(3, 5))
    k = draw(st.integers(1, 2))
    rows = _layer_major(
        draw(st.integers(2, 8)), n_layers, n_experts, k, draw(st.integers(0, 10**6))
    )
    return rows, n_layers, n_experts


@settings(max_examples=25, deadline=None)
@given(
    tr=st.one_of(traces(max_steps=30), cycle_traces()),
    scope=st.sampled_from(["global", "per-layer"]),
    duel=st.integers(0, 1),
    seed=st.integers(0, 1000),
)
def test_cycle_matches_brute_force(tr, scope, duel, seed):
    steps, n_layers, n_experts = tr
    rows = steps.tolist()
    rng = np.random.default_rng(seed)
    w = DEFAULT_WEIGHTS if seed % 2 else tuple(rng.normal(0, 0.4, len(FEATURES)).round(3))
    params = {f"w{i}": float(v) for i, v in enumerate(w)} | {"duel": duel}
    for cap in range(1, n_layers * n_experts + 1):
        want = ref_replay(
            rows,
            n_layers,
            n_experts,
            cap,
            scope,
            lambda c: RefCycle(c, n_layers, n_experts, w, duel),
        )
        got = core_counts(
            steps, n_layers, n_experts, "cycle", cap, scope, params=params, fast=False
        )
        assert got == want, (scope, cap, duel)


def _layer_major(n_tokens, n_layers, n_experts, k, seed):
    rng = np.random.default_rng(seed)
    p = rng.random(n_experts) ** 2 + 0.05
    rows = [
        [layer * n_experts + int(e) for e in rng.choice(n_experts, k, replace=False, p=p / p.sum())]
        for _ in range(n_tokens)
        for layer in range(n_layers)
    ]
    return np.asarray(rows, dtype=np.int32)


def test_visit_features_are_the_policys_own():
    """The fitting features at a layer's visit give the z the policy holds after it."""
    L, E, k = 3, 5, 2
    steps = _layer_major(30, L, E, k, 4)
    w = (0.3, 0.2, -0.4, 0.1, 0.5, -0.2, 0.9)
    X, _ = visit_features(steps, L, E)
    X = X.reshape(29, L, E, len(FEATURES))
    params = {f"w{i}": v for i, v in enumerate(w)}
    cfg = ReplayConfig(policy="cycle", cache_slots=4, policy_params=params)
    rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
    pol = rep.cache.partitions[0].policy
    for t in range(rep.n_steps - L):  # visit_features has every visit but the last token's
        for adm in rep.step(t).reads:
            rep.complete(adm.key)
        tau, layer = divmod(t, L)
        for e in range(E):
            key = layer * E + e
            f = X[tau, layer, e]
            want = w[0]
            for i in range(1, len(FEATURES)):
                want += w[i] * f[i]
            assert pol._z[key] == pytest.approx(want, abs=1e-12), (t, key)


def test_fit_recovers_the_terms_that_matter():
    """On a trace whose layers repeat their previous token's experts half the time,
    the fitted weight of the repeat term is positive and the fit beats a constant."""
    rng = np.random.default_rng(0)
    L, E, k = 4, 8, 2
    rows, prev = [], [None] * L
    for _ in range(300):
        for layer in range(L):
            if prev[layer] is not None and rng.random() < 0.5:
                ex = prev[layer]
            else:
                ex = [int(e) for e in rng.choice(E, k, replace=False)]
            prev[layer] = ex
            rows.append([layer * E + e for e in ex])
    steps = np.asarray(rows, dtype=np.int32)
    w, diag = fit_weights([(steps, L, E)])
    assert w[FEATURES.index("log_repeat")] > 0.5 or w[FEATURES.index("used_last")] > 0.5
    assert diag["log_likelihood"] > diag["log_likelihood_constant"] + 0.02
    assert w[FEATURES.index("log_ema_long")] == 0.0  # not in the default terms


def test_cycle_rejects_bad_parameters():
    for bad in ({"rate_mid": 0.0}, {"duel": 2}, {"prior": -1.0}, {"w9": 1.0}):
        with pytest.raises(BadInput):
            Replay(
                _layer_major(2, 2, 4, 2, 0),
                n_layers=2,
                n_experts=4,
                config=ReplayConfig(policy="cycle", cache_slots=3, policy_params=bad),
            )
    with pytest.raises(BadInput, match="features"):
        fit_weights([(_layer_major(5, 2, 4, 2, 0), 2, 4)], features=("log_repeat",))


def test_cycle_beats_lru_where_lru_thrashes():
    """Below k x L slots global LRU keeps nothing a token later (a cyclic scan); the
    layer cycle keeps the experts of the layers coming next."""
    L, E, k = 8, 8, 2
    steps = _layer_major(200, L, E, k, 3)
    out = {}
    for pol in ("lru", "cycle"):
        cfg = ReplayConfig(policy=pol, cache_slots=k * L - 2)
        out[pol] = replay_counts(Replay(steps, n_layers=L, n_experts=E, config=cfg)).hit_rate
    assert out["lru"] < 0.05 < out["cycle"]
