"""Shared pieces of the malformed-input corpus (tests/test_corpus_*.py).

Every corpus case drives the real CLI in-process (`mer.cli.main([...])`) on
fixtures generated here, and asserts the contract: the exit code, exactly one
error message, no traceback, nothing on stdout, and no hang (a SIGALRM per
case turns a block into a failure instead of a stuck test run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mer.cli import main
from mer.traces.format import ARROW_SCHEMA, META_KEY, TraceMeta, from_arrays, write_trace

# Long enough for a process-pool command on a 2-core machine at load 15 (30 s was
# not: a pooled `mrc` hit it there); a real hang still fails, only later.
HANG_S = 90
PROFILE_DIR = Path(__file__).resolve().parents[1] / "sim" / "profiles"


class Hang(Exception):
    """A case that did not finish within HANG_S seconds."""


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run_cli(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> Result:
    """mer.cli.main in this process, with a hang alarm; argparse's SystemExit is a result."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"mer {' '.join(map(str, argv))} did not finish in {HANG_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    cap = capsys.readouterr()
    _log(argv, int(rc), cap.err)
    return Result(int(rc), cap.out, cap.err)


def _log(argv: list[Any], rc: int, err: str) -> None:
    """With MER_CORPUS_LOG=FILE, one JSON line per CLI call (for docs/reliability.md's figures)."""
    path = os.environ.get("MER_CORPUS_LOG")
    if not path:
        return
    rec = {
        "command": " ".join(str(a) for a in argv[:2]),
        "rc": rc,
        "traceback": "Traceback" in err,
        "internal": "internal error" in err,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def tally(log: str) -> str:
    """The corpus figures from a MER_CORPUS_LOG file: calls, exit codes, tracebacks."""
    recs = [json.loads(line) for line in Path(log).read_text().splitlines()]
    codes: dict[int, int] = {}
    for r in recs:
        codes[r["rc"]] = codes.get(r["rc"], 0) + 1
    return (
        f"CLI calls {len(recs)}; exit codes {dict(sorted(codes.items()))}; "
        f"tracebacks {sum(r['traceback'] for r in recs)}; "
        f"internal errors {sum(r['internal'] for r in recs)}"
    )


def assert_bad(
    argv: list[Any], capsys: pytest.CaptureFixture[str], match: str | None = None, rc: int = 2
) -> Result:
    """The contract for bad input: exit code, one message, no traceback, no stdout."""
    r = run_cli(argv, capsys)
    where = f"mer {' '.join(map(str, argv))}\nstderr: {r.err}"
    assert "Traceback" not in r.err and "Traceback" not in r.out, where
    assert "internal error" not in r.err, where
    assert r.rc == rc, f"exit {r.rc}, expected {rc}: {where}"
    messages = [ln for ln in r.err.splitlines() if re.match(r"^mer[\w -]*: error:", ln)]
    assert len(messages) == 1, f"expected one error message: {where}"
    assert r.out == "", f"nothing on stdout for bad input: {where}\nstdout: {r.out}"
    if match is not None:
        assert match.lower() in r.err.lower(), f"{match!r} not in the message: {where}"
    return r


def assert_ok(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> Result:
    r = run_cli(argv, capsys)
    assert "Traceback" not in r.err, r.err
    assert r.rc == 0, f"mer {' '.join(map(str, argv))} exited {r.rc}: {r.err}"
    return r


# -- fixtures ----------------------------------------------------------------------------
def small_trace(
    n_tokens: int = 16, n_layers: int = 4, n_experts: int = 8, seed: int = 0, prefill: int = 4
) -> Any:
    """A valid trace with gate weights: `prefill` prompt tokens, then decode tokens."""
    rng = np.random.default_rng(seed)
    experts = np.stack(
        [
            np.stack([rng.choice(n_experts, 2, replace=False) for _ in range(n_layers)])
            for _ in range(n_tokens)
        ]
    ).astype(np.int16)
    w = rng.uniform(0.1, 1, (n_tokens, n_layers, 2))
    w = np.sort(w, axis=-1)[..., ::-1]
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    meta = TraceMeta(model="corpus", n_layers=n_layers, n_experts=n_experts, top_k=2)
    phase = ["prefill"] * prefill + ["decode"] * (n_tokens - prefill)
    return from_arrays(experts, meta, weights=w, token=np.arange(n_tokens), phase=phase)


@dataclass
class Kit:
    root: Path
    trace: Path  # 4 layers x 8 experts, 16 tokens, weights
    mix: Path  # 32 layers x 8 experts, 6 tokens: the mixtral-tiny geometry
    gguf: Path  # mixtral-tiny experts
    packed: Path  # the same, packed
    profile: Path  # a copy of ci-tiny
    summary: Path  # a simulate --summary of `mix`
    sweep: Path  # sweep results of `mix`
    fifo: Path

    def table(self) -> pa.Table:
        """The good trace's arrow table (schema and metadata included)."""
        return pq.read_table(self.trace)

    def meta(self) -> dict[str, Any]:
        return json.loads(pq.read_schema(self.trace).metadata[META_KEY])

    def path(self, name: str) -> Path:
        """A fresh path in the kit's scratch directory."""
        p = self.root / "cases" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
        return p


def build_kit(root: Path) -> Kit:
    """The good fixtures every case edits (a few seconds: one small GGUF, one pack)."""
    from mer.engine.gguf_synth import synth_gguf
    from mer.engine.pack import pack_experts
    from mer.shapes import get_shape

    root.mkdir(parents=True, exist_ok=True)
    trace = write_trace(small_trace(), root / "good.parquet")
    mix = write_trace(small_trace(n_tokens=6, n_layers=32, prefill=2, seed=1), root / "mix.parquet")
    gguf = root / "tiny.gguf"
    synth_gguf(gguf, get_shape("mixtral-tiny"), seed=1)
    packed = root / "packed"
    pack_experts(gguf, packed)
    profile = root / "profile.json"
    shutil.copy(PROFILE_DIR / "ci-tiny.json", profile)
    summary = root / "sim.json"
    rc = main(
        ["simulate", str(mix), "--hardware", str(profile), "--summary", str(summary), "--json"]
    )
    assert rc == 0
    sweep = root / "sweep.parquet"
    rc = main(
        [
            "sweep",
            str(mix),
            "--hardware",
            str(profile),
            "-o",
            str(sweep),
            "--jobs",
            "1",
            "--no-progress",
            "--json",
            "--cache-slots",
            "16,32",
        ]
    )
    assert rc == 0
    fifo = root / "fifo"
    os.mkfifo(fifo)
    return Kit(root, trace, mix, gguf, packed, profile, summary, sweep, fifo)


def write_raw_trace(
    path: Path,
    table: pa.Table,
    meta: Any = None,
    *,
    raw_meta: bytes | None = None,
) -> Path:
    """A parquet with arbitrary columns and metadata (what a broken producer writes)."""
    md = (
        {}
        if meta is None and raw_meta is None
        else {META_KEY: raw_meta or json.dumps(meta).encode()}
    )
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


def replace_column(table: pa.Table, name: str, values: Any, typ: Any = None) -> pa.Table:
    arr = pa.array(values, type=typ)
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(name, arr)
    return table.set_column(i, name, arr)


__all__ = [
    "ARROW_SCHEMA",
    "Kit",
    "Result",
    "assert_bad",
    "assert_ok",
    "build_kit",
    "kit",
    "replace_column",
    "run_cli",
    "small_trace",
    "write_raw_trace",
]


_KITS: dict[str, Kit] = {}


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """One kit per test session, shared by every corpus module (import this fixture)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _KITS:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            _KITS[key] = build_kit(tmp_path_factory.getbasetemp() / "corpus-kit")
    return _KITS[key]


if __name__ == "__main__":  # python tests/corpus_kit.py LOG
    import sys

    print(tally(sys.argv[1]))
