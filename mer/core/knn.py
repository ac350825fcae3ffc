"""`knn`: cotoken's model plus the text repeating itself, scored over three visits.

Generated text repeats itself (code, numbers, phrases). A token whose routing so
far repeats a past token's is likely the same text, and what followed that token
then tends to follow again. `cotoken` cannot see this: its evidence is counts of
pairs and transitions, which forget *which* token came after which. This policy
keeps the routing of every token seen so far and lets the past tokens vote.

The vote (online, past only). At step (token tau, layer c) the similarity of a
past token sigma < tau is the number of picks it shares with the current token
over the layers routed so far (0..c). The vote for key (l, e) a visits ahead is
the softmax(beta * similarity)-weighted share of the successors sigma + a that
picked it:

- a layer already routed in this token (l <= c): its a-th visit from now is
  token tau + a, so the successor is sigma + a, usable once routed
  (sigma + a <= tau; for sigma + a = tau the current token's own pick at l);
- a layer still to come (l > c): its next visit is this token (no vote: cotoken
  alone), its (a + 1)-th is token tau + a, the successor sigma + a, usable once
  the whole token is routed (sigma + a < tau).

No usable successor: the uninformed share k / E. `window` > 0 lets only the last
`window` tokens vote, bounding the cost (O(tokens x keys) per victim search).

The score. For each of the next `visits` (<= 3) visits j of a key's layer, a
logistic model of "picked there": z_j = w_j . [cotoken's nine features, then
log(vote_j + 0.02) for a routed layer (else 0), then, for j >= 2, log(vote_{j-1}
+ 0.02) for a layer still to come (else 0)], the vote a = j ahead for a routed
layer and a = j - 1 for one still to come. The victim is the resident key with
the lowest hit density summed over those visits,

    log( sum_{i=1..visits} sigmoid(z_i) / (d + (i - 1) L) ),

d the steps until its layer's next visit (1 <= d <= L), ties to the smaller key.
The first visit alone (visits=1) is cotoken's z - log d with the vote added. The
visits after the next are where the vote pays: text that repeats itself repeats
for several tokens, and a large cache holds a key through more than one visit.

Measured held out (docs/policies.md): +2.1 to +5.1 points of the LRU->OPT gap
over cotoken at 96-192 slots, global scope. A partition that sees one layer only
(scope `per-layer`) has no token to match: the vote stays at its prior there.

The 32 weights (w1_0..w1_9, w2_0..w2_10, w3_0..w3_10) are fitted by maximum
likelihood over (step, key) pairs of the tuning traces, one logistic fit per
visit (`mer tune --policy knn`, `fit`), on features computed by this very
class. The defaults were fitted on the bundled trace. Never the future: each
step's keys arrive at `begin_step`, as an engine sees the router's output
(tests/test_core_no_future.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from mer.core.cotoken import FEATURES as COTOKEN_FEATURES
from mer.core.cotoken import Cotoken, sampled_steps, token_picks
from mer.core.cycle import TUNED_ON, logistic_fit
from mer.core.policies import _param
from mer.core.policy import register_policy
from mer.errors import BadInput

#: Added to a vote before its logarithm (a vote of 0 is a weak "no", not a sure one).
VOTE_EPS = 0.02
#: The visits ahead the weights cover.
MAX_VISITS = 3
#: Weights per visit: cotoken's nine, the routed layers' vote, then (j >= 2) the
#: vote of the layers still to come.
N_WEIGHTS = tuple(len(COTOKEN_FEATURES) + (1 if j == 1 else 2) for j in range(1, MAX_VISITS + 1))
WEIGHT_NAMES = tuple(f"w{j}_{i}" for j in range(1, MAX_VISITS + 1) for i in range(N_WEIGHTS[j - 1]))
#: Fitted by `mer tune --policy knn traces/data/mixtral-offloading-h39s.parquet
#: --phase decode` (the bundled trace is all decode).
DEFAULT_WEIGHTS: dict[str, float] = {
    "w1_0": 0.5246,
    "w1_1": 0.0836,
    "w1_2": 0.1657,
    "w1_3": 1.1253,
    "w1_4": 0.0575,
    "w1_5": 0.1591,
    "w1_6": 0.2609,
    "w1_7": 0.1712,
    "w1_8": 0.2102,
    "w1_9": 0.3842,
    "w2_0": 0.1501,
    "w2_1": 0.1017,
    "w2_2": 0.0784,
    "w2_3": 0.1612,
    "w2_4": -0.0023,
    "w2_5": 0.1353,
    "w2_6": 0.0527,
    "w2_7": 0.3568,
    "w2_8": 0.0453,
    "w2_9": 0.2203,
    "w2_10": 0.6175,
    "w3_0": -0.1612,
    "w3_1": 0.1124,
    "w3_2": 0.0446,
    "w3_3": 0.3063,
    "w3_4": -0.1254,
    "w3_5": 0.1229,
    "w3_6": 0.0117,
    "w3_7": 0.4159,
    "w3_8": 0.0128,
    "w3_9": 0.1138,
    "w3_10": 0.2348,
}
FIT_STRIDE = 5


@register_policy
class Knn(Cotoken):
    """Hit density over the next three visits, from cotoken's terms and the votes of
    past tokens that routed like this one (module doc)."""

    name = "knn"
    # Every past token votes, so its cost per step grows with the trace: even compiled
    # (about 0.01x libCacheSim's LRU) it made the bundled trace's default curves 6.3 s
    # instead of under 4, so it is drawn only when named (--policies, --tuned).
    in_default_curves = False
    compiled_in_default_curves = False
    tunable = WEIGHT_NAMES
    tuned_on = TUNED_ON

    #: The weight of the previous token's match in the similarity (`knnctx`); `knn`
    #: has none and takes no `context` parameter.
    default_context: ClassVar[float] = 0.0
    default_weights: ClassVar[dict[str, float]] = DEFAULT_WEIGHTS

    @classmethod
    def fit(
        cls, data: Sequence[tuple[np.ndarray, int, int]], **options: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`mer tune`: one maximum-likelihood logistic fit per visit ahead."""
        opts = dict(options)
        beta = float(opts.pop("beta", 0.5))
        window = int(opts.pop("window", 0))
        context = float(opts.pop("context", cls.default_context)) if cls.default_context else 0.0
        if opts:
            names = "beta, window and context" if cls.default_context else "beta and window"
            raise BadInput(
                f"policy {cls.name!r} takes tuning options {names} only ({', '.join(opts)})."
            )
        params, diag = fit_weights(data, beta=beta, window=window, context=context)
        if beta != 0.5:
            params["beta"] = beta
        if window:
            params["window"] = window
        if context != cls.default_context:
            params["context"] = context
        ctx = f", context {context}" if cls.default_context else ""
        diag["method"] = (
            "maximum likelihood over (step, key) pairs, one logistic fit per visit ahead "
            f"(cotoken's terms and the kNN votes, beta {beta}, window {window or 'all'}{ctx})"
        )
        return params, diag

    def __init__(self, capacity: int, **params: Any) -> None:
        params = dict(params)
        stray = [p for p in params if re.fullmatch(r"w\d+", p)]
        if stray:
            raise BadInput(
                f"policy {self.name!r} takes weights w1_0..w{MAX_VISITS}_10, "
                f"not {', '.join(stray)}."
            )
        self.weights = {
            n: _param(params, n, self.default_weights[n], float, self.name) for n in WEIGHT_NAMES
        }
        self.beta = _param(params, "beta", 0.5, float, self.name)
        self.window = _param(params, "window", 0, int, self.name)
        self.visits = _param(params, "visits", MAX_VISITS, int, self.name)
        self.context = 0.0
        if self.default_context:
            self.context = _param(params, "context", self.default_context, float, self.name)
        super().__init__(capacity, **params)
        if not 1 <= self.visits <= MAX_VISITS:
            raise BadInput(
                f"policy {self.name!r}: visits must be 1..{MAX_VISITS}, got {self.visits}."
            )
        if self.window < 0:
            raise BadInput(
                f"policy {self.name!r}: window must be >= 0 (0: all), got {self.window}."
            )
        for what in ("beta", "context"):
            if not math.isfinite(getattr(self, what)):
                raise BadInput(
                    f"policy {self.name!r}: {what} must be finite, got {getattr(self, what)}."
                )

    def attach_geometry(self, n_layers: int, n_experts: int) -> None:
        super().attach_geometry(n_layers, n_experts)
        nk = n_layers * n_experts
        self._wv = [
            np.array([self.weights[f"w{j}_{i}"] for i in range(N_WEIGHTS[j - 1])])
            for j in range(1, MAX_VISITS + 1)
        ]
        self._hist = np.zeros((64, nk))  # row sigma: token sigma's picks so far
        self._shared = np.zeros(64)  # picks each past token shares with this one
        self._prev = np.zeros(64)  # picks token sigma - 1 shares with the previous token
        self._kt = -1  # this token's index
        self._kcur = -1  # the layer of the latest step

    # -- state ---------------------------------------------------------------------------
    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        if self.n_experts and self._keyspace > self.n_experts and self.n_layers > 1:
            layer = int(keys[0]) // self.n_experts
            if self._kt < 0 or layer < self._kcur:
                self._new_token()
            self._kcur = layer
            tau = self._kt
            row = self._hist[tau]
            for key in keys:
                key = int(key)
                if not row[key]:
                    row[key] = 1.0
                    self._shared[:tau] += self._hist[:tau, key]
        super().begin_step(t, keys)

    def _new_token(self) -> None:
        self._kt += 1
        tau = self._kt
        if tau >= len(self._hist):
            grow = len(self._hist)
            self._hist = np.concatenate([self._hist, np.zeros((grow, self._hist.shape[1]))])
            self._shared = np.concatenate([self._shared, np.zeros(grow)])
            self._prev = np.concatenate([self._prev, np.zeros(grow)])
        self._shared[:tau] = 0.0
        if self.context and tau >= 2:
            self._prev[1:tau] = self._hist[: tau - 1] @ self._hist[tau - 1]

    def _vote(self, a: int, routed: bool) -> np.ndarray | None:
        """The vote of every key for the successors sigma + a (module doc), or None when
        no past token has a usable successor (then the prior k / E)."""
        tau = self._kt
        lo = max(0, tau - self.window) if self.window else 0
        hi = tau - a if routed else tau - a - 1  # the last usable sigma
        if hi < lo:
            return None
        s = self._shared[lo : hi + 1]
        if self.context:
            s = s + self.context * self._prev[lo : hi + 1]
        s = self.beta * s
        w = np.exp(s - s.max())
        w /= w.sum()
        return np.asarray(w @ self._hist[lo + a : hi + a + 1])

    def visit_features(self) -> tuple[list[np.ndarray], np.ndarray]:
        """([X_1 .. X_visits], d): each key's terms for its layer's j-th visit from now
        (cotoken's nine, then the votes), after the current step's `begin_step`."""
        F, d = self.features()
        routed = self._layer_of <= self._cur
        prior = math.log(self._k / self.n_experts + VOTE_EPS)
        knn_on = self._kt >= 0

        def logvote(a: int, is_routed: bool) -> np.ndarray:
            v = self._vote(a, is_routed) if knn_on else None
            return np.full(len(d), prior) if v is None else np.log(v + VOTE_EPS)

        out = []
        for j in range(1, self.visits + 1):
            cols = [F, np.where(routed, logvote(j, True), 0.0)[:, None]]
            if j > 1:
                cols.append(np.where(routed, 0.0, logvote(j - 1, False))[:, None])
            out.append(np.concatenate(cols, axis=1))
        return out, d

    def scores(self) -> np.ndarray:
        """Every key's log hit density over the next `visits` visits (module doc)."""
        X, d = self.visit_features()
        L = self.n_layers
        dens = np.zeros(len(d))
        for i, x in enumerate(X):
            dens += 1.0 / (1.0 + np.exp(-(x @ self._wv[i]))) / (d + i * L)
        return np.asarray(np.log(dens))

    def model_params(self) -> dict[str, Any]:
        out = {**self.weights, "beta": self.beta, "window": self.window, "visits": self.visits}
        if self.context:
            out["context"] = self.context
        return out


#: `knnctx`'s weights, fitted like knn's (`mer tune --policy knnctx
#: traces/data/mixtral-offloading-h39s.parquet --phase decode`).
CONTEXT_WEIGHTS: dict[str, float] = {
    "w1_0": 0.5246,
    "w1_1": 0.0836,
    "w1_2": 0.1657,
    "w1_3": 1.1253,
    "w1_4": 0.0341,
    "w1_5": 0.1649,
    "w1_6": 0.2453,
    "w1_7": 0.2232,
    "w1_8": 0.2367,
    "w1_9": 0.2657,
    "w2_0": 0.032,
    "w2_1": 0.124,
    "w2_2": 0.0444,
    "w2_3": 0.2592,
    "w2_4": -0.005,
    "w2_5": 0.1391,
    "w2_6": 0.0497,
    "w2_7": 0.3915,
    "w2_8": 0.0452,
    "w2_9": 0.1589,
    "w2_10": 0.3369,
    "w3_0": -0.1927,
    "w3_1": 0.1206,
    "w3_2": 0.0338,
    "w3_3": 0.3459,
    "w3_4": -0.1263,
    "w3_5": 0.125,
    "w3_6": 0.0095,
    "w3_7": 0.434,
    "w3_8": 0.0132,
    "w3_9": 0.0818,
    "w3_10": 0.1351,
}


@register_policy
class KnnCtx(Knn):
    """knn whose past tokens match on the previous token too: the similarity of sigma
    is the picks it shares with this token over the layers routed so far plus
    `context` x the picks sigma - 1 shares with the previous token (whole tokens).

    Why: text that repeats itself repeats in runs. A past token whose predecessor
    also routed like this token's predecessor is more likely the same text than one
    matching this token alone, and early in a token (few layers routed) this token's
    own evidence is thin. Measured held out in docs/policies.md (the knn section)."""

    name = "knnctx"
    default_context = 0.5
    default_weights = CONTEXT_WEIGHTS


# -- fitting the weights (mer tune) ----------------------------------------------------------


def training_rows(
    steps: np.ndarray,
    n_layers: int,
    n_experts: int,
    *,
    stride: int = FIT_STRIDE,
    beta: float = 0.5,
    window: int = 0,
    context: float = 0.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per visit j ahead, (X, y): the policy's own terms at every `stride`-th step (from
    the second token on), for every key whose layer's j-th visit is in the trace, and
    whether that visit picks the key."""
    steps = np.asarray(steps, dtype=np.int64)
    L, E = n_layers, n_experts
    picked = token_picks(steps, L, E, "knn", pad=MAX_VISITS)
    T = len(picked) - MAX_VISITS
    pol = (
        KnnCtx(1, beta=beta, window=window, context=context)
        if context
        else Knn(1, beta=beta, window=window)
    )
    cols = np.arange(L * E)
    rows: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(MAX_VISITS)]
    for nxt in sampled_steps(pol, steps, L, E, stride):
        X, _ = pol.visit_features()
        for j in range(MAX_VISITS):
            at = nxt + j
            ok = at < T
            rows[j][0].append(X[j][ok])
            rows[j][1].append(picked[at[ok], cols[ok]])
    out = []
    for j, (xs, ys) in enumerate(rows):
        if not xs:
            out.append((np.zeros((0, N_WEIGHTS[j])), np.zeros(0)))
        else:
            out.append((np.concatenate(xs), np.concatenate(ys).astype(np.float64)))
    return out


def fit_weights(
    data: Sequence[tuple[np.ndarray, int, int]],
    *,
    beta: float = 0.5,
    window: int = 0,
    context: float = 0.0,
    l2: float = 1e-3,
    iters: int = 50,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Maximum-likelihood logistic weights per visit (`mer.core.cycle.logistic_fit`),
    rounded to 4 decimals as stored, and fit diagnostics."""
    per_trace = [
        training_rows(s, n_l, n_e, beta=beta, window=window, context=context)
        for s, n_l, n_e in data
    ]
    params: dict[str, Any] = {}
    diag: dict[str, Any] = {}
    for j in range(MAX_VISITS):
        X = np.concatenate([r[j][0] for r in per_trace])
        y = np.concatenate([r[j][1] for r in per_trace])
        if not len(y):
            raise BadInput("fitting 'knn' needs traces with at least two tokens.")
        w, ll, ll0 = logistic_fit(X, y, l2=l2, iters=iters)
        for i, v in enumerate(w):
            params[f"w{j + 1}_{i}"] = round(float(v), 4)
        diag[f"visit{j + 1}"] = {
            "rows": len(y),
            "log_likelihood": ll,
            "log_likelihood_constant": ll0,
        }
    return params, diag
