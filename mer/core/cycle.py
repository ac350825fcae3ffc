"""`cycle`: eviction by hit density over the layer cycle (an online policy).

Decoding walks the layers in a fixed cycle: step t is layer t mod L, so an
expert of layer l can be needed again only when layer l comes round, d steps
from now (1 <= d <= L), and then only if the router picks it. A slot given to
that expert buys one chance of a hit, with probability p, for d steps of
occupancy. The policy evicts the resident key with the lowest hit density,
measured as the odds of a pick per step of waiting: z - log d, with z the
log-odds of p. An unlikely expert of a layer that has just been visited goes
first, a likely one of the next layer last. (Belady's OPT evicts the farthest
next use; docs/policies.md shows the online stand-ins tried and why this one.)

p is the probability that the expert is among its layer's top-k at the layer's
next visit, estimated from the routing seen so far only (never the future):

    z = w0 + w1 log(ema_long + eps) + w2 log(ema_mid + eps)
        + w3 log(ema_short + eps) + w4 used_last + w5 log1p(gap)
        + w6 log(repeat + eps)

- ema_long / ema_mid / ema_short: exponential averages, per visit of the layer,
  of "the expert was picked" (rates 0.05, 0.2, 0.5): popularity at three time
  scales, because Mixtral's per-layer popularity drifts within a sequence.
- used_last: picked at its layer's latest visit; gap: visits of its layer since
  it was last picked (capped at 1000): token-to-token repetition and its decay.
- repeat: the layer's own token-to-token transitions, counted online: the mean
  over the experts a of the layer's latest visit of P(next visit picks e | a),
  with a prior of strength `prior` towards k / E. On real Mixtral routing this
  is the strongest single term.

The weights are fitted by maximum likelihood (`mer tune --policy cycle`,
`fit_weights`); the defaults were fitted on the bundled trace (TUNED_ON), on the
terms of DEFAULT_FEATURES (a weight of 0 switches a term off, at no cost). z
changes only when its layer is visited, so it is computed once per visit.

Duel (`duel` = 1; off by default): the policy can also replay two shadow
directories of its capacity (keys only, no data), one LRU and one this policy,
count their hits with an exponential decay (`duel_decay` per step) and, while
the shadow LRU leads, evict its least recently used key instead. On the real
traces the policy never trails LRU, so the duel only costs time there; it is a
guard for routing unlike Mixtral's. Shadows see every step but no prefetch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Container, Sequence
from typing import Any

import numpy as np

from mer.core.policies import _param
from mer.core.policy import EvictionPolicy, register_policy
from mer.errors import BadInput

#: The terms of p's logit, in weight order (w0 .. w6).
FEATURES = (
    "bias",
    "log_ema_long",
    "log_ema_mid",
    "log_ema_short",
    "used_last",
    "log1p_gap",
    "log_repeat",
)
#: The terms fitted by default: the others add under 0.002 of the gap closed on
#: held-out traces (docs/policies.md) and each costs a logarithm per expert visit.
DEFAULT_FEATURES = ("bias", "log_ema_mid", "used_last", "log_repeat")
EPS = 0.01
GAP_CAP = 1000
#: Fitted by `mer tune --policy cycle traces/data/mixtral-offloading-h39s.parquet`
#: (maximum likelihood over every layer visit of the bundled trace).
DEFAULT_WEIGHTS = (0.5475, 0.0, 0.0948, 0.0, 0.2109, 0.0, 1.1391)
TUNED_ON = ({"name": "mixtral-offloading-h39s.parquet", "routing_digest": "f89ee95c2c020bb3"},)


@register_policy
class Cycle(EvictionPolicy):
    """Evict the lowest hit density (log-odds z - log d) over the layer cycle (module doc)."""

    name = "cycle"
    #: Parameters `mer tune` fits (`fit`), and the traces the defaults were fitted on.
    tunable = tuple(f"w{i}" for i in range(len(FEATURES)))
    tuned_on = TUNED_ON

    @classmethod
    def fit(
        cls, data: Sequence[tuple[np.ndarray, int, int]], *, features: Sequence[str] = ()
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`mer tune`: maximum-likelihood weights over the traces' layer visits."""
        w, fitted = fit_weights(data, features=tuple(features) or DEFAULT_FEATURES)
        diag: dict[str, Any] = dict(fitted)
        diag["method"] = "maximum likelihood over layer visits, terms " + ", ".join(
            f for f, v in zip(FEATURES, w, strict=True) if v or f == "bias"
        )
        return {f"w{i}": v for i, v in enumerate(w)}, diag

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        for i, default in enumerate(DEFAULT_WEIGHTS):
            setattr(self, f"w{i}", _param(params, f"w{i}", default, float, self.name))
        self.rate_long = _param(params, "rate_long", 0.05, float, self.name)
        self.rate_mid = _param(params, "rate_mid", 0.2, float, self.name)
        self.rate_short = _param(params, "rate_short", 0.5, float, self.name)
        self.prior = _param(params, "prior", 2.0, float, self.name)
        self.duel = _param(params, "duel", 0, int, self.name)
        self.duel_decay = _param(params, "duel_decay", 0.995, float, self.name)
        super().__init__(capacity, **params)
        for nm in ("rate_long", "rate_mid", "rate_short"):
            if not 0.0 < getattr(self, nm) <= 1.0:
                raise BadInput(f"policy 'cycle': {nm} must be in (0, 1], got {getattr(self, nm)}.")
        if self.prior <= 0:
            raise BadInput(f"policy 'cycle': prior must be > 0, got {self.prior}.")
        if self.duel not in (0, 1):
            raise BadInput(f"policy 'cycle': duel must be 0 or 1, got {self.duel}.")
        if not 0.0 < self.duel_decay <= 1.0:
            raise BadInput(f"policy 'cycle': duel_decay must be in (0, 1], got {self.duel_decay}.")
        self.n_layers = 0
        self.n_experts = 0
        self._k = 0

    # -- geometry and state --------------------------------------------------------------
    def attach_keyspace(self, n_keys: int) -> None:
        if not self.n_experts:  # until the geometry is known: one layer of n_keys experts
            self.attach_geometry(1, n_keys)

    def attach_geometry(self, n_layers: int, n_experts: int) -> None:
        self.n_layers = n_layers
        self.n_experts = n_experts
        nk = n_layers * n_experts
        self._k = 0  # top-k: known at the first step; the state starts there
        self._w = self.weights()
        self._visits = [0] * n_layers
        self._latest: list[list[int]] = [[] for _ in range(n_layers)]
        self._rep = [0] * (n_layers * n_experts * n_experts)
        self._rcount = [0] * nk
        self._last = [-1] * nk
        self._ema_l = [0.0] * nk
        self._ema_m = [0.0] * nk
        self._ema_s = [0.0] * nk
        self._z = [0.0] * nk
        self._res = [False] * nk
        self._order: OrderedDict[int, None] = OrderedDict()  # real residents, LRU first
        self._cur = 0
        self._logd = [0.0] + [math.log(d) for d in range(1, n_layers + 1)]
        self._lru_mode = False
        self._sh_lru: OrderedDict[int, None] = OrderedDict()
        self._sh_res = [False] * nk
        self._sh_n = 0
        self._hl = 0.0
        self._hc = 0.0

    def _start(self, k: int) -> None:
        """First step: everything starts at the uninformed rate k / E."""
        self._k = k
        base = k / self.n_experts
        nk = len(self._z)
        self._ema_l = [base] * nk
        self._ema_m = [base] * nk
        self._ema_s = [base] * nk
        z0 = self._logodds(base, base, base, 0.0, GAP_CAP, base)
        self._z = [z0] * nk

    def weights(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, f"w{i}")) for i in range(len(FEATURES)))

    def _logodds(self, el: float, em: float, es: float, used: float, gap: int, rep: float) -> float:
        # Terms with weight 0 are skipped (exactly: they would add 0.0), so a model
        # fitted on fewer features costs fewer logarithms.
        w = self._w
        z = w[0]
        if w[1]:
            z += w[1] * math.log(el + EPS)
        if w[2]:
            z += w[2] * math.log(em + EPS)
        if w[3]:
            z += w[3] * math.log(es + EPS)
        if w[4]:
            z += w[4] * used
        if w[5]:
            z += w[5] * math.log1p(gap)
        if w[6]:
            z += w[6] * math.log(rep + EPS)
        return z  # the log-odds of a pick: the victim rule needs no sigmoid

    # -- hooks ---------------------------------------------------------------------------
    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        if not self.n_experts:
            raise BadInput("policy 'cycle' needs the model geometry (attach_geometry).")
        if not self._k:
            self._start(len(keys))
        E = self.n_experts
        layer = keys[0] // E
        base = layer * E
        loc = [key - base for key in keys]
        rep, rcount = self._rep, self._rcount
        for a in self._latest[layer]:
            rcount[base + a] += 1
            row = (base + a) * E
            for b in loc:
                rep[row + b] += 1
        self._latest[layer] = loc
        self._visits[layer] += 1
        v = self._visits[layer]
        rl, rm, rs = self.rate_long, self.rate_mid, self.rate_short
        el, em, es, last = self._ema_l, self._ema_m, self._ema_s, self._last
        for e in range(E):
            key = base + e
            x = 1.0 if e in loc else 0.0
            el[key] = (1.0 - rl) * el[key] + rl * x
            em[key] = (1.0 - rm) * em[key] + rm * x
            es[key] = (1.0 - rs) * es[key] + rs * x
            if x:
                last[key] = v
        prior = self.prior
        pk = prior * (self._k / E)
        n_loc = len(loc)
        inv = [1.0 / (rcount[base + a] + prior) for a in loc]
        for e in range(E):
            key = base + e
            r = 0.0
            for a, ia in zip(loc, inv, strict=True):
                r += (rep[(base + a) * E + e] + pk) * ia
            r /= n_loc
            gap = v - last[key] if last[key] >= 0 else GAP_CAP
            if gap > GAP_CAP:
                gap = GAP_CAP
            used = 1.0 if gap == 0 else 0.0
            self._z[key] = self._logodds(el[key], em[key], es[key], used, gap, r)
        self._cur = layer
        if self.duel:
            self._duel_step(keys)

    def end_step(self, t: int, keys: Sequence[int]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                order.move_to_end(key)

    def on_insert(self, key: int) -> None:
        self._res[key] = True
        self._order[key] = None

    def on_remove(self, key: int) -> None:
        self._res[key] = False
        del self._order[key]

    def victim(self, protected: Container[int]) -> int | None:
        if self._lru_mode:
            for key in self._order:
                if key not in protected:
                    return key
            return None
        return self._best(self._res, protected)

    # -- the hit-density rule --------------------------------------------------------------
    def _best(self, res: list[bool], protected: Container[int]) -> int | None:
        """Per layer the resident unprotected key with the lowest log-odds z (ties: the
        smaller key), then across layers the lowest z - log d (ties: the lower layer)."""
        E, L, z = self.n_experts, self.n_layers, self._z
        cur = self._cur
        best = -1
        best_v = 0.0
        for layer in range(L):
            base = layer * E
            cand = -1
            cp = 0.0
            for key in range(base, base + E):
                if res[key] and key not in protected and (cand < 0 or z[key] < cp):
                    cand, cp = key, z[key]
            if cand < 0:
                continue
            d = (layer - cur - 1) % L + 1
            val = cp - self._logd[d]
            if best < 0 or val < best_v:
                best, best_v = cand, val
        return best if best >= 0 else None

    def _duel_step(self, keys: Sequence[int]) -> None:
        """Replay the step on the two shadow directories, then pick this step's rule."""
        cap = self.capacity
        step = set(keys)
        sh = self._sh_lru
        hits_l = 0
        for key in keys:
            if key in sh:
                hits_l += 1
        for key in keys:
            if key in sh:
                continue
            if len(sh) >= cap:
                v = next((x for x in sh if x not in step), None)
                if v is None:
                    continue
                del sh[v]
            sh[key] = None
        for key in reversed(keys):
            if key in sh:
                sh.move_to_end(key)
        res = self._sh_res
        hits_c = 0
        for key in keys:
            if res[key]:
                hits_c += 1
        for key in keys:
            if res[key]:
                continue
            if self._sh_n >= cap:
                v2 = self._best(res, step)
                if v2 is None:
                    continue
                res[v2] = False
                self._sh_n -= 1
            res[key] = True
            self._sh_n += 1
        dec = self.duel_decay
        self._hl = dec * self._hl + hits_l
        self._hc = dec * self._hc + hits_c
        self._lru_mode = self._hl > self._hc

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            **{f"w{i}": getattr(self, f"w{i}") for i in range(len(FEATURES))},
            "rate_long": self.rate_long,
            "rate_mid": self.rate_mid,
            "rate_short": self.rate_short,
            "prior": self.prior,
            "duel": self.duel,
            "duel_decay": self.duel_decay,
        }


# -- fitting the weights (mer tune) ----------------------------------------------------------


def visit_features(
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    *,
    rate_long: float = 0.05,
    rate_mid: float = 0.2,
    rate_short: float = 0.5,
    prior: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The policy's features at every layer visit, and whether the expert is picked at
    that layer's next visit: (X (n, len(FEATURES)), y (n,)) over every (visit, expert)
    that has a next visit. Computed as the policy computes them (same recurrences)."""
    steps = np.asarray(steps, dtype=np.int64)
    n_steps, k = steps.shape
    L, E = n_layers, n_experts
    if n_steps % L:
        raise BadInput(f"fitting 'cycle' needs whole tokens: {n_steps} steps, {L} layers.")
    T = n_steps // L
    loc = (steps - (np.arange(n_steps) % L)[:, None] * E).reshape(T, L, k)
    if loc.min() < 0 or loc.max() >= E:
        raise BadInput("fitting 'cycle' needs steps in layer order (step t = layer t mod L).")
    ind = np.zeros((T, L, E))
    for r in range(k):
        np.put_along_axis(ind, loc[:, :, r : r + 1], 1.0, axis=2)
    base = k / E
    el = np.full((L, E), base)
    em = np.full((L, E), base)
    es = np.full((L, E), base)
    last = np.full((L, E), -1)
    rep = np.zeros((L, E, E))
    rcount = np.zeros((L, E))
    feats = np.zeros((T, L, E, len(FEATURES)))
    pk = prior * base
    for tau in range(T):
        x = ind[tau]
        if tau > 0:
            prev = ind[tau - 1]
            rcount += prev
            rep += prev[:, :, None] * x[:, None, :]
        el = (1.0 - rate_long) * el + rate_long * x
        em = (1.0 - rate_mid) * em + rate_mid * x
        es = (1.0 - rate_short) * es + rate_short * x
        last = np.where(x > 0, tau + 1, last)
        r = ((rep + pk) / (rcount[:, :, None] + prior) * x[:, :, None]).sum(1) / k
        gap = np.where(last >= 0, np.minimum(tau + 1 - last, GAP_CAP), GAP_CAP)
        f = feats[tau]
        f[..., 0] = 1.0
        f[..., 1] = np.log(el + EPS)
        f[..., 2] = np.log(em + EPS)
        f[..., 3] = np.log(es + EPS)
        f[..., 4] = gap == 0
        f[..., 5] = np.log1p(gap)
        f[..., 6] = np.log(r + EPS)
    X = feats[:-1].reshape(-1, len(FEATURES))
    y = ind[1:].reshape(-1)
    return X, y


def fit_weights(
    data: Sequence[tuple[np.ndarray, int, int]],
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    l2: float = 1e-3,
    iters: int = 50,
) -> tuple[tuple[float, ...], dict[str, float]]:
    """Maximum-likelihood logistic weights over the visits of several traces.

    data: (steps, n_layers, n_experts) per trace; `features`: the terms to fit
    (the others get weight 0, which the policy skips). Newton's method with a
    small L2 term (the problem is convex, so the result does not depend on a start
    point). Returns all weights w0..w6 (rounded to 4 decimals, as stored) and fit
    diagnostics.
    """
    unknown = [f for f in features if f not in FEATURES]
    if unknown or "bias" not in features:
        raise BadInput(
            f"'cycle' features must include bias and come from {', '.join(FEATURES)}; "
            f"got {', '.join(features)}."
        )
    cols = [FEATURES.index(f) for f in FEATURES if f in features]
    Xs, ys = zip(*(visit_features(s, n_l, n_e) for s, n_l, n_e in data), strict=True)
    X = np.concatenate(Xs)[:, cols]
    y = np.concatenate(ys)
    if not len(y):
        raise BadInput("fitting 'cycle' needs traces with at least two tokens.")
    w, ll, ll0 = logistic_fit(X, y, l2=l2, iters=iters)
    n = len(y)
    full = [0.0] * len(FEATURES)
    for c, v in zip(cols, w, strict=True):
        full[c] = round(float(v), 4)
    return tuple(full), {
        "visits": int(n),
        "log_likelihood": ll,
        "log_likelihood_constant": ll0,
    }


def logistic_fit(
    X: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iters: int = 50
) -> tuple[np.ndarray, float, float]:
    """Logistic regression by Newton's method with a small L2 term (convex: no start
    point matters). Returns the weights, the mean log-likelihood, and that of the
    best constant (the base rate), for the fit diagnostics of `mer tune`."""
    w = np.zeros(X.shape[1])
    n = len(y)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        g = X.T @ (p - y) / n + l2 * w
        h = (X * (p * (1 - p))[:, None]).T @ X / n + l2 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    p = np.clip(1.0 / (1.0 + np.exp(-(X @ w))), 1e-12, 1 - 1e-12)
    ll = float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    base = float(y.mean())
    ll0 = float(base * math.log(base) + (1 - base) * math.log(1 - base)) if 0 < base < 1 else 0.0
    return w, ll, ll0
