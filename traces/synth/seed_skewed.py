"""`seed-skewed`: the seed engine's synthetic "skewed" routing stream, bit-exact.

The published cache figures this project audits were measured on this stream,
so it must be regenerated exactly as ../shared/specs/seed-engine.md describes:
splitmix64 (uint64, wrapping), a Zipf CDF with its last entry forced to 1.0, a
Fisher-Yates rank -> id permutation with its own state, correlation repeats,
max(64, 64k) attempts per set and a fill in rank order.

Speed comes from one observation: the stream state advances by the same
constant per draw whatever the outcome, so the n-th uniform does not depend on
earlier decisions. We therefore compute the uniforms (and their ids through the
CDF with numpy.searchsorted) in vectorised blocks, and only the cheap decision
logic runs per iteration in Python.
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

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
PERM_XOR = 0xD1B54A32D192ED03
STREAM_ADD = 0x12345678
TWO_POW_53 = float(1 << 53)


def splitmix64_block(state: int, count: int, start: int = 0) -> np.ndarray:
    """Outputs number start+1 .. start+count of splitmix64 from `state` (uint64 array).

    The i-th step (1-based) sees state + i * GOLDEN, so any slice of the output
    sequence can be computed without running the steps before it.
    """
    steps = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(state & MASK64) + steps * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def zipf_cdf(n: int, s: float) -> np.ndarray:
    """CDF of w_r = 1/(r+1)^s, normalised, summed left to right, cdf[n-1] = 1.0.

    Plain sequential float64 sums (not numpy's pairwise sum) so that the last
    bits match a straightforward loop, which is what the seed engine ran.
    """
    weights = [1.0 / math.pow(r + 1, s) for r in range(n)]
    total = 0.0
    for w in weights:
        total += w
    cdf = np.empty(n, dtype=np.float64)
    acc = 0.0
    for r, w in enumerate(weights):
        acc += w / total
        cdf[r] = acc
    cdf[n - 1] = 1.0
    return cdf


def rank_permutation(n: int, seed: int) -> list[int]:
    """Rank -> id permutation: Fisher-Yates from the top with state seed ^ PERM_XOR."""
    perm = list(range(n))
    if n < 2:
        return perm
    draws = splitmix64_block((seed ^ PERM_XOR) & MASK64, n - 1)
    bounds = np.arange(n, 1, -1, dtype=np.uint64)  # i + 1 for i = n-1 .. 1
    js = (draws % bounds).tolist()
    for idx, i in enumerate(range(n - 1, 0, -1)):
        j = js[idx]
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass(frozen=True)
class SkewedParams:
    """The seed engine's skewed-workload knobs (defaults: its Mixtral runs)."""

    experts: int = 256
    top_k: int = 2
    zipf_s: float = 1.2
    correlation: float = 0.7
    seed: int = 42
    iterations: int = 10_000
    experts_per_layer: int = 8

    def check(self) -> None:
        if not 1 <= self.experts <= np.iinfo(np.int16).max:
            raise BadInput(
                f"--experts must be in 1..32767 (flat ids are int16), got {self.experts}."
            )
        if not 1 <= self.top_k <= self.experts:
            raise BadInput(f"--top-k must be in 1..--experts ({self.experts}), got {self.top_k}.")
        if not (math.isfinite(self.zipf_s) and self.zipf_s >= 0):
            raise BadInput(f"--zipf-s must be a finite number >= 0, got {self.zipf_s}.")
        if not (math.isfinite(self.correlation) and 0.0 <= self.correlation <= 1.0):
            raise BadInput(f"--correlation must be in [0, 1], got {self.correlation}.")
        if not 0 <= self.seed <= MASK64:
            raise BadInput(f"--seed must be an unsigned 64-bit integer, got {self.seed}.")
        if self.iterations < 1:
            raise BadInput(f"--iterations must be >= 1, got {self.iterations}.")
        check_size(self.iterations, 1, self.top_k, "--iterations")
        if self.experts_per_layer < 1 or self.experts % self.experts_per_layer:
            raise BadInput(
                f"--experts-per-layer ({self.experts_per_layer}) must divide --experts "
                f"({self.experts}): the flat id space is layers x experts per layer."
            )


def generate_ids(p: SkewedParams) -> np.ndarray:
    """The stream: int array (iterations, top_k) of flat ids, in draw order."""
    p.check()
    n, k = p.experts, p.top_k
    cdf = zipf_cdf(n, p.zipf_s)
    perm = rank_permutation(n, p.seed)
    perm_arr = np.asarray(perm, dtype=np.int64)
    stream_state = (p.seed + STREAM_ADD) & MASK64
    attempts = max(64, 64 * k)
    rho = p.correlation

    us: list[float] = []
    ids: list[int] = []

    def extend(count: int) -> None:
        raw = splitmix64_block(stream_state, count, start=len(us))
        u = (raw >> np.uint64(11)).astype(np.float64) / TWO_POW_53
        rank = np.minimum(np.searchsorted(cdf, u, side="left"), n - 1)
        us.extend(u.tolist())
        ids.extend(perm_arr[rank].tolist())

    block = max(4096, 2 * p.iterations + attempts)
    out = np.empty((p.iterations, k), dtype=np.int64)
    pos = 0
    prev: list[int] | None = None
    for it in range(p.iterations):
        if pos + attempts + 1 > len(us):
            extend(block)
        if prev is not None:
            u = us[pos]
            pos += 1
            if u < rho:
                out[it] = prev
                continue
        chosen: list[int] = []
        for _ in range(attempts):
            eid = ids[pos]
            pos += 1
            if eid not in chosen:
                chosen.append(eid)
                if len(chosen) == k:
                    break
        if len(chosen) < k:
            for eid in perm:
                if eid not in chosen:
                    chosen.append(eid)
                    if len(chosen) == k:
                        break
        out[it] = chosen
        prev = chosen
    return out


class SeedSkewed:
    """Registry entry for `mer trace synth seed-skewed`."""

    name: ClassVar[str] = "seed-skewed"
    help: ClassVar[str] = (
        "the seed engine's Zipf + correlation stream, bit-exact to specs/seed-engine.md "
        "(flat ids, n_layers = 1)"
    )

    def __init__(self, params: SkewedParams) -> None:
        params.check()
        self.params = params

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        d = SkewedParams()
        p.add_argument(
            "--experts",
            type=int,
            default=d.experts,
            help=f"flat id count n (default {d.experts}; Qwen3-30B-A3B runs: 6144)",
        )
        p.add_argument(
            "--top-k", type=int, default=d.top_k, help=f"ids per iteration k (default {d.top_k})"
        )
        p.add_argument(
            "--zipf-s", type=float, default=d.zipf_s, help=f"Zipf exponent (default {d.zipf_s})"
        )
        p.add_argument(
            "--correlation",
            type=float,
            default=d.correlation,
            help=f"probability rho of repeating the previous set (default {d.correlation})",
        )
        p.add_argument("--seed", type=int, default=d.seed, help=f"uint64 seed (default {d.seed})")
        p.add_argument(
            "--iterations",
            type=int,
            default=d.iterations,
            help=f"number of top-k draws (default {d.iterations})",
        )
        p.add_argument(
            "--experts-per-layer",
            type=int,
            default=d.experts_per_layer,
            help=f"geometry carried in the metadata for locality pinning (default {d.experts_per_layer})",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SeedSkewed:
        return cls(
            SkewedParams(
                experts=args.experts,
                top_k=args.top_k,
                zipf_s=args.zipf_s,
                correlation=args.correlation,
                seed=args.seed,
                iterations=args.iterations,
                experts_per_layer=args.experts_per_layer,
            )
        )

    def parameters(self) -> dict[str, Any]:
        return asdict(self.params)

    def generate(self) -> Trace:
        p = self.params
        ids = generate_ids(p)
        meta = TraceMeta(
            model=f"seed-skewed-{p.experts}x{p.top_k}",
            n_layers=1,
            n_experts=p.experts,
            top_k=p.top_k,
            source={
                "generator": self.name,
                "spec": "shared/specs/seed-engine.md",
                **self.parameters(),
            },
            extra={
                "experts_per_layer": p.experts_per_layer,
                "flat_ids": True,
                "note": (
                    "expert is the seed engine's flat id over all layers (it fed the stream as "
                    "layer 0): real layer = id // experts_per_layer, local expert = "
                    "id % experts_per_layer. One token here is one 'iteration' = one MoE layer."
                ),
            },
        )
        return from_arrays(ids.reshape(p.iterations, 1, p.top_k), meta, name=self.name)
