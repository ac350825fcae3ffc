"""Corpus: the commands and flags that came after the first corpus, with the same contract:
`mer generate`, `mer tune` and `--tuned`/`--warmup`, `mer mrc --backend/--granularity`,
plugin policies (`--policy file.py:Class`), `--ffn`, `mer trace bundled -o`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus_kit import Kit, assert_bad, assert_ok, run_cli


# -- plugins ----------------------------------------------------------------------------
def _py(body: str) -> Callable[[Kit, Path], str]:
    def make(k: Kit, p: Path) -> str:
        p.write_text(body)
        return f"{p}:Custom"

    return make


PLUGIN_CASES: dict[str, Callable[[Kit, Path], str]] = {
    "no-such-module": lambda k, p: "no_such_pkg_xyz.mod:Custom",
    "no-such-file": lambda k, p: f"{p}:Custom",
    "no-colon-class": lambda k, p: "lru:",
    "empty-module": lambda k, p: ":Custom",
    "syntax-error": _py("class Custom(:\n"),
    "raises-at-import": _py("raise RuntimeError('broken plugin')\n"),
    "no-such-class": _py("X = 1\n"),
    "not-a-class": _py("Custom = 42\n"),
    "not-a-policy": _py("class Custom:\n    pass\n"),
    "imports-missing": _py("import no_such_dependency_xyz\nclass Custom: pass\n"),
    "binary-file": lambda k, p: (p.write_bytes(b"\x00\xff" * 50), f"{p}:Custom")[1],
    "fifo": lambda k, p: (os.mkfifo(p), f"{p}:Custom")[1],
    "directory": lambda k, p: (p.mkdir(), f"{p}:Custom")[1],
    "proc": lambda k, p: "/proc/self/status.py:Custom",
}


@pytest.mark.parametrize("name", list(PLUGIN_CASES))
@pytest.mark.parametrize("flag", ["--policy", "--predictor"])
def test_bad_plugins(kit: Kit, name: str, flag: str, capsys) -> None:
    spec = PLUGIN_CASES[name](kit, kit.path(f"plugin-{name}.py"))
    assert_bad(["simulate", kit.mix, "--hardware", kit.profile, flag, spec], capsys)


def test_bad_plugins_in_sweep_and_mrc(kit: Kit, capsys) -> None:
    spec = PLUGIN_CASES["raises-at-import"](kit, kit.path("plugin-sweep.py"))
    assert_bad(
        [
            "sweep",
            kit.mix,
            "--hardware",
            kit.profile,
            "-o",
            kit.path("s.parquet"),
            "--jobs",
            "1",
            "--policies",
            f"lru,{spec}",
        ],
        capsys,
    )
    assert_bad(["mrc", kit.trace, "-o", kit.path("m.parquet"), "--policies", spec], capsys)


# -- mer tune and --tuned ------------------------------------------------------------------
TUNE_FLAGS = [
    ["--policy", "nosuch"],
    ["--policy", "lfu", "--sizes", "0"],
    ["--policy", "lfu", "--sizes", ""],
    ["--policy", "lfu", "--scope", "diagonal"],
    ["--policy", "cycle", "--features", "nosuch"],
    ["--policy", "cycle", "--features", ""],
    ["--policy", "lfu", "--phase", "x"],
]


@pytest.mark.parametrize("flags", TUNE_FLAGS, ids=[" ".join(f) for f in TUNE_FLAGS])
def test_tune_flags(kit: Kit, flags: list[str], capsys) -> None:
    assert_bad(["tune", kit.mix, *flags, "-o", kit.path("tuned.json")], capsys)
    assert not kit.path("tuned.json").exists()


def test_tune_refuses_bad_traces_and_outputs(kit: Kit, capsys) -> None:
    bad = kit.path("tune-bad.parquet")
    bad.write_bytes(b"not parquet")
    assert_bad(["tune", bad, "--policy", "lfu", "-o", kit.path("t.json")], capsys)
    assert_bad(["tune", kit.fifo, "--policy", "lfu", "-o", kit.path("t.json")], capsys)
    victim = kit.path("tune-victim.parquet")
    shutil.copy(kit.mix, victim)
    before = victim.read_bytes()
    assert_bad(["tune", victim, "--policy", "lfu", "-o", victim], capsys, match="also an input")
    assert victim.read_bytes() == before


@pytest.fixture(scope="module")
def tuned(kit: Kit) -> dict[str, Any]:
    path = kit.root / "lfu-tuned.json"
    if not path.exists():
        import contextlib
        import io

        from mer.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(
                ["tune", str(kit.mix), "--policy", "lfu", "--sizes", "16,32", "-o", str(path)]
            )
        assert rc == 0
    return json.loads(path.read_text())


def _tuned_edit(base: dict[str, Any], **changes: Any) -> str:
    d = json.loads(json.dumps(base))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d, allow_nan=True)


TUNED_CASES: dict[str, Callable[[dict[str, Any]], str | bytes]] = {
    "empty": lambda b: "",
    "not-json": lambda b: "{kind: tuned}",
    "deep": lambda b: "[" * 100_000 + "]" * 100_000,
    "binary": lambda b: b"\xff\xfe\x00",
    "list": lambda b: "[]",
    "wrong-kind": lambda b: _tuned_edit(b, kind="profile"),
    "version-9": lambda b: _tuned_edit(b, version=9),
    "no-policy": lambda b: _tuned_edit(b, policy=None),
    "unknown-policy": lambda b: _tuned_edit(b, policy="nosuch"),
    "params-list": lambda b: _tuned_edit(b, params=[1]),
    "params-unknown": lambda b: _tuned_edit(b, params={"nosuch": 1}),
    "params-nan": lambda b: _tuned_edit(
        b, params={k: float("nan") for k in b["params"]} or {"x": float("nan")}
    ),
    "tuned-on-string": lambda b: _tuned_edit(b, tuned_on="a.parquet"),
    "tuned-on-bad-entry": lambda b: _tuned_edit(b, tuned_on=[{"nosuch": 1}]),
    "sizes-strings": lambda b: _tuned_edit(b, sizes=["x"]),
}


@pytest.mark.parametrize("name", list(TUNED_CASES))
def test_bad_tuned_files(kit: Kit, tuned: dict[str, Any], name: str, capsys) -> None:
    p = kit.path(f"tuned-{name}.json")
    data = TUNED_CASES[name](tuned)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    assert_bad(
        ["mrc", kit.trace, "-o", kit.path("m.parquet"), "--sizes", "8", "--tuned", p], capsys
    )


@pytest.mark.parametrize("value", ["-1", "x", "100000", "nan"])
def test_bad_warmup(kit: Kit, value: str, capsys) -> None:
    assert_bad(
        ["mrc", kit.trace, "-o", kit.path("m.parquet"), "--sizes", "8", "--warmup", value], capsys
    )


def test_tuned_file_over_an_input(kit: Kit, tuned: dict[str, Any], capsys) -> None:
    p = kit.path("tuned-keep.json")
    p.write_text(json.dumps(tuned))
    assert_bad(
        ["mrc", kit.trace, "--sizes", "8", "--tuned", p, "-o", p], capsys, match="also an input"
    )
    assert json.loads(p.read_text()) == tuned


# -- mrc backends, granularity, --ffn ----------------------------------------------------------
NEW_FLAGS = [
    ["mrc", "{trace}", "-o", "{out}", "--backend", "dask"],
    ["mrc", "{trace}", "-o", "{out}", "--scheduler", "tcp://127.0.0.1:1"],
    ["mrc", "{trace}", "-o", "{out}", "--backend", "cloud"],
    ["mrc", "{trace}", "-o", "{out}", "--granularity", "token"],
    ["mrc", "{trace}", "-o", "{out}", "--backend", "libcachesim", "--granularity", "step"],
    ["mrc", "{trace}", "-o", "{out}", "--processes", "0"],
    ["simulate", "{mix}", "--hardware", "{profile}", "--granularity", "x"],
    ["sweep", "{mix}", "--hardware", "{profile}", "-o", "{out}", "--granularity", "x"],
    ["run", "{mix}", "--experts", "{gguf}", "--ffn", "fortran"],
    ["probe", "--quick", "--dir", "{dir}", "--ffn", "x"],
    ["sweep", "{mix}", "--hardware", "{profile}", "-o", "{out}", "--backend", "dask"],
]


def _fill(kit: Kit, argv: list[str]) -> list[str]:
    values = {
        "trace": kit.trace,
        "mix": kit.mix,
        "gguf": kit.gguf,
        "profile": kit.profile,
        "out": kit.path("new-out.parquet"),
        "dir": kit.path("new-dir"),
    }
    return [str(values[a[1:-1]]) if a.startswith("{") else a for a in argv]


@pytest.mark.parametrize("argv", NEW_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a in NEW_FLAGS])
def test_new_flags(kit: Kit, argv: list[str], capsys) -> None:
    assert_bad(_fill(kit, argv), capsys)


# -- trace bundled -----------------------------------------------------------------------------
@pytest.mark.parametrize("dest", ["dir", "dev-null", "under-file", "fifo"])
def test_trace_bundled_bad_outputs(kit: Kit, dest: str, capsys) -> None:
    p = kit.path(f"bundled-{dest}")
    if dest == "dir":
        p.mkdir()
    elif dest == "dev-null":
        p = Path("/dev/null")
    elif dest == "under-file":
        p.write_text("x")
        p = p / "t.parquet"
    else:
        os.mkfifo(p)
    assert_bad(["trace", "bundled", "-o", p], capsys)


# -- mer generate ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_model(kit: Kit) -> Path:
    pytest.importorskip("transformers")
    p = kit.root / "full.gguf"
    if not p.exists():
        import contextlib
        import io

        from mer.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert (
                main(["experts", "synth", "--full", "--shape", "mixtral-tiny", "-o", str(p)]) == 0
            )
    return p


GENERATE_FLAGS = {
    "--max-new-tokens": ["-1", "x", "nan"],
    "--temperature": ["0", "-1", "nan", "inf"],
    "--seed": ["-1", "x"],
    "--cache-slots": ["0", "-1", "x"],
    "--cache-gib": ["nan", "0"],
    "--policy": ["nosuch"],
    "--predictor": ["oracle", "nosuch"],
    "--prefetch-min-prob": ["2"],
    "--queue-depth": ["100000"],
    "--chunk-bytes": ["5000"],
    "--ffn": ["x"],
    "--granularity": ["x"],
}
GEN_CASES = [(f, v) for f, vs in GENERATE_FLAGS.items() for v in vs]


def _prompts(kit: Kit) -> Path:
    p = kit.root / "gen-prompts.txt"
    p.write_text("the world was good\n")
    return p


@pytest.mark.record
@pytest.mark.parametrize(("flag", "value"), GEN_CASES, ids=[f"{f}={v}" for f, v in GEN_CASES])
def test_generate_flags(kit: Kit, full_model: Path, flag: str, value: str, capsys) -> None:
    argv = [
        "generate",
        "--model",
        full_model,
        "--prompts",
        _prompts(kit),
        "--no-progress",
        "--max-new-tokens",
        "2",
        flag,
        value,
    ]
    if flag == "--temperature":
        argv.append("--sample")
    assert_bad(argv, capsys)


GEN_MODELS: dict[str, Callable[[Kit, Path], Path]] = {
    "experts-only-gguf": lambda k, p: k.gguf,  # no embeddings, no vocabulary
    "a-trace": lambda k, p: k.trace,
    "empty": lambda k, p: (p.write_bytes(b""), p)[1],
    "truncated": lambda k, p: p,  # filled in the test from the full model
    "fifo": lambda k, p: (os.mkfifo(p), p)[1],
    "proc": lambda k, p: Path("/proc/self/mem"),
    "directory": lambda k, p: (p.mkdir(), p)[1],
    "packed-dir": lambda k, p: k.packed,
}


@pytest.mark.record
@pytest.mark.parametrize("name", list(GEN_MODELS))
def test_generate_refuses_bad_models(kit: Kit, full_model: Path, name: str, capsys) -> None:
    p = GEN_MODELS[name](kit, kit.path(f"gen-model-{name}.gguf"))
    if name == "truncated":
        p.write_bytes(full_model.read_bytes()[: full_model.stat().st_size // 2])
    assert_bad(["generate", "--model", p, "--prompts", _prompts(kit), "--no-progress"], capsys)


@pytest.mark.record
@pytest.mark.parametrize("flag", ["-o", "--summary", "--token-table"])
def test_generate_outputs_never_replace_inputs(
    kit: Kit, full_model: Path, flag: str, capsys
) -> None:
    model = kit.path("gen-keep.gguf")
    os.link(full_model, model)
    prompts = kit.path("gen-keep.txt")
    prompts.write_text("the world was good\n")
    size = model.stat().st_size
    for victim in (model, prompts):
        assert_bad(
            ["generate", "--model", model, "--prompts", prompts, "--no-progress", flag, victim],
            capsys,
            match="also an input",
        )
    assert model.stat().st_size == size and prompts.read_text() == "the world was good\n"
    for bad in (Path("/dev/null"), kit.path("gen-out-dir")):
        if bad.name == "gen-out-dir":
            bad.mkdir()
        assert_bad(
            ["generate", "--model", model, "--prompts", prompts, "--no-progress", flag, bad], capsys
        )


@pytest.mark.record
def test_generate_bad_prompts(kit: Kit, full_model: Path, capsys) -> None:
    for name, data in {
        "empty": b"",
        "binary": b"\xff\xfe\x00\x01",
        "jsonl-no-prompt": b'{"text": "x"}\n',
    }.items():
        p = kit.path(f"gen-prompts-{name}.txt")
        p.write_bytes(data)
        assert_bad(["generate", "--model", full_model, "--prompts", p, "--no-progress"], capsys)
    assert_bad(["generate", "--model", full_model, "--prompts", kit.fifo, "--no-progress"], capsys)


def test_the_good_commands_still_run(kit: Kit, capsys) -> None:
    """The bases the cases edit are fine, so each refusal is the edit's doing."""
    assert_ok(
        ["mrc", kit.trace, "-o", kit.path("ok-mrc.parquet"), "--sizes", "8", "--no-progress"],
        capsys,
    )
    r = run_cli(["trace", "bundled", "-o", kit.path("bundled-ok.parquet")], capsys)
    assert r.rc == 0, r.err


# -- mer validate ------------------------------------------------------------------------------
def _grid(configs: Any, **extra: Any) -> str:
    return json.dumps({"configs": configs, **extra}, allow_nan=True)


GOOD_CFG = {"name": "a", "policy": "lru", "cache_slots": 16}
GRID_CASES: dict[str, str | bytes] = {
    "empty": "",
    "not-json": "{configs: []}",
    "deep": "[" * 100_000 + "]" * 100_000,
    "binary": b"\xff\xfe\x00\x01",
    "list": "[]",
    "configs-missing": json.dumps({"calibration": GOOD_CFG}),
    "configs-object": _grid({"a": 1}),
    "configs-empty": _grid([]),
    "entry-string": _grid(["a"]),
    "entry-no-name": _grid([{"policy": "lru"}]),
    "name-path": _grid([{**GOOD_CFG, "name": "../escape"}]),
    "name-hidden": _grid([{**GOOD_CFG, "name": ".x"}]),
    "name-number": _grid([{**GOOD_CFG, "name": 5}]),
    "slots-zero": _grid([{**GOOD_CFG, "cache_slots": 0}]),
    "slots-nan": _grid([{**GOOD_CFG, "cache_slots": float("nan")}]),
    "slots-string": _grid([{**GOOD_CFG, "cache_slots": "16"}]),
    "chunk-misaligned": _grid([{**GOOD_CFG, "chunk_bytes": 5000}]),
    "queue-huge": _grid([{**GOOD_CFG, "queue_depth": 10**6}]),
    "policy-unknown": _grid([{**GOOD_CFG, "policy": "nosuch"}]),
    "predictor-unknown": _grid([{**GOOD_CFG, "predictor": "nosuch"}]),
    "scope-unknown": _grid([{**GOOD_CFG, "scope": "diagonal"}]),
    "names-repeat": _grid([GOOD_CFG, GOOD_CFG]),
    "calibration-string": _grid([GOOD_CFG], calibration="cal"),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_validate_refuses_bad_grids(kit: Kit, name: str, capsys) -> None:
    grid = kit.path(f"grid-{name}.json")
    data = GRID_CASES[name]
    grid.write_bytes(data if isinstance(data, bytes) else data.encode())
    out = kit.path("validate-out")
    assert_bad(
        [
            "validate",
            kit.mix,
            "--experts",
            kit.gguf,
            "--hardware",
            kit.profile,
            "--grid",
            grid,
            "-o",
            out,
        ],
        capsys,
    )
    assert not out.exists()


VALIDATE_FLAGS = [
    ["--tokens", "0"],
    ["--tokens", "x"],
    ["--repeats", "0"],
    ["--repeats", "1000"],
    ["--drift", "nan"],
    ["--drift", "-1"],
    ["--drift", "0"],
    ["--queue-depth", "100000"],
    ["--chunk-bytes", "5000"],
    ["--threads", "0"],
    ["--io", "x"],
    ["--grid", "nosuch"],
    ["--hardware", "nosuch"],
]


@pytest.mark.parametrize("flags", VALIDATE_FLAGS, ids=[" ".join(f) for f in VALIDATE_FLAGS])
def test_validate_flags(kit: Kit, flags: list[str], capsys) -> None:
    argv = ["validate", kit.mix, "--experts", kit.gguf, "-o", kit.path("validate-out"), *flags]
    if flags[0] != "--hardware":
        argv += ["--hardware", kit.profile]
    assert_bad(argv, capsys)


def test_validate_outputs_and_inputs(kit: Kit, capsys) -> None:
    base = ["validate", kit.mix, "--hardware", kit.profile]
    f = kit.path("validate-file")
    f.write_text("x")
    for out in (f, Path("/dev/null"), kit.path("plain") / "sub"):
        if out.parent.name == "plain":
            out.parent.write_text("x")
        assert_bad([*base, "--experts", kit.gguf, "-o", out], capsys)
    for experts in (kit.fifo, Path("/proc/self/mem"), kit.trace):
        assert_bad([*base, "--experts", experts, "-o", kit.path("validate-out")], capsys)
