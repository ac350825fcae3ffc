"""`mer generate`: decode a Mixtral-family GGUF on this machine, experts streamed from disk.

Thin CLI over mer.model: open the model (config, resident dense weights, the
expert store), build the GGUF's own tokenizer, decode the prompts through the
engine with `mer run`'s cache and prefetch options, print the text, and
optionally write the routing it took (-o, a format-v1 trace, resumable) and
the measured summary (--summary, the same RunSummary as `mer run`).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from mer.cli.common import (
    FinalWrites,
    add_replay_args,
    emit,
    input_file,
    note,
    output_file,
    replay_config_from_args,
)
from mer.cli.generation_args import (
    add_generation_args,
    add_trace_content_args,
    generation_from_args,
)
from mer.cli.run_cmd import GiB, add_engine_args, engine_config_from_args

EPILOG = """\
examples:
  mer experts synth --full --shape mixtral-small -o small-full.gguf
  mer generate --model small-full.gguf --prompts prompts.txt --max-new-tokens 16
  mer generate --model mixtral-8x7b-v0.1.Q4_0.gguf --prompts prompts.txt \\
      -o routing.parquet --logits --lookahead --summary gen.json --cache-gib 6
  mer simulate routing.parquet --policy lru --cache-gib 6 --json > sim.json
  mer compare sim.json gen.json

An interrupted run with -o keeps each finished prompt in OUT.parts/; rerun the
same command to resume. See docs/generate.md.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="decode a Mixtral-family GGUF with experts streamed from disk; record its routing",
        description=(
            "Decode prompts with the real model read from a GGUF (llama architecture with "
            "experts: Mixtral). Dense weights stay in RAM; every routed expert goes through the "
            "engine (cache policy and prefetch from the shared decision core, io_uring O_DIRECT "
            "reads, the q4_0 FFN). Prints the generated text. -o writes the routing it took as a "
            "format-v1 trace (prefill and decode, gate weights, optionally router logits and "
            "lookahead); --summary writes the measured RunSummary, as `mer run` does."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", type=input_file, required=True, help="a GGUF model file (Q4_0 experts)"
    )
    p.add_argument(
        "--prompts",
        type=input_file,
        required=True,
        help='text file (one prompt per line) or JSON Lines with a "prompt" field',
    )
    add_generation_args(p)
    p.add_argument(
        "-o",
        "--output",
        type=output_file,
        default=None,
        help="write the routing taken as a trace (format v1 parquet)",
    )
    add_trace_content_args(p, with_o=True)
    p.add_argument(
        "--summary", type=output_file, default=None, help="write the measured summary (JSON)"
    )
    p.add_argument(
        "--token-table",
        type=output_file,
        default=None,
        help="write the per-token timing table (parquet)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_replay_args(p, live=True)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mer.errors import BadInput
    from mer.model.generate import GenerateOptions, PromptResult, generate_run
    from mer.model.gguf_model import MoeModel
    from mer.model.tokenizer import load_tokenizer
    from mer.summary import write_token_table
    from mer.traces.record.prompts import load_prompts

    if (args.logits or args.lookahead or args.keep_parts) and args.output is None:
        raise BadInput("--logits, --lookahead and --keep-parts describe the trace: give -o.")
    prompts = load_prompts(args.prompts)
    model = MoeModel.open(args.model)
    tokenizer = load_tokenizer(args.model)
    rcfg = replay_config_from_args(args, bytes_per_expert=model.store.bytes_per_expert)
    ecfg = engine_config_from_args(args, seed=args.seed)
    mem = model.memory()
    cfg = model.config
    if not args.json:
        deq = mem["dequantised_to_f32"]
        extra = (
            "; dequantised to f32 at load: "
            + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in deq.items())
            if deq
            else ""
        )
        note(
            f"{args.model.name}: {cfg.n_layers} layers x {cfg.n_experts} experts ("
            f"{model.store.expert_dtype.lower()}, {model.store.bytes_per_expert / 2**20:.1f} MiB "
            f"each), top-{cfg.top_k}, vocab {cfg.vocab_size}; resident dense "
            f"{mem['resident_bytes'] / 2**20:.0f} MiB{extra}; expert cache "
            f"{rcfg.cache_slots} slots ({rcfg.cache_slots * model.store.slot_bytes / GiB:.2f} GiB)"
        )
    opts = GenerateOptions(
        **generation_from_args(args).to_dict(),
        logits=args.logits,
        lookahead=args.lookahead,
        keep_parts=args.keep_parts,
    )

    def show(res: PromptResult) -> None:
        if not args.json:
            tag = " (resumed)" if res.resumed else ""
            print(f"--- prompt {res.seq}{tag}: {prompts.texts[res.seq][:60]!r}")
            print(res.text, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = generate_run(
            model, tokenizer, prompts, rcfg, ecfg, opts, out=args.output, on_text=show
        )
    summary = result.summary
    writes = FinalWrites()
    if summary is not None:
        writes.add(args.summary, summary.save, "summary")
        writes.add(
            args.token_table,
            lambda p: write_token_table(result.tokens, p, summary),
            "per-token table",
        )
    writes.run()
    lines = []
    if result.trace_path is not None:
        lines.append(f"trace: {result.trace_path}")
    if summary is not None:
        ex = summary.extra
        lines.append(summary.format_text())
        lines.append(
            f"peak RSS: {ex['peak_rss_bytes'] / GiB:.2f} GiB (dense {ex['dense_resident_bytes'] / GiB:.2f}"
            f" GiB, cache buffers {ex['cache_buffer_bytes'] / GiB:.2f} GiB, KV cache "
            f"{ex['kv_cache_bytes'] / GiB:.3f} GiB); reads via {ex['io']['kind']}"
            f"{' O_DIRECT' if ex['io']['direct'] else ' buffered'}"
        )
    else:
        lines.append("every prompt was already decoded (resumed); nothing measured.")
    emit(args, result.to_dict(), "\n".join(lines))
    return writes.finish()
