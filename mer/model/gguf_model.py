"""A Mixture-of-Experts model read straight from GGUF: hyperparameters and resident weights.

What llama.cpp calls the llama architecture with `expert_count` > 0 (Mixtral
8x7B, 8x22B and their fine-tunes). The hyperparameters are llama.cpp's keys
(`llama.block_count`, `llama.rope.freq_base`, ...), with llama.cpp's defaults
where a key is optional. Everything but the routed experts is loaded and stays
resident: token embedding, norms, attention projections, routers, output head.
The experts stay on disk and are streamed by the engine (`mer.engine.store`
describes their bytes, `mer.engine.streaming` reads them).

Tensor orientation is ggml's: a weight of ne {cols, rows} maps `cols` inputs
to `rows` outputs. As llama.cpp's converter writes them, attn_q and attn_k
rows are permuted so that rotary position embedding rotates adjacent pairs
(2i, 2i + 1) of each head, which is what `mer.model.decoder` applies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer.engine.store import ExpertStore, TensorInfo, _field_value, _TableReader
from mer.errors import BadInput
from mer.model.weights import Matrix, concat_rows, describe_bytes, load_matrix

SUPPORTED_ARCHS = ("llama",)
ROPE_SCALINGS = ("none", "linear")


@dataclass(frozen=True)
class MoeConfig:
    """The decoder's hyperparameters, as the file states them (llama.cpp's defaults otherwise)."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    n_experts: int
    top_k: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_scaling: str = "none"
    rope_factor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # float32 (d_model,)
    qkv: Matrix | None  # q, k, v stacked when they share a type, else None
    q: Matrix
    k: Matrix
    v: Matrix
    o: Matrix
    ffn_norm: np.ndarray
    router: np.ndarray  # float32 (n_experts, d_model)


@dataclass
class MoeModel:
    """A GGUF MoE model: config, resident dense weights, and the store of its experts."""

    path: Path
    config: MoeConfig
    embedding: Matrix
    layers: list[LayerWeights]
    output_norm: np.ndarray
    output: Matrix
    rope_freqs: np.ndarray | None
    store: ExpertStore
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def matrices(self) -> list[Matrix]:
        out = [self.embedding, self.output]
        for lw in self.layers:
            out += [lw.qkv] if lw.qkv is not None else [lw.q, lw.k, lw.v]
            out.append(lw.o)
        # The tied head shares the embedding's bytes: count them once.
        seen: set[int] = set()
        uniq = []
        for m in out:
            if id(m.data) not in seen:
                seen.add(id(m.data))
                uniq.append(m)
        return uniq

    @property
    def resident_bytes(self) -> int:
        """Every byte this model holds in RAM (matrices, norms, routers, rope factors)."""
        small = self.output_norm.nbytes + sum(
            lw.attn_norm.nbytes + lw.ffn_norm.nbytes + lw.router.nbytes for lw in self.layers
        )
        if self.rope_freqs is not None:
            small += self.rope_freqs.nbytes
        return sum(m.nbytes for m in self.matrices) + int(small)

    def memory(self) -> dict[str, Any]:
        return {"resident_bytes": self.resident_bytes, **describe_bytes(self.matrices)}

    @classmethod
    def open(cls, path: str | Path) -> MoeModel:
        return open_model(Path(path))


def _require(value: Any, key: str, p: Path) -> Any:
    if value is None:
        raise BadInput(
            f"{p}: metadata key {key} is missing; the file is not a complete llama-architecture "
            "GGUF (convert it with llama.cpp's convert_hf_to_gguf.py)."
        )
    return value


def read_config(reader: Any, table: dict[str, TensorInfo], p: Path) -> MoeConfig:
    arch = _field_value(reader, "general.architecture") or "llama"
    n_experts = _field_value(reader, f"{arch}.expert_count") or 0
    if arch not in SUPPORTED_ARCHS or not n_experts:
        what = f"architecture {arch!r}" + ("" if n_experts else " without experts")
        raise BadInput(
            f"{p}: {what}; mer generate decodes the llama architecture with experts "
            f"(Mixtral: general.architecture 'llama', llama.expert_count > 0)."
        )

    def get(key: str, default: Any = None) -> Any:
        v = _field_value(reader, f"{arch}.{key}")
        return default if v is None else v

    n_layers = int(_require(get("block_count"), f"{arch}.block_count", p))
    d_model = int(_require(get("embedding_length"), f"{arch}.embedding_length", p))
    n_heads = int(_require(get("attention.head_count"), f"{arch}.attention.head_count", p))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise BadInput(f"{p}: key and value head sizes differ; not a Mixtral-family model.")
    emb = table.get("token_embd.weight")
    if emb is None:
        raise BadInput(f"{p}: tensor token_embd.weight is missing; the file is incomplete.")
    vocab = int(get("vocab_size", emb.ne[1] if len(emb.ne) > 1 else 0))
    scaling = str(get("rope.scaling.type", "none"))
    factor = float(get("rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ROPE_SCALINGS:
        raise BadInput(
            f"{p}: rope scaling {scaling!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})."
        )
    cfg = MoeConfig(
        arch=arch,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=int(get("expert_feed_forward_length", get("feed_forward_length", 0))),
        n_experts=int(n_experts),
        top_k=int(_require(get("expert_used_count"), f"{arch}.expert_used_count", p)),
        vocab_size=vocab,
        context_length=int(get("context_length", 4096)),
        rms_eps=float(
            _require(
                get("attention.layer_norm_rms_epsilon"),
                f"{arch}.attention.layer_norm_rms_epsilon",
                p,
            )
        ),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_dim=int(get("rope.dimension_count", head_dim)),
        rope_scaling=scaling,
        rope_factor=factor if scaling == "linear" else 1.0,
    )
    if n_heads % n_kv:
        raise BadInput(f"{p}: {n_heads} attention heads do not split into {n_kv} KV groups.")
    if cfg.rope_dim > head_dim or cfg.rope_dim % 2:
        raise BadInput(f"{p}: rope dimension {cfg.rope_dim} does not fit head size {head_dim}.")
    if not 0 < cfg.top_k <= cfg.n_experts:
        raise BadInput(f"{p}: expert_used_count {cfg.top_k} outside 1..{cfg.n_experts}.")
    return cfg


def _vector(fh: Any, t: TensorInfo, n: int, p: Path) -> np.ndarray:
    m = load_matrix(fh, t.name, t.dtype, (t.ne[0], 1), t.offset, keep_rows=False)
    v = np.ascontiguousarray(m.data.reshape(-1), dtype=np.float32)
    if v.size != n:
        raise BadInput(f"{p}: tensor {t.name} has {v.size} values, expected {n}.")
    return v


def _dtype_ok(t: TensorInfo, p: Path) -> None:
    if t.dtype.startswith("type "):
        raise BadInput(
            f"{p}: tensor {t.name} has a ggml {t.dtype} this gguf library cannot decode; "
            "upgrade gguf (pip install -U gguf) or use a Q4_0 file."
        )


def open_model(p: Path) -> MoeModel:
    """Read the config, check every tensor, load the dense weights, open the expert store."""
    store = ExpertStore.open(p)  # checks magic, header, truncation, expert tensors and types
    reader = _TableReader(str(p))
    table = {t.name: t for t in reader.table}
    cfg = read_config(reader, table, p)
    meta = {
        "name": _field_value(reader, "general.name"),
        "file_type": _field_value(reader, "general.file_type"),
    }
    del reader
    if (store.n_layers, store.n_experts, store.shape.d_model) != (
        cfg.n_layers,
        cfg.n_experts,
        cfg.d_model,
    ):
        raise BadInput(
            f"{p}: expert tensors are {store.n_layers} layers x {store.n_experts} experts of "
            f"width {store.shape.d_model}, but the metadata says {cfg.n_layers} x {cfg.n_experts} "
            f"of width {cfg.d_model}; the file is inconsistent."
        )
    cfg = MoeConfig(**{**cfg.to_dict(), "d_ff": store.shape.d_ff})
    unexpected = sorted(n for n in table if n.startswith("blk.") and n.endswith(".bias"))
    if unexpected:
        raise BadInput(
            f"{p}: holds bias tensors ({', '.join(unexpected[:3])}), which Mixtral-family "
            "models do not have; this architecture variant is not supported."
        )

    def need(name: str) -> TensorInfo:
        t = table.get(name)
        if t is None:
            raise BadInput(f"{p}: tensor {name} is missing; the file is incomplete.")
        _dtype_ok(t, p)
        return t

    def want_ne(t: TensorInfo, cols: int, rows: int) -> None:
        if tuple(t.ne[:2]) != (cols, rows) or any(d != 1 for d in t.ne[2:]):
            raise BadInput(
                f"{p}: tensor {t.name} has ne {list(t.ne)}, expected [{cols}, {rows}] "
                "from the metadata."
            )

    d, qd, kvd = cfg.d_model, cfg.q_dim, cfg.kv_dim
    with open(p, "rb") as fh:

        def mat(name: str, cols: int, rows: int, keep_rows: bool = False) -> Matrix:
            t = need(name)
            want_ne(t, cols, rows)
            return load_matrix(fh, name, t.dtype, t.ne, t.offset, keep_rows=keep_rows)

        embedding = mat("token_embd.weight", d, cfg.vocab_size, keep_rows=True)
        layers = []
        for L in range(cfg.n_layers):
            q = mat(f"blk.{L}.attn_q.weight", d, qd)
            k = mat(f"blk.{L}.attn_k.weight", d, kvd)
            v = mat(f"blk.{L}.attn_v.weight", d, kvd)
            qkv = None
            if q.dtype == k.dtype == v.dtype:
                qkv = concat_rows(f"blk.{L}.attn_qkv", [q, k, v])
                q = Matrix(q.name, q.dtype, q.rows, q.cols, qkv.data[: q.rows])
                k = Matrix(k.name, k.dtype, k.rows, k.cols, qkv.data[q.rows : q.rows + k.rows])
                v = Matrix(v.name, v.dtype, v.rows, v.cols, qkv.data[q.rows + k.rows :])
            router_t = need(f"blk.{L}.ffn_gate_inp.weight")
            want_ne(router_t, d, cfg.n_experts)
            router = load_matrix(
                fh, router_t.name, router_t.dtype, router_t.ne, router_t.offset, keep_rows=False
            )
            layers.append(
                LayerWeights(
                    attn_norm=_vector(fh, need(f"blk.{L}.attn_norm.weight"), d, p),
                    qkv=qkv,
                    q=q,
                    k=k,
                    v=v,
                    o=mat(f"blk.{L}.attn_output.weight", qd, d),
                    ffn_norm=_vector(fh, need(f"blk.{L}.ffn_norm.weight"), d, p),
                    router=np.ascontiguousarray(router.data, dtype=np.float32)
                    if router.dtype == "F32"
                    else _dense(router),
                )
            )
        output_norm = _vector(fh, need("output_norm.weight"), d, p)
        output = (
            mat("output.weight", d, cfg.vocab_size)
            if "output.weight" in table
            else _tied_head(embedding)
        )
        rope_freqs = None
        if "rope_freqs.weight" in table:
            rope_freqs = _vector(fh, need("rope_freqs.weight"), cfg.rope_dim // 2, p)
    return MoeModel(p, cfg, embedding, layers, output_norm, output, rope_freqs, store, meta)


def _dense(m: Matrix) -> np.ndarray:
    """A small quantised matrix (a q8_0 router) as float32."""
    eye = np.eye(m.cols, dtype=np.float32)
    return np.ascontiguousarray(m.matvec(eye).T if m.dtype != "F32" else m.data)


def _tied_head(embedding: Matrix) -> Matrix:
    """llama.cpp uses the token embedding as the head when output.weight is absent."""
    if embedding.dtype in ("Q4_0", "Q8_0", "F32"):
        return embedding
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[embedding.dtype]
    data = np.asarray(dequantize(embedding.data, qt), dtype=np.float32).reshape(
        embedding.rows, embedding.cols
    )
    return Matrix(
        "output.weight (tied)",
        "F32",
        embedding.rows,
        embedding.cols,
        data,
        dequantised_from=embedding.dtype,
    )
