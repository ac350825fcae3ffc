"""`mer run` (the real engine replaying a trace) and `mer probe` (measure this machine)."""

from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path
from typing import Any

from mer.cli.common import (
    DefaultsHelpFormatter,
    FinalWrites,
    add_output_args,
    add_replay_args,
    add_trace_and_experts,
    emit,
    float_range,
    input_path,
    int_range,
    note,
    output_dir,
    output_file,
    replay_config_from_args,
    require_file,
    seed_int,
)
from mer.errors import BadInput

KiB = 1 << 10
GiB = 1 << 30
MAX_CHUNK_BYTES = 64 << 20


def _size(text: str) -> int:
    """'512K', '1M', '4096' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", KiB), ("M", KiB**2), ("G", KiB**3)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        f = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512K or 1M, got {text!r}") from None
    if not math.isfinite(f) or f < 1 or f > MAX_CHUNK_BYTES:
        raise argparse.ArgumentTypeError(
            f"expected a size from 4K to {MAX_CHUNK_BYTES >> 20}M, got {text!r}"
        )
    v = int(f)
    if v % 4096:
        raise argparse.ArgumentTypeError(f"expected a multiple of 4096 bytes (4K), got {text!r}")
    return v


def add_engine_args(p: argparse.ArgumentParser) -> Any:
    """How the engine reads and computes (shared by `mer run` and `mer generate`)."""
    from mer.engine.io import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, MAX_QUEUE_DEPTH

    g = p.add_argument_group("engine")
    g.add_argument(
        "--io",
        choices=("auto", "uring", "pread"),
        default="auto",
        help="reader: io_uring (auto falls back to a preadv thread pool, saying why once)",
    )
    g.add_argument(
        "--queue-depth",
        type=int_range(1, MAX_QUEUE_DEPTH),
        default=DEFAULT_QUEUE_DEPTH,
        help=f"reads in flight (1..{MAX_QUEUE_DEPTH})",
    )
    g.add_argument(
        "--background-depth",
        type=int_range(1, MAX_QUEUE_DEPTH),
        default=None,
        metavar="N",
        help="prefetch chunks on the device at once (default: the whole queue depth); the "
        "others wait behind every demand read, so a miss never queues behind more than N "
        "prefetch chunks",
    )
    g.add_argument(
        "--chunk-bytes",
        type=_size,
        default=DEFAULT_CHUNK_BYTES,
        help="reads are split into chunks of this size (multiple of 4096; 512K, 1M ...)",
    )
    g.add_argument(
        "--threads",
        type=int_range(1, 1024),
        default=os.cpu_count() or 1,
        help="compute threads for the FFN and dense block",
    )
    g.add_argument(
        "--ffn",
        choices=("auto", "native", "numpy"),
        default="auto",
        help="expert FFN kernel: native C (ggml's q4_0 x q8_0 arithmetic; auto uses it wherever "
        "it was built, else numpy, saying so once) or the numpy reference",
    )
    g.add_argument(
        "--buffered",
        action="store_true",
        help="read through the page cache instead of O_DIRECT (not a fair measurement)",
    )
    add_arrangement_args(g)
    return g


def add_arrangement_args(g: Any) -> None:
    """The engine's memory and priority arrangement (both only change timing)."""
    for flag, text in (
        (
            "--no-huge-pages",
            "slot buffers on plain 4 KiB pages instead of transparent huge pages (the old "
            "arrangement: runs of one configuration then vary more, by how the kernel places "
            "the pages; also MER_HUGE_PAGES=0)",
        ),
        (
            "--no-realtime",
            "keep the driver thread at normal priority (by default `mer run` and `mer "
            "validate` run their timed loop under SCHED_FIFO where permitted, so a landed read "
            "wakes the driver at once: on a busy machine runs of one configuration then agree "
            "more closely; `mer generate` stays at normal priority either way)",
        ),
    ):
        g.add_argument(flag, action="store_true", help=text)


def huge_pages_from_args(args: argparse.Namespace) -> bool:
    from mer.engine.aligned import huge_pages_default

    return huge_pages_default() and not getattr(args, "no_huge_pages", False)


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    from mer.engine.streaming import EngineConfig

    values: dict[str, Any] = dict(
        io=args.io,
        queue_depth=args.queue_depth,
        chunk_bytes=args.chunk_bytes,
        background_depth=args.background_depth,
        threads=args.threads,
        ffn=args.ffn,
        direct=not args.buffered,
        huge_pages=huge_pages_from_args(args),
        realtime=not getattr(args, "no_realtime", False),
        progress=not args.no_progress,
    )
    values.update(overrides)
    return EngineConfig(**values)


def register(sub: Any) -> None:

    p = sub.add_parser(
        "run",
        help="replay a trace on real expert weights (io_uring, O_DIRECT, native q4_0 FFN)",
        description=(
            "Replay TRACE through the shared decision core on real q4_0 expert weights: "
            "misses are read from the expert file (io_uring with O_DIRECT, or a preadv pool), "
            "predicted experts are prefetched in the background, every expert's SwiGLU FFN is "
            "computed and combined with the trace's gate weights. Prints the same summary as "
            "`mer simulate` (kind 'measured'). Make an expert file with `mer experts synth`."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    add_trace_and_experts(
        p,
        "expert weights: a GGUF file (stacked or per-expert layout) or a packed directory",
    )
    add_replay_args(p)
    g = add_engine_args(p)
    g.add_argument(
        "--mode",
        choices=("model", "seed"),
        default="model",
        help="model: run the resident dense (attention-sized) block every layer, so tokens/s is "
        "whole-model; seed: experts only, as the public engine's benchmark",
    )
    g.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the hidden vector and dense block"
    )
    add_output_args(p)
    p.add_argument(
        "--summary", type=output_file, default=None, help="also write the summary as JSON"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_run)

    q = sub.add_parser(
        "probe",
        help="measure this machine's SSD, FFN and memory into a simulator hardware profile",
        description=(
            "Measure, on a temporary file on the target disk (O_DIRECT, deleted afterwards), "
            "the bandwidth of whole-expert reads at queue depths 1..64 and several chunk sizes "
            "and the 4 KiB read latency; the q4_0 expert FFN and dense-block throughput of the "
            "kernel `mer run` uses (native where built); the memory read bandwidth beside it. Writes a hardware profile (the simulator's schema) so "
            "`mer simulate --hardware FILE` predicts this machine."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    q.add_argument(
        "--dir",
        type=output_dir,
        default=None,
        help="directory on the disk to measure (default: the current directory; never tmpfs)",
    )
    q.add_argument(
        "--size-gib",
        type=float_range(1 / 1024, 1024, what="a size in GiB from 1/1024 to 1024"),
        default=None,
        help="probe file size in GiB (default: 2; 1/16 with --quick)",
    )
    q.add_argument(
        "--shape",
        default=None,
        help="model shape whose experts are read and computed: measure the shape you will "
        "run, since FFN bytes/s differs between shapes (default: mixtral-8x7b; mixtral-small "
        "with --quick)",
    )
    q.add_argument(
        "--experts",
        type=input_path,
        default=None,
        help="measure the shape of this expert file (the one `mer run --experts` will read)",
    )
    q.add_argument("--io", choices=("auto", "uring", "pread"), default="auto", help="reader")
    q.add_argument(
        "--threads",
        type=int_range(1, 1024),
        default=os.cpu_count() or 1,
        help="compute threads (as `mer run --threads`)",
    )
    q.add_argument(
        "--ffn",
        choices=("auto", "native", "numpy"),
        default="auto",
        help="expert FFN kernel to measure (as `mer run --ffn`): the one runs will use",
    )
    q.add_argument(
        "--quick", action="store_true", help="a few seconds: small file, small shape, fewer points"
    )
    q.add_argument(
        "--ssd-model",
        choices=("shared", "channels"),
        default="shared",
        help="the profile's SSD model: shared (reads in flight share the device, their "
        "aggregate rate following the measured bursts of 1..32 chunks) or channels (chunks "
        "queue for a fitted number of channels, the model of earlier versions)",
    )
    q.add_argument("--name", default=None, help="profile name (default probe-HOSTNAME)")
    q.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    q.add_argument(
        "-o",
        "--output",
        type=output_file,
        default=None,
        help="write the hardware profile JSON here",
    )
    q.set_defaults(func=cmd_probe)


def _open_store(path: Path) -> Any:
    from mer.engine.store import ExpertStore

    if not path.exists():
        raise BadInput(
            f"expert file {path}: no such file or directory; make one with `mer experts synth`."
        )
    return ExpertStore.open(path)


def cmd_run(args: argparse.Namespace) -> int:
    from mer.engine.executor import Executor
    from mer.summary import trace_digest, write_token_table
    from mer.traces.format import read_trace

    require_file(args.trace, "trace")
    trace = read_trace(args.trace)
    store = _open_store(args.experts)
    rcfg = replay_config_from_args(args, bytes_per_expert=store.bytes_per_expert)
    ecfg = engine_config_from_args(args, mode=args.mode, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        ex = Executor(
            trace,
            store,
            rcfg,
            ecfg,
            trace_name=args.trace.name,
            trace_digest=trace_digest(trace),
            store_path=str(args.experts),
        )
        result = ex.run()
    summary = result.summary
    writes = FinalWrites()
    writes.add(
        args.output, lambda p: write_token_table(result.tokens, p, summary), "per-token table"
    )
    writes.add(args.summary, summary.save, "summary")
    writes.run()
    if args.output in writes.written:
        note(f"per-token table: {args.output}")
    text = summary.format_text()
    ex_ = summary.extra
    text += (
        f"\npeak RSS: {ex_['peak_rss_bytes'] / GiB:.2f} GiB (cache buffers "
        f"{ex_['cache_buffer_bytes'] / GiB:.2f} GiB, scratch {ex_['scratch_buffer_bytes'] / GiB:.3f} "
        f"GiB, dense {ex_['dense_resident_bytes'] / GiB:.3f} GiB); reads via {ex_['io']['kind']}"
        f"{' O_DIRECT' if ex_['io']['direct'] else ' buffered'}"
    )
    emit(args, summary.to_dict(), text)
    return writes.finish()


def cmd_probe(args: argparse.Namespace) -> int:
    from mer.engine.probe import ProbeConfig, run_probe, to_profile

    size = int(args.size_gib * GiB) if args.size_gib is not None else None
    shape = args.shape
    if args.experts is not None:
        store = _open_store(args.experts)
        if shape and shape != store.shape.name:
            raise BadInput(
                f"--shape {shape} disagrees with the expert file {args.experts}, which is "
                f"{store.shape.name}; give one of them."
            )
        shape = store.shape.name
        from mer.shapes import SHAPES

        if shape not in SHAPES:
            raise BadInput(
                f"the expert file {args.experts} has shape {shape}, which mer probe cannot "
                f"synthesise; pass --shape with a registered shape ({', '.join(SHAPES)})."
            )
    kw: dict[str, Any] = dict(
        directory=args.dir,
        size_bytes=size,
        shape=shape,
        io=args.io,
        threads=args.threads,
        ffn=args.ffn,
    )
    if args.quick:
        cfg = ProbeConfig.quick(**kw)
    else:
        cfg = ProbeConfig(**{k: v for k, v in kw.items() if v is not None})
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = run_probe(cfg, log=note)
    profile = to_profile(result, args.name, args.ssd_model)
    writes = FinalWrites()
    writes.add(args.output, profile.save, "hardware profile")
    writes.run()
    if writes.written:
        note(f"hardware profile: {args.output} (use: mer simulate --hardware {args.output})")
    s = profile.ssd
    c = profile.compute
    text = "\n".join(
        [
            f"=== mer probe: {profile.name} ===",
            f"ssd: latency {s.latency_s * 1e6:.0f} us, bandwidth {s.bandwidth_bytes_per_s / 1e9:.2f} GB/s, "
            f"channels {s.channels}, chunk {s.chunk_bytes >> 10} KiB "
            f"({result.io_kind}{', O_DIRECT' if result.direct else ', buffered'}, {result.filesystem})",
            f"compute: expert FFN {c.ffn_bytes_per_s / 1e9:.2f} GB/s of q4_0 weights "
            f"({result.ffn_kernel}, {result.threads} threads) = "
            f"{c.ffn_bytes_per_s / profile.memory.read_bandwidth_bytes_per_s:.0%} of memory read "
            f"{profile.memory.read_bandwidth_bytes_per_s / 1e9:.2f} GB/s; dense block "
            f"{c.dense_bytes_per_s / 1e9:.2f} GB/s; measured on {result.shape} experts: simulate "
            "that shape with this profile (another shape's FFN runs at another rate; probe it "
            "with --shape or --experts)",
            f"memory: {profile.memory.read_bandwidth_bytes_per_s / 1e9:.2f} GB/s read on "
            f"{result.threads} threads, {result.memory_read_1thread_bytes_per_s / 1e9:.2f} GB/s on "
            f"one ({result.memory_read_kind}), {profile.memory.ram_bytes / GiB:.1f} GiB RAM",
        ]
    )
    emit(args, profile.to_dict(), text)
    return writes.finish()
