"""Mixtral-shaped engine run, measured (`mer run`) next to predicted (`mer simulate`).

Usage:
    .venv/bin/python bench/bench_engine.py --experts /work/scratch_run/mixtral-8x7b.gguf \
        [--shape mixtral-8x7b] [--tokens 24] [--cache-slots 64] [--hardware HW.json]

Steps (each one a `mer` command, printed so the figures can be reproduced):
1. `mer experts synth --shape SHAPE -o EXPERTS` when the file is missing
   (mixtral-8x7b: ~25 GB; mixtral-quarter: ~6 GB);
2. `mer probe -o HW.json --dir <the experts' directory>` unless --hardware is given;
3. `mer run TRACE --experts EXPERTS --cache-slots N --tokens T --json`;
4. `mer simulate TRACE ... --hardware HW.json --json` on the same configuration
   (skipped, saying so, when this checkout has no `mer simulate`).
Prints Markdown rows for docs/benchmarks.md: tokens/s, hit rate, I/O share, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
MER = [sys.executable, "-m", "mer"]


def sh(args: list[str], *, capture: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"$ mer {shlex.join(args)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*MER, *args], capture_output=capture, text=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.1f} s, exit {proc.returncode})", file=sys.stderr)
    if proc.returncode != 0 and capture:
        sys.stderr.write(proc.stderr)
    return proc


def row(label: str, s: dict[str, Any]) -> str:
    ex = s.get("extra", {})
    rss = ex.get("peak_rss_bytes")
    rss_s = f"{rss / 2**30:.2f} GiB" if rss else "n/a"
    return (
        f"| {label} | {s['shape']} | {s['tokens']} | {s['cache_slots']} | {s['hit_rate'] * 100:.2f}% "
        f"| {s['tokens_per_s']:.4f} | {s['layer_iterations_per_s']:.2f} | "
        f"{s['io_wait_share'] * 100:.1f}% | {s['bytes_read'] / 2**30:.2f} GiB | {s['wall_s']:.1f} s "
        f"| {rss_s} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experts", type=Path, required=True, help="expert GGUF (made if missing)")
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--cache-slots", type=int, default=64, help="25%% of 256 experts = 64")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--predictor", default="none")
    ap.add_argument("--mode", default="model", choices=("model", "seed"))
    ap.add_argument("--ffn", default="auto", choices=("auto", "native", "numpy"))
    ap.add_argument("--hardware", type=Path, default=None, help="profile (default: probe now)")
    ap.add_argument("--probe-gib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.experts.exists():
        p = sh(["experts", "synth", "--shape", args.shape, "-o", str(args.experts)], capture=False)
        if p.returncode:
            return p.returncode
    hw = args.hardware
    if hw is None:
        hw = args.out / "hardware-probe.json"
        p = sh(
            ["probe", "-o", str(hw), "--dir", str(args.experts.resolve().parent),
             "--size-gib", str(args.probe_gib), "--shape", args.shape, "--ffn", args.ffn]
        )  # fmt: skip
        if p.returncode:
            return p.returncode
        print(p.stdout, file=sys.stderr)

    common = [
        str(TRACE), "--policy", args.policy, "--cache-slots", str(args.cache_slots),
        "--predictor", args.predictor, "--tokens", str(args.tokens), "--mode", args.mode, "--json",
    ]  # fmt: skip
    run_args = ["run", *common, "--experts", str(args.experts), "--no-progress", "--ffn", args.ffn,
                "--summary", str(args.out / "engine-run.json")]  # fmt: skip
    p = sh(run_args)
    if p.returncode:
        return p.returncode
    measured = json.loads(p.stdout)

    sim_args = ["simulate", *common, "--hardware", str(hw), "--shape", args.shape]
    p = sh(sim_args)
    simulated = json.loads(p.stdout) if p.returncode == 0 else None

    print("| run | shape | tokens | cache slots | hit rate | tokens/s | layer it/s | I/O share "
          "| read | wall | peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(row("measured (`mer run`)", measured))
    if simulated is not None:
        print(row(f"predicted (`mer simulate`, {Path(hw).name})", simulated))
    else:
        print(
            "| predicted | `mer simulate` failed or is missing in this checkout | | | | | | | | | |"
        )
    ex = measured["extra"]
    print()
    print(
        f"I/O: {ex['io']['kind']}{' O_DIRECT' if ex['io']['direct'] else ' buffered'}, "
        f"queue depth {ex['io']['queue_depth']}, chunk {ex['io']['chunk_bytes'] >> 10} KiB; "
        f"cache buffers {ex['cache_buffer_bytes'] / 2**30:.2f} GiB, dense resident "
        f"{ex['dense_resident_bytes'] / 2**30:.2f} GiB; compute {measured['compute_s']:.1f} s, "
        f"dense {measured['dense_s']:.1f} s, I/O wait {measured['io_wait_s']:.1f} s"
    )
    print(f"FFN kernel: {ex.get('ffn', 'numpy')}; load average {os.getloadavg()[0]:.1f} at the end")
    print()
    # the targets, as ratios of this run: I/O share, and tokens/s against the numpy engine's
    # 0.074 and against what the SSD alone allows (bytes read / the probed bandwidth)
    hw_doc = json.loads(Path(hw).read_text())
    ssd_bw = float(hw_doc["ssd"]["bandwidth_bytes_per_s"])
    ssd_bound = measured["tokens"] / (measured["bytes_read"] / ssd_bw)
    tps = measured["tokens_per_s"]
    print("| target | this run | met |")
    print("|---|---|---|")
    share = measured["io_wait_share"]
    print(f"| I/O wait share >= 40% | {share:.1%} | {share >= 0.4} |")
    print(
        f"| tokens/s >= 3x 0.074 (numpy engine) | {tps:.3f} = {tps / 0.074:.1f}x | {tps >= 0.222} |"
    )
    print(
        f"| (reference) SSD bound: bytes read / probed {ssd_bw / 1e9:.2f} GB/s | "
        f"{ssd_bound:.3f} tokens/s; measured = {tps / ssd_bound:.0%} of it | |"
    )
    print()
    print("Commands:")
    print(f"    mer {shlex.join(run_args)}")
    print(f"    mer {shlex.join(sim_args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
