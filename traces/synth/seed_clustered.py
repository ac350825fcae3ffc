"""`seed-clustered`: a clustered, sticky Markov router (statistics, not bit-exact).

The seed engine's default synthetic router routed tokens "within clusters with
sticky transitions"; its code is not part of the spec (only the skewed stream
is specified bit-exactly), so this is our model of that behaviour, documented
in docs/trace-statistics.md:

- every token carries a hidden cluster c in 0..clusters-1 (a topic), shared by
  all layers; c follows a sticky Markov chain over tokens: it stays with
  probability `stickiness`, otherwise it is redrawn uniformly (possibly the
  same cluster again);
- each layer partitions its experts into `clusters` equal groups (a random
  partition per layer, from the seed), so cluster c means a different group of
  experts at every layer: inter-layer transitions are structured, as in real
  routers, without being the identity;
- within its group a token draws top_k distinct experts, without replacement,
  proportionally to per-layer in-group weights drawn once from a symmetric
  Dirichlet(`concentration`) (smaller = more skewed); rank = draw order.

Consecutive tokens therefore often reuse the same group (temporal locality),
and popularity is skewed within groups, which is what a cache sees.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from mer.errors import BadInput
from mer.traces.format import Trace, TraceMeta, from_arrays
from mer.traces.synth.base import check_size


@dataclass(frozen=True)
class ClusteredParams:
    """Knobs of the clustered Markov router (defaults: Mixtral 8x7B geometry)."""

    layers: int = 32
    experts: int = 8
    top_k: int = 2
    clusters: int = 2
    stickiness: float = 0.9
    concentration: float = 1.0
    tokens: int = 1000
    seed: int = 42

    def check(self) -> None:
        if self.layers < 1 or self.tokens < 1:
            raise BadInput("--layers and --tokens must be >= 1.")
        if self.layers > 1024:
            raise BadInput(f"--layers must be at most 1024, got {self.layers}.")
        if not 1 <= self.experts <= np.iinfo(np.int16).max:
            raise BadInput(f"--experts must be in 1..32767, got {self.experts}.")
        if self.clusters < 1 or self.experts % self.clusters:
            raise BadInput(f"--clusters ({self.clusters}) must divide --experts ({self.experts}).")
        if not 1 <= self.top_k <= self.experts // self.clusters:
            raise BadInput(
                f"--top-k ({self.top_k}) must be between 1 and the group size "
                f"experts/clusters = {self.experts // self.clusters}."
            )
        if not (math.isfinite(self.stickiness) and 0.0 <= self.stickiness <= 1.0):
            raise BadInput(f"--stickiness must be in [0, 1], got {self.stickiness}.")
        if not (math.isfinite(self.concentration) and self.concentration > 0):
            raise BadInput(
                f"--concentration must be a finite number > 0, got {self.concentration}."
            )
        if not 0 <= self.seed < 2**63:
            raise BadInput(f"--seed must be from 0 to 2**63-1, got {self.seed}.")
        check_size(self.tokens, self.layers, self.top_k)


def generate_experts(p: ClusteredParams) -> np.ndarray:
    """int64 (tokens, layers, top_k) of local expert ids."""
    p.check()
    rng = np.random.default_rng(p.seed)
    size = p.experts // p.clusters
    # members[l, c, :] = the experts of group c at layer l.
    members = np.stack([rng.permutation(p.experts) for _ in range(p.layers)]).reshape(
        p.layers, p.clusters, size
    )
    weights = rng.dirichlet(np.full(size, p.concentration), size=(p.layers, p.clusters))
    # Sticky Markov chain of clusters over tokens: forward-fill the redraws.
    redraw = rng.random(p.tokens) >= p.stickiness
    redraw[0] = True
    fresh = rng.integers(p.clusters, size=p.tokens)
    last = np.maximum.accumulate(np.where(redraw, np.arange(p.tokens), 0))
    cluster = fresh[last]
    out = np.empty((p.tokens, p.layers, p.top_k), dtype=np.int64)
    with np.errstate(divide="ignore"):
        logw = np.log(weights)
    for ly in range(p.layers):
        # Gumbel top-k = sampling k without replacement proportionally to weights.
        scores = logw[ly, cluster] + rng.gumbel(size=(p.tokens, size))
        pick = np.argsort(-scores, axis=1, kind="stable")[:, : p.top_k]
        out[:, ly, :] = np.take_along_axis(members[ly, cluster], pick, axis=1)
    return out


class SeedClustered:
    """Clustered sticky Markov router: tokens stay in per-layer expert groups."""

    name: ClassVar[str] = "seed-clustered"
    help: ClassVar[str] = "clustered sticky Markov router (layers x experts, statistics only)"

    def __init__(self, params: ClusteredParams) -> None:
        params.check()
        self.params = params

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        d = ClusteredParams()
        p.add_argument(
            "--layers", type=int, default=d.layers, help=f"MoE layers (default {d.layers})"
        )
        p.add_argument(
            "--experts",
            type=int,
            default=d.experts,
            help=f"experts per layer (default {d.experts})",
        )
        p.add_argument(
            "--top-k",
            type=int,
            default=d.top_k,
            help=f"experts per token and layer (default {d.top_k})",
        )
        p.add_argument(
            "--clusters",
            type=int,
            default=d.clusters,
            help=f"expert groups per layer (default {d.clusters})",
        )
        p.add_argument(
            "--stickiness",
            type=float,
            default=d.stickiness,
            help=f"probability a token keeps the previous token's cluster (default {d.stickiness})",
        )
        p.add_argument(
            "--concentration",
            type=float,
            default=d.concentration,
            help=f"Dirichlet concentration of in-group popularity; smaller = more skewed (default {d.concentration})",
        )
        p.add_argument(
            "--tokens", type=int, default=d.tokens, help=f"tokens to generate (default {d.tokens})"
        )
        p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SeedClustered:
        return cls(
            ClusteredParams(
                layers=args.layers,
                experts=args.experts,
                top_k=args.top_k,
                clusters=args.clusters,
                stickiness=args.stickiness,
                concentration=args.concentration,
                tokens=args.tokens,
                seed=args.seed,
            )
        )

    def parameters(self) -> dict[str, Any]:
        return asdict(self.params)

    def generate(self) -> Trace:
        p = self.params
        meta = TraceMeta(
            model=f"seed-clustered-{p.layers}x{p.experts}",
            n_layers=p.layers,
            n_experts=p.experts,
            top_k=p.top_k,
            source={"generator": self.name, **self.parameters()},
        )
        return from_arrays(generate_experts(p), meta, name=self.name)
