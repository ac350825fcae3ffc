"""A tiny random Mixtral built with transformers, written to GGUF as llama.cpp's converter does.

Shared by the decoder tests (not a test module itself). Nothing is downloaded:
the tokenizer is a sentencepiece BPE model trained here on a few sentences,
the model is `MixtralForCausalLM` from a small config with random weights.

`write_gguf` follows llama.cpp's convert_hf_to_gguf.py for a
MixtralForCausalLM (class LlamaModel there):
- hyperparameters: context_length, embedding_length, block_count,
  feed_forward_length, rope freq_base, head_count(_kv),
  layer_norm_rms_epsilon, expert_count, expert_used_count, vocab_size,
  rope dimension_count, file_type;
- vocabulary `_set_vocab_sentencepiece`: tokenizer.ggml.model "llama", pre
  "default", every piece with its sentencepiece score and type (normal,
  unknown, control, unused, byte), then gguf's SpecialVocab over the model
  dir (bos/eos ids from config.json, add_bos/add_eos from tokenizer_config.json);
- tensors: attn_q and attn_k rows permuted with the converter's `permute`
  (rotate-half pairs (i, i + d/2) become adjacent pairs (2i, 2i + 1)), experts
  stacked per layer into ffn_{gate,up,down}_exps (w1 = gate, w3 = up, w2 = down).
The bytes are written by mer's own GGUF writer (`write_gguf_file`); the tests
read them back with gguf's reader to check them.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mer.engine.gguf_synth import TensorSpec, write_gguf_file
from mer.engine.q4_0 import dequantize as q4_dequantize
from mer.engine.q4_0 import quantize as q4_quantize

CORPUS = [
    "the cat sat on the mat",
    "a big red house near the old tree",
    "dogs ran fast and cats ran slow",
    "Hello world, this is a test of the tokenizer.",
    "numbers like 12345 and symbols like !? appear too",
    "she sells sea shells by the sea shore",
    "time flies like an arrow; fruit flies like a banana",
]
TEST_STRINGS = [
    "the cat sat on the mat",
    "Hello world!",
    "an unseen zebra quietly jumps",
    "  two  spaces",
    "ünïcödé and emoji 🙂",
    "line one\nline two",
    "12345 + 678 = ?",
]

N_LAYERS, N_EXPERTS, TOP_K = 4, 8, 2
D_MODEL, D_FF, N_HEADS, N_KV = 64, 96, 4, 2
ROPE_THETA = 1e6
RMS_EPS = 1e-5


def deps() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    return torch, transformers


def tokenizer_dir(root: Path) -> Path:
    """A model dir with a trained sentencepiece BPE tokenizer.model, as Mixtral's repo has."""
    import sentencepiece as spm

    d = root / "tiny-mixtral"
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10),
        model_writer=buf,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "LlamaTokenizer",
            }
        )
    )
    return d


def hf_tokenizer(d: Path) -> Any:
    _, tf = deps()
    return tf.LlamaTokenizer.from_pretrained(str(d))


def hf_model(d: Path, vocab_size: int, seed: int = 0) -> Any:
    """A random float32 Mixtral; its config.json goes into the model dir (the converter reads it)."""
    torch, tf = deps()
    cfg = tf.MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=D_MODEL,
        intermediate_size=D_FF,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        num_local_experts=N_EXPERTS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=256,
        rope_theta=ROPE_THETA,
        rms_norm_eps=RMS_EPS,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        experts_implementation="eager",  # the plain per-expert loop; it also runs in float64
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # Norm gains away from 1 and routers spread (far from ties), as trained ones are.
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            layer.mlp.gate.weight.mul_(4.0)
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.config.save_pretrained(str(d))
    return model


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model: Any) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array (numpy order), as the converter maps them."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"blk.{i}.attn_q.weight"] = permute(sd[p + "self_attn.q_proj.weight"], N_HEADS, N_HEADS)
        out[f"blk.{i}.attn_k.weight"] = permute(sd[p + "self_attn.k_proj.weight"], N_HEADS, N_KV)
        out[f"blk.{i}.attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"blk.{i}.ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # (E, 2 ff, d): gate rows, then up rows
        out[f"blk.{i}.ffn_gate_exps.weight"] = np.ascontiguousarray(gate_up[:, :D_FF])
        out[f"blk.{i}.ffn_up_exps.weight"] = np.ascontiguousarray(gate_up[:, D_FF:])
        out[f"blk.{i}.ffn_down_exps.weight"] = sd[p + "mlp.experts.down_proj"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    out["output.weight"] = sd["lm_head.weight"]
    return out


def sentencepiece_vocab(d: Path) -> tuple[list[bytes], list[float], list[int]]:
    """convert_hf_to_gguf.py's _create_vocab_sentencepiece for this dir."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(d / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        t = 1  # NORMAL
        if sp.IsUnknown(i):
            t = 2
        elif sp.IsControl(i):
            t = 3
        elif sp.IsUnused(i):
            t = 5
        elif sp.IsByte(i):
            t = 6
        types.append(t)
    return tokens, scores, types


EXPERT_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def write_gguf(
    model: Any,
    d: Path,
    out: Path,
    experts: str = "F32",
    types: dict[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` to `out`; returns the float32 values of every tensor written.

    `experts`: F32, Q4_0 (mer's quantiser), or any type gguf.quants can quantise
    (Q8_0, F16, ...). `types`: other tensors by name fragment ("attn_q", "output.",
    "token_embd") -> type. Quantised tensors are returned dequantised (what the
    file holds), so a reference can run on exactly those weights.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gg_dequantize
    from gguf.quants import quantize as gg_quantize

    tensors = gguf_tensors(model)
    specs: list[TensorSpec] = []
    data: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        is_expert = any(k in name for k in EXPERT_NAMES)
        want = experts if is_expert else "F32"
        for frag, t in (types or {}).items():
            if frag in name and not is_expert:
                want = t
        if want == "Q4_0" and is_expert:
            raw = q4_quantize(arr)
            tensors[name] = q4_dequantize(raw).reshape(arr.shape)
            specs.append(TensorSpec(name, arr.shape, Q.Q4_0, 0, "gate"))
            data[name] = raw
        elif want != "F32":
            qt = Q[want]
            raw = gg_quantize(np.ascontiguousarray(arr, dtype=np.float32), qt)
            tensors[name] = np.asarray(gg_dequantize(raw, qt), dtype=np.float32).reshape(arr.shape)
            specs.append(TensorSpec(name, arr.shape, qt, 0, "gate"))
            data[name] = raw
        else:
            specs.append(TensorSpec(name, arr.shape, Q.F32, 0, "router"))
            data[name] = np.ascontiguousarray(arr, dtype=np.float32)
    tokens, scores, types = sentencepiece_vocab(d)
    cfg = model.config

    def keys(w: Any) -> None:
        w.add_name("tiny-mixtral")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_freq_base(ROPE_THETA)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_file_type(
            gguf.LlamaFileType.MOSTLY_Q4_0 if experts == "Q4_0" else gguf.LlamaFileType.ALL_F32
        )
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        gguf.SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    write_gguf_file(out, specs, lambda s: data[s.name], keys)
    return tensors


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The inverse of `permute`: adjacent pairs back to rotate-half order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def set_hf_weights(model: Any, tensors: dict[str, np.ndarray]) -> None:
    """Put every (dequantised) tensor of the file back into the transformers model."""
    import torch

    def put(param: Any, value: np.ndarray) -> None:
        param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    with torch.no_grad():
        put(model.model.embed_tokens.weight, tensors["token_embd.weight"])
        put(model.model.norm.weight, tensors["output_norm.weight"])
        put(model.lm_head.weight, tensors["output.weight"])
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            put(a.q_proj.weight, unpermute(tensors[f"blk.{i}.attn_q.weight"], N_HEADS, N_HEADS))
            put(a.k_proj.weight, unpermute(tensors[f"blk.{i}.attn_k.weight"], N_HEADS, N_KV))
            put(a.v_proj.weight, tensors[f"blk.{i}.attn_v.weight"])
            put(a.o_proj.weight, tensors[f"blk.{i}.attn_output.weight"])
            put(layer.input_layernorm.weight, tensors[f"blk.{i}.attn_norm.weight"])
            put(layer.post_attention_layernorm.weight, tensors[f"blk.{i}.ffn_norm.weight"])
            put(layer.mlp.gate.weight, tensors[f"blk.{i}.ffn_gate_inp.weight"])
    set_hf_experts(model, tensors)


def set_hf_experts(model: Any, tensors: dict[str, np.ndarray]) -> None:
    """Put the (dequantised) expert weights back into the transformers model."""
    import torch

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            g = tensors[f"blk.{i}.ffn_gate_exps.weight"]
            u = tensors[f"blk.{i}.ffn_up_exps.weight"]
            dn = tensors[f"blk.{i}.ffn_down_exps.weight"]
            layer.mlp.experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([g, u], axis=1)))
            layer.mlp.experts.down_proj.copy_(torch.from_numpy(dn))


def q8_activations(model: Any) -> Any:
    """A copy of `model` whose experts see their inputs as the native kernel does.

    The native q4_0 kernel (ggml's arithmetic) quantises every activation vector
    to q8_0 per block of 32 before its integer dots: the experts' input x and
    their hidden silu(gate x) * (up x). This reference applies exactly that
    quantisation (mer.native.q4_0.quantize_q8_0, the numpy definition the kernel
    is tested against), then computes the rest in the model's own dtype, so
    mer's native run can be held to it at float32 precision.
    """
    import types

    import torch
    from torch import nn

    from mer.native import q4_0 as nq

    def q8(x: Any) -> Any:
        a = x.detach().to(torch.float32).cpu().numpy().reshape(-1, x.shape[-1])
        q, d, _ = nq.quantize_q8_0(a)
        deq = q.astype(np.float32).reshape(a.shape[0], -1, 32) * d[:, :, None]
        return torch.from_numpy(deq.reshape(x.shape)).to(x.dtype)

    def forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for r in range(top_k_index.shape[1]):
                e = int(top_k_index[t, r])
                x = q8(hidden_states[t : t + 1])
                gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
                h = q8(self.act_fn(gate) * up)
                y = nn.functional.linear(h, self.down_proj[e])
                out[t] += (y * top_k_weights[t, r])[0].to(out.dtype)
        return out

    m = copy.deepcopy(model)
    for layer in m.model.layers:
        layer.mlp.experts.forward = types.MethodType(forward, layer.mlp.experts)
    return m
