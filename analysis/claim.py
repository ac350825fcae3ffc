"""The claim check: what the public engine's "97.46% hit rate, 21 TPS" is made of.

It regenerates the engine's synthetic workload bit-exactly (traces.synth
seed-skewed), replays it with the engine's own policy through the shared
decision core, splits the misses into cold (compulsory) and capacity misses,
replays the same cache sizes on real Mixtral routing with the OPT ceiling
beside, and restates "21 TPS" (layer iterations per second) as whole-model
tokens per second. Every number here is computed, none is typed in, except the
published figures it is held against (PUBLISHED).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mer.core import Replay, ReplayConfig, policy_names, replay_counts
from mer.traces.format import Trace

#: The public engine's own published figures (shared/specs/seed-engine.md).
PUBLISHED: dict[str, Any] = {
    "hit_rate": 0.9746,
    "hits": 9746,
    "misses": 254,
    "lookups": 10_000,
    "iterations": 5000,
    "cache_slots": 256,
    "sustained_tps": 21.38,
    "wall_s": 233.8,
    "compute_ms_per_iteration": 40.85,
    "io_wait_ms_per_iteration": 5.77,
    "io_share": 0.1237,
    "layers": 32,
    "scaling_cache_slots": [16, 32, 64, 124],
    "scaling_iterations": 10_000,
}


@dataclass
class ReplayRow:
    workload: str
    policy: str
    scope: str
    cache_slots: int
    lookups: int
    hits: int
    misses: int
    cold_misses: int
    hit_rate: float


@dataclass
class ClaimCheck:
    headline: dict[str, Any] = field(default_factory=dict)
    rows: list[ReplayRow] = field(default_factory=list)
    tps: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _replay(trace: Trace, policy: str, slots: int, scope: str = "global") -> tuple[int, int]:
    params: dict[str, Any] = {}
    if policy == "seed-lru-locality":
        params["experts_per_layer"] = int(
            trace.meta.extra.get("experts_per_layer", trace.n_experts)
        )
    cfg = ReplayConfig(policy=policy, cache_slots=slots, scope=scope, policy_params=params)
    stats = replay_counts(Replay.from_trace(trace, cfg))
    return stats.total("hits"), stats.total("misses")


def _row(workload: str, trace: Trace, policy: str, slots: int, scope: str = "global") -> ReplayRow:
    hits, misses = _replay(trace, policy, slots, scope)
    cold = len(np.unique(trace.keys()))
    return ReplayRow(
        workload, policy, scope, slots, hits + misses, hits, misses, cold, hits / (hits + misses)
    )


def seed_workload(iterations: int) -> Trace:
    from mer.traces.synth.seed_skewed import SeedSkewed, SkewedParams

    return SeedSkewed(SkewedParams(iterations=iterations)).generate()


def run_claim_check(
    real: Trace | None = None, *, extra_real: list[Trace] | None = None
) -> ClaimCheck:
    """Compute everything the claim-check report shows."""
    available = set(policy_names())
    seed_policies = [p for p in ("seed-lru-locality", "lru", "opt") if p in available]
    out = ClaimCheck()

    # 1. The headline: 5,000 iterations, 256 slots for 256 ids (everything fits).
    head = seed_workload(PUBLISHED["iterations"])
    distinct = len(np.unique(head.keys()))
    lookups = head.n_lookups
    hits, misses = _replay(head, seed_policies[0], PUBLISHED["cache_slots"])
    out.headline = {
        "lookups": lookups,
        "distinct_ids": distinct,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / lookups,
        "cold_miss_hit_rate": 1 - distinct / lookups,
        "all_misses_are_cold": misses == distinct,
        # With every id resident after its first miss, no policy can do worse than this.
        "floor_any_policy": 1 - PUBLISHED["cache_slots"] / lookups,
        "published": {k: PUBLISHED[k] for k in ("hits", "misses", "hit_rate", "lookups")},
        "policy": seed_policies[0],
    }

    # 2. The cache-scaling runs, and the same sizes on real routing.
    scaling = seed_workload(PUBLISHED["scaling_iterations"])
    sizes = [*PUBLISHED["scaling_cache_slots"], PUBLISHED["cache_slots"]]
    for slots in sizes:
        for policy in seed_policies:
            out.rows.append(_row("seed-skewed (synthetic, flat ids)", scaling, policy, slots))
    for trace in [t for t in [real, *(extra_real or [])] if t is not None]:
        name = f"{trace.name} (real Mixtral routing)"
        for slots in sizes:
            if slots > trace.n_layers * trace.n_experts:
                continue
            for policy in [p for p in ("lru", "opt") if p in available]:
                for scope in ("global", "per-layer"):
                    if scope == "per-layer" and slots < trace.n_layers * trace.top_k:
                        continue
                    out.rows.append(_row(name, trace, policy, slots, scope))

    # 3. "21 TPS": layer iterations per second, not tokens.
    tps = PUBLISHED["sustained_tps"]
    layers = PUBLISHED["layers"]
    out.tps = {
        "sustained_tps_published": tps,
        "meaning": "one iteration = the two expert FFNs of ONE MoE layer (no attention, no other layers, no LM head)",
        "whole_model_tokens_per_s_upper_bound": tps / layers,
        "ms_per_token_at_that_rate": 1e3 * layers / tps,
        "layers": layers,
    }
    return out


def format_markdown(
    check: ClaimCheck, *, mrc_figure: str | None = None, sim: dict[str, Any] | None = None
) -> str:
    h = check.headline
    pub = h["published"]
    lines = [
        '# Claim check: "97.46% expert-cache hit rate, 21 TPS, Mixtral on CPU + SSD"',
        "",
        "Regenerated by `mer report claim-check`; every figure below was computed by mer from the",
        "public engine's specification (`shared/specs/seed-engine.md`), except the published ones it is held against.",
        "",
        "## 1. What the 97.46% is made of",
        "",
        f"The headline run replays {pub['lookups']:,} lookups ({PUBLISHED['iterations']:,} iterations, top-2) of the",
        "engine's *synthetic* Zipf stream over 256 flat expert ids, with a cache of **256 slots: every expert fits**.",
        "Nothing is ever evicted, so every miss is a cold (compulsory) miss and the hit rate is",
        "`1 - distinct ids / lookups`, whatever the policy.",
        "",
        "| | published | mer (regenerated, policy " + h["policy"] + ") |",
        "|---|---:|---:|",
        f"| lookups | {pub['lookups']:,} | {h['lookups']:,} |",
        f"| hits | {pub['hits']:,} | {h['hits']:,} |",
        f"| misses | {pub['misses']:,} | {h['misses']:,} |",
        f"| distinct ids seen (= cold misses) | | {h['distinct_ids']:,} |",
        f"| hit rate | {pub['hit_rate'] * 100:.2f}% | {h['hit_rate'] * 100:.2f}% |",
        f"| 1 - distinct / lookups | | {h['cold_miss_hit_rate'] * 100:.2f}% |",
        "",
        f"All of mer's misses are cold misses: **{h['all_misses_are_cold']}**. The 97.46% measures how many of",
        "256 ids a 10,000-draw Zipf stream touches, not the quality of a cache policy. With 256 slots for 256 ids",
        f"no policy, on any stream, can score below 1 - 256 / {h['lookups']:,} = **{h['floor_any_policy'] * 100:.2f}%**:",
        f"the published figure is {(pub['hit_rate'] - h['floor_any_policy']) * 100:.2f} points above the worst possible cache.",
        "",
        "mer regenerates the stream with the parameters the spec gives for the engine's scaling runs (Zipf 1.2,",
        f"correlation 0.7, seed 42) at {PUBLISHED['iterations']:,} iterations and sees {h['distinct_ids']} distinct ids, not the",
        f"published {pub['misses']}: the spec does not state the headline run's workload parameters, and the count of",
        "distinct ids is sensitive to them (it approaches 256 as the Zipf exponent or the correlation drops). Either",
        "way every miss is cold.",
        "",
        "## 2. The same cache sizes: synthetic stream vs real Mixtral routing",
        "",
        "No prefetch, cache starts empty, global scope unless stated. `opt` is Belady's offline optimum: the ceiling.",
        "",
        "| workload | policy | scope | slots | lookups | misses | cold misses | hit rate |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in check.rows:
        lines.append(
            f"| {r.workload} | {r.policy} | {r.scope} | {r.cache_slots} | {r.lookups:,} | {r.misses:,} | "
            f"{r.cold_misses:,} | {r.hit_rate * 100:.2f}% |"
        )
    if mrc_figure:
        lines += [
            "",
            f"![hit rate vs cache size on the real trace, OPT as the ceiling, the claim marked]({mrc_figure})",
            "*Figure 1. Look at where the red star sits: at 256 slots every cache holds every expert, "
            "so any policy, LRU included, scores the same; below 64 slots global LRU gets nothing on "
            "real routing while OPT shows what a better policy could reach.*",
            "",
        ]
    t = check.tps
    lines += [
        "",
        '## 3. What "21 TPS" means',
        "",
        f"The engine's `sustained_tps` ({t['sustained_tps_published']}) counts iterations; {t['meaning']}.",
        f"Mixtral 8x7B has {t['layers']} MoE layers, so a whole token needs {t['layers']} such iterations plus attention:",
        f"at that rate, at most **{t['whole_model_tokens_per_s_upper_bound']:.3f} whole-model tokens/s**",
        f"({t['ms_per_token_at_that_rate']:.0f} ms per token), before any attention or LM-head time.",
    ]
    if sim:
        lines += [
            "",
            "mer's simulator, with the hardware profile derived from the engine's own published run",
            f"(`{sim.get('hardware', '?')}`), on the real Mixtral trace ({sim.get('trace', '?')}):",
            "",
            "| cache slots | policy | hit rate | tokens/s (whole model) | layer iterations/s | I/O share |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for row in sim.get("rows", []):
            lines.append(
                f"| {row['cache_slots']} | {row['policy']} | {row['hit_rate'] * 100:.2f}% | {row['tokens_per_s']:.3f} | "
                f"{row['layer_iterations_per_s']:.2f} | {row['io_wait_share'] * 100:.1f}% |"
            )
    return "\n".join(lines) + "\n"
