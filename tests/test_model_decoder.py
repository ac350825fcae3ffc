"""mer's GGUF decoder against transformers, on a tiny random Mixtral built in the test.

The model is written to GGUF the way llama.cpp's converter writes a Mixtral
(tests/tiny_mixtral.py), once with f32 experts and once with q4_0 experts,
and read back with gguf's own reader to check the file. The reference for the
decoder is transformers' MixtralForCausalLM on the same weights:

- logits: mer runs in float32, like transformers' float32 model; both are held
  against transformers in float64 (the "truth"). The tolerance is derived from
  the model's own float32 conditioning, measured in the same test: mer may be
  at most 4x as far from the float64 result as transformers' float32 result is
  (two float32 evaluations of one computation in different operation orders
  err by the same order of magnitude; 4x is the margin for the spread of a
  maximum over a few thousand values). A wrong rotary convention, head
  grouping, norm or routing rule errs by O(1), 10^4 times more.
- routing: the experts (top-k, rank order) equal transformers' router on every
  token and layer, the gate weights within the router-logit tolerance (the
  renormalised softmax weights are 1-Lipschitz in the logits' max norm).
- greedy generation: the same 40 tokens as transformers' greedy decoding.
- q4_0 experts: transformers runs the dequantised q4_0 weights. With the
  numpy kernel mer computes with exactly those weights in float32, so the same
  tolerances hold. The native kernel also quantises the experts' activations
  to q8_0 per block (ggml's arithmetic); its reference is transformers with that
  same activation quantisation in its experts, and again the float32 tolerances.
  A routing difference is allowed only at a near-tie, where transformers' gap
  between the k-th and (k+1)-th router logit is within twice the router-logit
  tolerance (a perturbation of at most e per logit swaps two logits only if they
  are within 2e); after one, that token's later layers and the later tokens are
  not compared (their hidden states differ by a whole expert), and at least
  half of the steps must have been compared. On this model there is none.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_mixtral as tm

pytestmark = pytest.mark.record

N_NEW = 40
PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tm.deps()
    root = tmp_path_factory.mktemp("tiny-mixtral")
    d = tm.tokenizer_dir(root)
    tok = tm.hf_tokenizer(d)
    model = tm.hf_model(d, len(tok))
    f32 = root / "tiny-f32.gguf"
    q4 = root / "tiny-q4_0.gguf"
    tensors_f32 = tm.write_gguf(model, d, f32, "F32")
    tensors_q4 = tm.write_gguf(model, d, q4, "Q4_0")
    model_q4 = copy.deepcopy(model)
    tm.set_hf_experts(model_q4, tensors_q4)
    return {
        "dir": d,
        "tok": tok,
        "model": model,
        "model_q4": model_q4,
        "f32": f32,
        "q4": q4,
        "tensors_f32": tensors_f32,
        "tensors_q4": tensors_q4,
        "root": root,
    }


# ---- the file ------------------------------------------------------------------------
def test_gguf_file_reads_back_through_gguf(tiny: dict[str, Any]) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from gguf.quants import quantize as gg_quantize

    sd = {k: v.detach().numpy() for k, v in tiny["model"].state_dict().items()}
    for path, tensors in ((tiny["f32"], tiny["tensors_f32"]), (tiny["q4"], tiny["tensors_q4"])):
        r = GGUFReader(path)
        by = {t.name: t for t in r.tensors}
        assert set(by) == set(tensors)
        for name, t in by.items():
            if t.tensor_type == Q.Q4_0:
                # mer's q4_0 bytes are ggml's reference quantisation of the f32 weights.
                want = gg_quantize(tm.gguf_tensors(tiny["model"])[name], Q.Q4_0)
                np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)
            else:
                assert t.tensor_type == Q.F32
                np.testing.assert_array_equal(
                    np.asarray(t.data).reshape(tensors[name].shape), tensors[name]
                )

        def field(key: str, r: Any = r) -> Any:
            f = r.fields[key]
            part = f.parts[f.data[0]]
            return bytes(part).decode() if f.types[0].name == "STRING" else part[0]

        assert field("general.architecture") == "llama"
        assert field("llama.expert_count") == tm.N_EXPERTS
        assert field("llama.expert_used_count") == tm.TOP_K
        assert field("llama.rope.freq_base") == pytest.approx(tm.ROPE_THETA)
        assert field("tokenizer.ggml.model") == "llama"
        assert field("tokenizer.ggml.bos_token_id") == 1
        assert field("tokenizer.ggml.eos_token_id") == 2
        assert bool(field("tokenizer.ggml.add_bos_token")) is True
    # The converter's permutation, checked row by row against its definition: in each head,
    # rotate-half pair (i, i + hd/2) becomes the adjacent pair (2i, 2i + 1).
    hd = tm.D_MODEL // tm.N_HEADS
    q_hf = sd["model.layers.1.self_attn.q_proj.weight"]
    k_hf = sd["model.layers.1.self_attn.k_proj.weight"]
    q_file = tiny["tensors_f32"]["blk.1.attn_q.weight"]
    k_file = tiny["tensors_f32"]["blk.1.attn_k.weight"]
    for w_hf, w_file, heads in ((q_hf, q_file, tm.N_HEADS), (k_hf, k_file, tm.N_KV)):
        for h in range(heads):
            for i in range(hd // 2):
                np.testing.assert_array_equal(w_file[h * hd + 2 * i], w_hf[h * hd + i])
                np.testing.assert_array_equal(
                    w_file[h * hd + 2 * i + 1], w_hf[h * hd + hd // 2 + i]
                )


def test_tokenizer_ids_equal_transformers(tiny: dict[str, Any]) -> None:
    from mer.model.tokenizer import load_tokenizer

    ours = load_tokenizer(tiny["f32"])
    ref = tiny["tok"]
    for s in tm.TEST_STRINGS:
        assert ours(s).input_ids == ref(s).input_ids, s
        ids = ref(s).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.bos_token_id == ref.bos_token_id == 1


def test_model_config_from_the_file(tiny: dict[str, Any]) -> None:
    from mer.model.gguf_model import MoeModel

    m = MoeModel.open(tiny["q4"])
    c = m.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim) == (
        tm.N_LAYERS,
        tm.D_MODEL,
        tm.N_HEADS,
        tm.N_KV,
        tm.D_MODEL // tm.N_HEADS,
    )
    assert (c.d_ff, c.n_experts, c.top_k, c.vocab_size) == (
        tm.D_FF,
        tm.N_EXPERTS,
        tm.TOP_K,
        len(tiny["tok"]),
    )
    assert c.rope_base == tm.ROPE_THETA and c.rms_eps == pytest.approx(tm.RMS_EPS)
    assert m.store.expert_dtype == "Q4_0"
    assert m.memory()["dequantised_to_f32"] == {}


# ---- the reference -----------------------------------------------------------------------
def _hf_teacher_forced(model: Any, ids: list[int]) -> dict[str, np.ndarray]:
    """One full-sequence forward (no cache): LM logits and every router's output, per position."""
    import torch

    from mer.traces.record.families import find_family
    from mer.traces.record.recorder import RouterTap

    fam = find_family(model)
    with torch.no_grad(), RouterTap(fam, logits=True) as tap:
        tap.begin()
        out = model(input_ids=torch.tensor([ids]))
        routing = tap.end()
    assert routing.logits is not None
    return {
        "logits": out.logits[0].double().numpy(),
        "experts": routing.experts,
        "weights": routing.weights,
        "router_logits": routing.logits,
    }


def _mer_teacher_forced(path: Path, ids: list[int], kernel: str = "auto") -> dict[str, np.ndarray]:
    """mer's decoder fed `ids` one by one, experts through the engine (io_uring or preadv)."""
    from mer.core import Replay, ReplayConfig
    from mer.engine.expert_types import make_expert_ffn
    from mer.engine.streaming import EngineConfig, ExpertStreamer
    from mer.model.decoder import Decoder
    from mer.model.gguf_model import MoeModel

    m = MoeModel.open(path)
    c = m.config
    replay = Replay.live(
        n_layers=c.n_layers,
        n_experts=c.n_experts,
        top_k=c.top_k,
        config=ReplayConfig(cache_slots=6, policy="lru"),
    )
    ffn = make_expert_ffn(m.store.expert_dtype, m.store.shape, 2, kernel)
    logits, experts, weights, rlog = [], [], [], []
    try:
        with ExpertStreamer(m.store, replay, EngineConfig(threads=2), ffn=ffn) as st:
            dec = Decoder(
                m,
                st,
                threads=2,
                pool=getattr(ffn, "_pool", None),
                native=getattr(ffn, "kind", "numpy") == "native",
                record_logits=True,
            )
            dec.start(len(ids))
            for t in ids:
                lg, r, _ = dec.forward(t)
                logits.append(lg)
                experts.append(r.experts)
                weights.append(r.weights)
                rlog.append(r.logits)
    finally:
        ffn.close()
    return {
        "logits": np.array(logits, dtype=np.float64),
        "experts": np.array(experts),
        "weights": np.array(weights),
        "router_logits": np.array(rlog, dtype=np.float64),
    }


def _tolerance(ref32: np.ndarray, ref64: np.ndarray) -> float:
    """4x transformers' own float32 error against float64 (floor: 2^-20 of the largest value)."""
    return 4.0 * max(float(np.abs(ref32 - ref64).max()), 2.0**-20 * float(np.abs(ref64).max()))


def _sequence(tiny: dict[str, Any]) -> list[int]:
    rng = np.random.default_rng(1)
    ids = tiny["tok"](PROMPT).input_ids
    return ids + [int(t) for t in rng.integers(3, len(tiny["tok"]), 34)]


def _hold(ours: dict[str, np.ndarray], ref32: dict[str, Any], ref64: dict[str, Any]) -> list:
    """Routing, gate weights and logits of `ours` against the float64 reference.

    Returns the near-ties met (a routing difference where the reference's gap
    between ranks k-1 and k is within twice the router-logit tolerance). After
    one, that token's later layers and the later tokens are not compared: their
    hidden states differ by a whole expert's output.
    """
    k = tm.TOP_K
    tol = _tolerance(ref32["logits"], ref64["logits"])
    rtol = _tolerance(ref32["router_logits"], ref64["router_logits"])
    n_tok = len(ours["logits"])
    near: list[tuple[int, int, float]] = []
    stop_t, stop_l = n_tok, tm.N_LAYERS
    for t in range(n_tok):
        for layer in range(tm.N_LAYERS):
            if (ours["experts"][t, layer] != ref64["experts"][t, layer]).any():
                z = np.sort(ref64["router_logits"][t, layer])[::-1]
                gap = float(z[k - 1] - z[k])
                assert gap <= 2 * rtol, (
                    f"token {t} layer {layer}: routing differs with a gap of {gap:.3g} between "
                    f"ranks {k - 1} and {k}, more than twice the tolerance {rtol:.3g}"
                )
                near.append((t, layer, gap))
                stop_t, stop_l = t, layer
                break
        if near:
            break
    ok = slice(0, stop_t)
    dz = np.abs(ours["router_logits"][ok] - ref64["router_logits"][ok])
    assert float(dz.max(initial=0.0)) <= rtol
    assert float(np.abs(ours["weights"][ok] - ref64["weights"][ok]).max(initial=0.0)) <= rtol
    err = float(np.abs(ours["logits"][ok] - ref64["logits"][ok]).max(initial=0.0))
    assert err <= tol, f"logits off by {err:.3g} > {tol:.3g}"
    assert stop_t * tm.N_LAYERS + stop_l >= n_tok * tm.N_LAYERS // 2, f"near-ties: {near}"
    return near


def test_f32_logits_and_routing_equal_transformers(tiny: dict[str, Any]) -> None:
    ids = _sequence(tiny)
    ours = _mer_teacher_forced(tiny["f32"], ids)
    ref32 = _hf_teacher_forced(tiny["model"], ids)
    ref64 = _hf_teacher_forced(copy.deepcopy(tiny["model"]).double(), ids)
    assert _hold(ours, ref32, ref64) == []  # f32 experts: no near-tie on this model
    np.testing.assert_array_equal(ours["experts"], ref64["experts"])
    np.testing.assert_array_equal(ours["experts"], ref32["experts"])


def test_f32_greedy_generation_and_trace_equal_transformers(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    """`mer generate` greedy (its trace) against `mer record` on the transformers model."""
    import torch

    from mer.core import ReplayConfig
    from mer.engine.streaming import EngineConfig
    from mer.model.generate import GenerateOptions, generate_run
    from mer.model.gguf_model import MoeModel
    from mer.model.tokenizer import load_tokenizer
    from mer.traces.format import read_trace
    from mer.traces.record.families import find_family
    from mer.traces.record.generate import GenerationSettings, record_prompt
    from mer.traces.record.prompts import load_prompts
    from mer.traces.record.recorder import RouterTap

    pfile = tmp_path / "p.txt"
    pfile.write_text(PROMPT + "\n")
    m = MoeModel.open(tiny["f32"])
    out = tmp_path / "gen.parquet"
    res = generate_run(
        m,
        load_tokenizer(tiny["f32"]),
        load_prompts(pfile),
        ReplayConfig(cache_slots=12),
        EngineConfig(threads=1),
        GenerateOptions(max_new_tokens=N_NEW, ignore_eos=True, logits=True, lookahead=True),
        out=out,
    )
    model = tiny["model"]
    with torch.no_grad(), RouterTap(find_family(model), logits=True, lookahead=True) as tap:
        ref = record_prompt(
            model,
            tiny["tok"],
            PROMPT,
            tap,
            GenerationSettings(max_new_tokens=N_NEW, ignore_eos=True),
        )
    assert res.prompts[0].generated_ids == ref.generated_ids
    assert len(ref.generated_ids) == N_NEW + 1  # >= 32 tokens, token for token
    tr = read_trace(out, with_logits=True)
    assert tr.n_tokens == len(ref.phase)
    assert list(tr.token_table()["phase"].astype(str)) == ref.phase
    np.testing.assert_array_equal(tr.experts, ref.experts)
    la = tr.lookahead()
    assert la is not None and ref.lookahead is not None
    np.testing.assert_array_equal(la, ref.lookahead)
    w = tr.weights()
    assert w is not None
    assert tr.logits is not None and ref.logits is not None
    err = float(np.abs(tr.logits.reshape(ref.logits.shape) - ref.logits).max())
    assert err <= 1e-3 * float(np.abs(ref.logits).max())
    assert float(np.abs(w - ref.weights).max()) <= 1e-3
    s = res.summary
    assert s is not None and s.tokens == tr.n_tokens and s.trace_digest


def test_q4_0_experts_numpy_kernel_against_transformers(tiny: dict[str, Any]) -> None:
    """The numpy q4_0 FFN computes with the dequantised weights in float32: as tight as f32."""
    ids = _sequence(tiny)
    ours = _mer_teacher_forced(tiny["q4"], ids, "numpy")
    ref32 = _hf_teacher_forced(tiny["model_q4"], ids)
    ref64 = _hf_teacher_forced(copy.deepcopy(tiny["model_q4"]).double(), ids)
    near = _hold(ours, ref32, ref64)
    assert len(near) <= 1, near


def test_q4_0_experts_native_kernel_against_transformers(tiny: dict[str, Any]) -> None:
    """The native kernel quantises activations to q8_0 (ggml's arithmetic): the reference
    is transformers on the dequantised weights with that same activation quantisation in
    its experts (tiny_mixtral.q8_activations)."""
    from mer.native import q4_0 as nq

    if not nq.available():
        pytest.skip("the native q4_0 kernel is not compiled here")
    ids = _sequence(tiny)
    ours = _mer_teacher_forced(tiny["q4"], ids, "native")
    ref32 = _hf_teacher_forced(tm.q8_activations(tiny["model_q4"]), ids)
    ref64 = _hf_teacher_forced(tm.q8_activations(copy.deepcopy(tiny["model_q4"]).double()), ids)
    near = _hold(ours, ref32, ref64)
    assert len(near) <= 1, near
