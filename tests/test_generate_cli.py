"""`mer generate` end to end on a synthetic full model (`mer experts synth --full`).

The references are the other two drivers of the same decision core: `mer
simulate` and `mer run` replaying the trace `mer generate` recorded. With
prefetch off, hits and misses are decided by the same core from the same
steps in the same order, so they must be equal exactly; any difference means
the live replay or the decoder's step order is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mer.cli import main

pytestmark = pytest.mark.record

PROMPTS = "the world was good\nthere is a little time\nwe made it\n"


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("full")
    p = d / "tiny-full.gguf"
    assert main(["experts", "synth", "--full", "--shape", "mixtral-tiny", "-o", str(p)]) == 0
    return p


def _prompts(tmp_path: Path, n: int = 3) -> Path:
    f = tmp_path / "p.txt"
    f.write_text("".join(PROMPTS.splitlines(keepends=True)[:n]))
    return f


def test_generate_record_then_replay_gives_the_same_hits(
    full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mer.traces.format import read_trace

    out, gen = tmp_path / "t.parquet", tmp_path / "gen.json"
    args = ["--cache-slots", "40", "--policy", "lru"]
    rc = main(
        [
            "generate",
            "--model",
            str(full),
            "--prompts",
            str(_prompts(tmp_path)),
            "--max-new-tokens",
            "5",
            "-o",
            str(out),
            "--logits",
            "--lookahead",
            "--summary",
            str(gen),
            "--no-progress",
            *args,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "--- prompt 2" in text and "peak RSS" in text
    tr = read_trace(out, with_logits=True)
    assert (tr.n_layers, tr.n_experts, tr.top_k) == (32, 8, 2)
    assert tr.logits is not None and tr.lookahead() is not None
    phases = tr.token_table()["phase"].astype(str)
    assert set(phases) == {"prefill", "decode"}
    g = json.loads(gen.read_text())
    assert g["tokens"] == tr.n_tokens and g["kind"] == "measured"
    sim = tmp_path / "sim.json"
    run = tmp_path / "run.json"
    capsys.readouterr()
    assert main(["simulate", str(out), "--shape", "mixtral-tiny", *args, "--json"]) == 0
    sim.write_text(capsys.readouterr().out)
    rc = main(
        ["run", str(out), "--experts", str(full), *args, "--summary", str(run), "--no-progress"]
    )
    assert rc == 0
    s, r = json.loads(sim.read_text()), json.loads(run.read_text())
    assert g["hits"] == s["hits"] == r["hits"]
    assert g["misses"] == s["misses"] == r["misses"]
    assert g["trace_digest"] == s["trace_digest"] == r["trace_digest"]
    capsys.readouterr()
    assert main(["compare", str(sim), str(gen)]) == 0
    assert "hit counts identical" in capsys.readouterr().out
    ex = g["extra"]
    assert ex["kv_cache_bytes"] > 0 and ex["dense_resident_bytes"] > 0
    assert ex["peak_rss_bytes"] >= ex["cache_buffer_bytes"]


def test_generate_resumes_per_prompt(full: Path, tmp_path: Path) -> None:
    from mer.core import ReplayConfig
    from mer.engine.streaming import EngineConfig
    from mer.model.generate import GenerateOptions, generate_run
    from mer.model.gguf_model import MoeModel
    from mer.model.tokenizer import load_tokenizer
    from mer.traces.format import read_trace
    from mer.traces.record.prompts import load_prompts

    model = MoeModel.open(full)
    tok = load_tokenizer(full)
    prompts = load_prompts(_prompts(tmp_path, 2))
    opts = GenerateOptions(max_new_tokens=3, sample=True, seed=3, logits=True)
    whole = tmp_path / "whole.parquet"
    cut = tmp_path / "cut.parquet"
    rc, ec = ReplayConfig(cache_slots=16), EngineConfig(threads=1)
    ref = generate_run(model, tok, prompts, rc, ec, opts, out=whole)

    class Stop(Exception):
        pass

    def stop_after_first(i: int) -> None:
        if i == 0:
            raise Stop

    with pytest.raises(Stop):
        generate_run(model, tok, prompts, rc, ec, opts, out=cut, on_prompt_done=stop_after_first)
    assert not cut.exists() and (tmp_path / "cut.parquet.parts" / "part-000000.parquet").exists()
    res = generate_run(model, tok, prompts, rc, ec, opts, out=cut)
    assert res.summary is not None
    assert res.summary.extra["resumed_prompts"] == 1
    assert [p.generated_ids for p in res.prompts] == [p.generated_ids for p in ref.prompts]
    a, b = read_trace(whole, with_logits=True), read_trace(cut, with_logits=True)
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights(), b.weights())
    assert a.logits is not None and b.logits is not None
    np.testing.assert_array_equal(a.logits, b.logits)
    # Other settings must not be mixed into an interrupted run.
    with pytest.raises(Stop):
        generate_run(model, tok, prompts, rc, ec, opts, out=cut, on_prompt_done=stop_after_first)
    other = GenerateOptions(max_new_tokens=4, sample=True, seed=3, logits=True)
    from mer.errors import BadInput

    with pytest.raises(BadInput, match="different settings"):
        generate_run(model, tok, prompts, rc, ec, other, out=cut)


def test_generate_with_prefetch_runs_live(full: Path, tmp_path: Path) -> None:
    from mer.core import ReplayConfig
    from mer.engine.streaming import EngineConfig
    from mer.model.generate import GenerateOptions, generate_run
    from mer.model.gguf_model import MoeModel
    from mer.model.tokenizer import load_tokenizer
    from mer.traces.record.prompts import load_prompts

    model = MoeModel.open(full)
    tok = load_tokenizer(full)
    prompts = load_prompts(_prompts(tmp_path, 2))
    for pred in ("lookahead", "previous-token"):
        rc = ReplayConfig(cache_slots=24, predictor=pred, pipeline_depth=1)
        res = generate_run(
            model, tok, prompts, rc, EngineConfig(threads=1), GenerateOptions(max_new_tokens=3)
        )
        s = res.summary
        assert s is not None and s.prefetch["issued"] > 0, pred
        assert s.hits + s.misses == s.tokens * 32 * 2


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--logits"], "give -o"),
        (["--predictor", "oracle"], "future"),
        (["--policy", "opt"], "future"),
        (["--sample", "--temperature", "0"], "temperature"),
    ],
)
def test_generate_bad_options(
    full: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], match: str
) -> None:
    try:
        rc = main(["generate", "--model", str(full), "--prompts", str(_prompts(tmp_path)), *extra])
    except SystemExit as exc:  # argparse refuses the value itself
        rc = int(exc.code or 0)
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_generate_refuses_files_it_cannot_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experts_only = tmp_path / "experts.gguf"
    assert main(["experts", "synth", "--shape", "mixtral-tiny", "-o", str(experts_only)]) == 0
    rc = main(["generate", "--model", str(experts_only), "--prompts", str(_prompts(tmp_path))])
    assert rc == 2
    assert "token_embd.weight is missing" in capsys.readouterr().err
    rc = main(["generate", "--model", str(tmp_path / "nope.gguf"), "--prompts", "x"])
    assert rc == 2
