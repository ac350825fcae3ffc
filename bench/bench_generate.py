"""`mer generate` (the real decoder) against `mer run` (the stand-in) on the routing it recorded.

Usage:
    .venv/bin/python bench/bench_generate.py --model MODEL.gguf \
        [--shape mixtral-8x7b] [--cache-slots 64] [--max-new-tokens 8] [--rounds 2]

Steps (each a `mer` command, printed so every figure can be reproduced):
1. `mer experts synth --full --shape SHAPE -o MODEL` when the file is missing
   (mixtral-8x7b: about 26 GB, a random model with a 512-token vocabulary);
2. per round, in this order, each in a fresh process, same cache and policy:
   a. `mer generate ... -o TRACE --logits --summary A.json`   (recording)
   b. `mer generate ... --summary B.json`                     (not recording)
   c. `mer run TRACE --experts MODEL ... --summary C.json`    (the stand-in, on a's routing)
Greedy decoding, so every round decodes the same tokens and b routes exactly as a.
Prints a Markdown table (median over rounds) and the three targets as ratios:
generate / run tokens/s (>= 0.8), recording overhead 1 - a / b (<= 5%), and
peak RSS against dense resident + cache slots + KV cache + 300 MiB; the
machine's load average before and after (2 cores shared: say it with the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MER = [sys.executable, "-m", "mer"]
PROMPTS = [
    "The history of the city begins with a small harbour",
    "In mathematics, a prime number is",
]
MiB = 1 << 20
GiB = 1 << 30


def sh(args: list[str]) -> subprocess.CompletedProcess[str]:
    print(f"$ mer {shlex.join(args)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([*MER, *args], capture_output=True, text=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.1f} s, exit {proc.returncode})", file=sys.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return proc


def budget(s: dict[str, Any]) -> int:
    ex = s["extra"]
    return int(
        ex["dense_resident_bytes"]
        + ex["cache_buffer_bytes"]
        + ex.get("kv_cache_bytes", 0)
        + 300 * MiB
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="full-model GGUF (made if missing)")
    ap.add_argument("--shape", default="mixtral-8x7b", help="shape for synth when missing")
    ap.add_argument(
        "--cache-slots",
        type=int,
        default=64,
        help="expert cache slots (default 64: a quarter of mixtral-8x7b's 256 experts)",
    )
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "generate")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.model.exists():
        sh(["experts", "synth", "--full", "--shape", args.shape, "-o", str(args.model)])
    prompts = args.out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--cache-slots", str(args.cache_slots), "--policy", args.policy, "--no-progress"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    gen = [
        "generate",
        "--model",
        str(args.model),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--ignore-eos",
    ]
    runs: dict[str, list[dict[str, Any]]] = {"record": [], "generate": [], "run": []}
    load_before = os.getloadavg()
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(args.rounds):
        trace = args.out / f"trace-{r}.parquet"
        for p in (trace, *args.out.glob(f"trace-{r}.parquet.parts")):
            if p.is_dir():
                for q in p.iterdir():
                    q.unlink()
                p.rmdir()
            elif p.exists():
                p.unlink()
        a, b, c = (args.out / f"{k}-{r}.json" for k in ("record", "generate", "run"))
        for p in (a, b, c):
            p.unlink(missing_ok=True)
        sh([*gen, "-o", str(trace), "--logits", "--summary", str(a), *common])
        sh([*gen, "--summary", str(b), *common])
        sh(["run", str(trace), "--experts", str(args.model), "--summary", str(c), *common])
        for k, p in (("record", a), ("generate", b), ("run", c)):
            runs[k].append(json.loads(p.read_text()))

    load_after = os.getloadavg()
    t_end = time.strftime("%H:%M UTC", time.gmtime())

    def med(k: str, field: str) -> float:
        return statistics.median(float(s[field]) for s in runs[k])

    print(
        "| run | tokens | hit rate | tokens/s (median) | per round | I/O share | dense s | "
        "peak RSS | budget: dense + cache + KV + 300 MiB |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    labels = {
        "generate": "`mer generate` (real decoder)",
        "record": "`mer generate -o --logits` (recording)",
        "run": "`mer run` (stand-in) on the recorded trace",
    }
    for k in ("generate", "record", "run"):
        s0 = runs[k][0]
        rss = max(int(s["extra"]["peak_rss_bytes"]) for s in runs[k])
        bud = budget(s0) if k != "run" else None
        per = ", ".join(f"{float(s['tokens_per_s']):.4f}" for s in runs[k])
        print(
            f"| {labels[k]} | {s0['tokens']} | {s0['hit_rate'] * 100:.2f}% | "
            f"{med(k, 'tokens_per_s'):.4f} | {per} | {med(k, 'io_wait_share') * 100:.1f}% | "
            f"{med(k, 'dense_s'):.1f} | {rss / GiB:.2f} GiB | "
            f"{f'{bud / GiB:.2f} GiB' if bud else 'n/a'} |"
        )
    ratio = med("generate", "tokens_per_s") / med("run", "tokens_per_s")
    overhead = 1 - med("record", "tokens_per_s") / med("generate", "tokens_per_s")
    rss_ok = all(
        int(s["extra"]["peak_rss_bytes"]) <= budget(s)
        for k in ("generate", "record")
        for s in runs[k]
    )
    hits_equal = all(
        runs["record"][i]["hits"] == runs["run"][i]["hits"] == runs["generate"][i]["hits"]
        for i in range(args.rounds)
    )
    print()
    print(f"- generate / run tokens/s: {ratio:.3f} (target >= 0.8)")
    print(f"- recording overhead (-o --logits): {overhead * 100:+.1f}% (target <= 5%)")
    print(f"- peak RSS within budget in every generate run: {rss_ok}")
    print(f"- hits identical across generate, recording and run: {hits_equal}")
    s0 = runs["generate"][0]["extra"]
    print(
        f"- dense resident {s0['dense_resident_bytes'] / GiB:.2f} GiB, cache "
        f"{s0['cache_buffer_bytes'] / GiB:.2f} GiB, KV {s0['kv_cache_bytes'] / MiB:.1f} MiB, "
        f"FFN {s0.get('ffn', '?')}, reads {s0['io']['kind']}"
    )
    print(
        f"- measured {t_start} to {t_end}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
