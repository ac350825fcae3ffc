"""`mer trace import | validate | info`: bring routing in, check it, describe it.

Import converts a foreign file with a registered importer, says on stderr what
it dropped and why, and writes the validated trace atomically. validate and
info read a trace file through the same validating reader every component uses,
so a file they accept is a file the simulator and the engine accept.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mer.cli.common import emit, input_file, int_range, note, output_file
from mer.traces.format import PHASES, Trace, read_trace, write_trace
from mer.traces.importers import IMPORTERS, ImportOptions, import_trace

FORMATS_HELP = "\n".join(f"  {name:<19} {imp.summary}" for name, imp in IMPORTERS.items())
IMPORT_EXAMPLE = """example:
  mer trace import mixtral-offloading active_experts.txt -o h39s.parquet
  mer trace import speculative-moe humaneval_2_routing.jsonl -o he.parquet --json
  mer trace import seed-jsonl replay.jsonl -o seed.parquet --model seed-flat-256 \\
      --experts-per-layer 8"""


def register(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser(
        "import",
        help="convert a published or foreign routing file to trace format v1",
        description=(
            "Convert routing recorded elsewhere into a validated trace (format v1, parquet).\n"
            "What the source lacks (per-token prefill routing, gate weights, whole tokens) is\n"
            "dropped and counted on stderr and in --json, never invented; details per format\n"
            f"in docs/trace-format.md.\n\nformats:\n{FORMATS_HELP}"
        ),
        epilog=IMPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", metavar="FORMAT", choices=list(IMPORTERS), help=", ".join(IMPORTERS))
    p.add_argument("src", metavar="SRC", type=input_file, help="the file to import")
    p.add_argument(
        "-o", "--output", type=output_file, required=True, help="trace file to write (.parquet)"
    )
    p.add_argument("--model", help="model name for the metadata (default: the format's)")
    p.add_argument(
        "--n-layers",
        type=int_range(1, 1 << 15),
        help="number of MoE layers (default: the format's, or inferred as max layer + 1)",
    )
    p.add_argument(
        "--n-experts",
        type=int_range(1, 1 << 15),
        help="experts per layer (default: the format's, or inferred as max expert + 1)",
    )
    p.add_argument(
        "--top-k",
        type=int_range(1, 127),
        help="experts per token and layer (default: the format's, or inferred)",
    )
    p.add_argument(
        "--experts-per-layer",
        type=int_range(1, 1 << 15),
        help="record the real geometry of a flat-id trace (seed-jsonl) in the metadata",
    )
    p.add_argument("--provenance", help="provenance text for the metadata (default: derived)")
    p.add_argument("--licence", help="licence of the source data for the metadata")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    p.set_defaults(func=cmd_import)

    p = tsub.add_parser(
        "bundled",
        help="write the bundled real Mixtral trace to a file (or print where it is installed)",
        description=(
            "mer ships one real trace: Mixtral-8x7B decode routing published by the "
            "mixtral-offloading project (MIT; 773 tokens x 32 layers, top-2). With -o it is "
            "copied there, so every example in the docs can start from it; without, its "
            "installed path is printed."
        ),
    )
    p.add_argument("-o", "--output", type=output_file, default=None, help="copy it here (.parquet)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    p.set_defaults(func=cmd_bundled)

    p = tsub.add_parser(
        "validate",
        help="check a trace file against format v1 (exit 2 with the first problem)",
        description=(
            "Read a trace file with full validation. Prints OK and a one-line summary, or "
            "the first problem (naming the file and the offending rows) and exits with 2."
        ),
    )
    p.add_argument("file", metavar="FILE", type=input_file, help="trace file (.parquet)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    p.set_defaults(func=cmd_validate)

    p = tsub.add_parser(
        "info",
        help="metadata and size of a trace: tokens per phase, sequences, lookups, columns",
        description=(
            "Describe a (validated) trace file: its metadata (model, shape, source, provenance, "
            "licence), tokens per phase, sequences, lookups, and whether it has gate weights, "
            "lookahead and router logits."
        ),
    )
    p.add_argument("file", metavar="FILE", type=input_file, help="trace file (.parquet)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    p.set_defaults(func=cmd_info)


def cmd_import(args: argparse.Namespace) -> int:
    options = ImportOptions(
        model=args.model,
        n_layers=args.n_layers,
        n_experts=args.n_experts,
        top_k=args.top_k,
        experts_per_layer=args.experts_per_layer,
        provenance=args.provenance,
        licence=args.licence,
    )
    result = import_trace(args.format, args.src, options)
    for msg in result.notes:
        note(f"note: {msg}")
    write_trace(result.trace, args.output)
    summary = {"output": str(args.output), "format": args.format, **result.summary()}
    per_phase = summary["tokens_per_phase"]
    dropped = ", ".join(f"{k} {v}" for k, v in result.dropped.items()) or "nothing"
    text = (
        f"wrote {args.output}: {summary['tokens']} tokens "
        f"({per_phase['prefill']} prefill, {per_phase['decode']} decode) in "
        f"{summary['sequences']} sequence(s), {summary['n_layers']} layers x "
        f"{summary['n_experts']} experts, top-{summary['top_k']}, "
        f"weights {'yes' if summary['has_weights'] else 'no'}; dropped: {dropped}"
    )
    emit(args, summary, text)
    return 0


def cmd_bundled(args: argparse.Namespace) -> int:
    import shutil

    from mer.atomic import atomic_path
    from mer.traces.bundled import bundled_trace_path

    src = bundled_trace_path()
    info = {"bundled": str(src), "output": None, "licence": "MIT (mixtral-offloading)"}
    text = str(src)
    if args.output is not None:
        with atomic_path(args.output) as tmp:
            shutil.copyfile(src, tmp)
            umask = os.umask(0)  # a trace is data to share: honour the umask as open() does
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        info["output"] = str(args.output)
        text = (
            f"wrote {args.output}: Mixtral-8x7B routing from mixtral-offloading (MIT), "
            "773 decode tokens x 32 layers, top-2"
        )
    emit(args, info, text)
    return 0


def trace_summary(trace: Trace, path: Path) -> dict[str, Any]:
    """What `info` reports, as a JSON-ready dict."""
    tt = trace.token_table()
    phases = tt["phase"].astype(str).value_counts().to_dict()
    schema = pq.read_schema(path)
    meta = trace.meta
    return {
        "file": str(path),
        "model": meta.model,
        "schema_version": meta.schema_version,
        "n_layers": meta.n_layers,
        "n_experts": meta.n_experts,
        "top_k": meta.top_k,
        "tokens": trace.n_tokens,
        "tokens_per_phase": {p: int(phases.get(p, 0)) for p in PHASES},
        "sequences": int(tt["seq"].nunique()),
        "lookups": trace.n_lookups,
        "distinct_keys": len(set(trace.keys().reshape(-1).tolist())),
        "has_weights": bool(trace.df["weight"].notna().any()),
        "has_lookahead": bool(trace.df["lookahead"].notna().any()),
        "has_logits": "logits" in schema.names,
        "source": meta.source,
        "provenance": meta.provenance,
        "licence": meta.licence,
        "created": meta.created,
        "extra": meta.extra,
    }


def cmd_validate(args: argparse.Namespace) -> int:
    trace = read_trace(args.file, with_logits=True)  # full validation: logits too
    info = trace_summary(trace, args.file)
    ph = info["tokens_per_phase"]
    text = (
        f"OK {args.file}: {info['model']}, {info['tokens']} tokens ({ph['prefill']} prefill, "
        f"{ph['decode']} decode), {info['sequences']} sequence(s), {info['n_layers']} layers x "
        f"{info['n_experts']} experts, top-{info['top_k']}"
    )
    emit(args, {"ok": True, **info}, text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    trace = read_trace(args.file)
    info = trace_summary(trace, args.file)
    ph = info["tokens_per_phase"]
    yes = {True: "yes", False: "no"}
    lines = [
        f"file         {info['file']}",
        f"model        {info['model']}  (schema v{info['schema_version']})",
        f"shape        {info['n_layers']} layers x {info['n_experts']} experts, top-{info['top_k']}",
        f"tokens       {info['tokens']}  (prefill {ph['prefill']}, decode {ph['decode']})",
        f"sequences    {info['sequences']}",
        f"lookups      {info['lookups']}  ({info['distinct_keys']} distinct expert keys)",
        f"weights      {yes[info['has_weights']]}",
        f"lookahead    {yes[info['has_lookahead']]}",
        f"logits       {yes[info['has_logits']]}",
        f"source       {_short(info['source'])}",
        f"provenance   {info['provenance'] or '-'}",
        f"licence      {info['licence'] or '-'}",
        f"created      {info['created']}",
    ]
    if info["extra"]:
        lines.append(f"extra        {_short(info['extra'])}")
    emit(args, info, "\n".join(lines))
    return 0


def _short(d: dict[str, Any]) -> str:
    """One line of key=value, long values (e.g. sequence lists) summarised."""
    parts = []
    for k, v in d.items():
        if isinstance(v, list) and len(v) > 3:
            parts.append(f"{k}=[{len(v)} items]")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts) or "-"
