"""Predictors beyond the core's none / oracle / previous-token: markov,
popularity, lookahead. Each is one class plus @register_predictor; see
docs/policies.md for parameters and origins.

Probabilities are "probability that the key is one of the step's experts"
(in [0, 1]), so the prefetch rule's `min_prob` means the same for all of them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mer.core.predictor import Prediction, Predictor, ReplayContext, _horizon, register_predictor
from mer.errors import BadInput


def _layer_of_step(ctx: ReplayContext, u: int) -> int:
    return u % ctx.n_layers


@register_predictor
class MarkovPredictor(Predictor):
    """First-order transitions from step t's keys to step t+1's (layer l -> l+1),
    counted online; a key's score for the next step is the mean over the current
    keys a of q(b | a) = (c(a->b) + alpha) / (k c(a) + alpha E), times k, capped
    at 1. Deeper steps chain the distribution. `warm`: a trace file whose
    transitions are counted before replay (same geometry)."""

    name = "markov"

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        params = dict(params)
        self.alpha = float(params.pop("alpha", 1.0))
        warm = params.pop("warm", None)
        super().__init__(ctx, **params)
        if self.alpha < 0:
            raise BadInput(f"predictor 'markov': alpha must be >= 0, got {self.alpha}.")
        self._trans: dict[int, dict[int, int]] = defaultdict(dict)
        self._out: dict[int, int] = defaultdict(int)  # c(a): times a was followed by a step
        self._last: list[int] | None = None
        self._last_t = -2
        if warm:
            self._warm(str(warm))

    def _count(self, prev: np.ndarray, nxt: np.ndarray) -> None:
        """Add transitions for aligned rows prev[i] -> nxt[i] (vectorised)."""
        if len(prev) == 0:
            return
        k = prev.shape[1]
        a = np.repeat(prev, k, axis=1).reshape(-1)
        b = np.tile(nxt, (1, k)).reshape(-1)
        pairs, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
        for (ka, kb), c in zip(pairs.tolist(), counts.tolist(), strict=True):
            row = self._trans[ka]
            row[kb] = row.get(kb, 0) + c
        srcs, scounts = np.unique(prev.reshape(-1), return_counts=True)
        for ka, c in zip(srcs.tolist(), scounts.tolist(), strict=True):
            self._out[ka] += c

    def _warm(self, path: str) -> None:
        from mer.traces.format import read_trace

        tr = read_trace(path)
        ctx = self.ctx
        if (tr.n_layers, tr.n_experts, tr.top_k) != (ctx.n_layers, ctx.n_experts, ctx.top_k):
            raise BadInput(
                f"predictor 'markov': warm trace {path} is {tr.n_layers}x{tr.n_experts} top-"
                f"{tr.top_k}, the replayed one {ctx.n_layers}x{ctx.n_experts} top-{ctx.top_k}; "
                "warm from a trace of the same model."
            )
        steps = tr.keys().reshape(-1, tr.top_k).astype(np.int64)
        self._count(steps[:-1], steps[1:])

    def observe(self, t: int, keys: np.ndarray) -> None:
        cur = [int(k) for k in keys]
        if self._last is not None and self._last_t == t - 1:
            for a in self._last:
                row = self._trans[a]
                for b in cur:
                    row[b] = row.get(b, 0) + 1
                self._out[a] += 1
        self._last = cur
        self._last_t = t

    def _step_dist(self, dist: dict[int, float], layer: int) -> dict[int, float]:
        """Distribution over the given layer's keys after one transition from `dist`."""
        ctx = self.ctx
        e, k, alpha = ctx.n_experts, ctx.top_k, self.alpha
        base = layer * e
        out = dict.fromkeys(range(base, base + e), 0.0)
        for a, w in dist.items():
            denom = k * self._out.get(a, 0) + alpha * e
            if denom <= 0:
                continue
            row = self._trans.get(a, {})
            prior = alpha / denom
            for b in out:
                out[b] += w * (row.get(b, 0) / denom + prior)
        total = sum(out.values())
        if total <= 0:
            return {}
        return {b: v / total for b, v in out.items()}

    def predict(self, t: int, depth: int) -> list[Prediction]:
        if self._last is None:
            return [[] for _ in _horizon(self.ctx, t, depth)]
        k = self.ctx.top_k
        dist = {a: 1.0 / len(self._last) for a in self._last}
        out: list[Prediction] = []
        for u in _horizon(self.ctx, t, depth):
            dist = self._step_dist(dist, _layer_of_step(self.ctx, u))
            ranked = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append([(b, min(1.0, k * p)) for b, p in ranked])
            # Chain from the likeliest 4k keys only (renormalised): deeper steps stay cheap.
            top = ranked[: 4 * k]
            mass = sum(p for _, p in top)
            dist = {b: p / mass for b, p in top} if mass > 0 else {}
        return out

    def describe(self) -> dict[str, Any]:
        return {"predictor": self.name, "alpha": self.alpha}


@register_predictor
class PopularityPredictor(Predictor):
    """The most frequent experts of the step's layer so far; probability = the
    fraction of that layer's observed steps that used the key."""

    name = "popularity"

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self._counts: dict[int, dict[int, int]] = defaultdict(dict)  # layer -> key -> count
        self._steps: dict[int, int] = defaultdict(int)

    def observe(self, t: int, keys: np.ndarray) -> None:
        layer = _layer_of_step(self.ctx, t)
        row = self._counts[layer]
        for key in keys.tolist():
            row[key] = row.get(key, 0) + 1
        self._steps[layer] += 1

    def predict(self, t: int, depth: int) -> list[Prediction]:
        out: list[Prediction] = []
        for u in _horizon(self.ctx, t, depth):
            layer = _layer_of_step(self.ctx, u)
            row = self._counts.get(layer)
            if not row:
                out.append([])
                continue
            n = self._steps[layer]
            ranked = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append([(key, c / n) for key, c in ranked])
        return out

    #: predict_all's largest padded array (steps x depth x experts); beyond it, step by step
    MAX_CELLS = 1 << 24

    def predict_all(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        # Step t's prediction for u = t + d is layer u's counts after its latest step
        # src <= t (src = u - L * ceil(d / L)), ranked by (-count, key), observed keys only.
        ctx = self.ctx
        steps = ctx.steps
        n, k = steps.shape
        n_layers, n_exp = ctx.n_layers, ctx.n_experts
        if n * max(depth, 1) * n_exp > self.MAX_CELLS or self._steps:
            return None
        layer_of = np.arange(n) % n_layers
        local = steps.astype(np.int64) - (layer_of * n_exp)[:, None]
        if local.min(initial=0) < 0 or local.max(initial=0) >= n_exp:
            return None  # a step outside its layer's keys: leave it to predict()
        hits = np.zeros((n, n_exp), dtype=np.int64)
        np.add.at(hits, (np.repeat(np.arange(n), k), local.reshape(-1)), 1)
        cum = np.zeros_like(hits)  # counts of step s's layer over its steps <= s
        for layer in range(n_layers):
            cum[layer::n_layers] = np.cumsum(hits[layer::n_layers], axis=0)
        keys = np.full((n, depth, n_exp), -1, dtype=np.int32)
        probs = np.zeros((n, depth, n_exp))
        t = np.arange(n)
        for d in range(1, depth + 1):
            src = t + d - n_layers * (-(-d // n_layers))
            ok = np.flatnonzero((src >= 0) & (t + d < n))
            if not ok.size:
                continue
            c = cum[src[ok]]
            order = np.argsort(-c, axis=1, kind="stable")  # ties: the smaller key first
            cs = np.take_along_axis(c, order, axis=1)
            seen = (src[ok] // n_layers + 1)[:, None]  # the layer's observed steps
            base = (((t[ok] + d) % n_layers) * n_exp)[:, None]
            keys[ok, d - 1] = np.where(cs > 0, base + order, -1)
            probs[ok, d - 1] = cs / seen
        return keys, probs


@register_predictor
class LookaheadPredictor(Predictor):
    """The trace's recorded lookahead column: the next layer's router applied to
    this layer's hidden state. Depth 1 only (nothing is recorded further ahead)."""

    name = "lookahead"

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if ctx.lookahead is None:
            raise BadInput(
                "predictor 'lookahead' needs a trace with a recorded lookahead column; "
                "this trace has none (record with `mer record`, or pick another predictor)."
            )

    def predict(self, t: int, depth: int) -> list[Prediction]:
        horizon = _horizon(self.ctx, t, depth)
        if len(horizon) == 0:
            return []
        row = self.ctx.lookahead_at(t + 1)
        first = [] if row is None else [(int(k), 1.0) for k in row]
        return [first] + [[] for _ in range(len(horizon) - 1)]

    def predict_all(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        la = self.ctx.lookahead
        if not isinstance(la, np.ndarray):
            return None
        n = len(self.ctx.steps)
        k = la.shape[1]
        keys = np.full((n, depth, k), -1, dtype=np.int32)
        if depth and n > 1:
            keys[: n - 1, 0] = la[1:n]
        return keys, np.ones(keys.shape)


def evaluate(predictor: Predictor, steps: np.ndarray, depth: int = 1) -> list[dict[str, Any]]:
    """Precision and recall of a predictor's top-k per future distance 1..depth.

    Replays the steps in order (observe, then predict, as `Replay` does):
    precision = predicted top-k keys that are in the true step's set / predicted,
    recall = true keys that were predicted / true keys.
    """
    k = steps.shape[1]
    tp = np.zeros(depth, dtype=np.int64)
    predicted = np.zeros(depth, dtype=np.int64)
    truth = np.zeros(depth, dtype=np.int64)
    n = len(steps)
    rows = steps.tolist()
    for t in range(n):
        predictor.observe(t, steps[t])
        preds = predictor.predict(t, depth)
        for d in range(min(depth, n - 1 - t)):
            true = set(rows[t + 1 + d])
            guess = [key for key, _ in preds[d][:k]] if d < len(preds) else []
            tp[d] += sum(1 for key in guess if key in true)
            predicted[d] += len(guess)
            truth[d] += len(true)
    return [
        {
            "distance": d + 1,
            "precision": float(tp[d] / predicted[d]) if predicted[d] else 0.0,
            "recall": float(tp[d] / truth[d]) if truth[d] else 0.0,
            "true_positives": int(tp[d]),
            "predicted": int(predicted[d]),
            "true": int(truth[d]),
        }
        for d in range(depth)
    ]
