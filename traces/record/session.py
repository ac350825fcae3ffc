"""A recording run: per-prompt parts, resume, and the final trace file.

Long runs (hours for Mixtral 8x7B on CPU) must survive interruption, so every
completed prompt is written at once, atomically, as its own valid trace in
`OUT.parts/part-NNNNNN.parquet`, next to `settings.json` (the run's
fingerprint). A rerun with the same settings skips the prompts that have a
part and records the rest; with different settings it refuses rather than mix
two runs. When all prompts are done the parts are assembled into OUT (written
atomically) and the parts directory is removed.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.atomic import write_json_atomic
from mer.errors import BadInput, RuntimeFailure
from mer.traces.format import Trace, TraceMeta, from_arrays, read_trace, write_trace
from mer.traces.record.families import Family
from mer.traces.record.generate import GenerationSettings, PromptRouting, record_prompt
from mer.traces.record.prompts import Prompts
from mer.traces.record.recorder import RouterTap

LOOKAHEAD_DEFINITION = (
    "lookahead[token, L, r] = rank-r expert of MoE layer L's router applied to the hidden state "
    "entering MoE layer L-1's router; for L = 0, router 0 applied to the residual stream entering "
    "the decoder layer of MoE layer 0"
)


@dataclass
class RecordOptions:
    """The run's settings; `fingerprint()` must match for a resume."""

    model_id: str
    revision: str | None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    logits: bool = False
    lookahead: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    keep_parts: bool = False

    def fingerprint(self, family: Family, prompts: Prompts) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "architecture": family.architecture,
            "n_layers": family.n_layers,
            "n_experts": family.n_experts,
            "top_k": family.top_k,
            "prompts_sha256": prompts.sha256,
            "generation": self.generation.to_dict(),
            "logits": self.logits,
            "lookahead": self.lookahead,
            "dtype": self.dtype,
            "device": self.device,
        }


@dataclass
class RecordResult:
    path: Path
    prompts: int
    resumed_prompts: int
    tokens: int
    prefill_tokens: int
    decode_tokens: int
    n_layers: int
    n_experts: int
    top_k: int
    model: str
    architecture: str

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _library_versions() -> dict[str, str]:
    import torch
    import transformers

    from mer import __version__

    return {
        "mer": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_meta(
    family: Family, prompts: Prompts, opts: RecordOptions, per_prompt: list[dict[str, int]]
) -> TraceMeta:
    source: dict[str, Any] = {
        "recorder": "mer record (transformers router hooks)",
        "model_revision": opts.revision,
        "architecture": family.architecture,
        "model_type": family.model_type,
        "gate_normalisation": family.normalisation,
        "weights_renormalised_by_recorder": not family.weights_already_normalised,
        "prompts": {
            "path": prompts.path,
            "sha256": prompts.sha256,
            "count": len(prompts),
            "format": prompts.format,
        },
        "generation": {**opts.generation.to_dict(), "batch_size": 1, "kv_cache": True},
        "dtype": opts.dtype,
        "device": opts.device,
        "logits": opts.logits,
        "lookahead": LOOKAHEAD_DEFINITION if opts.lookahead else None,
        "libraries": _library_versions(),
    }
    extra: dict[str, Any] = {
        "moe_layer_map": family.moe_layer_map,
        "n_decoder_layers": family.n_decoder_layers,
        "notes": family.notes,
        "per_prompt": per_prompt,
    }
    return TraceMeta(
        model=opts.model_id,
        n_layers=family.n_layers,
        n_experts=family.n_experts,
        top_k=family.top_k,
        source=source,
        extra=extra,
    )


def prompt_trace(r: PromptRouting, seq: int, meta: TraceMeta, name: str) -> Trace:
    n = len(r.phase)
    trace = from_arrays(
        r.experts,
        meta,
        weights=r.weights,
        lookahead=r.lookahead,
        seq=np.full(n, seq, np.int32),
        token=np.arange(n, dtype=np.int32),
        phase=r.phase,
        name=name,
    )
    trace.logits = r.logits
    return trace


def _check_settings(pdir: Path, fingerprint: dict[str, Any]) -> None:
    settings = pdir / "settings.json"
    if not settings.exists():
        if any(pdir.glob("part-*.parquet")):
            raise BadInput(
                f"{pdir}: has parts but no settings.json; it is not a mer record run. Remove it."
            )
        return
    try:
        old = json.loads(settings.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{settings}: unreadable ({exc}); remove {pdir} to start over.") from exc
    old = json.loads(json.dumps(old))
    new = json.loads(json.dumps(fingerprint))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in diff[:4])
        raise BadInput(
            f"{pdir} holds an interrupted run with different settings ({shown}). Rerun with the "
            f"same settings to resume, or delete {pdir} to start over."
        )


def record_run(
    model: Any,
    tokenizer: Any,
    family: Family,
    prompts: Prompts,
    out: str | Path,
    opts: RecordOptions,
    *,
    progress: Any = None,
    on_prompt_done: Callable[[int], None] | None = None,
) -> RecordResult:
    """Record all prompts into `out`, resuming from `out.parts/` when present.

    `progress` is an optional `RecordProgress`; `on_prompt_done(i)` is called
    after prompt i's part is safely on disk (tests use it to interrupt a run).
    """
    out = Path(out)
    pdir, done = prepare_parts(out, opts.fingerprint(family, prompts), len(prompts))
    part_meta = build_meta(family, prompts, opts, [])
    resumed = len(done)
    if progress is not None:
        progress.start(len(prompts), resumed)
    with RouterTap(family, logits=opts.logits, lookahead=opts.lookahead) as tap:
        for i, text in enumerate(prompts.texts):
            if i in done:
                continue
            if progress is not None:
                progress.prompt(i, opts.generation.max_new_tokens)
            try:
                routing = record_prompt(
                    model,
                    tokenizer,
                    text,
                    tap,
                    opts.generation,
                    prompt_index=i,
                    on_token=progress.token if progress is not None else None,
                )
            except RuntimeError as exc:  # torch errors (OOM, too long for the model, ...)
                if progress is not None:
                    progress.stop()
                first = (str(exc).splitlines() or [""])[0][:300]
                raise RuntimeFailure(
                    f"prompt {i} failed in the model forward ({type(exc).__name__}: {first}). "
                    f"The {len(list(pdir.glob('part-*.parquet')))} finished prompt(s) are kept in "
                    f"{pdir}; fix the cause (shorter prompt, fewer --max-new-tokens, "
                    "more memory) and rerun to resume."
                ) from exc
            part_meta.extra["per_prompt"] = [_prompt_summary(i, routing)]
            trace = prompt_trace(routing, i, part_meta, f"prompt {i}")
            write_trace(trace, part_path(pdir, i))
            if progress is not None:
                progress.prompt_done()
            if on_prompt_done is not None:
                on_prompt_done(i)
    if progress is not None:
        progress.stop()
    return _assemble(pdir, out, family, prompts, opts, resumed)


def _prompt_summary(i: int, r: PromptRouting) -> dict[str, int]:
    return {"seq": i, "prompt_tokens": r.prompt_tokens, "decode_tokens": r.decode_tokens}


def part_path(pdir: Path, i: int) -> Path:
    return pdir / f"part-{i:06d}.parquet"


def prepare_parts(out: Path, fingerprint: dict[str, Any], n_prompts: int) -> tuple[Path, set[int]]:
    """The parts dir of `out` (checked against `fingerprint`, created) and the prompts done."""
    pdir = parts_dir(out)
    if pdir.exists():
        _check_settings(pdir, fingerprint)
    pdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(pdir / "settings.json", fingerprint)
    return pdir, {i for i in range(n_prompts) if part_path(pdir, i).exists()}


def assemble_parts(
    pdir: Path,
    out: Path,
    n_prompts: int,
    meta_for: Callable[[list[dict[str, Any]]], TraceMeta],
    *,
    logits: bool,
    keep_parts: bool,
) -> Trace:
    """Concatenate the per-prompt parts into `out` (atomically); remove the parts unless kept.

    `meta_for(per_prompt)` makes the final metadata from the parts' per-prompt summaries.
    """
    frames: list[pd.DataFrame] = []
    logit_parts: list[np.ndarray] = []
    per_prompt: list[dict[str, Any]] = []
    for i in range(n_prompts):
        part = read_trace(part_path(pdir, i), with_logits=logits)
        frames.append(part.df)
        if logits:
            if part.logits is None:
                raise BadInput(f"{pdir}: part {i} has no logits although the run records them.")
            logit_parts.append(part.logits)
        per_prompt.extend(part.meta.extra.get("per_prompt", []))
    meta = meta_for(per_prompt)
    df = pd.concat(frames, ignore_index=True)
    trace = Trace(
        df, meta, logits=np.concatenate(logit_parts) if logit_parts else None, name=out.name
    )
    write_trace(trace, out)
    if not keep_parts:
        shutil.rmtree(pdir)
    return trace


def _assemble(
    pdir: Path, out: Path, family: Family, prompts: Prompts, opts: RecordOptions, resumed: int
) -> RecordResult:
    trace = assemble_parts(
        pdir,
        out,
        len(prompts),
        lambda per_prompt: build_meta(family, prompts, opts, per_prompt),
        logits=opts.logits,
        keep_parts=opts.keep_parts,
    )
    phase = trace.token_table()["phase"].astype(str)
    return RecordResult(
        path=out,
        prompts=len(prompts),
        resumed_prompts=resumed,
        tokens=trace.n_tokens,
        prefill_tokens=int((phase == "prefill").sum()),
        decode_tokens=int((phase == "decode").sum()),
        n_layers=family.n_layers,
        n_experts=family.n_experts,
        top_k=family.top_k,
        model=opts.model_id,
        architecture=family.architecture,
    )
