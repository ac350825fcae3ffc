"""Does the probe's SSD model predict a real Mixtral-shaped run on a shared disk?

Usage:
    .venv/bin/python bench/bench_io_drift.py --experts EXPERTS.gguf --hardware HW.json \
        [--repeats 3] [--tokens 32] [--cache-slots 64]

HW.json is a `mer probe` profile of the expert file's disk (`mer probe -o HW.json --dir
DIR --shape SHAPE`). Each repeat runs `mer run` on the bundled trace (LRU, global,
prefetch off) between two pulses on the expert file itself: a stream of 12 random
experts read back to back as the engine reads them, and the probe's bursts (k = 1..32
chunks of 512 KiB and 128 KiB submitted together) fitted by the probe's device fit.
Then `mer simulate` predicts the run from (a) HW.json as probed, (b) HW.json with its
SSD replaced by the two pulses' burst fit, (c) HW.json with the SSD a single channel at
the pulses' streamed rate. Prints one Markdown row per run: the load average, the
measured tokens/s and read rate (bytes / time with a read outstanding), the pulses'
figures and the three predictions with their errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mer.engine.aligned import aligned_empty
from mer.engine.io import open_reader
from mer.engine.probe import fit_device, measure_bursts
from mer.engine.store import ExpertStore

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
MER = [sys.executable, "-m", "mer"]
CHUNK = 512 << 10


def stream_rate(store: ExpertStore, path: Path, n: int, rng: np.random.Generator) -> float:
    """Bytes/s of `n` random experts read one after the other (queue depth 32)."""
    keys = rng.choice(store.n_layers * store.n_experts, size=n, replace=False)
    buf = aligned_empty(int(store.slot_bytes))
    with open_reader(kind="auto", queue_depth=32, chunk_bytes=CHUNK) as reader:
        fd = reader.open(path)
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            plan = store.read_plan(*divmod(int(key), store.n_experts))
            reader.submit_reads(
                [
                    (fd, r.offset, r.length, buf[r.buf_offset : r.buf_offset + r.length], (i, j))
                    for j, r in enumerate(plan)
                ]
            )
            for j in range(len(plan)):
                reader.wait((i, j))
        return n * store.slot_bytes / (time.perf_counter() - t0)


def pulse(store: ExpertStore, path: Path, seed: int) -> tuple[float, Any]:
    rng = np.random.default_rng(seed)
    rate = stream_rate(store, path, 12, rng)
    bursts = []
    for chunk in (CHUNK, CHUNK // 4):
        got, _kind, _direct = measure_bursts(path, chunk, "auto", 6, rng)
        bursts += [(b.chunks, b.chunk_bytes, b.seconds) for b in got]
    return rate, fit_device(bursts)


def simulate(profile: dict[str, Any], args: argparse.Namespace, shape: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(profile, fh)
    try:
        cmd = [*MER, "simulate", str(TRACE), "--policy", "lru", "--cache-slots",
               str(args.cache_slots), "--tokens", str(args.tokens), "--json",
               "--hardware", fh.name, "--experts", str(args.experts)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        return float(json.loads(out.stdout)["tokens_per_s"])
    finally:
        os.unlink(fh.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--hardware", type=Path, required=True, help="a `mer probe` profile")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cache-slots", type=int, default=64)
    args = ap.parse_args()
    store = ExpertStore.open(args.experts)
    probed = json.loads(args.hardware.read_text())
    print(
        "| run | load | measured tokens/s | run's reads GB/s | streamed GB/s (before, after) "
        "| burst fit GB/s (before, after) | (a) probed | (b) burst fit | (c) streamed |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for r in range(args.repeats):
        load0 = os.getloadavg()[0]
        s0, f0 = pulse(store, args.experts, 100 + r)
        cmd = [*MER, "run", str(TRACE), "--policy", "lru", "--cache-slots", str(args.cache_slots),
               "--tokens", str(args.tokens), "--json", "--experts", str(args.experts),
               "--no-progress"]  # fmt: skip
        m = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        s1, f1 = pulse(store, args.experts, 200 + r)
        load = (load0 + os.getloadavg()[0]) / 2
        fit = json.loads(json.dumps(probed))
        fit["ssd"].update(
            channels=f0.channels,
            latency_s=(f0.latency_s + f1.latency_s) / 2,
            access_latency_s=(f0.access_s + f1.access_s) / 2,
            bandwidth_bytes_per_s=2 / (1 / f0.bandwidth + 1 / f1.bandwidth),
        )
        streamed = json.loads(json.dumps(probed))
        streamed["ssd"].update(
            channels=1, latency_s=0.0, access_latency_s=0.0, bandwidth_bytes_per_s=(s0 + s1) / 2
        )
        got = m["tokens_per_s"]
        preds = [simulate(p, args, m["shape"]) for p in (probed, fit, streamed)]
        cells = " | ".join(f"{p:.4f} ({p / got - 1:+.0%})" for p in preds)
        print(
            f"| {r + 1} | {load:.1f} | {got:.4f} | {m['bytes_read'] / m['read_busy_s'] / 1e9:.2f} "
            f"| {s0 / 1e9:.2f}, {s1 / 1e9:.2f} | {f0.bandwidth / 1e9:.2f}, {f1.bandwidth / 1e9:.2f} "
            f"| {cells} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
