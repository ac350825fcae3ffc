"""Predictors: which experts the next steps will want. One interface, one registry.

A predictor sees the replay one step at a time (`observe`, after the step's
true experts are known) and, when asked, returns for each of the next `depth`
steps a ranked list of (global key, probability). It never decides what to
read: the core's `PrefetchRule` turns predictions into prefetches, so the
simulator and the engine prefetch identically.

A step is one (token, layer); step t + 1 is the next layer, wrapping into the
next token's layer 0 after the last layer.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mer.core import plugins
from mer.errors import BadInput

Prediction = list[tuple[int, float]]  # ranked (key, probability) for one future step


@dataclass(frozen=True)
class ReplayContext:
    """What a replay exposes to predictors. Online predictors must only read the
    shape fields; `steps` and `lookahead` are for the oracle and the recorded
    lookahead signal.

    A live replay (a model decoding, its steps arriving one at a time) has no
    `steps` (an empty array) and no end (`n_steps` is unbounded); its lookahead
    is a dict step -> keys that the driver fills just before it asks for the
    prefetches of the step before (`Replay.supply_lookahead`).
    """

    n_layers: int
    n_experts: int
    top_k: int
    steps: np.ndarray  # (n_steps, k) int32 global keys, replay order
    lookahead: np.ndarray | dict[int, np.ndarray] | None = None  # (n_steps, k) global keys
    live: bool = False

    @property
    def n_steps(self) -> int:
        return sys.maxsize if self.live else len(self.steps)

    def lookahead_at(self, u: int) -> np.ndarray | None:
        """The lookahead keys recorded (or supplied live) for step u, or None."""
        la = self.lookahead
        if la is None:
            return None
        if isinstance(la, dict):
            return la.get(u)
        return la[u]


class Predictor(ABC):
    name: ClassVar[str] = ""
    #: True when it reads the future of the trace (reported as an upper bound).
    offline: ClassVar[bool] = False

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        if params:
            raise BadInput(f"predictor {self.name!r} takes no parameter(s) {', '.join(params)}.")
        self.ctx = ctx

    def observe(self, t: int, keys: np.ndarray) -> None:
        """Step t's true keys (rank order), after its lookups."""

    @abstractmethod
    def predict(self, t: int, depth: int) -> list[Prediction]:
        """Predictions for steps t+1 .. t+depth (fewer at the end of the trace)."""

    def describe(self) -> dict[str, Any]:
        return {"predictor": self.name}

    def predict_all(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Optional, for speed: every step's `predict(t, depth)` of a trace replay at once,
        as if each step had been observed in turn: keys (n_steps, depth, width) int32
        (-1 past a prediction's end) and their probabilities. None: drive it step by step.
        Only for predictors whose predictions depend on the trace alone."""
        return None


_REGISTRY: plugins.Registry[Predictor] = plugins.Registry(
    "predictor",
    Predictor,  # type: ignore[type-abstract]  # the base, never instantiated
    plugins.PREDICTOR_GROUP,
    ("mer.core.predictors", "mer.core.cooccur"),
)
PREDICTORS: dict[str, type[Predictor]] = _REGISTRY.classes
register_predictor = _REGISTRY.register


def predictor_class(name: str) -> type[Predictor]:
    """The class of a predictor name: registered, `module:Class`, or an installed entry
    point (see `mer.core.plugins`). A loaded plugin is registered under `name`."""
    return _REGISTRY.get(name)


def make_predictor(name: str, ctx: ReplayContext, **params: Any) -> Predictor:
    return predictor_class(name)(ctx, **params)


def predictor_names() -> list[str]:
    """Registered names, installed plugins' included (and any `module:Class` loaded so far)."""
    return _REGISTRY.names()


def _horizon(ctx: ReplayContext, t: int, depth: int) -> range:
    return range(t + 1, min(t + 1 + depth, ctx.n_steps))


@register_predictor
class NoPredictor(Predictor):
    """No prefetch: the baseline every other predictor is measured against."""

    name = "none"

    def predict(self, t: int, depth: int) -> list[Prediction]:
        return []


@register_predictor
class OraclePredictor(Predictor):
    """The true experts of the next steps: the upper bound of any predictor."""

    name = "oracle"
    offline = True

    def predict(self, t: int, depth: int) -> list[Prediction]:
        steps = self.ctx.steps
        return [[(int(k), 1.0) for k in steps[u]] for u in _horizon(self.ctx, t, depth)]

    def predict_all(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        steps = self.ctx.steps
        n, k = steps.shape
        keys = np.full((n, depth, k), -1, dtype=np.int32)
        for d in range(1, depth + 1):
            keys[: max(0, n - d), d - 1] = steps[d:]
        return keys, np.ones(keys.shape)


@register_predictor
class PreviousTokenPredictor(Predictor):
    """The same layer's experts of the previous token (temporal locality)."""

    name = "previous-token"

    def __init__(self, ctx: ReplayContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self._last: dict[int, np.ndarray] = {}  # layer -> keys of the latest token

    def observe(self, t: int, keys: np.ndarray) -> None:
        self._last[t % self.ctx.n_layers] = keys

    def predict(self, t: int, depth: int) -> list[Prediction]:
        out: list[Prediction] = []
        n_layers = self.ctx.n_layers
        for u in _horizon(self.ctx, t, depth):
            prev = self._last.get(u % n_layers)
            out.append([] if prev is None else [(int(k), 1.0) for k in prev])
        return out

    def predict_all(self, depth: int) -> tuple[np.ndarray, np.ndarray] | None:
        # after observing steps 0..t, layer u's latest keys are step u - L * ceil((u - t) / L)
        steps = self.ctx.steps
        n, k = steps.shape
        n_layers = self.ctx.n_layers
        keys = np.full((n, depth, k), -1, dtype=np.int32)
        t = np.arange(n)
        for d in range(1, depth + 1):
            src = t + d - n_layers * (-(-d // n_layers))
            ok = (src >= 0) & (t + d < n)
            keys[ok, d - 1] = steps[src[ok]]
        return keys, np.ones(keys.shape)
