"""Corpus: malformed sources for every importer (`mer trace import FORMAT SRC`).

File kinds (empty, binary, FIFO, /proc, directories) for every format, then
each format's own malformations: ids out of every integer range, wrong types,
NaN and negative weights, inconsistent top-k, duplicates, nesting bombs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from corpus_kit import Kit, assert_bad, assert_ok

from mer.traces.importers import IMPORTERS


def _jsonl(*recs: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n"


def _seed(**kw: object) -> dict[str, object]:
    rec: dict[str, object] = {"token": 0, "layer": 0, "experts": [1, 2]}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not _DEL}


def _spec(**kw: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "dataset": "humaneval",
        "problem_id": 0,
        "layer": 0,
        "experts": [6, 5],
        "gating_probs": [0.7, 0.3],
        "token_idx": 0,
    }
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not _DEL}


_DEL = object()
CSV_HEAD = "seq,token,layer,rank,expert,phase,weight\n"


def _csv(*rows: str, head: str = CSV_HEAD) -> str:
    return head + "".join(r + "\n" for r in rows)


def _mixtral(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


# a valid mixtral-offloading file: one prompt block (all 8 experts) + two decode tokens
_PROMPT = ["0,1,2,3,4,5,6,7"] * 32
_DECODE = ["1,5"] * 32

FORMAT_CASES: dict[str, dict[str, str | bytes]] = {
    "seed-jsonl": {
        "not-json": "token 0 layer 0\n",
        "json-list": _jsonl([1, 2, 3]),
        "json-string": _jsonl('"x"'),
        "deep-nesting": "[" * 100_000 + "]" * 100_000 + "\n",
        "no-token": _jsonl(_seed(token=_DEL)),
        "no-experts": _jsonl(_seed(experts=_DEL)),
        "token-string": _jsonl(_seed(token="0")),
        "token-float": _jsonl(_seed(token=0.5)),
        "token-bool": _jsonl(_seed(token=True)),
        "token-negative": _jsonl(_seed(token=-1)),
        "token-beyond-int32": _jsonl(_seed(token=2**40)),
        "seq-beyond-int32": _jsonl(_seed(seq=2**31)),
        "layer-beyond-int16": _jsonl(_seed(layer=40_000)),
        "expert-beyond-int16": _jsonl(_seed(experts=[1, 70_000])),
        "expert-beyond-int64": _jsonl(_seed(experts=[1, 10**20])),
        "expert-negative": _jsonl(_seed(experts=[-1, 2])),
        "experts-empty": _jsonl(_seed(experts=[])),
        "experts-duplicate": _jsonl(_seed(experts=[2, 2])),
        "experts-strings": _jsonl(_seed(experts=["1", "2"])),
        "experts-null": _jsonl(_seed(experts=None)),
        "weights-nan": '{"token": 0, "layer": 0, "experts": [1, 2], "weights": [NaN, 0.5]}\n',
        "weights-infinity": '{"token": 0, "layer": 0, "experts": [1, 2], "weights": [Infinity, 0.5]}\n',
        "weights-negative": _jsonl(_seed(weights=[-0.5, 1.5])),
        "weights-zero-sum": _jsonl(_seed(weights=[0.0, 0.0])),
        "weights-length": _jsonl(_seed(weights=[1.0])),
        "weights-strings": _jsonl(_seed(weights=["a", "b"])),
        "phase-unknown": _jsonl(_seed(phase="generate")),
        "phase-mixed": _jsonl(_seed(), _seed(layer=1, phase="prefill")),
        "top-k-varies": _jsonl(_seed(), _seed(token=1, experts=[1, 2, 3])),
        "duplicate-record": _jsonl(_seed(), _seed()),
        "weights-on-some": _jsonl(_seed(weights=[0.6, 0.4]), _seed(token=1)),
        "n-layers-gap-only": _jsonl(_seed(layer=3)),
        "blank-only": "\n\n\n",
    },
    "speculative-moe": {
        "not-json": "{problem_id: 0}\n",
        "no-position": _jsonl(_spec(token_idx=_DEL)),
        "both-layouts": _jsonl(_spec(), _spec(token_idx=_DEL, token_pos=3, layer=1)),
        "no-gating": _jsonl(_spec(gating_probs=_DEL)),
        "gating-nan": '{"problem_id": 0, "layer": 0, "experts": [6, 5], "gating_probs": [NaN, 0.3], "token_idx": 0}\n',
        "gating-length": _jsonl(_spec(gating_probs=[1.0])),
        "gating-negative": _jsonl(_spec(gating_probs=[-1.0, 2.0])),
        "problem-string": _jsonl(_spec(problem_id="p0")),
        "dataset-number": _jsonl(_spec(dataset=5)),
        "token-idx-beyond-int32": _jsonl(_spec(token_idx=2**35)),
        "layer-beyond-int16": _jsonl(_spec(layer=2**20)),
        "expert-too-large-for-8": _jsonl(_spec(experts=[6, 9])),
        "layer-too-large-for-32": _jsonl(_spec(layer=40)),
        "experts-duplicate": _jsonl(_spec(experts=[5, 5])),
        "only-incomplete": _jsonl(_spec(), _spec(layer=1)),
        "deep-nesting": '{"a":' * 50_000 + "1" + "}" * 50_000 + "\n",
    },
    "mixtral-offloading": {
        "letters": _mixtral(["a,b"] * 64),
        "blank-line": _mixtral([*_PROMPT, "1,5", "", *_DECODE[2:]]),
        "expert-too-large": _mixtral([*_PROMPT, "1,9", *_DECODE[1:]]),
        "expert-negative": _mixtral([*_PROMPT, "-1,5", *_DECODE[1:]]),
        "expert-huge": _mixtral([*_PROMPT, "1," + "9" * 30, *_DECODE[1:]]),
        "duplicate-expert": _mixtral([*_PROMPT, "5,5", *_DECODE[1:]]),
        "decode-one-expert": _mixtral([*_PROMPT, "5", *_DECODE[1:]]),
        "prompt-only": _mixtral(_PROMPT),
        "short": _mixtral(["1,5"] * 10),
        "floats": _mixtral([*_PROMPT, "1.5,2", *_DECODE[1:]]),
        "semicolons": _mixtral([*_PROMPT, "1;5", *_DECODE[1:]]),
    },
    "csv": {
        "no-header": "0,0,0,0,1\n",
        "missing-column": _csv("0,0,0,1,decode,0.5", head="seq,token,layer,rank,phase,weight\n"),
        "header-only": CSV_HEAD,
        "letters": _csv("0,0,x,0,1,decode,0.5"),
        "float-id": _csv("0,0,0,0,1.5,decode,1.0"),
        "negative": _csv("0,0,0,0,-1,decode,1.0"),
        "inf-id": _csv("0,0,0,0,inf,decode,1.0"),
        "nan-id": _csv("0,0,0,0,nan,decode,1.0"),
        "huge-id": _csv("0,0,0,0,1e30,decode,1.0"),
        "int16-overflow": _csv("0,0,0,0,40000,decode,1.0"),
        "int32-overflow": _csv("0,3000000000,0,0,1,decode,1.0"),
        "blank-required": _csv("0,,0,0,1,decode,1.0"),
        "weight-nan": _csv("0,0,0,0,1,decode,nan"),
        "weight-inf": _csv("0,0,0,0,1,decode,inf"),
        "weight-text": _csv("0,0,0,0,1,decode,heavy"),
        "weight-negative": _csv("0,0,0,0,1,decode,-1"),
        "phase-unknown": _csv("0,0,0,0,1,generate,1.0"),
        "ragged-row": _csv("0,0,0,0,1,decode,1.0,extra,more"),
        "quote-unclosed": _csv('0,0,0,0,1,"decode,1.0'),
        "duplicate-rows": _csv("0,0,0,0,1,decode,1.0", "0,0,0,0,1,decode,1.0"),
        "incomplete-token": _csv(
            "0,0,0,0,1,decode,0.5", "0,0,0,1,2,decode,0.5", "0,1,0,0,1,decode,1.0"
        ),
        "lookahead-text": "seq,token,layer,rank,expert,lookahead\n0,0,0,0,1,x\n",
    },
}

# What every format must refuse whatever it parses: the file itself is wrong.
FILE_KINDS: dict[str, Callable[[Kit, Path], Path]] = {
    "empty": lambda k, p: (p.write_bytes(b""), p)[1],
    "binary": lambda k, p: (p.write_bytes(k.gguf.read_bytes()[:4096]), p)[1],
    "latin-1": lambda k, p: (p.write_bytes("token,é\n".encode("latin-1")), p)[1],
    "utf-16": lambda k, p: (p.write_bytes('{"token": 0}'.encode("utf-16")), p)[1],
    "parquet": lambda k, p: k.trace,
    "directory": lambda k, p: (p.mkdir(), p)[1],
    "fifo": lambda k, p: (os.mkfifo(p), p)[1],
    "symlink-to-fifo": lambda k, p: (p.symlink_to(k.fifo), p)[1],
    "missing": lambda k, p: p,
    "proc-mem": lambda k, p: Path("/proc/self/mem"),
    "proc-status": lambda k, p: Path("/proc/self/status"),
    "dev-zero": lambda k, p: Path("/dev/zero"),
}


@pytest.mark.parametrize("fmt", list(IMPORTERS))
@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_every_importer_refuses_bad_files(kit: Kit, fmt: str, kind: str, capsys) -> None:
    src = FILE_KINDS[kind](kit, kit.path(f"src-{fmt}-{kind}"))
    out = kit.path(f"imp-{fmt}-{kind}.parquet")
    assert_bad(["trace", "import", fmt, src, "-o", out], capsys)
    assert not out.exists()


CASES = [(fmt, name) for fmt, cases in FORMAT_CASES.items() for name in cases]


@pytest.mark.parametrize(("fmt", "name"), CASES, ids=[f"{f}:{n}" for f, n in CASES])
def test_importer_refuses_malformed_source(kit: Kit, fmt: str, name: str, capsys) -> None:
    src = kit.path(f"src-{fmt}-{name}.txt")
    data = FORMAT_CASES[fmt][name]
    if isinstance(data, str):
        src.write_text(data)
    else:
        src.write_bytes(data)
    out = kit.path(f"imp-{fmt}-{name}.parquet")
    assert_bad(["trace", "import", fmt, src, "-o", out], capsys)
    assert not out.exists()


IMPORT_FLAGS = [
    ["--n-layers", "0"],
    ["--n-layers", "100000"],
    ["--n-experts", "100000000"],
    ["--n-experts", "-3"],
    ["--top-k", "0"],
    ["--top-k", "1000"],
    ["--experts-per-layer", "0"],
    ["--n-experts", "nan"],
]


@pytest.mark.parametrize("flags", IMPORT_FLAGS, ids=[" ".join(f) for f in IMPORT_FLAGS])
def test_import_options_are_checked(kit: Kit, flags: list[str], capsys) -> None:
    src = kit.path("ok.jsonl")
    src.write_text(_jsonl(_seed(), _seed(layer=1)))
    assert_bad(["trace", "import", "seed-jsonl", src, "-o", kit.path("o.parquet"), *flags], capsys)


def test_import_over_its_source_is_refused(kit: Kit, capsys) -> None:
    src = kit.path("keep.jsonl")
    src.write_text(_jsonl(_seed(), _seed(layer=1)))
    before = src.read_bytes()
    assert_bad(["trace", "import", "seed-jsonl", src, "-o", src], capsys, match="also an input")
    assert src.read_bytes() == before
    assert_ok(["trace", "import", "seed-jsonl", src, "-o", kit.path("fine.parquet")], capsys)


def test_messages_name_file_and_line(kit: Kit, capsys) -> None:
    src = kit.path("line.jsonl")
    src.write_text(_jsonl(_seed(), _seed(layer=1), _seed(token=2**40)))
    r = assert_bad(["trace", "import", "seed-jsonl", src, "-o", kit.path("o.parquet")], capsys)
    assert f"{src}:3" in r.err and "token" in r.err
