"""Write Mixtral-shaped GGUF files with q4_0 expert weights (random, seeded).

The files have Mixtral's real tensor names and ggml shapes, so the store reads
them exactly as it would read a converted Mixtral:

    stacked    blk.N.ffn_gate_exps.weight  ne {d_model, d_ff, n_expert}   (numpy [E, d_ff, d_model])
               blk.N.ffn_up_exps.weight    ne {d_model, d_ff, n_expert}
               blk.N.ffn_down_exps.weight  ne {d_ff, d_model, n_expert}   (numpy [E, d_model, d_ff])
    per-expert blk.N.ffn_{gate,up}.E.weight ne {d_model, d_ff}; blk.N.ffn_down.E.weight ne {d_ff, d_model}

plus the f32 router `blk.N.ffn_gate_inp.weight` (ne {d_model, n_expert}) and,
with `dense=True`, the q4_0 attention projections `blk.N.attn_{q,k,v,output}.weight`
at their true per-layer size. Metadata is arch "llama" as llama.cpp writes it for
Mixtral (expert_count, expert_used_count, block_count, ...), plus `mer.*` keys.

`full=True` (`mer experts synth --full`) writes a whole model `mer generate`
decodes: also the token embedding, the norms, the output head, rope and
norm hyperparameters and a small sentencepiece-style ("llama") vocabulary in
llama.cpp's tokenizer keys. Its q4_0 codes are symmetric about zero
(`random_q4_0(symmetric=True)`), or the random model would route every token
to the same experts; `mer run --experts` reads the same file, so one file
serves both `mer run` and `mer generate`.

Writing streams: gguf's GGUFWriter takes every tensor's info first
(`add_tensor_info`), writes header, metadata and tensor infos, then the data one
tensor at a time (`write_tensor_data`), so memory stays at one tensor (one
expert in the per-expert layout, one layer's 8 experts stacked) even for the
25 GB mixtral-8x7b. Each expert's weights come from a generator seeded by
(seed, layer, expert, matrix), so both layouts hold identical experts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from mer.atomic import atomic_path
from mer.engine.q4_0 import random_q4_0
from mer.shapes import ALIGN, ModelShape

LAYOUTS = ("stacked", "per-expert")
EXPERT_KINDS = ("gate", "up", "down")
_KIND_ID = {
    "gate": 0,
    "up": 1,
    "down": 2,
    "router": 3,
    "q": 4,
    "k": 5,
    "v": 6,
    "output": 7,
    "embed": 8,
    "head": 9,
    "norm": 10,
}
DEFAULT_VOCAB = 512
ROPE_BASE = 1e6  # Mixtral's
RMS_EPS = 1e-5
Q4_0 = GGMLQuantizationType.Q4_0


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: numpy-order shape (outermost first; last = ggml ne[0])."""

    name: str
    shape: tuple[int, ...]
    dtype: GGMLQuantizationType
    layer: int
    kind: str  # gate | up | down | router | q | k | v | output
    expert: int | None = None  # per-expert tensors; stacked tensors hold all experts
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.dtype]
        n = int(np.prod(self.shape))
        return n // block * size


def expert_tensor_name(layout: str, layer: int, kind: str, expert: int | None = None) -> str:
    if layout == "stacked":
        return f"blk.{layer}.ffn_{kind}_exps.weight"
    return f"blk.{layer}.ffn_{kind}.{expert}.weight"


def _expert_rows_cols(shape: ModelShape, kind: str) -> tuple[int, int]:
    return (shape.d_model, shape.d_ff) if kind == "down" else (shape.d_ff, shape.d_model)


def attention_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """Per-layer attention projections, numpy order [rows, cols] as llama.cpp stores them."""
    head_dim = shape.d_model // shape.n_heads
    q = shape.n_heads * head_dim
    kv = shape.n_kv_heads * head_dim
    return {
        "q": (q, shape.d_model),
        "k": (kv, shape.d_model),
        "v": (kv, shape.d_model),
        "output": (shape.d_model, q),
    }


def plan_tensors(
    shape: ModelShape, layout: str = "stacked", dense: bool = False
) -> list[TensorSpec]:
    """Every tensor of the file, in write order (per layer: attention, router, experts)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    specs: list[TensorSpec] = []
    for layer in range(shape.n_layers):
        if dense:
            for kind, dims in attention_dims(shape).items():
                specs.append(TensorSpec(f"blk.{layer}.attn_{kind}.weight", dims, Q4_0, layer, kind))
        specs.append(
            TensorSpec(
                f"blk.{layer}.ffn_gate_inp.weight",
                (shape.n_experts, shape.d_model),
                GGMLQuantizationType.F32,
                layer,
                "router",
            )
        )
        if layout == "stacked":
            for kind in EXPERT_KINDS:
                rows, cols = _expert_rows_cols(shape, kind)
                specs.append(
                    TensorSpec(
                        expert_tensor_name(layout, layer, kind),
                        (shape.n_experts, rows, cols),
                        Q4_0,
                        layer,
                        kind,
                    )
                )
        else:
            for expert in range(shape.n_experts):
                for kind in EXPERT_KINDS:
                    specs.append(
                        TensorSpec(
                            expert_tensor_name(layout, layer, kind, expert),
                            _expert_rows_cols(shape, kind),
                            Q4_0,
                            layer,
                            kind,
                            expert,
                        )
                    )
    return specs


def plan_full_tensors(
    shape: ModelShape, vocab_size: int = DEFAULT_VOCAB, layout: str = "stacked"
) -> list[TensorSpec]:
    """Every tensor of a whole model, in llama.cpp's order: embedding, layers, norm, head."""
    f32 = GGMLQuantizationType.F32
    d = shape.d_model
    specs = [TensorSpec("token_embd.weight", (vocab_size, d), Q4_0, 0, "embed")]
    for spec in plan_tensors(shape, layout, dense=True):
        if spec.kind == "q":
            specs.append(
                TensorSpec(f"blk.{spec.layer}.attn_norm.weight", (d,), f32, spec.layer, "norm")
            )
        if spec.kind == "router":
            specs.append(
                TensorSpec(f"blk.{spec.layer}.ffn_norm.weight", (d,), f32, spec.layer, "norm")
            )
        specs.append(spec)
    specs.append(TensorSpec("output_norm.weight", (d,), f32, shape.n_layers, "norm"))
    specs.append(TensorSpec("output.weight", (vocab_size, d), Q4_0, 0, "head"))
    return specs


def synthetic_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style vocabulary as llama.cpp stores Mixtral's: tokens, scores, types.

    <unk>, <s>, </s>, the 256 byte-fallback tokens <0xNN>, then "▁" and letters,
    then English words built prefix by prefix ("▁t", "▁th", "▁the") so every
    piece has a merge; scores fall with rank, as a BPE sentencepiece model's do.
    """
    if vocab_size < 300:
        raise ValueError(f"a synthetic vocabulary needs at least 300 tokens, got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    pieces: list[str] = ["\u2581", *"etaoinshrdlcumwfgypbvkjxqz"]
    pieces += list("ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,!?'-:;")
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "that",
        "for",
        "it",
        "as",
        "with",
        "be",
        "on",
        "by",
        "at",
        "this",
        "had",
        "not",
        "are",
        "but",
        "from",
        "or",
        "have",
        "an",
        "they",
        "which",
        "one",
        "you",
        "were",
        "all",
        "we",
        "her",
        "she",
        "there",
        "would",
        "their",
        "will",
        "when",
        "who",
        "him",
        "been",
        "has",
        "more",
        "if",
        "no",
        "out",
        "do",
        "so",
        "can",
        "what",
        "up",
        "said",
        "about",
        "other",
        "into",
        "than",
        "its",
        "time",
        "only",
        "could",
        "new",
        "them",
        "man",
        "some",
        "these",
        "then",
        "two",
        "first",
        "may",
        "any",
        "like",
        "now",
        "my",
        "such",
        "make",
        "over",
        "our",
        "even",
        "most",
        "me",
        "state",
        "after",
        "also",
        "made",
        "many",
        "did",
        "must",
        "before",
        "back",
        "see",
        "through",
        "way",
        "where",
        "get",
        "much",
        "go",
        "well",
        "your",
        "know",
        "should",
        "down",
        "work",
        "year",
        "because",
        "come",
        "people",
        "just",
        "say",
        "each",
        "those",
        "take",
        "day",
        "good",
        "how",
        "long",
        "little",
        "very",
        "world",
        "own",
        "still",
        "here",
        "great",
        "old",
        "life",
        "end",
    ]
    seen = set(pieces)
    for w in words:
        for j in range(1, len(w) + 1):
            piece = "\u2581" + w[:j]
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    n = vocab_size - len(tokens)
    tokens += pieces[:n]
    types += [1] * min(n, len(pieces))  # NORMAL
    while len(tokens) < vocab_size:  # pad as the converter does
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)  # UNUSED
    scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
    return tokens, scores, types


def _rng(seed: int, layer: int, expert: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, layer, expert, _KIND_ID[kind]])


def tensor_data(spec: TensorSpec, seed: int, symmetric: bool = False) -> np.ndarray:
    """The bytes of one tensor (uint8 for quantised types), deterministic in (seed, spec).

    `symmetric`: q4_0 codes symmetric about zero (`random_q4_0`), for whole models.
    """
    if spec.kind == "norm":  # RMSNorm gains near 1, as in a trained model
        rng = _rng(seed, spec.layer, 0, spec.kind)
        return (1.0 + 0.05 * rng.standard_normal(spec.shape)).astype(np.float32)
    if spec.dtype == GGMLQuantizationType.F32:
        rng = _rng(seed, spec.layer, spec.expert or 0, spec.kind)
        std = float(spec.shape[-1]) ** -0.5
        return (rng.standard_normal(spec.shape) * std).astype(np.float32)
    if spec.dtype == GGMLQuantizationType.F16:
        rng = _rng(seed, spec.layer, spec.expert or 0, spec.kind)
        return (rng.standard_normal(spec.shape) * float(spec.shape[-1]) ** -0.5).astype(np.float16)
    if spec.dtype != Q4_0:
        # any other quantised type: random bytes of the right size (valid enough to test)
        rng = _rng(seed, spec.layer, spec.expert or 0, spec.kind)
        return np.frombuffer(rng.bytes(spec.n_bytes), dtype=np.uint8).copy()
    rows, cols = spec.shape[-2], spec.shape[-1]
    scale = float(cols) ** -0.5  # fan-in scaling keeps activations O(1) layer after layer
    if len(spec.shape) == 3:  # stacked: expert is the outermost dimension
        out = np.empty((spec.shape[0], rows, cols // 32 * 18), dtype=np.uint8)
        for e in range(spec.shape[0]):
            random_q4_0(
                _rng(seed, spec.layer, e, spec.kind),
                rows,
                cols,
                scale,
                out=out[e],
                symmetric=symmetric,
            )
        return out
    expert = spec.expert if spec.expert is not None else 0
    return random_q4_0(
        _rng(seed, spec.layer, expert, spec.kind), rows, cols, scale, symmetric=symmetric
    )


@dataclass(frozen=True)
class SynthResult:
    path: str
    shape: str
    layout: str
    dense: bool
    seed: int
    n_tensors: int
    file_bytes: int
    expert_bytes: int
    full: bool = False

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def write_gguf_file(
    path: str | os.PathLike[str],
    specs: list[TensorSpec],
    data: Callable[[TensorSpec], np.ndarray],
    metadata: Callable[[GGUFWriter], None],
    progress: Callable[[int, int], None] | None = None,
    arch: str = "llama",
) -> int:
    """mer's GGUF writer: `specs` with bytes from `data(spec)`, keys from `metadata(writer)`.

    Atomic (temporary file, then rename) and streaming (one tensor in memory at a
    time). The file is padded to a multiple of 4096 bytes so that an aligned read
    of the last expert never runs past the end of the file. Returns the file size.
    """
    total = sum(s.n_bytes for s in specs)
    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), arch=arch)
        metadata(w)
        for s in specs:
            if s.dtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w.add_tensor_info(
                    s.name, s.shape, np.dtype(np.float32), s.n_bytes, raw_dtype=s.dtype
                )
            else:
                byte_shape = (*s.shape[:-1], s.n_bytes // int(np.prod(s.shape[:-1])))
                w.add_tensor_info(
                    s.name, byte_shape, np.dtype(np.uint8), s.n_bytes, raw_dtype=s.dtype
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        done = 0
        for s in specs:
            w.write_tensor_data(data(s))
            done += s.n_bytes
            if progress is not None:
                progress(done, total)
        w.close()
        size = os.path.getsize(tmp)
        pad = -size % ALIGN
        if pad:
            with open(tmp, "ab") as fh:
                fh.write(b"\0" * pad)
            size += pad
    return size


def _shape_keys(w: GGUFWriter, shape: ModelShape, seed: int, layout: str) -> None:
    w.add_name(f"mer synthetic {shape.name}")
    w.add_context_length(4096)
    w.add_embedding_length(shape.d_model)
    w.add_feed_forward_length(shape.d_ff)
    w.add_block_count(shape.n_layers)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_expert_count(shape.n_experts)
    w.add_expert_used_count(shape.top_k)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    w.add_string("mer.shape", shape.name)
    w.add_string("mer.layout", layout)
    w.add_uint32("mer.seed", seed)


def write_gguf(
    path: str | os.PathLike[str],
    shape: ModelShape,
    specs: list[TensorSpec],
    seed: int = 0,
    layout: str = "stacked",
    progress: Callable[[int, int], None] | None = None,
    metadata: dict[str, int] | None = None,
) -> int:
    """Write `specs` (data from `tensor_data`) to `path` atomically; returns file size."""

    def keys(w: GGUFWriter) -> None:
        _shape_keys(w, shape, seed, layout)
        for key, value in (metadata or {}).items():
            w.add_uint32(key, value)

    return write_gguf_file(path, specs, lambda s: tensor_data(s, seed), keys, progress)


def synth_gguf(
    path: str | os.PathLike[str],
    shape: ModelShape,
    seed: int = 0,
    layout: str = "stacked",
    dense: bool = False,
    progress: Callable[[int, int], None] | None = None,
    full: bool = False,
    vocab_size: int = DEFAULT_VOCAB,
) -> SynthResult:
    """`mer experts synth`: a Mixtral-shaped q4_0 GGUF for `shape` (`full`: a whole model)."""
    if not full:
        specs = plan_tensors(shape, layout, dense)
        size = write_gguf(path, shape, specs, seed, layout, progress)
    else:
        specs = plan_full_tensors(shape, vocab_size, layout)
        tokens, scores, types = synthetic_vocab(vocab_size)

        def keys(w: GGUFWriter) -> None:
            _shape_keys(w, shape, seed, layout)
            w.add_vocab_size(vocab_size)
            w.add_rope_dimension_count(shape.d_model // shape.n_heads)
            w.add_rope_freq_base(ROPE_BASE)
            w.add_layer_norm_rms_eps(RMS_EPS)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(tokens)
            w.add_token_scores(scores)
            w.add_token_types(types)
            w.add_unk_token_id(0)
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_add_bos_token(True)
            w.add_add_eos_token(False)
            w.add_bool("mer.full", True)

        size = write_gguf_file(
            path, specs, lambda s: tensor_data(s, seed, symmetric=True), keys, progress
        )
    return SynthResult(
        path=str(Path(path)),
        shape=shape.name,
        layout=layout,
        dense=dense or full,
        seed=seed,
        n_tensors=len(specs),
        file_bytes=size,
        expert_bytes=shape.bytes_per_expert * shape.n_keys,
        full=full,
    )


__all__ = [
    "EXPERT_KINDS",
    "LAYOUTS",
    "SynthResult",
    "TensorSpec",
    "attention_dims",
    "expert_tensor_name",
    "plan_full_tensors",
    "plan_tensors",
    "synth_gguf",
    "synthetic_vocab",
    "tensor_data",
    "write_gguf",
    "write_gguf_file",
]
