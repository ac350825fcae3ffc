"""`cooccur`: which experts the coming layers will pick, from the whole token so far.

Mixtral's routers are correlated across layers within a token far beyond the
next layer: on the real traces the mutual information between layer a's and
layer a+8's choices is still a third to a half of that between a and a+1, so a
first-order chain (`markov`) forgets most of what the token has already said.
This predictor keeps, online, how often every pair of experts is picked in the
same token (any two layers) and in consecutive tokens (any two layers), and
scores each expert of a coming layer by naive Bayes over everything seen so
far: the layers of the current token already routed, and the previous token.

    z(y) = logit(prior y) + beta * sum over seen layers j of log LR_j(y)
                          + beta_prev * sum over the previous token's layers of log LR'(y)

LR is the likelihood ratio of layer j's observed state (each of its experts
picked or not) given y picked vs not, with add-`alpha` smoothing. `near` > 0
weighs the token's own layers by their distance d to y's layer, beta + near *
near_decay^(d - 1) instead of beta: the routers' mutual information falls with
distance, so the layers just routed say more than those far behind. Naive Bayes
counts correlated evidence many times over, so z ranks well but its sigmoid is
no probability. p is therefore calibrated online: every prediction's z falls
in a bin (of sign(z) log1p|z|, width 0.1), and once the step it was about has been routed the bin
counts whether it was right; p = (right + 2 sigmoid(z)) / (made + 2), from
past predictions only. So `--prefetch-min-prob` means what it says.

`warm` (comma-separated trace files of the same model) counts other traces'
tokens first: the cross-layer structure is the model's, and carries over from
prompt to prompt where per-layer popularity does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.core.predictor import Prediction, Predictor, ReplayContext, _horizon, register_predictor
from mer.errors import BadInput

#: Calibration bins on sign(z) log1p(|z|) (naive Bayes z spans hundreds): width 0.1.
Z_LO, Z_HI, BIN = -6.0, 6.0, 0.1
N_BINS = round((Z_HI - Z_LO) / BIN)


@register_predictor
class CooccurPredictor(Predictor):
    """Naive Bayes over the token's routed layers and the previous token (module doc)."""

    name = "cooccur"

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        params = dict(params)
        self.beta = float(params.pop("beta", 0.3))
        self.beta_prev = float(params.pop("beta_prev", 0.3))
        self.alpha = float(params.pop("alpha", 0.5))
        self.near = float(params.pop("near", 0.0))
        self.near_decay = float(params.pop("near_decay", 0.5))
        warm = params.pop("warm", None)
        super().__init__(ctx, **params)
        if self.alpha <= 0:
            raise BadInput(f"predictor 'cooccur': alpha must be > 0, got {self.alpha}.")
        if self.near < 0 or not 0 <= self.near_decay <= 1:
            raise BadInput(
                f"predictor 'cooccur': near must be >= 0 and near_decay from 0 to 1, got "
                f"{self.near} and {self.near_decay}."
            )
        nk = ctx.n_layers * ctx.n_experts
        self.nk = nk
        self.C = np.zeros((nk, nk))  # same token: both picked
        self.P = np.zeros((nk, nk))  # previous token x, this token y
        self.n = np.zeros(nk)  # tokens that picked x
        self.n_prev = np.zeros(nk)  # tokens (with a successor) that picked x
        self.n_next = np.zeros(nk)  # tokens (with a predecessor) that picked y
        self.T = 0.0
        self.Tp = 0.0
        self._cur = np.zeros(nk)  # this token's indicator so far
        self._prev: np.ndarray | None = None
        self._layer = -1
        self._ev = np.zeros(nk)  # evidence from this token's layers so far
        L = ctx.n_layers
        self._ev_layer = np.zeros((L, nk))  # ... layer by layer (for `near`)
        d = np.arange(L)[:, None] - np.arange(L)[None, :]  # target layer - routed layer
        self._near_w = np.where(d > 0, self.near * self.near_decay ** np.maximum(d - 1, 0), 0.0)
        self._ev_prev = np.zeros(nk)  # evidence from the previous token
        self._ev_next = np.zeros(nk)  # this token's layers so far, as the next one's past
        # online calibration: bins of z -> (predictions made, right), per "same token" flag
        self._made = np.zeros((2, N_BINS))
        self._right = np.zeros((2, N_BINS))
        self._pending: dict[int, list[tuple[int, int, int]]] = {}  # step -> (key, same, bin)
        self._tables()
        if warm:
            for path in str(warm).split(","):
                self._warm(path.strip())
            self._tables()

    # -- counts --------------------------------------------------------------------------
    def _add_token(self, x: np.ndarray, prev: np.ndarray | None) -> None:
        self.C += np.outer(x, x)
        self.n += x
        self.T += 1
        if prev is not None:
            self.P += np.outer(prev, x)
            self.n_prev += prev
            self.n_next += x
            self.Tp += 1

    def _warm(self, path: str) -> None:
        from mer.traces.format import read_trace

        tr = read_trace(path)
        ctx = self.ctx
        if (tr.n_layers, tr.n_experts, tr.top_k) != (ctx.n_layers, ctx.n_experts, ctx.top_k):
            raise BadInput(
                f"predictor 'cooccur': warm trace {path} is {tr.n_layers}x{tr.n_experts} top-"
                f"{tr.top_k}, the replayed one {ctx.n_layers}x{ctx.n_experts} top-{ctx.top_k}; "
                "warm from traces of the same model."
            )
        keys = tr.keys().reshape(tr.n_tokens, -1)
        prev = None
        for row in keys:
            x = np.zeros(self.nk)
            x[row] = 1.0
            self._add_token(x, prev)
            prev = x

    def _tables(self) -> None:
        """Log likelihood ratios of x's state for y, from the counts (once per token)."""
        a = self.alpha
        n, T = self.n, self.T
        p1 = (self.C + a) / (n[None, :] + 2 * a)  # P(x picked | y picked)   [x, y]
        p0 = (n[:, None] - self.C + a) / (T - n[None, :] + 2 * a)  # P(x picked | y not)
        self.W1 = np.log(p1) - np.log(p0)
        self.W0 = np.log1p(-p1) - np.log1p(-p0)
        q1 = (self.P + a) / (self.n_next[None, :] + 2 * a)
        q0 = (self.n_prev[:, None] - self.P + a) / (self.Tp - self.n_next[None, :] + 2 * a)
        self.V1 = np.log(q1) - np.log(q0)
        self.V0 = np.log1p(-q1) - np.log1p(-q0)
        prior = (n + a) / (T + 2 * a)
        self.logit_prior = np.log(prior) - np.log1p(-prior)

    # -- the predictor -------------------------------------------------------------------
    def observe(self, t: int, keys: np.ndarray) -> None:
        ctx = self.ctx
        L, E = ctx.n_layers, ctx.n_experts
        made = self._pending.pop(t, None)
        if made:
            truth = set(int(k) for k in keys)
            for key, same, b in made:
                self._made[same, b] += 1
                self._right[same, b] += key in truth
        layer = t % L
        if layer == 0 and self._layer >= 0:  # a new token: count the finished one
            x = self._cur
            self._add_token(x, self._prev)
            self._tables()
            self._prev = x
            self._cur = np.zeros(self.nk)
            self._ev = np.zeros(self.nk)
            self._ev_layer[:] = 0.0
            # the previous token's evidence, with the tables that now include it
            self._ev_prev = x @ self.V1 + (1.0 - x) @ self.V0
            self._ev_next = np.zeros(self.nk)
        self._layer = layer
        block = slice(layer * E, (layer + 1) * E)
        self._cur[np.asarray(keys, dtype=np.int64)] = 1.0
        xs = self._cur[block]
        ev = xs @ self.W1[block] + (1.0 - xs) @ self.W0[block]
        self._ev += ev
        if self.near:
            self._ev_layer[layer] = ev
        self._ev_next += xs @ self.V1[block] + (1.0 - xs) @ self.V0[block]

    def predict(self, t: int, depth: int) -> list[Prediction]:
        ctx = self.ctx
        L, E = ctx.n_layers, ctx.n_experts
        us = _horizon(ctx, t, depth)
        if self._layer < 0 or not us:
            return [[] for _ in us]
        # Every step of the horizon at once (one array op each instead of one per step:
        # the engine calls this every step); the same element-wise arithmetic as log_odds.
        u = np.asarray(us, dtype=np.int64)
        same = (u // L == t // L).astype(np.int64)
        idx = ((u % L) * E)[:, None] + np.arange(E)[None, :]
        within = self.beta_prev * self._ev_prev[idx] + self.beta * self._ev[idx]
        if self.near:
            # sum over routed layers j of near_w[target layer, j] * ev_layer[j, idx]
            within = within + np.einsum(
                "uj,uje->ue", self._near_w[u % L], self._ev_layer[:, idx].transpose(1, 0, 2)
            )
        zz = self.logit_prior[idx] + np.where(
            same[:, None] == 1, within, self.beta_prev * self._ev_next[idx]
        )
        zs = np.sign(zz) * np.log1p(np.abs(zz))
        bins = np.clip(((zs - Z_LO) / BIN).astype(np.int64), 0, N_BINS - 1)
        raw = 1.0 / (1.0 + np.exp(-np.clip(zz, -30, 30)))
        s2 = same[:, None]
        p = (self._right[s2, bins] + 2 * raw) / (self._made[s2, bins] + 2)
        order = np.lexsort((-zz, -p), axis=-1)
        keys = idx.tolist()
        probs = p.tolist()
        out: list[Prediction] = []
        pending = self._pending
        for i, step in enumerate(us):
            row_k, row_p = keys[i], probs[i]
            out.append([(row_k[e], row_p[e]) for e in order[i].tolist()])
            if step not in pending:  # score each step's first (farthest) prediction once
                sm, bi = int(same[i]), bins[i].tolist()
                pending[step] = [(row_k[e], sm, bi[e]) for e in range(E)]
        return out

    def log_odds(self, t: int, u: int) -> np.ndarray:
        """The naive-Bayes z of step u's layer's experts after observing step t (u > t)."""
        ctx = self.ctx
        L, E = ctx.n_layers, ctx.n_experts
        block = slice((u % L) * E, (u % L + 1) * E)
        if u // L == t // L:
            z = self.beta_prev * self._ev_prev[block] + self.beta * self._ev[block]
            if self.near:
                z = z + self._near_w[u % L] @ self._ev_layer[:, block]
        else:
            z = self.beta_prev * self._ev_next[block]
        return np.asarray(self.logit_prior[block] + z)

    def describe(self) -> dict[str, Any]:
        return {
            "predictor": self.name,
            "beta": self.beta,
            "beta_prev": self.beta_prev,
            "alpha": self.alpha,
            "near": self.near,
            "near_decay": self.near_decay,
        }
