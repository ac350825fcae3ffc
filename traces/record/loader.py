"""Load a transformers MoE model and its tokenizer, failing with one clear message.

The MoE check runs first on a weightless copy built on the `meta` device, so a
dense model is refused in seconds instead of after loading tens of GB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mer.errors import BadInput, RuntimeFailure
from mer.traces.record.families import Family, find_family

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: Family
    revision: str | None
    device: str  # resolved: "cpu" or "cuda"
    dtype: str  # resolved torch dtype name


def _not_found(model_id: str, exc: Exception) -> BadInput:
    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    if Path(model_id).exists():
        return BadInput(
            f"cannot load model {model_id!r}: the local path exists but is not a loadable "
            f"transformers model ({reason}). Point --model at the directory that holds "
            "config.json, the tokenizer files and the weights."
        )
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    hint = (
        "HF_HUB_OFFLINE is set, so only local directories and the local Hugging Face cache are "
        "searched. "
        if offline
        else ""
    )
    return BadInput(
        f"cannot load model {model_id!r}: it is not a local directory and was not found in the "
        f"Hugging Face cache or on the hub ({reason}). {hint}Pass a local model directory, or "
        f"download it first on a connected machine (`hf download {model_id}`) and copy the "
        "cache (~/.cache/huggingface)."
    )


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise BadInput(f"--device must be one of {', '.join(DEVICES)}, got {device!r}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is visible to torch; use --device cpu.")
    return device


def load_model(model_id: str, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Config -> MoE check on meta weights -> tokenizer -> weights, each step explained on failure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise _not_found(model_id, exc) from exc
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:
        skeleton = None
    if skeleton is not None:
        find_family(skeleton, model_id)
        del skeleton
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise _not_found(model_id, exc) from exc
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if dev == "cuda":
        kwargs["device_map"] = "auto"  # spreads a large model over all visible GPUs
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        raise _not_found(model_id, exc) from exc
    except (ImportError, ValueError) as exc:
        if "accelerate" not in str(exc) and isinstance(exc, ValueError):
            raise RuntimeFailure(f"cannot load model {model_id!r}: {exc}") from exc
        raise RuntimeFailure(
            f"loading {model_id} needs a missing package: {exc}. For --device cuda install "
            "`accelerate` (device_map='auto')."
        ) from exc
    except torch.cuda.OutOfMemoryError as exc:
        raise RuntimeFailure(
            f"out of GPU memory loading {model_id}; use --dtype bfloat16, more GPUs, or see "
            "docs/recording.md for 4-bit loading."
        ) from exc
    if dev == "cpu":
        model = cast(Any, model).to("cpu")
    model.eval()
    family = find_family(model, model_id)
    revision = getattr(model.config, "_commit_hash", None) or getattr(config, "_commit_hash", None)
    local = Path(model_id)
    if revision is None and local.parent.name == "snapshots":  # a path into the HF cache
        revision = local.resolve().name
    resolved_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return LoadedModel(model, tokenizer, family, revision, dev, resolved_dtype)
