"""The shared decision core: cache, eviction policies, predictors, prefetch rule.

Pure and deterministic: no clock, no I/O. The simulator (`sim`) and the real
engine (`mer.engine`) both drive `mer.core.replay.Replay`.
"""

from mer.core.cache import Admission, CacheStats, ExpertCache, StepResult, split_slots
from mer.core.policy import (
    EvictionPolicy,
    make_policy,
    policy_class,
    policy_names,
    register_policy,
)
from mer.core.predictor import (
    Predictor,
    ReplayContext,
    make_predictor,
    predictor_class,
    predictor_names,
    register_predictor,
)
from mer.core.replay import PrefetchRule, Replay, ReplayConfig, popular_keys, replay_counts

__all__ = [
    "Admission",
    "CacheStats",
    "EvictionPolicy",
    "ExpertCache",
    "Predictor",
    "PrefetchRule",
    "Replay",
    "ReplayConfig",
    "ReplayContext",
    "StepResult",
    "make_policy",
    "make_predictor",
    "policy_class",
    "policy_names",
    "popular_keys",
    "predictor_class",
    "predictor_names",
    "register_policy",
    "register_predictor",
    "replay_counts",
    "split_slots",
]
