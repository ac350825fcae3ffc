"""`mer experts synth|pack|info`: q4_0 expert files for the real engine.

synth writes a Mixtral-shaped GGUF (real tensor names, q4_0 blocks, random
seeded weights); pack repacks a GGUF's experts into 4 KiB-aligned slots; info
describes a GGUF or a packed dir the way the executor will read it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mer.cli.common import (
    emit,
    input_file,
    input_path,
    int_range,
    note,
    output_dir,
    output_file,
)
from mer.shapes import SHAPES, shape_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experts",
        help="write, repack and describe q4_0 expert files (GGUF)",
        description="Expert weight files for `mer run`: synth | pack | info.",
    )
    esub = p.add_subparsers(dest="experts_command", metavar="ACTION")
    p.set_defaults(func=lambda a: p.print_help() or 2)

    s = esub.add_parser(
        "synth",
        help="write a Mixtral-shaped GGUF with random q4_0 experts",
        description=(
            "Write a GGUF with Mixtral's real tensor names and ggml shapes, q4_0 expert "
            "weights from a seeded generator and llama-arch metadata (expert_count, "
            "expert_used_count, block_count, ...). Streams tensor by tensor, so "
            "mixtral-8x7b (about 25 GB of experts) needs one tensor of memory. "
            "Shapes: " + shape_help()
        ),
    )
    s.add_argument(
        "--shape",
        required=True,
        choices=list(SHAPES),
        metavar="NAME",
        help="model shape (see above)",
    )
    s.add_argument("-o", "--output", type=output_file, required=True, help="output .gguf file")
    s.add_argument(
        "--seed",
        type=int_range(0, (1 << 32) - 1, "a seed from 0 to 4294967295"),
        default=0,
        help="weight seed (default 0; stored as uint32 in the GGUF)",
    )
    s.add_argument(
        "--layout",
        choices=("stacked", "per-expert"),
        default="stacked",
        help="stacked blk.N.ffn_gate_exps.weight (default, current llama.cpp) or "
        "per-expert blk.N.ffn_gate.E.weight (older conversions)",
    )
    s.add_argument(
        "--dense",
        action="store_true",
        help="also write q4_0 attention tensors blk.N.attn_{q,k,v,output}.weight of the true size",
    )
    s.add_argument(
        "--full",
        action="store_true",
        help="a whole model for `mer generate`: also token embedding, norms, attention, output "
        "head, rope/norm hyperparameters and a small sentencepiece-style vocabulary, q4_0 codes "
        "symmetric about zero so that tokens route apart (`mer run --experts` reads it too)",
    )
    s.add_argument(
        "--vocab",
        type=int,
        default=512,
        help="vocabulary size with --full (default 512: the head stays small)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    s.set_defaults(func=run_synth)

    k = esub.add_parser(
        "pack",
        help="repack a GGUF's experts into 4 KiB-aligned slots (one read per expert)",
        description=(
            "Copy every expert of FILE.gguf into DIR/experts.bin, gate|up|down contiguous in a "
            "4 KiB-aligned slot, with DIR/manifest.json (shape, slot size, offsets, source "
            "digest). `mer run --experts DIR` then reads each expert with one O_DIRECT read."
        ),
    )
    k.add_argument("file", type=input_file, metavar="FILE.gguf", help="source GGUF")
    k.add_argument("-o", "--output", type=output_dir, required=True, help="output directory")
    k.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    k.set_defaults(func=run_pack)

    i = esub.add_parser(
        "info",
        help="shape, layout, bytes per expert, alignment of a GGUF or packed dir",
        description="Describe an expert file as the executor will read it.",
    )
    i.add_argument("file", type=input_path, metavar="FILE", help="a .gguf file or a packed dir")
    i.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    i.set_defaults(func=run_info)


@contextmanager
def _progress(label: str, unit_bytes: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn(label), BarColumn()]
    cols.append(DownloadColumn() if unit_bytes else TextColumn("{task.completed}/{task.total}"))
    cols.append(TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def run_synth(args: argparse.Namespace) -> int:
    from mer.engine.gguf_synth import plan_full_tensors, plan_tensors, synth_gguf
    from mer.errors import BadInput
    from mer.guard import check_free_space
    from mer.shapes import get_shape

    shape = get_shape(args.shape)
    if args.full and args.vocab < 300:
        raise BadInput(
            f"--vocab must be at least 300 (bytes, specials, letters), got {args.vocab}."
        )
    specs = (
        plan_full_tensors(shape, args.vocab, args.layout)
        if args.full
        else plan_tensors(shape, args.layout, args.dense)
    )
    check_free_space(args.output, sum(s.n_bytes for s in specs), "-o")
    t0 = time.perf_counter()
    with _progress(f"synth {shape.name}", True) as prog:
        res = synth_gguf(
            args.output,
            shape,
            args.seed,
            args.layout,
            args.dense,
            prog,
            full=args.full,
            vocab_size=args.vocab,
        )
    secs = time.perf_counter() - t0
    out = {**res.to_dict(), "seconds": round(secs, 3)}
    note(f"wrote {args.output}")
    emit(
        args,
        out,
        f"{shape.name}: {shape.n_layers} layers x {shape.n_experts} experts, {args.layout} layout"
        f"{' + dense attention' if args.dense and not args.full else ''}"
        f"{f' + the whole model (vocabulary {args.vocab})' if args.full else ''}, "
        f"{res.file_bytes / 2**20:.1f} MiB "
        f"in {secs:.1f} s ({res.file_bytes / 2**20 / max(secs, 1e-9):.0f} MiB/s) -> {args.output}",
    )
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from mer.engine.pack import pack_experts

    t0 = time.perf_counter()
    with _progress("pack", False) as prog:
        res = pack_experts(args.file, args.output, prog)
    secs = time.perf_counter() - t0
    out = {**res.to_dict(), "seconds": round(secs, 3)}
    emit(
        args,
        out,
        f"packed {res.slots} experts into {res.slot_bytes}-byte slots "
        f"({res.data_bytes / 2**20:.1f} MiB{f', dense for {res.dense_layers} layers' if res.dense_layers else ''}) "
        f"in {secs:.1f} s -> {args.output}",
    )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from mer.engine.store import ExpertStore

    info = ExpertStore.open(args.file).info()
    shape = info["shape"]
    dense = (
        f"present, {info['dense_bytes_per_layer']} bytes/layer"
        if info["dense_present"]
        else "absent"
    )
    text = "\n".join(
        [
            f"file           {info['path']} ({info['kind']}, {info['file_size'] / 2**20:.1f} MiB)",
            f"shape          {shape['name']}: {info['n_layers']} layers x {info['n_experts']} experts, "
            f"top-{shape['top_k']}, d_model {shape['d_model']}, d_ff {shape['d_ff']}",
            f"layout         {info['layout']}",
            f"bytes/expert   {info['bytes_per_expert']} ({info['bytes_per_expert'] / 2**20:.2f} MiB q4_0)",
            f"alignment      {info['alignment']}: {info['reads_per_expert']} read(s) per expert, "
            f"{info['bytes_needed']} bytes per slot, read amplification {info['read_amplification']:.3f}",
            f"dense          {dense}",
        ]
    )
    emit(args, info, text)
    return 0
