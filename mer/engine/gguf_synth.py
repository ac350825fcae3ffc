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
_KIND_ID = {"gate": 0, "up": 1, "down": 2, "router": 3, "q": 4, "k": 5, "v": 6, "output": 7}
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


def _rng(seed: int, layer: int, expert: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, layer, expert, _KIND_ID[kind]])


def tensor_data(spec: TensorSpec, seed: int) -> np.ndarray:
    """The bytes of one tensor (uint8 for quantised types), deterministic in (seed, spec)."""
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
            random_q4_0(_rng(seed, spec.layer, e, spec.kind), rows, cols, scale, out=out[e])
        return out
    expert = spec.expert if spec.expert is not None else 0
    return random_q4_0(_rng(seed, spec.layer, expert, spec.kind), rows, cols, scale)


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

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def write_gguf(
    path: str | os.PathLike[str],
    shape: ModelShape,
    specs: list[TensorSpec],
    seed: int = 0,
    layout: str = "stacked",
    progress: Callable[[int, int], None] | None = None,
    metadata: dict[str, int] | None = None,
) -> int:
    """Write `specs` (data from `tensor_data`) to `path` atomically; returns file size.

    The file is padded to a multiple of 4096 bytes so that an aligned read of the
    last expert never runs past the end of the file.
    """
    total = sum(s.n_bytes for s in specs)
    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), arch="llama")
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
        for key, value in (metadata or {}).items():
            w.add_uint32(key, value)
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
            data = tensor_data(s, seed)
            w.write_tensor_data(data)
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


def synth_gguf(
    path: str | os.PathLike[str],
    shape: ModelShape,
    seed: int = 0,
    layout: str = "stacked",
    dense: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """`mer experts synth`: a Mixtral-shaped q4_0 GGUF for `shape`."""
    specs = plan_tensors(shape, layout, dense)
    size = write_gguf(path, shape, specs, seed, layout, progress)
    return SynthResult(
        path=str(Path(path)),
        shape=shape.name,
        layout=layout,
        dense=dense,
        seed=seed,
        n_tensors=len(specs),
        file_bytes=size,
        expert_bytes=shape.bytes_per_expert * shape.n_keys,
    )


__all__ = [
    "EXPERT_KINDS",
    "LAYOUTS",
    "SynthResult",
    "TensorSpec",
    "attention_dims",
    "expert_tensor_name",
    "plan_tensors",
    "synth_gguf",
    "tensor_data",
    "write_gguf",
]
