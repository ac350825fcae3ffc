"""The tokenizer a GGUF carries in its metadata, built by transformers.

A GGUF has no tokenizer.json: llama.cpp's converter stores the vocabulary,
scores, token types, merges and special ids under `tokenizer.ggml.*`. The
transformers library knows how to turn those into a fast tokenizer (its
`integrations.gguf` builders: sentencepiece-style "llama" vocabularies as
Mixtral's, byte-level "gpt2" ones, ...), so that is what builds it here.

Only the metadata is read, with gguf's own reader (the same that reads the
tensor table), rather than through transformers' GGUF file reader, which
imports torch: the decoder needs no torch, and the few hundred MiB it costs
would count against the run's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mer.errors import BadInput, RuntimeFailure


def _values(reader: Any, key: str) -> Any:
    """A metadata value: scalars, strings, and arrays of either (None when absent)."""
    f = reader.fields.get(key)
    if f is None or not f.types:
        return None

    def conv(part: Any, typ: Any) -> Any:
        if typ.name == "STRING":
            return bytes(part).decode("utf-8", "replace")
        v = part[0]
        return v.item() if hasattr(v, "item") else v

    if f.types[0].name == "ARRAY":
        typ = f.types[-1]
        return [conv(f.parts[i], typ) for i in f.data]
    return conv(f.parts[f.data[0]], f.types[0])


def _gguf_builders() -> tuple[dict[str, dict[str, str]], Any]:
    """transformers' GGUF key mapping and builder (5.x module, or 4.x's integrations.ggml)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:
        from transformers.integrations.ggml import (  # type: ignore[no-redef,attr-defined]
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def read_tokenizer_metadata(reader: Any, where: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, tokenizer dict, tokenizer config) as transformers' GGUF builders take them."""
    GGUF_TOKENIZER_MAPPING, _ = _gguf_builders()

    arch = _values(reader, "general.architecture") or "llama"
    groups: dict[str, dict[str, Any]] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        groups[group] = {}
        for key, name in renames.items():
            v = _values(reader, f"tokenizer.{key}")
            if v is not None:
                groups[group][name] = v
    tok, conf = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tok or "tokenizer_type" not in tok:
        raise BadInput(
            f"{where}: no tokenizer in the metadata (tokenizer.ggml.model / tokenizer.ggml.tokens); "
            "convert the model with llama.cpp's convert_hf_to_gguf.py, which embeds it."
        )
    if tok["tokenizer_type"] == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        conf.setdefault("add_bos_token", True)
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        tid = _values(reader, f"tokenizer.ggml.{key}")
        conf[name] = (
            tok["tokens"][tid] if tid is not None and 0 <= tid < len(tok["tokens"]) else None
        )
    return arch, tok, conf


def load_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer built from the GGUF's own metadata."""
    try:
        from transformers import PreTrainedTokenizerFast

        _, convert_gguf_tokenizer = _gguf_builders()
    except ImportError as exc:
        raise RuntimeFailure(
            f"mer generate needs transformers and tokenizers for the GGUF's tokenizer ({exc}); "
            "install the extra: pip install 'mer-moe[generate]'."
        ) from exc
    from mer.engine.store import _TableReader

    p = Path(path)
    reader = _TableReader(str(p))
    arch, tok, conf = read_tokenizer_metadata(reader, str(p))
    del reader
    try:
        backend, extra = convert_gguf_tokenizer(arch, tok)
    except (ValueError, KeyError) as exc:
        raise BadInput(f"{p}: cannot build its tokenizer ({exc}).") from None
    kwargs = {k: v for k, v in {**conf, **extra}.items() if v is not None}
    kwargs.pop("chat_template", None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
