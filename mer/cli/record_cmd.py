"""`mer record`: router traces from a real transformers MoE model.

Thin CLI over traces.record: parse, load, record (resumable), report.
"""

from __future__ import annotations

import argparse

from mer.cli.common import add_output_args, emit, input_file, note
from mer.cli.generation_args import (
    add_generation_args,
    add_trace_content_args,
    generation_from_args,
)
from mer.errors import BadInput, RuntimeFailure

EPILOG = """\
examples:
  mer record --model mistralai/Mixtral-8x7B-Instruct-v0.1 --prompts prompts.txt \\
      -o mixtral.parquet --max-new-tokens 128 --device cuda --dtype bfloat16 --lookahead
  mer record --model ./tiny-mixtral --prompts prompts.jsonl -o tiny.parquet --max-new-tokens 8

An interrupted run keeps each finished prompt in OUT.parts/; rerun the same
command to resume. See docs/recording.md.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="record router traces from a real transformers MoE model",
        description=(
            "Run prompts through a Hugging Face transformers MoE model (batch size 1, KV cache)\n"
            "and record, for every prompt token (phase prefill), every generated token (decode)\n"
            "and every MoE layer, the top-k experts in rank order with their normalised gate\n"
            "weights, into trace format v1 (-o OUT.parquet)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face model id or local directory")
    p.add_argument(
        "--prompts",
        required=True,
        type=input_file,
        help='text file (one prompt per line) or JSON Lines with a "prompt" field',
    )
    add_generation_args(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cuda loads with device_map='auto' over all visible GPUs (needs accelerate); "
        "auto: cuda if available (default)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (auto: the checkpoint's)",
    )
    add_trace_content_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output is None:
        raise BadInput("mer record needs -o OUT.parquet (where to write the trace).")
    if args.sample and not args.temperature > 0:
        raise BadInput(f"--temperature must be > 0, got {args.temperature}.")
    from mer.traces.record.prompts import load_prompts

    prompts = load_prompts(args.prompts)  # check cheap inputs before loading a model
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise RuntimeFailure(
            f"mer record needs torch and transformers ({exc}); install the extra: "
            "pip install 'mer-moe[record]'."
        ) from exc
    from mer.traces.record.loader import load_model
    from mer.traces.record.progress import RecordProgress
    from mer.traces.record.session import RecordOptions, record_run

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        note(f"loading {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    fam = loaded.family
    if not args.quiet:
        note(
            f"{fam.architecture}: {fam.n_layers} MoE layers x {fam.n_experts} experts, "
            f"top-{fam.top_k} on {loaded.device} ({loaded.dtype}); {len(prompts)} prompts"
        )
    opts = RecordOptions(
        model_id=args.model,
        revision=loaded.revision,
        generation=generation_from_args(args),
        logits=args.logits,
        lookahead=args.lookahead,
        dtype=loaded.dtype,
        device=loaded.device,
        keep_parts=args.keep_parts,
    )
    result = record_run(
        loaded.model,
        loaded.tokenizer,
        fam,
        prompts,
        args.output,
        opts,
        progress=RecordProgress(enabled=not args.quiet),
    )
    text = (
        f"wrote {result.path}: {result.prompts} prompts ({result.resumed_prompts} resumed), "
        f"{result.tokens} tokens ({result.prefill_tokens} prefill, {result.decode_tokens} "
        f"decode), {result.n_layers} MoE layers x {result.n_experts} experts, top-{result.top_k}"
    )
    emit(args, result.to_dict(), text)
    return 0
