"""What a driver that sleeps on a read pays when it wakes: the dense block and an expert FFN
timed right after nothing, a 1 ms spin, sleeps of 0.3 / 1 / 3 ms and a blocking read of one
expert; then the engine's step sequence (dense, two reads waited for, their FFNs) against
the same steps with every expert resident.

    .venv/bin/python bench/bench_wake.py --experts experts-small.gguf [--rounds 150]

Time it alone on the disk (`flock` the disk if others time it too). The model's wake costs
(`compute.wake_ffn_s`, `compute.wake_dense_s`) are what these differences are, fitted by
`mer calibrate` from an I/O-bound run; this shows where they come from.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("none", "spin 1 ms", "sleep 0.3 ms", "sleep 1 ms", "sleep 3 ms", "blocking read")


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--experts", type=Path, required=True, help="a GGUF expert file (mer experts synth)"
    )
    ap.add_argument("--rounds", type=int, default=150, help="repeats of each case (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.experts.is_file():
        print(f"--experts {a.experts}: no such file (make one with `mer experts synth`)")
        return 2
    from mer.engine.aligned import aligned_empty
    from mer.engine.dense import DenseBlock
    from mer.engine.ffn import make_ffn
    from mer.engine.io import open_reader
    from mer.engine.store import ExpertStore
    from mer.engine.streaming import _Reads

    store = ExpertStore.open(a.experts)
    shape = store.shape
    rng = np.random.default_rng(a.seed)
    n_layers, n_exp = store.n_layers, store.n_experts
    ring = 64
    bufs = [aligned_empty(int(store.slot_bytes)) for _ in range(ring)]
    x = rng.standard_normal(shape.d_model).astype(np.float32)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    res: dict[tuple[str, str], list[float]] = {}
    seq: dict[tuple[str, str], list[float]] = {}
    with (
        make_ffn(shape, 2, "auto") as ffn,
        open_reader(kind="auto", queue_depth=32, chunk_bytes=512 << 10) as reader,
    ):
        fd = reader.open(store.data_path)
        reads = _Reads(reader, lambda *_a: None)
        block = DenseBlock(shape, n_layers=n_layers, seed=a.seed, threads=2, kernel=ffn)
        rid = [0]

        def read(slot: int, layer: int, expert: int) -> Any:
            rid[0] += 1
            tag = ("slot", rid[0])
            reads.submit(tag, 0, store.read_plan(layer, expert), fd, bufs[slot])
            return tag

        for i in range(ring):  # the resident ring: 64 experts, more than the CPU caches hold
            layer, expert = divmod(i % (n_layers * n_exp), n_exp)
            reads.wait(read(i, layer, expert))

        def views(slot: int) -> Any:
            layer, expert = divmod(slot % (n_layers * n_exp), n_exp)
            return store.views(bufs[slot], layer, expert)

        i = 0
        for _ in range(a.rounds):
            for mode in rng.permutation(MODES):
                for what in ("dense", "FFN"):
                    if mode == "spin 1 ms":
                        _spin(1e-3)
                    elif mode.startswith("sleep"):
                        time.sleep(float(mode.split()[1]) * 1e-3)
                    elif mode == "blocking read":
                        s = int(rng.integers(ring))
                        reads.wait(read(s, *divmod(int(rng.integers(n_layers * n_exp)), n_exp)))
                        # re-read the ring's own expert so the slot keeps its layout
                        reads.wait(read(s, *divmod(s % (n_layers * n_exp), n_exp)))
                    t0 = time.perf_counter()
                    if what == "dense":
                        block(i % n_layers, x)
                    else:
                        ffn(x, *views(int(rng.integers(ring))))
                    res.setdefault((what, str(mode)), []).append(time.perf_counter() - t0)
                    i += 1
        n = 0
        for _ in range(max(1, a.rounds // 4)):
            for mode in rng.permutation(["blocked", "resident"]):
                for layer in range(n_layers):
                    t0 = time.perf_counter()
                    block(layer, x)
                    seq.setdefault((str(mode), "dense"), []).append(time.perf_counter() - t0)
                    slots = [int(rng.integers(ring)), int(rng.integers(ring))]
                    if mode == "blocked":
                        slots = [n % ring, (n + 1) % ring]
                        n += 2
                        tags = [read(s, *divmod(s % (n_layers * n_exp), n_exp)) for s in slots]
                        for j, (s, tag) in enumerate(zip(slots, tags, strict=True)):
                            reads.wait(tag)
                            c0 = time.perf_counter()
                            ffn(x, *views(s))
                            seq.setdefault((str(mode), f"FFN {j + 1}"), []).append(
                                time.perf_counter() - c0
                            )
                    else:
                        for j, s in enumerate(slots):
                            c0 = time.perf_counter()
                            ffn(x, *views(s))
                            seq.setdefault((str(mode), f"FFN {j + 1}"), []).append(
                                time.perf_counter() - c0
                            )
        reads.drain()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}\n")
    print("| timed right after | dense block p50 (us) | x | expert FFN p50 (us) | x |")
    print("|---|---:|---:|---:|---:|")
    base = {w: float(np.median(res[(w, "none")])) for w in ("dense", "FFN")}
    for mode in MODES:
        d, f = (float(np.median(res[(w, mode)])) for w in ("dense", "FFN"))
        print(
            f"| {mode} | {d * 1e6:.1f} | {d / base['dense']:.2f} | {f * 1e6:.1f} | "
            f"{f / base['FFN']:.2f} |"
        )
    print("\n| engine step | dense p50 (us) | FFN 1 p50 (us) | FFN 2 p50 (us) |")
    print("|---|---:|---:|---:|")
    for mode in ("resident", "blocked"):
        cells = [float(np.median(seq[(mode, p)])) * 1e6 for p in ("dense", "FFN 1", "FFN 2")]
        print(f"| {mode} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
