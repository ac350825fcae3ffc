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


PREDICTORS: dict[str, type[Predictor]] = {}


def register_predictor(cls: type[Predictor]) -> type[Predictor]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    PREDICTORS[cls.name] = cls
    return cls


def predictor_class(name: str) -> type[Predictor]:
    """The class of a predictor name: registered, `module:Class`, or an installed entry
    point (see `mer.core.plugins`). A loaded plugin is registered under `name`."""
    _load_builtin_predictors()
    cls = PREDICTORS.get(name)
    if cls is not None:
        return cls
    from mer.core import plugins

    if plugins.is_spec(name):
        cls = plugins.load_class(name, Predictor, "predictor")
        PREDICTORS[name] = cls
        return cls
    raise BadInput(
        f"unknown predictor {name!r}; choose one of: {', '.join(sorted(PREDICTORS))}, or load "
        f"your own class with package.module:ClassName ({plugins.GUIDE})."
    )


def make_predictor(name: str, ctx: ReplayContext, **params: Any) -> Predictor:
    return predictor_class(name)(ctx, **params)


def predictor_names() -> list[str]:
    """Registered names, installed plugins' included (and any `module:Class` loaded so far)."""
    _load_builtin_predictors()
    return sorted(PREDICTORS)


def _load_builtin_predictors() -> None:
    import importlib

    for mod in ("mer.core.predictors", "mer.core.cooccur"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    from mer.core import plugins

    for name, cls in plugins.entry_point_classes(
        plugins.PREDICTOR_GROUP, Predictor, "predictor"
    ).items():
        PREDICTORS.setdefault(name, cls)


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
