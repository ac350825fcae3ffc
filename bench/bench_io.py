"""Read bandwidth of whole-expert reads: mer's io_uring reader vs its preadv pool vs fio.

Reads `--objects` sized objects ("experts") back to back from a file on the target
disk with O_DIRECT, for every queue depth x chunk size, with:
- mer io_uring (UringReader; cache-like buffers registered as fixed buffers),
- mer preadv pool (PreadReader, queue_depth threads),
- fio (when installed) with ioengine=io_uring and libaio, --direct=1, the same
  block size (= chunk) and iodepth, over the same bytes.
Each cell is the median of --repeats runs, interleaved so that drift in the
device hits all engines alike. Prints a Markdown table, the command line, and an
strace check that the io_uring path reads the data file only via io_uring_enter.

    .venv/bin/python bench/bench_io.py                     # 3 GiB file under out/
    .venv/bin/python bench/bench_io.py --file /mnt/nvme/x.bin --size-gib 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from mer.engine.aligned import aligned_empty
from mer.engine.io import Reader, open_reader

MIXTRAL_EXPERT = 99_090_432  # 3 x (14336 x 4096) q4_0 weights
SMALL_EXPERT = MIXTRAL_EXPERT // 32  # a scaled shape's expert (3,096,576 bytes)


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def _list(text: str) -> list[int]:
    return [_size(x) for x in text.split(",") if x]


def _fmt_size(n: int) -> str:
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def ensure_file(path: Path, size: int) -> None:
    """Create a file of random bytes (not sparse, not zeros) unless it already has the size."""
    if path.exists() and path.stat().st_size >= size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            fh.write(block[:n])
            written += n
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Plan:
    """Which objects to read: offsets of `count` objects of `obj` bytes."""

    obj: int
    offsets: list[int]

    @property
    def total(self) -> int:
        return self.obj * len(self.offsets)


def make_plan(file_size: int, obj: int, total: int) -> Plan:
    slots = file_size // obj
    count = max(1, min(slots, math.ceil(total / obj)))
    return Plan(obj, [i * obj for i in range(count)])


def run_mer(kind: str, path: Path, plan: Plan, qd: int, chunk: int) -> float:
    """GB/s reading the plan's objects with a mer reader, keeping enough objects in flight."""
    window = max(2, math.ceil(qd * chunk / plan.obj) + 1)
    bufs = [aligned_empty(plan.obj) for _ in range(min(window, len(plan.offsets)))]
    r: Reader = open_reader(kind=kind, queue_depth=qd, chunk_bytes=chunk, direct=True)
    try:
        r.register_buffers(bufs)
        fd = r.open(path)
        free = list(range(len(bufs)))
        order: list[tuple[int, int]] = []  # outstanding tags, oldest first
        nxt = 0
        t0 = time.perf_counter()
        while nxt < len(plan.offsets) or order:
            while free and nxt < len(plan.offsets):
                tag = (nxt, free.pop())
                r.submit_reads([(fd, plan.offsets[nxt], plan.obj, bufs[tag[1]], tag)])
                order.append(tag)
                nxt += 1
            done = [cast(tuple[int, int], t) for t in r.poll()]
            if not done:
                r.wait(order[0])
                done = [order[0]]
            for tag in done:
                order.remove(tag)
                free.append(tag[1])
        dt = time.perf_counter() - t0
    finally:
        r.close()
    return plan.total / dt / 1e9


def run_fio(engine: str, path: Path, plan: Plan, qd: int, chunk: int) -> float | None:
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={path}",
        "--rw=read",
        f"--bs={chunk}",
        f"--iodepth={qd}",
        "--direct=1",
        f"--ioengine={engine}",
        "--offset=0",
        f"--size={plan.total}",
        "--numjobs=1",
        "--output-format=json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout[proc.stdout.index("{") :])
        return float(data["jobs"][0]["read"]["bw_bytes"]) / 1e9
    except (ValueError, KeyError, IndexError):
        return None


STRACE_SCRIPT = textwrap.dedent(
    """
    import sys
    from mer.engine.aligned import aligned_empty
    from mer.engine.uring import UringReader
    r = UringReader(queue_depth=16, chunk_bytes=512 * 1024)
    fd = r.open(sys.argv[1])
    n = int(sys.argv[2])
    bufs = [aligned_empty(n) for _ in range(2)]
    r.register_buffers(bufs)
    r.submit_reads([(fd, i * n, n, b, i) for i, b in enumerate(bufs)])
    r.wait_all()
    print(r.syscalls)
    r.close()
    """
)


def strace_check(path: Path, obj: int) -> str:
    if shutil.which("strace") is None:
        return "strace not installed: check skipped"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "strace.log"
        cmd = [
            "strace", "-f", "-y", "-o", str(log),
            "-e", "trace=io_uring_enter,pread64,preadv,preadv2,read",
            sys.executable, "-c", STRACE_SCRIPT, str(path), str(obj),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"strace run failed: {proc.stderr.strip()[-300:]}"
        lines = log.read_text().splitlines()
    target = f"<{os.path.realpath(path)}>"
    enters = sum("io_uring_enter(" in ln for ln in lines)
    data = sum(
        target in ln and any(c in ln for c in ("pread64(", "preadv(", "preadv2(", "read("))
        for ln in lines
    )
    shown = (
        " ".join(c if " " not in c else repr(c) for c in cmd[:7]) + " python -c <read 2 objects>"
    )
    return (
        f"strace (`{shown}`): {enters} io_uring_enter calls, {data} read/pread64/preadv/preadv2 "
        f"calls on the data file, reading 2 x {obj} bytes in 512K chunks at depth 16"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--file", type=Path, default=Path("out/bench_io.bin"))
    ap.add_argument("--size-gib", type=float, default=3.0, help="size of the test file")
    ap.add_argument("--objects", type=_list, default=[MIXTRAL_EXPERT, SMALL_EXPERT])
    ap.add_argument("--depths", type=_list, default=[1, 4, 16, 64])
    ap.add_argument("--chunks", type=_list, default=_list("128K,512K,1M"))
    ap.add_argument("--total-mib", type=int, default=512, help="bytes read per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--no-pread", action="store_true")
    args = ap.parse_args()

    ensure_file(args.file, int(args.size_gib * (1 << 30)))
    size = args.file.stat().st_size
    fio = not args.no_fio and shutil.which("fio") is not None
    engines = ["mer-uring"] + ([] if args.no_pread else ["mer-pread"])
    if fio:
        engines += ["fio-io_uring", "fio-libaio"]
    results: dict[tuple[int, int, int, str], list[float]] = {}
    for rep in range(args.repeats):
        for obj in args.objects:
            plan = make_plan(size, obj, args.total_mib << 20)
            for chunk in args.chunks:
                for qd in args.depths:
                    order = engines if rep % 2 == 0 else engines[::-1]
                    for eng in order:
                        if eng == "mer-uring":
                            bw: float | None = run_mer("uring", args.file, plan, qd, chunk)
                        elif eng == "mer-pread":
                            bw = run_mer("pread", args.file, plan, qd, chunk)
                        else:
                            bw = run_fio(eng.split("-", 1)[1], args.file, plan, qd, chunk)
                        if bw is not None:
                            results.setdefault((obj, chunk, qd, eng), []).append(bw)
                    print(
                        f"rep {rep + 1}/{args.repeats} object {obj} chunk {_fmt_size(chunk)} "
                        f"qd {qd} done",
                        file=sys.stderr,
                    )

    def cell(key: tuple[int, int, int, str]) -> float | None:
        vals = results.get(key)
        return statistics.median(vals) if vals else None

    cols = ["object bytes", "chunk", "QD", *[f"{e} GB/s" for e in engines]]
    if fio:
        cols.append("mer-uring / fio-io_uring")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for obj in args.objects:
        for chunk in args.chunks:
            for qd in args.depths:
                vals = [cell((obj, chunk, qd, e)) for e in engines]
                row = [f"{obj:,}", _fmt_size(chunk), str(qd)]
                row += ["n/a" if v is None else f"{v:.3f}" for v in vals]
                if fio:
                    u, f = vals[0], vals[2]
                    row.append("n/a" if not u or not f else f"{100 * u / f:.0f}%")
                out.append("| " + " | ".join(row) + " |")
    print("\n".join(out))
    print()
    print(
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; file {args.file} "
        f"({size / (1 << 30):.1f} GiB, O_DIRECT), objects read back to back from offset 0, "
        f"{args.total_mib} MiB per measurement, median of {args.repeats}; fio: "
        "`fio --rw=read --bs=CHUNK --iodepth=QD --direct=1 --ioengine=io_uring|libaio "
        "--size=SAME --offset=0`."
    )
    print(strace_check(args.file, args.objects[-1]))


if __name__ == "__main__":
    main()
