"""`make bench`: every benchmark script in turn, output kept under out/bench/.

Each script prints Markdown rows and the command that produced them; this
runner only sequences them (never in parallel: they would measure each other)
and keeps each one's output in out/bench/NAME.md, from which docs/benchmarks.md
is written by hand with the machine's state noted. `--quick` shortens every
script for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"


def steps(quick: bool) -> list[tuple[str, list[str]]]:
    small = str(OUT / "experts-mixtral-small.gguf")
    return [
        ("synth", ["bench/bench_synth.py"]),
        ("policies", ["bench/bench_policies.py", "--lookups", "200000" if quick else "1000000"]),
        ("cycle", ["bench/bench_cycle.py", "--lookups", "200000" if quick else "1000000"]),
        (
            "cotoken",
            [
                "bench/bench_cycle.py",
                "--lookups",
                "20000" if quick else "100000",
                "--repeats",
                "1",
                "--policies",
                "lru,cycle,cotoken",
            ],
        ),
        ("sim", ["bench/bench_sim.py", *(["--quick"] if quick else [])]),
        ("ffn", ["bench/bench_ffn.py", "--repeats", "2" if quick else "5"]),
        (
            "io",
            [
                "bench/bench_io.py",
                "--size-gib",
                "1" if quick else "3",
                "--repeats",
                "1" if quick else "3",
            ],
        ),
        (
            "engine",
            [
                "bench/bench_engine.py",
                "--experts",
                small,
                "--shape",
                "mixtral-small",
                "--tokens",
                "48" if quick else "200",
                "--out",
                str(OUT / "engine"),
            ],
        ),
        (
            "generate",
            [
                "bench/bench_generate.py",
                "--model",
                str(OUT / "mixtral-small-full.gguf"),
                "--shape",
                "mixtral-small",
                "--cache-slots",
                "64",
                "--rounds",
                "1" if quick else "3",
                "--out",
                str(OUT / "generate"),
            ],
        ),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated subset: synth,policies,sim,ffn,io,engine,generate",
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    failed = []
    for name, cmd in steps(args.quick):
        if only and name not in only:
            continue
        print(f"\n## {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(OUT / f"{name}.md", "w") as log:
            proc = subprocess.run(
                [sys.executable, *cmd],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                check=False,
            )
            log.write(proc.stdout)
        print(proc.stdout)
        print(
            f"({name}: exit {proc.returncode}, {time.perf_counter() - t0:.0f} s; kept in {OUT / (name + '.md')})"
        )
        if proc.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
