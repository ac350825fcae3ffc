"""Batch-size-1 generation with the KV cache, one routed forward pass per step.

A manual loop (rather than `model.generate`) because the trace needs to know
which forward pass each routing belongs to: pass 0 is the prompt (phase
prefill), every later pass feeds one generated token (phase decode), exactly
the serving order. `--max-new-tokens N` records N decode tokens: each generated
token is fed back through the model once, as a server does to produce the
next one. Generation stops early at an end-of-sequence token (which is then not
fed) unless `ignore_eos`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.traces.record.recorder import RouterTap, StepRouting


@dataclass
class GenerationSettings:
    """Everything that changes which tokens are generated (part of the resume fingerprint)."""

    max_new_tokens: int = 32
    sample: bool = False
    seed: int = 0
    temperature: float = 1.0
    ignore_eos: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptRouting:
    """All routing of one prompt, tokens in serving order."""

    experts: np.ndarray  # (T, L, k)
    weights: np.ndarray
    logits: np.ndarray | None
    lookahead: np.ndarray | None
    phase: list[str]
    prompt_tokens: int
    generated_ids: list[int]

    @property
    def decode_tokens(self) -> int:
        return len(self.phase) - self.prompt_tokens


def _forward_kwargs(model: Any) -> tuple[str, bool]:
    """Name of the cache argument (5.x `cache`, 4.x `past_key_values`) and logits_to_keep support."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v if isinstance(x, int))
    return ids


def record_prompt(
    model: Any,
    tokenizer: Any,
    text: str,
    tap: RouterTap,
    settings: GenerationSettings,
    *,
    prompt_index: int = 0,
    on_token: Callable[[str], None] | None = None,
) -> PromptRouting:
    """Run one prompt through `model` with `tap` installed; return its routing.

    Sampling uses a CPU generator seeded with `seed + prompt_index`, so each
    prompt's tokens do not depend on which prompts ran before it (a resumed run
    equals an uninterrupted one).
    """
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise BadInput(f"prompt {prompt_index} tokenises to no tokens: {text[:60]!r}.")
    device = model.get_input_embeddings().weight.device
    cache_kw, has_ltk = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_ltk else {}
    eos = set() if settings.ignore_eos else _eos_ids(model, tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed + prompt_index)

    def choose(logits: Any) -> int:
        last = logits[0, -1].float().cpu()
        if not settings.sample:
            return int(torch.argmax(last))
        probs = torch.softmax(last / settings.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    steps: list[StepRouting] = []
    phases: list[str] = []
    generated: list[int] = []
    with torch.no_grad():
        tap.begin()
        out = model(input_ids=ids.to(device), use_cache=True, **extra)
        steps.append(tap.end())
        phases += ["prefill"] * int(ids.shape[-1])
        if on_token:
            on_token("prefill")
        cache = _out_cache(out)
        nxt = choose(out.logits)
        generated.append(nxt)
        for _ in range(settings.max_new_tokens):
            if nxt in eos:
                break
            tap.begin()
            step_in = torch.tensor([[nxt]], dtype=torch.long, device=device)
            out = model(input_ids=step_in, use_cache=True, **{cache_kw: cache}, **extra)
            steps.append(tap.end())
            phases.append("decode")
            if on_token:
                on_token("decode")
            cache = _out_cache(out)
            nxt = choose(out.logits)
            generated.append(nxt)

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(s, name) for s in steps]
        return None if parts[0] is None else np.concatenate(parts, axis=0)

    experts = cat("experts")
    weights = cat("weights")
    assert experts is not None and weights is not None
    if len(experts) != len(phases):
        raise BadInput(
            f"prompt {prompt_index}: routers saw {len(experts)} positions, expected {len(phases)}."
        )
    return PromptRouting(
        experts=experts,
        weights=weights,
        logits=cat("logits"),
        lookahead=cat("lookahead"),
        phase=phases,
        prompt_tokens=int(ids.shape[-1]),
        generated_ids=generated,
    )
