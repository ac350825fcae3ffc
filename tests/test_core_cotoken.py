"""The `cotoken` policy against a restatement of its definition.

The reference recomputes, at every step, cycle's terms of every expert from the
raw prefix of the trace (no incremental state), and the naive-Bayes evidence
from a fresh `cooccur` predictor fed that prefix (the one copy of that model:
this checks which visit each key is scored for). It then applies the victim
rule as docs/policies.md states it. The step semantics come from
`test_core_policies.ref_replay`.
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
from mer.core.cooccur import CooccurPredictor
from mer.core.cotoken import DEFAULT_WEIGHTS, FEATURES, Cotoken, fit_weights
from mer.core.cycle import EPS
from mer.core.predictor import ReplayContext
from mer.errors import BadInput


def cycle_terms(visits, e, n_experts, k, rate=0.2, prior=2.0):
    """bias, log(ema_mid + eps), used_last, log(repeat + eps) of local expert e after
    the visits of its layer so far (lists of local experts)."""
    base = k / n_experts
    ema = base
    for v in visits:
        ema = (1.0 - rate) * ema + rate * (1.0 if e in v else 0.0)
    if not visits:
        return [1.0, math.log(base + EPS), 0.0, math.log(base + EPS)]
    latest = visits[-1]
    pk = prior * base
    rep = 0.0
    for a in latest:
        n_a = sum(1 for v in visits[:-1] if a in v)
        c_ae = sum(1 for v, nxt in itertools.pairwise(visits) if a in v and e in nxt)
        rep += (c_ae + pk) / (n_a + prior)
    rep /= len(latest)
    return [1.0, math.log(ema + EPS), 1.0 if e in latest else 0.0, math.log(rep + EPS)]


def ref_scores(rows, n_layers, n_experts, w, scope):
    """score[t][key] after step t's begin_step: z - log d, as docs/policies.md defines it."""
    L, E = n_layers, n_experts
    k = len(rows[0])
    use_nb = scope == "global" and L > 1
    out = []
    for t, keys in enumerate(rows):
        cur = keys[0] // E
        nb = None
        if use_nb:
            ctx = ReplayContext(L, E, k, np.zeros((0, k), dtype=np.int32))
            nb = CooccurPredictor(ctx, beta=1.0, beta_prev=1.0)
            for s in range(t + 1):
                nb.observe(s, np.asarray(rows[s]))
        sc = {}
        for key in range(L * E):
            layer, e = divmod(key, E)
            visits = [[x - layer * E for x in r] for r in rows[: t + 1] if r[0] // E == layer]
            terms = cycle_terms(visits, e, E, k)
            later = layer > cur
            d = (layer - cur - 1) % L + 1
            f = [0.0] * len(FEATURES)
            f[0 if later else 4 : 4 if later else 8] = terms
            if nb is not None and not later:
                z = float(nb.log_odds(t, (t // L + 1) * L + layer)[e])
                f[8] = math.copysign(math.log1p(abs(z)), z)
            sc[key] = sum(wi * fi for wi, fi in zip(w, f, strict=True)) - math.log(d)
        out.append(sc)
    return out


class RefCotoken:
    protects = True

    def __init__(self, scores):
        self.scores = scores
        self.res = []

    def begin(self, t, keys):
        self.sc = self.scores[t]

    def hit(self, key):
        pass

    def prepare(self, key):
        pass

    def victim(self, prot):
        cands = [x for x in self.res if x not in prot]
        if not cands:
            return None
        v = min(cands, key=lambda c: (self.sc[c], c))
        self.res.remove(v)
        return v

    def remove_forced(self, key):
        self.res.remove(key)

    def insert(self, key):
        self.res.append(key)

    def end(self, t, keys):
        pass


@st.composite
def typed_traces(draw):
    """Several tokens of several layers, with the structure the evidence picks up."""
    L = draw(st.integers(2, 4))
    E = draw(st.integers(4, 6))
    rows = _correlated(draw(st.integers(4, 10)), L, E, 2, 0.6, draw(st.integers(0, 10**6)))
    return rows, L, E


@settings(max_examples=20, deadline=None)
@given(
    tr=st.one_of(traces(max_steps=24), typed_traces()),
    scope=st.sampled_from(["global", "per-layer"]),
    seed=st.integers(0, 1000),
)
def test_cotoken_matches_its_definition(tr, scope, seed):
    steps, n_layers, n_experts = tr
    rows = steps.tolist()
    rng = np.random.default_rng(seed)
    w = DEFAULT_WEIGHTS if seed % 2 else tuple(rng.normal(0, 0.5, len(FEATURES)).round(3))
    params = {f"w{i}": float(v) for i, v in enumerate(w)}
    scores = ref_scores(rows, n_layers, n_experts, w, scope)
    for cap in range(1, n_layers * n_experts + 1):
        want = ref_replay(rows, n_layers, n_experts, cap, scope, lambda c: RefCotoken(scores))
        got = core_counts(
            steps, n_layers, n_experts, "cotoken", cap, scope, params=params, fast=False
        )
        assert got == want, (scope, cap)


def _correlated(n_tokens, L, E, k, copy, seed):
    """Each token has a type (one of E // k groups of experts) that follows the
    previous token's (type + 1, or at random one time in ten); each layer picks its
    type's experts with probability `copy`, else at random. One layer's last pick
    tells the next token's type only weakly; all the layers of the token tell it well."""
    rng = np.random.default_rng(seed)
    n_types = E // k
    g = 0
    rows = []
    for _ in range(n_tokens):
        g = (g + 1) % n_types if rng.random() < 0.9 else int(rng.integers(n_types))
        for layer in range(L):
            if rng.random() < copy:
                ex = [g * k + r for r in range(k)]
            else:
                ex = [int(e) for e in rng.choice(E, k, replace=False)]
            rows.append([layer * E + e for e in ex])
    return np.asarray(rows, dtype=np.int32)


def test_fit_finds_the_tokens_evidence_and_it_pays():
    """Fitted on one trace of typed tokens and replayed on another, cotoken beats
    cycle fitted on the same trace: the token's layers reveal the next type."""
    from mer.core.cycle import fit_weights as fit_cycle

    L, E, k = 6, 8, 2
    train = _correlated(150, L, E, k, 0.5, 1)
    w, diag = fit_weights([(train, L, E)])
    assert w[FEATURES.index("nb_next")] > 0.2
    assert diag["log_likelihood"] > diag["log_likelihood_constant"] + 0.01
    wc, _ = fit_cycle([(train, L, E)])
    held = _correlated(150, L, E, k, 0.5, 2)
    rate = {}
    for pol, ws in (("cycle", wc), ("cotoken", w)):
        for slots in (16, 24, 32):
            pp = {f"w{i}": v for i, v in enumerate(ws)}
            cfg = ReplayConfig(policy=pol, cache_slots=slots, policy_params=pp)
            rep = Replay(held, n_layers=L, n_experts=E, config=cfg)
            rate[pol, slots] = replay_counts(rep).hit_rate
    for slots in (16, 24, 32):
        assert rate["cotoken", slots] > rate["cycle", slots] + 0.005, rate


def test_tune_fits_cotoken_and_names_the_traces(tmp_path):
    from mer.sim.tune import routing_digest, tune_policy
    from mer.traces.format import TraceMeta, from_arrays

    L, E, k = 4, 6, 2
    meta = TraceMeta(model="test", n_layers=L, n_experts=E, top_k=k)
    trs = []
    for i in range(2):
        rows = _correlated(30, L, E, k, 0.6, 10 + i)
        ex = (rows % E).reshape(30, L, k).astype(np.int16)
        trs.append((tmp_path / f"t{i}.parquet", from_arrays(ex, meta, name=f"t{i}")))
    tuned = tune_policy("cotoken", trs, sizes=[6, 10])
    assert set(tuned.params) == {f"w{i}" for i in range(len(FEATURES))}
    assert [t.routing_digest for t in tuned.tuned_on] == [routing_digest(t) for _, t in trs]


def test_cotoken_rejects_bad_parameters():
    steps = _correlated(2, 2, 4, 2, 0.5, 0)
    for bad in ({"rate_mid": 0.0}, {"prior": -1.0}, {"alpha": 0.0}, {"w9": 1.0}):
        with pytest.raises(BadInput):
            Replay(
                steps,
                n_layers=2,
                n_experts=4,
                config=ReplayConfig(policy="cotoken", cache_slots=3, policy_params=bad),
            )
    with pytest.raises(BadInput, match="layer order"):
        fit_weights([(steps[::-1].copy(), 2, 4)])
    with pytest.raises(BadInput, match="tuning options"):
        Cotoken.fit([(steps, 2, 4)], features=("bias",))
