"""mer: measure, simulate and run SSD-streamed Mixture-of-Experts inference.

    import mer
    trace = mer.bundled_trace()
    curves = mer.mrc(trace, policies=["lru", "arc"], sizes=[32, 64, 128])
    sim = mer.simulate(trace, policy="lru", cache_slots=64)
    print(sim.summary.format_text())

The functions (see `mer.api` and docs/api.md) are loaded on first use, so
`import mer` costs almost nothing: no numpy, pandas, matplotlib or torch until a
function needs them. The decision core (cache, eviction policies, predictors)
lives in `mer.core`, so that the simulator (`mer.sim`) and the real engine
(`mer.engine`) drive one copy of it.
"""

from __future__ import annotations

from typing import Any

from mer.api import __all__ as _api_functions

__version__ = "0.1.0"

#: The Python API: name -> module that defines it (imported on first access). `mer.api`
#: itself imports only the standard library, so reading its names here costs nothing.
_API = dict.fromkeys(_api_functions, "mer.api")
_API.update(
    {
        "BadInput": "mer.errors",
        "RuntimeFailure": "mer.errors",
        "EvictionPolicy": "mer.core.policy",
        "Predictor": "mer.core.predictor",
        "register_policy": "mer.core.policy",
        "register_predictor": "mer.core.predictor",
    }
)

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
