"""Eviction policies: one interface, one registry.

After libCacheSim, a policy is a plugin with the same hooks: the cache tells it
what happened (hit, insert, remove) and asks it for a victim. The policy never
sees a clock or does I/O, and it never decides residency on its own, so the
simulator and the engine get the same decisions from the same calls.

Step semantics (see docs/policies.md): a step is one (token, layer) with its
top-k keys. The cache looks all k up first (hits refresh), then admits the
misses in rank order. `victim()` is asked to avoid the keys in `protected`
(pinned, in flight and, for policies with `protects_step`, the current step's
keys, which the engine needs resident to compute the layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Container, Sequence
from typing import Any, ClassVar

import numpy as np

from mer.core import plugins
from mer.errors import BadInput, RuntimeFailure


class EvictionPolicy(ABC):
    """Base class. Subclasses set `name` and implement the hooks they need."""

    name: ClassVar[str] = ""
    #: False for policies (like the public engine's) whose spec lets a miss evict
    #: another key of the same step.
    protects_step: ClassVar[bool] = True
    #: True for offline policies that need `attach_future` (OPT).
    needs_future: ClassVar[bool] = False
    #: False for policies too slow in Python to replay at every size by default: `mer mrc`
    #: then draws them by default only where their compiled twin runs (mer.native.replay),
    #: else only when asked with --policies, so the default curves of every size stay
    #: seconds, not the better part of an hour, even without a C compiler.
    in_default_curves: ClassVar[bool] = True
    #: False for policies whose cost per step grows with the trace (every past token
    #: votes, so a whole trace is quadratic): even compiled they are drawn only when asked,
    #: so that the default curves of a long trace stay seconds.
    compiled_in_default_curves: ClassVar[bool] = True
    #: For `mer tune`: candidate values per parameter (grid search; `fit` wins if defined),
    #: the parameters whose defaults were fitted, and the traces they were fitted on
    #: ({"name", "routing_digest"}), so that defaults obey the held-out protocol too.
    tune_grid: ClassVar[dict[str, tuple[Any, ...]]] = {}
    tunable: ClassVar[tuple[str, ...]] = ()
    tuned_on: ClassVar[tuple[dict[str, str], ...]] = ()

    def __init__(self, capacity: int, **params: Any) -> None:
        if params:
            raise BadInput(f"policy {self.name!r} takes no parameter(s) {', '.join(params)}.")
        self.capacity = capacity

    # -- hooks (default: nothing) -------------------------------------------------
    def attach_future(self, steps: np.ndarray) -> None:
        """Offline policies get the whole (n_steps, k) key matrix once, before replay."""

    def attach_keyspace(self, n_keys: int) -> None:
        """The number of keys this partition can ever see (all keys in scope
        `global`, one layer's experts in `per-layer`); called once, before replay."""

    def attach_geometry(self, n_layers: int, n_experts: int) -> None:
        """The model's layout (global key = layer * n_experts + expert), for policies
        that follow the layer cycle; called once, before replay."""

    def begin_step(self, t: int, keys: Sequence[int]) -> None:
        """Called before the step's lookups (t = step index in replay order)."""

    def prepare_admit(self, key: int) -> None:
        """`key` is about to be admitted: called before `victim()` (if the partition
        is full) and `on_insert`. ARC needs the incoming key to pick its victim."""

    def on_hit(self, key: int) -> None:
        """A lookup found `key` resident."""

    @abstractmethod
    def on_insert(self, key: int) -> None:
        """`key` was admitted (demand miss or prefetch)."""

    @abstractmethod
    def on_remove(self, key: int) -> None:
        """`key` left the cache (after being chosen as a victim)."""

    @abstractmethod
    def victim(self, protected: Container[int]) -> int | None:
        """The resident key to evict, not in `protected`; None if there is none.

        Must not change state: the cache calls `on_remove` when it evicts.
        """

    def end_step(self, t: int, keys: Sequence[int]) -> None:
        """Called after the step's admissions."""

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}


def not_resident(policy: EvictionPolicy, key: Any) -> RuntimeFailure:
    """The error for a `victim()` that named a key the cache does not hold: a broken
    policy (a user's, as the built-in ones are tested), named by class and module."""
    cls = type(policy)
    return RuntimeFailure(
        f"policy {policy.name!r} (class {cls.__qualname__} in module {cls.__module__}) chose "
        f"{key!r} as the victim, which is not resident; victim() must return a resident key "
        "that is not in `protected`, or None (see docs/policies.md, 'Writing a policy')."
    )


# -- registry --------------------------------------------------------------------

_REGISTRY: plugins.Registry[EvictionPolicy] = plugins.Registry(
    "policy",
    EvictionPolicy,  # type: ignore[type-abstract]  # the base, never instantiated
    plugins.POLICY_GROUP,
    ("mer.core.policies", "mer.core.cycle", "mer.core.cotoken", "mer.core.knn"),
)
POLICIES: dict[str, type[EvictionPolicy]] = _REGISTRY.classes
#: Class decorator: adding a policy is one class plus this one line.
register_policy = _REGISTRY.register


def policy_class(name: str) -> type[EvictionPolicy]:
    """The class of a policy name: registered, `module:Class`, or an installed entry point
    (see `mer.core.plugins`). A loaded plugin is registered under `name`."""
    return _REGISTRY.get(name)


def make_policy(name: str, capacity: int, **params: Any) -> EvictionPolicy:
    return policy_class(name)(capacity, **params)


def policy_names() -> list[str]:
    """Registered names, installed plugins' included (and any `module:Class` loaded so far)."""
    return _REGISTRY.names()
