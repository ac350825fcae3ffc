"""Per-family knowledge: where each MoE layer's router lives and how it normalises.

In transformers 5.x every MoE family we support routes through one small module
(`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, `PhimoeTopKRouter`, ...) whose
forward returns `(router_logits, routing_weights, expert_indices)`, the exact
values the experts are then run with. Hooking that module therefore records
what the model *did*, with the family's own normalisation, instead of a
re-implementation of it. This module only has to find those routers, map them
to MoE layers 0..n-1 (some families interleave dense layers), and describe the
normalisation for the trace metadata.

Families whose router only returns logits and routes elsewhere (DeepSeek-style
group-limited routing) are refused with a clear message rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mer.errors import BadInput

# model_type -> how the family turns router logits into top-k weights.
# "renormalised" means the weights the model multiplies the experts by already
# sum to 1 over the top-k; otherwise the recorder renormalises for the trace
# (format v1 stores normalised weights) and says so in the metadata.
_NORMALISATION: dict[str, str] = {
    "mixtral": "softmax over all experts, top-k, renormalised over the top-k",
    "qwen2_moe": "softmax over all experts, top-k{norm}",
    "qwen3_moe": "softmax over all experts, top-k{norm}",
    "qwen3_next": "softmax over all experts, top-k{norm}",
    "olmoe": "softmax over all experts, top-k{norm}",
    "flex_olmo": "softmax over all experts, top-k{norm}",
    "phimoe": "sparsemixer (per-rank masked softmax), top-2",
    "gpt_oss": "top-k of the logits (with bias), softmax over the top-k",
    "minimax": "softmax over all experts, top-k, renormalised over the top-k",
}

# A router module's class name: every supported family spells it *TopKRouter
# (PhiMoE's is an nn.Linear subclass of that name).
_ROUTER_NAME = re.compile(r"Top[Kk]Router$")


@dataclass
class RouterSite:
    """One MoE layer: its router module and where it sits in the decoder stack."""

    moe_layer: int  # 0..n-1, the trace's layer index
    decoder_layer: int  # index in the model's decoder ModuleList
    name: str  # dotted module path of the router
    router: Any  # torch.nn.Module
    decoder: Any  # torch.nn.Module: the decoder layer holding it


@dataclass
class Family:
    """What the recorder needs to know about a loaded MoE model."""

    model_type: str
    architecture: str
    sites: list[RouterSite]
    n_experts: int
    top_k: int
    n_decoder_layers: int
    normalisation: str
    weights_already_normalised: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def moe_layer_map(self) -> list[int]:
        """Decoder-layer index of each MoE layer (trace layer i -> decoder layer map[i])."""
        return [s.decoder_layer for s in self.sites]


def _decoder_of(model: Any, name: str) -> tuple[int, Any]:
    """The decoder layer index and module holding the module at dotted path `name`.

    Walks the path and stops at the first ModuleList (the decoder stack): the
    next path component is the layer index.
    """
    import torch

    parts = name.split(".")
    module = model
    for i, part in enumerate(parts[:-1]):
        module = getattr(module, part)
        if isinstance(module, torch.nn.ModuleList) and parts[i + 1].isdigit():
            idx = int(parts[i + 1])
            return idx, module[idx]
    raise BadInput(
        f"router {name!r} is not inside a decoder ModuleList; cannot place it in a layer."
    )


def _config_int(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def text_config(config: Any) -> Any:
    """Multimodal configs nest the language model's config; routing lives there."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def find_family(model: Any, model_id: str = "model") -> Family:
    """Locate every MoE router in `model` (a transformers causal LM) or refuse clearly."""
    config = model.config
    tconf = text_config(config)
    model_type = str(getattr(tconf, "model_type", getattr(config, "model_type", "unknown")))
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    routers = [(n, m) for n, m in model.named_modules() if _ROUTER_NAME.search(type(m).__name__)]
    if not routers:
        n_exp = _config_int(tconf, "num_local_experts", "num_experts", "n_routed_experts")
        why = (
            f"its config declares {n_exp} experts but no *TopKRouter module was found, so this "
            "family's routing cannot be observed by mer yet"
            if n_exp
            else "it has no router modules and its config declares no experts"
        )
        raise BadInput(
            f"{model_id}: not a supported Mixture-of-Experts model ({model_type}, "
            f"{archs[0]}): {why}. Supported families: {', '.join(sorted(_NORMALISATION))} "
            "and other transformers MoE models whose router returns (logits, weights, indices)."
        )
    sites: list[RouterSite] = []
    for i, (name, router) in enumerate(routers):
        dec_idx, decoder = _decoder_of(model, name)
        sites.append(RouterSite(i, dec_idx, name, router, decoder))
    if len({s.decoder_layer for s in sites}) != len(sites):
        raise BadInput(
            f"{model_id}: found {len(sites)} routers in fewer decoder layers; models with several "
            "routers per layer are not supported."
        )
    first = sites[0].router
    n_experts = _router_int(first, "num_experts", "out_features") or _config_int(
        tconf, "num_local_experts", "num_experts", "n_routed_experts"
    )
    top_k = _router_int(first, "top_k") or _config_int(
        tconf, "num_experts_per_tok", "experts_per_token", "top_k"
    )
    if not n_experts or not top_k:
        raise BadInput(f"{model_id}: cannot tell n_experts / top_k from router {sites[0].name!r}.")
    for s in sites[1:]:
        ne = _router_int(s.router, "num_experts", "out_features") or n_experts
        tk = _router_int(s.router, "top_k") or top_k
        if (ne, tk) != (n_experts, top_k):
            raise BadInput(
                f"{model_id}: layer {s.name} has {ne} experts top-{tk}, the first MoE layer "
                f"{n_experts} top-{top_k}; trace format v1 needs one shape for all layers."
            )
    norm_topk = getattr(first, "norm_topk_prob", getattr(tconf, "norm_topk_prob", None))
    template = _NORMALISATION.get(
        model_type, "as the model's router computes it (family not verified)"
    )
    normalisation = template.format(
        norm=", renormalised over the top-k"
        if norm_topk
        else ", not renormalised (norm_topk_prob=False)"
    )
    already = model_type in ("mixtral", "gpt_oss", "minimax") or bool(norm_topk)
    notes: list[str] = []
    n_dec = _config_int(tconf, "num_hidden_layers") or (max(s.decoder_layer for s in sites) + 1)
    if len(sites) != n_dec:
        notes.append(
            f"{n_dec - len(sites)} of {n_dec} decoder layers are dense; MoE layers are numbered "
            "0..n-1, see moe_layer_map"
        )
    if hasattr(model.get_submodule(sites[0].name.rsplit(".", 1)[0]), "shared_expert"):
        notes.append("the model also runs an always-on shared expert, which is not routed")
    if not already:
        notes.append(
            "the model's top-k expert weights do not sum to 1; the trace's weight column is "
            "those values renormalised to sum to 1 (raw router logits: use --logits)"
        )
    if model_type not in _NORMALISATION:
        notes.append(
            f"family {model_type!r} is recorded generically through its {type(first).__name__}"
        )
    return Family(
        model_type=model_type,
        architecture=archs[0],
        sites=sites,
        n_experts=int(n_experts),
        top_k=int(top_k),
        n_decoder_layers=int(n_dec),
        normalisation=normalisation,
        weights_already_normalised=already,
        notes=notes,
    )


def _router_int(router: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(router, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def supported_families() -> list[str]:
    return sorted(_NORMALISATION)
