"""`mer generate`: prompts decoded by the real model, experts streamed, routing recorded.

One run holds one expert cache across all prompts (as a server would) and a
fresh KV cache per prompt. Each prompt is fed token by token (phase prefill),
then each generated token is fed back once (phase decode) until
`max_new_tokens` or an end-of-sequence token, exactly `mer record`'s serving
order, so the trace it writes replays (`mer simulate`, `mer run`) to the same
lookups in the same order.

With an output trace, every finished prompt is written at once as its own part
(`OUT.parts/`, the same machinery as `mer record`): an interrupted run resumes
with the prompts that are missing. The measured summary then covers the
prompts decoded by this invocation (`extra.resumed_prompts` says how many were
skipped).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mer.core.replay import Replay, ReplayConfig
from mer.engine.executor import TokenRows, _progress, measured_summary
from mer.engine.expert_types import make_expert_ffn
from mer.engine.ffn import resolve_ffn
from mer.engine.streaming import EngineConfig, ExpertStreamer
from mer.errors import BadInput
from mer.model.decoder import Decoder, Routing, softmax
from mer.model.gguf_model import MoeModel
from mer.summary import RunSummary, trace_digest
from mer.traces.format import Trace, TraceMeta, write_trace
from mer.traces.record.generate import GenerationSettings, PromptRouting
from mer.traces.record.prompts import Prompts
from mer.traces.record.session import (
    LOOKAHEAD_DEFINITION,
    assemble_parts,
    part_path,
    prepare_parts,
    prompt_trace,
)

F32 = npt.NDArray[np.float32]


@dataclass
class GenerateOptions(GenerationSettings):
    """`mer record`'s generation settings plus what the trace holds (the resume fingerprint)."""

    logits: bool = False
    lookahead: bool = False
    keep_parts: bool = False

    def generation(self) -> dict[str, Any]:
        """Only what changes the tokens generated, as `mer record` stores it."""
        return {f.name: getattr(self, f.name) for f in fields(GenerationSettings)}


@dataclass
class PromptResult:
    seq: int
    prompt_tokens: int
    decode_tokens: int
    generated_ids: list[int]
    text: str
    resumed: bool = False


@dataclass
class GenerateResult:
    prompts: list[PromptResult]
    summary: RunSummary | None  # None when every prompt was resumed (nothing decoded)
    trace_path: Path | None
    tokens: Any = None  # the per-token table (pandas) of this invocation
    model_memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": [asdict(p) for p in self.prompts],
            "trace": str(self.trace_path) if self.trace_path else None,
            "summary": self.summary.to_dict() if self.summary else None,
            "model_memory": self.model_memory,
        }


def _eos_ids(tokenizer: Any) -> set[int]:
    v = getattr(tokenizer, "eos_token_id", None)
    return {int(v)} if isinstance(v, int) else set()


def fingerprint(model: MoeModel, prompts: Prompts, opts: GenerateOptions) -> dict[str, Any]:
    st = model.path.stat()
    return {
        "model": model.path.name,
        "model_bytes": st.st_size,
        "model_name": model.metadata.get("name"),
        "config": model.config.to_dict(),
        "prompts_sha256": prompts.sha256,
        "generation": opts.generation(),
        "logits": opts.logits,
        "lookahead": opts.lookahead,
    }


def trace_meta(
    model: MoeModel, prompts: Prompts, opts: GenerateOptions, per_prompt: list[dict[str, Any]]
) -> TraceMeta:
    from mer import __version__

    cfg = model.config
    source: dict[str, Any] = {
        "recorder": "mer generate (GGUF decoder, experts streamed)",
        "model_file": model.path.name,
        "model_name": model.metadata.get("name"),
        "architecture": cfg.arch,
        "gate_normalisation": "softmax over all experts, top-k, renormalised over the top-k",
        "weights_renormalised_by_recorder": False,
        "prompts": {
            "path": prompts.path,
            "sha256": prompts.sha256,
            "count": len(prompts),
            "format": prompts.format,
        },
        "generation": {**opts.generation(), "batch_size": 1, "kv_cache": True},
        "dtype": "float32 activations; weights as stored in the GGUF",
        "device": "cpu",
        "logits": opts.logits,
        "lookahead": LOOKAHEAD_DEFINITION if opts.lookahead else None,
        "libraries": {"mer": __version__, "python": platform.python_version()},
    }
    extra: dict[str, Any] = {
        "moe_layer_map": list(range(cfg.n_layers)),
        "n_decoder_layers": cfg.n_layers,
        "config": cfg.to_dict(),
        "per_prompt": per_prompt,
    }
    return TraceMeta(
        model=str(model.metadata.get("name") or model.path.name),
        n_layers=cfg.n_layers,
        n_experts=cfg.n_experts,
        top_k=cfg.top_k,
        source=source,
        extra=extra,
    )


class _Sampler:
    """Greedy, or seeded sampling with `seed + prompt index` (a resumed run equals a whole one)."""

    def __init__(self, opts: GenerateOptions, prompt_index: int) -> None:
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed + prompt_index)

    def __call__(self, logits: F32) -> int:
        if not self.opts.sample:
            return int(np.argmax(logits))
        p = softmax((logits.astype(np.float64) / self.opts.temperature).astype(np.float64))
        p = p / p.sum()
        return int(self.rng.choice(len(p), p=p))


def _routing_arrays(steps: list[Routing], opts: GenerateOptions) -> dict[str, Any]:
    out: dict[str, Any] = {
        "experts": np.stack([r.experts for r in steps]),
        "weights": np.stack([r.weights for r in steps]),
        "logits": np.stack([r.logits for r in steps]) if opts.logits else None,  # type: ignore[misc]
        "lookahead": np.stack([r.lookahead for r in steps])  # type: ignore[misc]
        if opts.lookahead
        else None,
    }
    return out


class _Feeder:
    """Feeds tokens to the decoder and keeps the run's per-token rows and clock."""

    def __init__(self, dec: Decoder, bar: Any, total: int) -> None:
        self.dec = dec
        self.bar = bar
        self.task = bar.add_task("mer generate", total=total) if bar is not None else None
        self.acc = TokenRows()
        self.seqs: list[int] = []
        self.positions: list[int] = []
        self.phases: list[str] = []
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def start(self, seq: int, max_positions: int) -> None:
        self.seq = seq
        self.steps: list[Routing] = []
        self.phase: list[str] = []
        self.dec.start(max_positions)

    def feed(self, tok: int, phase: str) -> F32:
        clock = time.perf_counter
        tok0 = clock()
        logits, routing, cost = self.dec.forward(tok)
        acc = self.acc
        acc.dense += cost.dense_s
        for oc, it in zip(cost.outcomes, cost.iteration_s, strict=True):
            acc.add_step(oc, it)
        acc.end_token(tok0 - self.t0 - self.paused, clock() - tok0)
        self.seqs.append(self.seq)
        self.positions.append(len(self.phase))
        self.phases.append(phase)
        self.steps.append(routing)
        self.phase.append(phase)
        if self.bar is not None:
            self.bar.update(self.task, advance=1)
        return logits

    def off_clock(self, seconds: float) -> None:
        self.paused += seconds

    def wall(self) -> float:
        return time.perf_counter() - self.t0 - self.paused


def generate_run(
    model: MoeModel,
    tokenizer: Any,
    prompts: Prompts,
    replay_config: ReplayConfig,
    engine_config: EngineConfig,
    opts: GenerateOptions,
    *,
    out: Path | None = None,
    on_text: Callable[[PromptResult], None] | None = None,
    on_prompt_done: Callable[[int], None] | None = None,
) -> GenerateResult:
    """Decode every prompt; write the trace parts and the final trace when `out` is given."""
    cfg = model.config
    if opts.sample and not opts.temperature > 0:
        raise BadInput(f"--temperature must be > 0, got {opts.temperature}.")
    encoded = []
    for i, text in enumerate(prompts.texts):
        ids = [int(t) for t in tokenizer(text).input_ids]
        if not ids:
            raise BadInput(f"prompt {i} tokenises to no tokens: {text[:60]!r}.")
        need = len(ids) + opts.max_new_tokens
        if need > cfg.context_length:
            raise BadInput(
                f"prompt {i}: {len(ids)} tokens + --max-new-tokens {opts.max_new_tokens} exceed "
                f"the model's context of {cfg.context_length}; shorten it or generate fewer."
            )
        encoded.append(ids)
    if replay_config.cache_slots < 1:
        raise BadInput(f"--cache-slots must be at least 1, got {replay_config.cache_slots}.")
    replay = Replay.live(
        n_layers=cfg.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k, config=replay_config
    )
    pdir: Path | None = None
    done: set[int] = set()
    if out is not None:
        pdir, done = prepare_parts(out, fingerprint(model, prompts, opts), len(prompts))
        part_meta = trace_meta(model, prompts, opts, [])
    results: list[PromptResult] = []
    for i in sorted(done):
        per = _resumed(pdir, i)  # type: ignore[arg-type]
        res = PromptResult(
            i,
            per["prompt_tokens"],
            per["decode_tokens"],
            per.get("generated_ids", []),
            tokenizer.decode(per.get("generated_ids", []), skip_special_tokens=True),
            resumed=True,
        )
        results.append(res)
        if on_text is not None:
            on_text(res)
    todo = [i for i in range(len(prompts)) if i not in done]
    eos = set() if opts.ignore_eos else _eos_ids(tokenizer)
    threads = max(1, int(engine_config.threads))
    ffn = make_expert_ffn(model.store.expert_dtype, model.store.shape, threads, engine_config.ffn)
    native = resolve_ffn(engine_config.ffn) == "native"
    total = sum(len(encoded[i]) + opts.max_new_tokens for i in todo)
    streamer = ExpertStreamer(model.store, replay, engine_config, ffn=ffn)
    clock = time.perf_counter
    try:
        with streamer, _progress(engine_config.progress, total) as bar:
            run = _Feeder(
                Decoder(
                    model,
                    streamer,
                    threads=threads,
                    pool=getattr(ffn, "_pool", None),
                    native=native,
                    record_logits=opts.logits and out is not None,
                    record_lookahead=opts.lookahead and out is not None,
                ),
                bar,
                total,
            )
            for i in todo:
                ids = encoded[i]
                run.start(i, len(ids) + opts.max_new_tokens)
                choose = _Sampler(opts, i)
                logits: F32 | None = None
                for tok in ids:
                    logits = run.feed(tok, "prefill")
                assert logits is not None
                generated = [choose(logits)]
                for _ in range(opts.max_new_tokens):
                    if generated[-1] in eos:
                        break
                    generated.append(choose(run.feed(generated[-1], "decode")))
                res = PromptResult(
                    i,
                    len(ids),
                    len(run.phase) - len(ids),
                    generated,
                    tokenizer.decode(generated, skip_special_tokens=True),
                )
                if pdir is not None:
                    w0 = clock()
                    arr = _routing_arrays(run.steps, opts)
                    routing = PromptRouting(
                        experts=arr["experts"],
                        weights=arr["weights"],
                        logits=arr["logits"],
                        lookahead=arr["lookahead"],
                        phase=run.phase,
                        prompt_tokens=len(ids),
                        generated_ids=generated,
                    )
                    part_meta.extra["per_prompt"] = [_prompt_summary(res)]
                    part = prompt_trace(routing, i, part_meta, f"prompt {i}")
                    write_trace(part, part_path(pdir, i))
                    run.off_clock(clock() - w0)  # writing a part is not decoding
                results.append(res)
                if on_text is not None:
                    on_text(res)
                if on_prompt_done is not None:
                    on_prompt_done(i)
            wall = run.wall()
            streamer.drain()
    finally:
        ffn.close()
    acc = run.acc
    seqs, positions, phases = run.seqs, run.positions, run.phases
    dec = run.dec
    results.sort(key=lambda r: r.seq)
    trace: Trace | None = None
    digest = ""
    if out is not None and pdir is not None:
        trace = assemble_parts(
            pdir,
            out,
            len(prompts),
            lambda per: trace_meta(model, prompts, opts, per),
            logits=opts.logits,
            keep_parts=opts.keep_parts,
        )
        digest = trace_digest(out)
    summary = None
    rows = None
    if seqs:
        rows = acc.frame(seqs, positions, phases)
        summary = measured_summary(
            streamer,
            rows,
            acc.it_times,
            wall,
            trace=out.name if out is not None else "(not recorded)",
            trace_digest=digest,
            model=str(model.metadata.get("name") or model.path.name),
            shape=model.store.shape.name,
            mode="model",
            config={
                "replay": replay_config.to_dict(),
                "engine": engine_config.to_dict(),
                "generation": opts.generation(),
                "model": model.config.to_dict(),
            },
            extra={
                "driver": "mer generate",
                "dense_resident_bytes": int(model.resident_bytes),
                "kv_cache_bytes": int(dec.kv_bytes_max),
                "model_memory": model.memory(),
                "expert_file": str(model.path),
                "prompts_decoded": len(todo),
                "resumed_prompts": len(done),
            },
        )
    return GenerateResult(
        results, summary, out if trace is not None else None, rows, model.memory()
    )


def _prompt_summary(res: PromptResult) -> dict[str, Any]:
    return {
        "seq": res.seq,
        "prompt_tokens": res.prompt_tokens,
        "decode_tokens": res.decode_tokens,
        "generated_ids": res.generated_ids,
    }


def _resumed(pdir: Path, i: int) -> dict[str, Any]:
    from mer.traces.format import read_meta

    meta = read_meta(part_path(pdir, i))
    per = meta.extra.get("per_prompt") or [{}]
    d = dict(per[0])
    d.setdefault("prompt_tokens", 0)
    d.setdefault("decode_tokens", 0)
    return d
