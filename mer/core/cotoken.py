"""`cotoken`: `cycle`'s hit density, with the whole current token as evidence.

`cycle` scores a resident expert of layer l by the odds that l's next visit
picks it, from l's own history: popularity, the last pick, and the layer's
token-to-token transitions (what layer l picked last token says about what it
picks next token). But by the time the engine must evict, the current token
has already been routed at every layer up to the current one, and Mixtral's
routers are correlated across layers: what this token picked at layers 0..c
says more about what the *next* token picks at layer l than layer l's own last
pick alone. `cotoken` adds that evidence to cycle's model and keeps its rule:
evict the resident key with the lowest z - log d, d the steps until its
layer's next visit (1 <= d <= L), z the log-odds of a pick there:

    z = [cycle's terms] . w_same                         (l > c: next visit this token)
    z = [cycle's terms] . w_next + w8 slog(z_nb)         (l <= c: next visit next token)

- cycle's terms, at l's latest visit (mer.core.cycle): bias, log(ema_mid +
  eps), used_last, log(repeat + eps). They get two sets of weights because the
  two cases differ: a layer still to come in this token was last visited less
  than a token ago, a layer already visited has just been routed, and only
  the second gets the token's evidence below.
- z_nb: the `cooccur` predictor's naive-Bayes log-odds that the next token
  picks the key at layer l, from every layer of this token routed so far
  (pair counts of "picked at layer a of one token, at layer b of the next",
  counted online; mer.core.cooccur is the one copy of that model).
  slog(x) = sign(x) log1p(|x|) tames naive Bayes' over-counting of correlated
  evidence (its z spans hundreds).

Measured on the real traces (docs/policies.md): the same-token counterpart
(this token's layers 0..c as evidence for a layer l > c still to come) predicts
better but evicts worse (held out, -5.3 to +0.5 points of the gap closed), so
it is left out.

The 9 weights are fitted by maximum likelihood over (step, key) pairs of the
tuning traces (`mer tune --policy cotoken`, `fit`): the features are computed
by running this very class over the traces, so the fit and the policy cannot
disagree. The defaults were fitted on the bundled trace.

A partition that sees one layer only (scope `per-layer`) has no other layer of
the token to learn from: there the policy is cycle with the next-token weights.
Never the future: the policy sees each step's keys at `begin_step`, as an
engine sees the router's output (tests/test_core_no_future.py).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Sequence
from typing import Any

import numpy as np

from mer.core.cooccur import CooccurPredictor
from mer.core.cycle import EPS, TUNED_ON, logistic_fit
from mer.core.policies import _param
from mer.core.policy import EvictionPolicy, register_policy
from mer.core.predictor import ReplayContext
from mer.errors import BadInput

#: cycle's terms (mer.core.cycle), evaluated at the layer's latest visit.
CYCLE_TERMS = ("bias", "log_ema_mid", "used_last", "log_repeat")
#: The weights, in order (w0 .. w8).
FEATURES = (
    *(f"same_{f}" for f in CYCLE_TERMS),
    *(f"next_{f}" for f in CYCLE_TERMS),
    "nb_next",
)
#: Fitted by `mer tune --policy cotoken traces/data/mixtral-offloading-h39s.parquet
#: --phase decode` (the bundled trace is all decode).
DEFAULT_WEIGHTS = (
    0.5246,
    0.0836,
    0.1657,
    1.1253,
    -0.1654,
    0.1848,
    0.2513,
    0.3942,
    0.3105,
)
#: Fitting samples every FIT_STRIDE-th step (coprime with the layer count of
#: Mixtral, so every layer distance is seen) to bound the fit's memory.
FIT_STRIDE = 5


@register_policy
class Cotoken(EvictionPolicy):
    """cycle's hit density z - log d, z with this token's routing as evidence (module doc)."""

    name = "cotoken"
    # About 25k lookups per CPU-second in Python: its 512 default curves of the bundled
    # trace would take about half an hour there, so the default curves draw it only
    # where its compiled twin (mer/native/replay.c) runs (under a second).
    in_default_curves = False
    tunable = tuple(f"w{i}" for i in range(len(FEATURES)))
    tuned_on = TUNED_ON

    @classmethod
    def fit(
        cls, data: Sequence[tuple[np.ndarray, int, int]], **options: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`mer tune`: maximum-likelihood weights over the traces' (step, key) pairs."""
        if options:
            raise BadInput(f"policy 'cotoken' takes no tuning options ({', '.join(options)}).")
        w, diag = fit_weights(data)
        diag["method"] = "maximum likelihood over (step, key) pairs, terms " + ", ".join(FEATURES)
        return {f"w{i}": v for i, v in enumerate(w)}, diag

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        for i, default in enumerate(DEFAULT_WEIGHTS):
            setattr(self, f"w{i}", _param(params, f"w{i}", default, float, self.name))
        self.rate_mid = _param(params, "rate_mid", 0.2, float, self.name)
        self.prior = _param(params, "prior", 2.0, float, self.name)
        self.alpha = _param(params, "alpha", 0.5, float, self.name)
        super().__init__(capacity, **params)
        if not 0.0 < self.rate_mid <= 1.0:
            raise BadInput(f"policy 'cotoken': rate_mid must be in (0, 1], got {self.rate_mid}.")
        if self.prior <= 0:
            raise BadInput(f"policy 'cotoken': prior must be > 0, got {self.prior}.")
        if self.alpha <= 0:
            raise BadInput(f"policy 'cotoken': alpha must be > 0, got {self.alpha}.")
        self.n_layers = 0
        self.n_experts = 0
        self._keyspace = 0

    # -- geometry and state --------------------------------------------------------------
    def attach_keyspace(self, n_keys: int) -> None:
        self._keyspace = n_keys
        if not self.n_experts:
            self.attach_geometry(1, n_keys)

    def attach_geometry(self, n_layers: int, n_experts: int) -> None:
        L, E = n_layers, n_experts
        self.n_layers, self.n_experts = L, E
        nk = L * E
        self._w = np.array([getattr(self, f"w{i}") for i in range(len(FEATURES))])
        self._k = 0
        self._visits = np.zeros(L, dtype=np.int64)
        self._latest: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(L)]
        self._rep = np.zeros((L, E, E))
        self._rcount = np.zeros((L, E))
        self._last = np.full((L, E), -1, dtype=np.int64)
        self._ema = np.zeros((L, E))
        self._terms = np.zeros((L, E, len(CYCLE_TERMS)))  # cycle's terms, latest visit
        self._res = np.zeros(nk, dtype=bool)
        self._layer_of = np.arange(nk) // E
        self._cur = -1
        self._tok = -1
        self._nb: CooccurPredictor | None = None
        self._order: np.ndarray | None = None  # this step's keys, lowest score first
        self._dkey = np.zeros(nk)

    def _start(self, k: int) -> None:
        """First step: every expert starts at the uninformed rate k / E."""
        self._k = k
        L, E = self.n_layers, self.n_experts
        base = k / E
        self._ema[:] = base
        t = self._terms
        t[..., 0] = 1.0
        t[..., 1] = math.log(base + EPS)
        t[..., 2] = 0.0
        t[..., 3] = math.log(base + EPS)
        # naive Bayes needs two or more layers in the partition's view
        if L > 1 and self._keyspace > E:
            ctx = ReplayContext(L, E, k, np.zeros((0, k), dtype=np.int32))
            self._nb = CooccurPredictor(ctx, beta=1.0, beta_prev=1.0, alpha=self.alpha)

    # -- hooks ---------------------------------------------------------------------------
    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        if not self.n_experts:
            raise BadInput("policy 'cotoken' needs the model geometry (attach_geometry).")
        if not self._k:
            self._start(len(keys))
        E = self.n_experts
        layer = int(keys[0]) // E
        loc = np.asarray([int(key) - layer * E for key in keys], dtype=np.int64)
        self._visit(layer, loc)  # as cycle: every step is a visit of its layer
        if self._nb is not None and layer != self._cur:
            # (the same layer twice in a row, in a global view of several layers, is one
            # step fed a lookup at a time: naive Bayes counts the layer's first lookup)
            if layer < self._cur or self._tok < 0:
                self._tok += 1
            self._nb.observe(self._tok * self.n_layers + layer, np.asarray(keys))
        self._cur = layer
        self._order = None

    def _visit(self, layer: int, loc: np.ndarray) -> None:
        """cycle's recurrences for one visit of `layer` (mer.core.cycle)."""
        E = self.n_experts
        for a in self._latest[layer]:
            self._rcount[layer, a] += 1
            self._rep[layer, a, loc] += 1
        self._latest[layer] = loc
        self._visits[layer] += 1
        x = np.zeros(E)
        x[loc] = 1.0
        rm = self.rate_mid
        self._ema[layer] = (1.0 - rm) * self._ema[layer] + rm * x
        self._last[layer, loc] = self._visits[layer]
        pk = self.prior * (self._k / E)
        rep = (self._rep[layer, loc] + pk) / (self._rcount[layer, loc] + self.prior)[:, None]
        r = rep.mean(axis=0)
        t = self._terms[layer]
        t[:, 1] = np.log(self._ema[layer] + EPS)
        t[:, 2] = x
        t[:, 3] = np.log(r + EPS)

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """(F (n_keys, 12), d (n_keys,)) for every key after the current step's
        `begin_step`: the model's terms for each key's layer's next visit, d steps away."""
        L, E = self.n_layers, self.n_experts
        cur = self._cur
        lay = self._layer_of
        later = lay > cur
        d = ((lay - cur - 1) % L + 1).astype(np.float64)
        terms = self._terms.reshape(L * E, len(CYCLE_TERMS))
        F = np.zeros((L * E, len(FEATURES)))
        F[later, 0:4] = terms[later]
        F[~later, 4:8] = terms[~later]
        nb = self._nb
        if nb is not None and nb._layer >= 0:
            z = nb.logit_prior[~later] + nb._ev_next[~later]
            F[~later, 8] = np.sign(z) * np.log1p(np.abs(z))
        return F, d

    def on_insert(self, key: int) -> None:
        self._res[key] = True

    def on_remove(self, key: int) -> None:
        self._res[key] = False

    def scores(self) -> np.ndarray:
        """Every key's z - log d after the current step's `begin_step` (lowest: evicted)."""
        F, d = self.features()
        return np.asarray(F @ self._w - np.log(d))

    def victim(self, protected: Container[int]) -> int | None:
        if self._order is None:
            self._order = np.argsort(self.scores(), kind="stable")  # ties: the smaller key
        res = self._res
        for key in self._order.tolist():
            if res[key] and key not in protected:
                return int(key)
        return None

    def model_params(self) -> dict[str, Any]:
        """The parameters of the score (for `describe`)."""
        return {f"w{i}": getattr(self, f"w{i}") for i in range(len(FEATURES))}

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            **self.model_params(),
            "rate_mid": self.rate_mid,
            "prior": self.prior,
            "alpha": self.alpha,
        }


# -- fitting the weights (mer tune) ----------------------------------------------------------


def token_picks(
    steps: np.ndarray, n_layers: int, n_experts: int, policy: str, pad: int = 0
) -> np.ndarray:
    """(tokens + pad, keys) bool: which keys each token picked, for fitting `policy`
    (whole tokens, steps in layer order, else BadInput); `pad` rows of False after."""
    n_steps, k = steps.shape
    L, E = n_layers, n_experts
    if n_steps % L:
        raise BadInput(f"fitting {policy!r} needs whole tokens: {n_steps} steps, {L} layers.")
    if (steps // E != (np.arange(n_steps) % L)[:, None]).any():
        raise BadInput(f"fitting {policy!r} needs steps in layer order (step t = layer t mod L).")
    picked = np.zeros((n_steps // L + pad, L * E), dtype=bool)
    for r in range(k):
        picked[np.arange(n_steps) // L, steps[:, r]] = True
    return picked


def sampled_steps(
    pol: Cotoken, steps: np.ndarray, n_layers: int, n_experts: int, stride: int
) -> Iterator[np.ndarray]:
    """Run `pol` over `steps` (one global partition); after the begin_step of every
    `stride`-th step from the second token on (the first: nothing learnt yet), yield
    each key's next-visit token (this token for a layer still to come, else the next)."""
    L, E = n_layers, n_experts
    pol.attach_keyspace(L * E)
    pol.attach_geometry(L, E)
    lay = np.arange(L * E) // E
    for t in range(len(steps)):
        pol.begin_step(t, steps[t].tolist())
        if t % stride or t < L:
            continue
        tau, c = divmod(t, L)
        yield np.where(lay > c, tau, tau + 1)


def training_rows(
    steps: np.ndarray, n_layers: int, n_experts: int, *, stride: int = FIT_STRIDE
) -> tuple[np.ndarray, np.ndarray]:
    """(X, y): the policy's own features at every `stride`-th step, for every key whose
    layer has a next visit in the trace, and whether that visit picks the key."""
    steps = np.asarray(steps, dtype=np.int64)
    L, E = n_layers, n_experts
    picked = token_picks(steps, L, E, "cotoken")
    T = len(picked)
    pol = Cotoken(1)
    Xs, ys = [], []
    for nxt in sampled_steps(pol, steps, L, E, stride):
        ok = nxt < T
        F, _ = pol.features()
        Xs.append(F[ok])
        ys.append(picked[nxt[ok], np.flatnonzero(ok)])
    if not Xs:
        return np.zeros((0, len(FEATURES))), np.zeros(0)
    return np.concatenate(Xs), np.concatenate(ys).astype(np.float64)


def fit_weights(
    data: Sequence[tuple[np.ndarray, int, int]], *, l2: float = 1e-3, iters: int = 50
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """Maximum-likelihood logistic weights (`mer.core.cycle.logistic_fit`), rounded
    to 4 decimals as stored, and fit diagnostics."""
    Xs, ys = zip(*(training_rows(s, n_l, n_e) for s, n_l, n_e in data), strict=True)
    X = np.concatenate(Xs)
    y = np.concatenate(ys)
    if not len(y):
        raise BadInput("fitting 'cotoken' needs traces with at least two tokens.")
    w, ll, ll0 = logistic_fit(X, y, l2=l2, iters=iters)
    n = len(y)
    return tuple(round(float(v), 4) for v in w), {
        "rows": int(n),
        "log_likelihood": ll,
        "log_likelihood_constant": ll0,
    }
