"""Corpus: malformed hardware profiles, through every command that loads one."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus_kit import PROFILE_DIR, Kit, assert_bad

BASE = json.loads((PROFILE_DIR / "ci-tiny.json").read_text())
_DEL = object()


def _edit(path: str, value: Any) -> str:
    d = copy.deepcopy(BASE)
    node = d
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    if value is _DEL:
        node.pop(last)
    else:
        node[last] = value
    return json.dumps(d, allow_nan=True)


PROFILE_CASES: dict[str, str | bytes | Callable[[Kit, Path], Path]] = {
    "empty": "",
    "not-json": "{ssd: fast}",
    "list": "[]",
    "string": '"nvme"',
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep-object": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "binary": b"\x00\xff\xfe\x01" * 64,
    "utf-16": json.dumps(BASE).encode("utf-16"),
    "huge-file": " " * (2 << 20) + "{}",
    "schema-string": _edit("schema_version", "one"),
    "schema-2": _edit("schema_version", 2),
    "schema-bool": _edit("schema_version", True),
    "schema-float": _edit("schema_version", 1.0),
    "no-ssd": _edit("ssd", _DEL),
    "ssd-list": _edit("ssd", [1]),
    "compute-string": _edit("compute", "fast"),
    "no-memory": _edit("memory", _DEL),
    "no-latency": _edit("ssd.latency_s", _DEL),
    "latency-negative": _edit("ssd.latency_s", -1e-4),
    "latency-huge": _edit("ssd.latency_s", 1e6),
    "latency-string": _edit("ssd.latency_s", "fast"),
    "latency-nan": _edit("ssd.latency_s", float("nan")),
    "bandwidth-tiny": _edit("ssd.bandwidth_bytes_per_s", 1e-300),
    "bandwidth-zero": _edit("ssd.bandwidth_bytes_per_s", 0),
    "bandwidth-inf": _edit("ssd.bandwidth_bytes_per_s", float("inf")),
    "bandwidth-huge": _edit("ssd.bandwidth_bytes_per_s", 1e300),
    "bandwidth-bool": _edit("ssd.bandwidth_bytes_per_s", True),
    "channels-1e9": _edit("ssd.channels", 1e9),
    "channels-zero": _edit("ssd.channels", 0),
    "channels-fraction": _edit("ssd.channels", 2.5),
    "channels-string": _edit("ssd.channels", "8"),
    "chunk-zero": _edit("ssd.chunk_bytes", 0),
    "chunk-huge": _edit("ssd.chunk_bytes", 2**40),
    "workers-1e30": _edit("compute.workers", 1e30),
    "workers-negative": _edit("compute.workers", -2),
    "ffn-negative": _edit("compute.ffn_bytes_per_s", -5),
    "dense-null": _edit("compute.dense_bytes_per_s", None),
    "dense-per-layer-negative": _edit("compute.dense_s_per_layer", -1),
    "dense-per-layer-string": _edit("compute.dense_s_per_layer", "1ms"),
    "ram-zero": _edit("memory.ram_bytes", 0),
    "ram-float": _edit("memory.ram_bytes", 1.5e9 + 0.5),
    "ram-huge": _edit("memory.ram_bytes", 2**70),
    "membw-nan": _edit("memory.read_bandwidth_bytes_per_s", float("nan")),
    "extra-list": _edit("extra", [1, 2]),
    "extra-string": _edit("extra", "notes"),
    "name-number": _edit("name", 5),
    "description-object": _edit("description", {"a": 1}),
    "fifo": lambda k, p: (os.mkfifo(p), p)[1],
    "directory": lambda k, p: (p.mkdir(), p)[1],
    "proc-status": lambda k, p: Path("/proc/self/status"),
    "dev-zero": lambda k, p: Path("/dev/zero"),
    "missing-file": lambda k, p: p,
    "gguf": lambda k, p: k.gguf,
    "unknown-name": lambda k, p: Path("no-such-profile-name"),
}


def _make(kit: Kit, name: str) -> Path:
    p = kit.path(f"profile-{name}.json")
    case = PROFILE_CASES[name]
    if callable(case):
        return case(kit, p)
    if isinstance(case, bytes):
        p.write_bytes(case)
    else:
        p.write_text(case)
    return p


@pytest.mark.parametrize("name", list(PROFILE_CASES))
def test_simulate_refuses_bad_profile(kit: Kit, name: str, capsys) -> None:
    assert_bad(["simulate", kit.mix, "--hardware", _make(kit, name)], capsys)


SAMPLE = [
    "deep",
    "schema-string",
    "channels-1e9",
    "workers-1e30",
    "bandwidth-tiny",
    "extra-list",
    "fifo",
]


@pytest.mark.parametrize("name", SAMPLE)
def test_other_profile_readers_refuse(kit: Kit, name: str, capsys) -> None:
    p = _make(kit, name)
    assert_bad(
        ["sweep", kit.mix, "--hardware", p, "-o", kit.path("s.parquet"), "--jobs", "1"], capsys
    )
    assert_bad(["calibrate", kit.summary, "--hardware", p, "-o", kit.path("cal.json")], capsys)
    assert not kit.path("s.parquet").exists() and not kit.path("cal.json").exists()


def test_messages_name_the_field(kit: Kit, capsys) -> None:
    for name, words in {
        "schema-string": "schema_version",
        "channels-1e9": "ssd.channels",
        "workers-1e30": "compute.workers",
        "bandwidth-tiny": "ssd.bandwidth_bytes_per_s",
        "extra-list": "extra",
        "deep": "nested too deeply",
    }.items():
        r = assert_bad(["simulate", kit.mix, "--hardware", _make(kit, name)], capsys)
        assert words in r.err, (name, r.err)
