"""mer: measure, simulate and run SSD-streamed Mixture-of-Experts inference.

The decision core (cache, eviction policies, predictors) lives here so that the
simulator (`sim`) and the real engine (`mer.engine`) drive one copy of it.
"""

__version__ = "0.1.0"
