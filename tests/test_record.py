"""mer record: recorded routing equals an independent float64 recomputation.

Tiny random-weight models are built from their configs inside the tests (no
downloads). The reference never touches the recorder: it runs a plain
full-sequence forward (no KV cache) of the model, takes the
hidden state entering each MoE block from the test's own pre-hook on that
block, and applies the router weights by hand (softmax, top-k, the family's
normalisation) in float64 numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mer.errors import BadInput
from mer.traces.record.prompts import load_prompts

PROMPTS = ["the cat sat on the mat", "a big red house", "dog ran fast"]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "fast",
    "slow",
    "big",
    "small",
    "red",
    "blue",
    "house",
    "tree",
]
N_NEW = 4


# -- prompts (no torch needed) ------------------------------------------------------


def test_prompts_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  \nsecond one\n")
    p = load_prompts(txt)
    assert p.texts == ["first prompt", "second one"] and p.format == "text"
    js = tmp_path / "p.jsonl"
    js.write_text(json.dumps({"prompt": "x y", "id": 1}) + "\n\n" + json.dumps({"prompt": "z"}))
    q = load_prompts(js)
    assert q.texts == ["x y", "z"] and q.format == "jsonl"
    assert len(q.sha256) == 64 and q.sha256 != p.sha256


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no prompts"),
        ("\n  \n", "no prompts"),
        ('{"prompt": 3}\n', "line 1"),
        ('{"text": "a"}', "line 1"),
    ],
)
def test_prompts_errors(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(BadInput, match=match):
        load_prompts(f)


# -- tiny models ----------------------------------------------------------------------


def _torch() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def _tokenizer() -> Any:
    _, transformers = _torch()
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


BASE = dict(
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.3,  # spread router logits so float32/float64 top-k cannot tie
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _config(kind: str) -> Any:
    _, tf = _torch()
    if kind == "mixtral":
        return tf.MixtralConfig(**BASE, num_local_experts=6, num_experts_per_tok=2)
    if kind == "qwen2_moe":  # dense layers 0 and 2, shared expert, unnormalised top-k
        return tf.Qwen2MoeConfig(
            **BASE,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        )
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **BASE,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=16,
            mlp_only_layers=[0],
            norm_topk_prob=True,
        )
    if kind == "olmoe":
        return tf.OlmoeConfig(**BASE, num_experts=6, num_experts_per_tok=2)
    if kind == "phimoe":
        return tf.PhimoeConfig(**BASE, num_local_experts=6, num_experts_per_tok=2)
    if kind == "gpt_oss":
        cfg = tf.GptOssConfig(**BASE, num_local_experts=6, num_experts_per_tok=2, head_dim=8)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        return cfg
    raise AssertionError(kind)


def _build(kind: str, seed: int = 0) -> Any:
    torch, tf = _torch()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(kind))
    model.eval()
    if kind == "gpt_oss":  # its router bias starts at zero; make it matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("router.bias"):
                    p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mixtral and Qwen2-MoE saved to disk with a tokenizer, for the CLI runs."""
    out = {}
    tok = _tokenizer()
    for kind in ("mixtral", "qwen2_moe"):
        d = tmp_path_factory.mktemp(kind)
        _build(kind).save_pretrained(d)
        tok.save_pretrained(d)
        out[kind] = d
    return out


# -- the independent reference ----------------------------------------------------------


def _moe_blocks(model: Any) -> list[tuple[int, Any]]:
    """(decoder index, MoE block) for decoder layers whose mlp routes (has a gate/router)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if (hasattr(mlp, "gate") and hasattr(mlp, "experts")) or hasattr(mlp, "router"):
            out.append((i, mlp))
    return out


def _greedy_no_cache(model: Any, ids: list[int], n: int) -> list[int]:
    """The tokens fed to the model: prompt + n greedy tokens, full recompute each step."""
    torch, _ = _torch()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
            seq.append(int(torch.argmax(logits[0, -1])))
    return seq


def _route(kind: str, x: np.ndarray, block: Any, k: int, norm: bool) -> tuple[np.ndarray, ...]:
    """Reference routing of hidden states x (T, H) through block's router, float64 numpy."""
    router = block.router if hasattr(block, "router") else block.gate
    w = router.weight.detach().double().numpy()
    logits = x @ w.T
    if kind == "gpt_oss":
        logits = logits + router.bias.detach().double().numpy()
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(logits, idx, axis=1)
        wts = np.exp(top - top.max(1, keepdims=True))
        return idx, wts / wts.sum(1, keepdims=True), logits
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, idx, axis=1)
    # Whether or not the model renormalises, the trace stores top-k weights summing to 1.
    del norm
    return idx, top / top.sum(1, keepdims=True), logits


def _reference(kind: str, model: Any, seq: list[int]) -> dict[str, np.ndarray]:
    """Experts, weights, logits, lookahead (T, L, .) for one sequence, no cache.

    The model runs in float32 (its expert kernels have no float64 path); the
    router maths on the captured hidden states is done here in float64.
    """
    torch, _ = _torch()
    ref = model  # float32 forward; the routing maths below is float64
    blocks = _moe_blocks(ref)
    captured: dict[int, np.ndarray] = {}
    handles = [
        blk.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(
                i, a[0].detach().reshape(-1, a[0].shape[-1]).double().numpy()
            )
        )
        for i, (_, blk) in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            out = ref(input_ids=torch.tensor([seq]), use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    k = model.config.num_experts_per_tok
    norm = bool(getattr(model.config, "norm_topk_prob", True))
    ex, wt, lg, la = [], [], [], []
    for i, (dec, blk) in enumerate(blocks):
        e, w, lgt = _route(kind, captured[i], blk, k, norm)
        ex.append(e)
        wt.append(w)
        lg.append(lgt)
        prev = captured[i - 1] if i else out.hidden_states[dec][0].double().numpy()
        la.append(_route(kind, prev, blk, k, norm)[0])
    return {
        name: np.stack(v, axis=1)
        for name, v in zip(
            ("experts", "weights", "logits", "lookahead"), (ex, wt, lg, la), strict=True
        )
    }


def _check_against_reference(
    kind: str, model: Any, trace: Any, prompts: list[str], n_new: int
) -> None:
    tok = _tokenizer()
    k = trace.top_k
    for s, text in enumerate(prompts):
        ids = tok(text).input_ids
        seq = _greedy_no_cache(model, ids, n_new)
        ref = _reference(kind, model, seq)
        sel = (trace.df["seq"] == s).to_numpy()
        tt = trace.token_table()
        rows = tt[tt["seq"] == s]
        assert (rows["phase"].astype(str) == "prefill").sum() == len(ids)
        assert (rows["phase"].astype(str) == "decode").sum() == n_new
        assert rows["token"].tolist() == list(range(len(ids) + n_new))
        n_tok = len(seq)
        got_e = trace.df["expert"].to_numpy()[sel].reshape(n_tok, trace.n_layers, k)
        got_w = trace.df["weight"].to_numpy(dtype=np.float64)[sel].reshape(n_tok, trace.n_layers, k)
        if kind == "phimoe":
            # sparsemixer picks the two largest logits; ranks follow its weights.
            np.testing.assert_array_equal(np.sort(got_e, -1), np.sort(ref["experts"], -1))
        else:
            np.testing.assert_array_equal(got_e, ref["experts"])
            np.testing.assert_allclose(got_w, ref["weights"], atol=2e-5)
        la = trace.df["lookahead"].to_numpy(dtype=np.int64)[sel].reshape(n_tok, trace.n_layers, k)
        if kind == "phimoe":
            np.testing.assert_array_equal(np.sort(la, -1), np.sort(ref["lookahead"], -1))
        else:
            np.testing.assert_array_equal(la, ref["lookahead"])
        if trace.logits is not None:
            first = int(np.flatnonzero((trace.token_table()["seq"] == s).to_numpy())[0])
            np.testing.assert_allclose(
                trace.logits[first : first + n_tok], ref["logits"], rtol=1e-4, atol=1e-4
            )


# -- end to end through the CLI -----------------------------------------------------------


def _cli(*argv: str) -> int:
    from mer.cli import main

    return main(list(argv))


@pytest.mark.record
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_cli_record_matches_reference(
    kind: str, saved_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tf = _torch()
    from mer.traces.format import read_trace

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    out = tmp_path / "t.parquet"
    rc = _cli(
        "record",
        "--model",
        str(saved_models[kind]),
        "--prompts",
        str(prompts),
        "-o",
        str(out),
        "--max-new-tokens",
        str(N_NEW),
        "--ignore-eos",
        "--logits",
        "--lookahead",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--quiet",
        "--json",
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    trace = read_trace(out, with_logits=True)
    model = tf.AutoModelForCausalLM.from_pretrained(saved_models[kind]).eval()
    blocks = _moe_blocks(model)
    assert trace.n_layers == len(blocks)
    assert trace.meta.extra["moe_layer_map"] == [d for d, _ in blocks]
    assert trace.n_experts == 6 and trace.top_k == 2
    assert summary["decode_tokens"] == N_NEW * len(PROMPTS)
    assert summary["tokens"] == trace.n_tokens
    assert trace.meta.source["prompts"]["sha256"] == load_prompts(prompts).sha256
    assert not (tmp_path / "t.parquet.parts").exists()
    _check_against_reference(kind, model, trace, PROMPTS, N_NEW)


# -- other families through the library API ------------------------------------------------


def _run_api(model: Any, out: Path, prompts: list[str], **kw: Any) -> Any:
    from mer.traces.format import read_trace
    from mer.traces.record import GenerationSettings, RecordOptions, find_family, record_run
    from mer.traces.record.prompts import Prompts

    family = find_family(model)
    opts = RecordOptions(
        model_id="tiny",
        revision=None,
        generation=GenerationSettings(
            max_new_tokens=kw.pop("n_new", N_NEW),
            ignore_eos=True,
            sample=kw.pop("sample", False),
            seed=kw.pop("seed", 0),
        ),
        logits=kw.pop("logits", True),
        lookahead=kw.pop("lookahead", True),
        dtype="float32",
        device="cpu",
        keep_parts=kw.pop("keep_parts", False),
    )
    p = Prompts("inline", prompts, "0" * 64, "text")
    result = record_run(model, _tokenizer(), family, p, out, opts, **kw)
    return result, read_trace(out, with_logits=opts.logits), family


@pytest.mark.record
@pytest.mark.parametrize("kind", ["olmoe", "qwen3_moe", "phimoe", "gpt_oss"])
def test_api_other_families_match_reference(kind: str, tmp_path: Path) -> None:
    _torch()
    model = _build(kind, seed=1)
    _, trace, family = _run_api(model, tmp_path / "t.parquet", PROMPTS[:2])
    assert family.model_type == kind
    _check_against_reference(kind, model, trace, PROMPTS[:2], N_NEW)


@pytest.mark.record
def test_hooks_removed_also_after_failure(tmp_path: Path) -> None:
    _torch()
    model = _build("mixtral")
    _run_api(model, tmp_path / "a.parquet", PROMPTS[:1])

    def all_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert all_hooks() == 0

    def boom(i: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        _run_api(model, tmp_path / "b.parquet", PROMPTS, on_prompt_done=boom)
    assert all_hooks() == 0


@pytest.mark.record
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    _torch()
    model = _build("mixtral")
    full_res, full, _ = _run_api(model, tmp_path / "full.parquet", PROMPTS, sample=True, seed=7)

    class Stop(Exception):
        pass

    def stop_after_first(i: int) -> None:
        if i == 0:
            raise Stop

    out = tmp_path / "resumed.parquet"
    with pytest.raises(Stop):
        _run_api(model, out, PROMPTS, sample=True, seed=7, on_prompt_done=stop_after_first)
    parts = sorted(p.name for p in (tmp_path / "resumed.parquet.parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet"] and not out.exists()
    res, resumed, _ = _run_api(model, out, PROMPTS, sample=True, seed=7)
    assert res.resumed_prompts == 1 and full_res.resumed_prompts == 0
    assert resumed.df.equals(full.df)
    np.testing.assert_array_equal(resumed.logits, full.logits)
    assert resumed.meta.extra["per_prompt"] == full.meta.extra["per_prompt"]


@pytest.mark.record
def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    _torch()
    model = _build("mixtral")
    out = tmp_path / "t.parquet"

    def stop(i: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run_api(model, out, PROMPTS, on_prompt_done=stop)
    with pytest.raises(BadInput, match=r"different settings \(generation"):
        _run_api(model, out, PROMPTS, n_new=N_NEW + 1)


@pytest.mark.record
def test_not_moe_and_empty_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, tf = _torch()
    d = tmp_path / "llama"
    cfg = tf.LlamaConfig(**{k: v for k, v in BASE.items() if k != "initializer_range"})
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    rc = _cli(
        "record",
        "--model",
        str(d),
        "--prompts",
        str(prompts),
        "-o",
        str(tmp_path / "o.parquet"),
        "--quiet",
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not a supported Mixture-of-Experts model" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    rc = _cli(
        "record", "--model", str(d), "--prompts", str(empty), "-o", str(tmp_path / "o.parquet")
    )
    assert rc == 2 and "no prompts" in capsys.readouterr().err


@pytest.mark.record
def test_missing_model_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _torch()
    import huggingface_hub.constants as hub_constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time; set both the env and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    rc = _cli(
        "record",
        "--model",
        "no-such-org/no-such-moe",
        "--prompts",
        str(prompts),
        "-o",
        str(tmp_path / "o.parquet"),
        "--quiet",
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "cannot load model 'no-such-org/no-such-moe'" in err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err


@pytest.mark.record
def test_recorded_trace_feeds_the_other_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Done-when: trace stats, mrc and simulate accept a recorded trace (and its
    recorded lookahead drives the `lookahead` predictor)."""
    _torch()
    out = tmp_path / "t.parquet"
    _run_api(_build("mixtral"), out, PROMPTS, lookahead=True, logits=True)
    runs = [
        ["trace", "validate", str(out)],
        ["trace", "stats", str(out)],
        ["mrc", str(out), "-o", str(tmp_path / "mrc.parquet")],
        ["simulate", str(out), "--policy", "lru", "--cache-slots", "8", "--json"],
        ["simulate", str(out), "--policy", "lru", "--cache-slots", "8", "--predictor", "lookahead"],
        ["predict-eval", str(out), "--predictors", "lookahead,previous-token", "--json"],
    ]
    for argv in runs:
        assert _cli(*argv) == 0, (argv, capsys.readouterr().err)


@pytest.mark.record
def test_model_failure_is_one_clear_error_and_keeps_parts(tmp_path: Path) -> None:
    _torch()
    from mer.errors import RuntimeFailure

    model = _build("mixtral")
    calls = {"n": 0}

    def fail_in_second_prompt(module: Any, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1 + N_NEW:  # prompt 0 = 1 prefill pass + N_NEW decode passes
            raise RuntimeError("simulated out of memory")

    handle = model.model.layers[0].register_forward_pre_hook(fail_in_second_prompt)
    try:
        with pytest.raises(RuntimeFailure, match=r"prompt 1 failed.*simulated out of memory"):
            _run_api(model, tmp_path / "t.parquet", PROMPTS)
    finally:
        handle.remove()
    parts = sorted(p.name for p in (tmp_path / "t.parquet.parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet"]
