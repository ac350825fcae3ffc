"""Corpus: every command's flags with values the work cannot use, and every output path
that would destroy an input or cannot be written.

A flag case is (command line with {placeholders}, the bad flag and value). The
placeholders name kit fixtures: {trace} {mix} {gguf} {packed} {profile} {sum}
{out} (a fresh output path) {dir} (a fresh output directory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from corpus_kit import Kit, assert_bad, assert_ok

BAD_NUMBERS = ["nan", "inf", "-1", "0", "1e400", "abc", ""]

# command template -> {flag: [bad values]}
FLAG_CASES: dict[str, dict[str, list[str]]] = {
    "simulate {mix} --hardware {profile}": {
        "--cache-slots": ["0", "-5", "1000000000000000", "2.5", "nan", "lots", "3000000000"],
        "--cache-gib": ["nan", "inf", "-1", "0", "1e30"],
        "--pipeline-depth": ["-1", "100000", "x"],
        "--prefetch-top-n": ["-3", "0", "nan"],
        "--prefetch-min-prob": ["2", "nan", "-0.1", "inf"],
        "--prefetch-inflight": ["0", "-1"],
        "--pin": ["-1", "x", "1e400"],
        "--tokens": ["0", "-2", "nan"],
        "--policy": ["nosuch", ""],
        "--predictor": ["nosuch"],
        "--scope": ["both"],
        "--phase": ["middle"],
        "--shape": ["nosuch"],
        "--mode": ["fast"],
        "--policy-param": ["novalue", "=3", "decay=nan", "nosuch=1"],
        "--predictor-param": ["x", "order=inf"],
    },
    "sweep {mix} --hardware {profile} -o {out} --no-progress --jobs 1": {
        "--policies": ["", ",", "lru,nosuch"],
        "--predictors": ["", "nosuch"],
        "--scopes": ["", "both"],
        "--cache-slots": ["", "0", "16,-1", "a,b", "16,,x", "99999999999"],
        "--jobs": ["0", "-1", "100000"],
        "--best": ["speed"],
        "--backend": ["cloud"],
        "--hardware": ["", "nosuch"],
        "--pin": ["-1"],
        "--prefetch-min-prob": ["1.5"],
    },
    "run {mix} --experts {gguf} --no-progress": {
        "--queue-depth": ["100000", "0", "-4", "x"],
        "--chunk-bytes": ["0", "100", "1G", "1e400", "-4K", "x", "5000"],
        "--threads": ["0", "-1", "100000"],
        "--cache-slots": ["0", "1e20"],
        "--cache-gib": ["nan", "0", "-1"],
        "--seed": ["-1", "x", str(2**64)],
        "--io": ["mmap"],
        "--mode": ["x"],
        "--tokens": ["0"],
    },
    "mrc {trace} -o {out}": {
        "--sizes": ["", "0", "-1", "a", "1,,x", "3000000000"],
        "--replay-step": ["0", "-1", "x"],
        "--processes": ["0", "100000", "-1", "x"],
        "--policies": ["", "nosuch"],
        "--scopes": ["", "diagonal"],
        "--phase": ["x"],
    },
    "predict-eval {trace}": {
        "--depth": ["0", "-1", "100000", "x"],
        "--predictors": ["", "nosuch"],
    },
    "trace stats {trace}": {"--phase": ["x"]},
    "trace synth seed-skewed -o {out}": {
        "--experts": [*BAD_NUMBERS, "100000000"],
        "--top-k": ["0", "-1", "1000", "nan"],
        "--zipf-s": ["nan", "inf", "-1"],
        "--correlation": ["nan", "1.5", "-0.5"],
        "--seed": ["-1", "x", str(2**64)],
        "--iterations": ["0", "-1", "nan", str(10**12)],
        "--experts-per-layer": ["0", "-1", "x"],
    },
    "trace synth seed-clustered -o {out}": {
        "--layers": ["0", "-1", "100000", "nan"],
        "--experts": ["0", "1", "100000000"],
        "--top-k": ["0", "100"],
        "--clusters": ["0", "-1", "1000"],
        "--stickiness": ["nan", "2", "-1"],
        "--concentration": ["nan", "0", "-1", "inf"],
        "--tokens": ["0", "-1", str(10**12)],
        "--seed": ["-1"],
    },
    "trace synth fitted --from {trace} -o {out}": {
        "--tokens": ["0", "1", "-5", str(10**12)],
        "--seed": ["-1", "nan"],
        "--phase": ["x"],
    },
    "experts synth --shape mixtral-tiny -o {out}": {
        "--seed": ["-1", "x", str(2**32), "nan"],
        "--layout": ["diagonal"],
        "--shape": ["nosuch", ""],
    },
    "probe --quick --dir {dir}": {
        "--size-gib": ["nan", "0", "-1", "inf", "1e9"],
        "--threads": ["0", "-1"],
        "--io": ["x"],
        "--shape": ["nosuch"],
    },
    "record --model {dir} --prompts {prompts} -o {out}": {
        "--max-new-tokens": ["-1", "x", str(10**12)],
        "--temperature": ["0", "-1", "nan", "inf"],
        "--seed": ["-1"],
        "--device": ["tpu"],
        "--dtype": ["int4"],
    },
    "plot layer-hits {trace} -o {out}": {
        "--cache-slots": ["0", "-1", "x"],
        "--policies": ["", "nosuch"],
        "--scope": ["x"],
    },
    "plot sweep {sweep} -o {out}": {"--hardware": ["nosuch"], "--shape": ["nosuch"]},
    "demo -o {dir} --quick": {"--tokens": ["0", "-1", "x"], "--shape": ["nosuch"]},
    "calibrate {sum} -o {out}": {"--hardware": ["nosuch", ""]},
}

CASES = [
    (cmd, flag, value)
    for cmd, flags in FLAG_CASES.items()
    for flag, values in flags.items()
    for value in values
]


def _fill(kit: Kit, template: str) -> list[str]:
    prompts = kit.root / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("hello\n")
    sweep = kit.sweep
    values = {
        "trace": kit.trace,
        "mix": kit.mix,
        "gguf": kit.gguf,
        "packed": kit.packed,
        "profile": kit.profile,
        "sum": kit.summary,
        "out": kit.path("flag-out.parquet"),
        "dir": kit.path("flag-dir"),
        "prompts": prompts,
        "sweep": sweep,
    }
    return [str(values[t[1:-1]]) if t.startswith("{") else t for t in template.split()]


@pytest.mark.parametrize(
    ("cmd", "flag", "value"), CASES, ids=[f"{c.split(' {')[0]} {f}={v}" for c, f, v in CASES]
)
def test_bad_flag_value(kit: Kit, cmd: str, flag: str, value: str, capsys) -> None:
    argv = [*_fill(kit, cmd), flag, value]
    if cmd.startswith("record") and flag == "--temperature":
        argv.append("--sample")
    before = (
        sorted(p.name for p in (kit.root / "cases").iterdir())
        if (kit.root / "cases").exists()
        else []
    )
    assert_bad(argv, capsys)
    after = sorted(p.name for p in (kit.root / "cases").iterdir())
    assert set(after) - set(before) <= set(), f"wrote {set(after) - set(before)}"


# -- output paths ------------------------------------------------------------------------
# Commands with their outputs: (template, output flag). {dest} is the bad output path.
OUTPUT_COMMANDS: dict[str, str] = {
    "trace-import": "trace import seed-jsonl {jsonl} -o {dest}",
    "trace-stats": "trace stats {trace} -o {dest}",
    "trace-synth": "trace synth seed-skewed --iterations 50 -o {dest}",
    "mrc": "mrc {trace} --sizes 4 -o {dest}",
    "mrc-plot": "mrc {trace} --sizes 4 -o {out} --plot {dest}",
    "predict-eval": "predict-eval {trace} -o {dest}",
    "simulate-o": "simulate {mix} --hardware {profile} -o {dest}",
    "simulate-summary": "simulate {mix} --hardware {profile} --summary {dest}",
    "sweep": "sweep {mix} --hardware {profile} --jobs 1 --no-progress -o {dest}",
    "run-o": "run {mix} --experts {gguf} --no-progress --tokens 1 -o {dest}",
    "run-summary": "run {mix} --experts {gguf} --no-progress --tokens 1 --summary {dest}",
    "experts-synth": "experts synth --shape mixtral-tiny -o {dest}",
    "compare": "compare {sum} {sum} -o {dest}",
    "calibrate": "calibrate {sum} --hardware {profile} -o {dest}",
    "plot-popularity": "plot popularity {trace} -o {dest}",
    "record": "record --model {nomodel} --prompts {prompts} -o {dest}",
}

# What the bad output is; each returns the path to pass (made in kit's scratch).
BAD_OUTPUTS = {
    "a-directory": lambda k: _dir(k, "out-dir"),
    "under-a-file": lambda k: _file(k, "plain-file") / "sub" / "out.x",
    "dev-null": lambda k: Path("/dev/null"),
    "proc": lambda k: Path("/proc/self/out.x"),
    "sys": lambda k: Path("/sys/out.x"),
    "a-fifo": lambda k: _fifo(k, "out-fifo"),
    "empty-name": lambda k: Path(""),
}


def _dir(k: Kit, name: str) -> Path:
    p = k.path(name)
    p.mkdir()
    return p


def _file(k: Kit, name: str) -> Path:
    p = k.path(name)
    p.write_text("x")
    return p


def _fifo(k: Kit, name: str) -> Path:
    p = k.path(name)
    os.mkfifo(p)
    return p


def _template(kit: Kit, template: str, dest: Path) -> list[str]:
    jsonl = kit.root / "ok.jsonl"
    jsonl.write_text('{"token": 0, "layer": 0, "experts": [1, 2]}\n')
    prompts = kit.root / "prompts.txt"
    prompts.write_text("hello\n")
    values = {
        "trace": kit.trace,
        "mix": kit.mix,
        "gguf": kit.gguf,
        "profile": kit.profile,
        "sum": kit.summary,
        "out": kit.path("side.parquet"),
        "jsonl": jsonl,
        "prompts": prompts,
        "nomodel": kit.root / "no-model-here",
        "dest": dest,
    }
    return [str(values[t[1:-1]]) if t.startswith("{") else t for t in template.split()]


OUT_CASES = [(c, b) for c in OUTPUT_COMMANDS for b in BAD_OUTPUTS]


@pytest.mark.parametrize(("command", "bad"), OUT_CASES, ids=[f"{c}:{b}" for c, b in OUT_CASES])
def test_bad_output_path(kit: Kit, command: str, bad: str, capsys) -> None:
    dest = BAD_OUTPUTS[bad](kit)
    assert_bad(_template(kit, OUTPUT_COMMANDS[command], dest), capsys)


# The output is an input of the same command (the data-destroying cases).
SAME_AS_INPUT = {
    "mrc-over-trace": "mrc {t} --sizes 4 -o {t}",
    "mrc-plot-over-trace": "mrc {t} --sizes 4 -o {o} --plot {t}",
    "stats-over-trace": "trace stats {t} -o {t}",
    "import-over-source": "trace import seed-jsonl {j} -o {j}",
    "synth-fitted-over-source": "trace synth fitted --from {t} -o {t}",
    "simulate-summary-over-trace": "simulate {m} --hardware {p} --summary {m}",
    "simulate-o-over-profile": "simulate {m} --hardware {p} -o {p}",
    "simulate-summary-equals-o": "simulate {m} --hardware {p} -o {o} --summary {o}",
    "sweep-over-trace": "sweep {m} --hardware {p} --jobs 1 -o {m}",
    "sweep-over-profile": "sweep {m} --hardware {p} --jobs 1 -o {p}",
    "run-summary-over-gguf": "run {m} --experts {g} --no-progress --summary {g}",
    "run-o-over-trace": "run {m} --experts {g} --no-progress -o {m}",
    "run-o-over-gguf-symlink": "run {m} --experts {g} --no-progress -o {gl}",
    "run-o-over-gguf-hardlink": "run {m} --experts {g} --no-progress -o {gh}",
    "compare-over-input": "compare {s} {s2} -o {s2}",
    "calibrate-over-run": "calibrate {s} --hardware {p} -o {s}",
    "calibrate-over-profile": "calibrate {s} --hardware {p} -o {p}",
    "pack-over-source": "experts pack {g} -o {g}",
    "synth-over-gguf-in-use": "experts synth --shape mixtral-tiny -o {g} --seed {gs}",
    "plot-over-trace": "plot popularity {t} -o {t}",
    "plot-layer-hits-over-trace": "plot layer-hits {t} -o {t}",
    "predict-eval-over-trace": "predict-eval {t} -o {t}",
    "probe-over-profile-dir": "probe --quick --dir {d} -o {d}",
}


@pytest.mark.parametrize("name", list(SAME_AS_INPUT))
def test_output_equal_to_an_input_is_refused(kit: Kit, name: str, capsys) -> None:
    d = kit.path(f"same-{name}")
    d.mkdir()
    t = d / "t.parquet"
    shutil.copy(kit.trace, t)
    m = d / "m.parquet"
    shutil.copy(kit.mix, m)
    g = d / "g.gguf"
    os.link(kit.gguf, g)  # a hard link: the kit's file must survive too
    gl = d / "gl.gguf"
    gl.symlink_to(g)
    gh = d / "gh.gguf"
    os.link(g, gh)
    p = d / "p.json"
    shutil.copy(kit.profile, p)
    s = d / "s.json"
    shutil.copy(kit.summary, s)
    s2 = d / "s2.json"
    shutil.copy(kit.summary, s2)
    j = d / "j.jsonl"
    j.write_text('{"token": 0, "layer": 0, "experts": [1, 2]}\n')
    values = {
        "t": t,
        "m": m,
        "g": g,
        "gl": gl,
        "gh": gh,
        "p": p,
        "s": s,
        "s2": s2,
        "j": j,
        "o": d / "o.parquet",
        "d": d,
        "gs": "1",
    }
    template = SAME_AS_INPUT[name]
    before = {
        k: Path(v).read_bytes() for k, v in values.items() if Path(str(v)).is_file() and k != "g"
    }
    g_size = g.stat().st_size
    argv = [str(values[x[1:-1]]) if x.startswith("{") else x for x in template.split()]
    if name == "synth-over-gguf-in-use":
        # the output is fine here (nothing reads g): it must succeed and keep the hard link's data
        assert_ok(argv, capsys)
        assert kit.gguf.stat().st_size == g_size and g.stat().st_ino != kit.gguf.stat().st_ino
        return
    assert_bad(argv, capsys)
    for k, data in before.items():
        assert Path(values[k]).read_bytes() == data, f"{k} changed"
    assert g.stat().st_size == g_size
    assert not list(d.glob(".*.tmp"))


def test_read_only_output_place_is_refused_before_the_work(kit: Kit, capsys) -> None:
    """A read-only directory (a read-only mount when running as root)."""
    import subprocess

    ro = kit.path("ro")
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
    else:
        ro.chmod(0o555)
    try:
        for argv in (
            ["run", kit.mix, "--experts", kit.gguf, "--no-progress", "--summary", ro / "s.json"],
            ["mrc", kit.trace, "--sizes", "4", "-o", ro / "m.parquet"],
            ["sweep", kit.mix, "--hardware", kit.profile, "--jobs", "1", "-o", ro / "s.parquet"],
            ["experts", "synth", "--shape", "mixtral-tiny", "-o", ro / "sub" / "e.gguf"],
        ):
            assert_bad(argv, capsys, match="cannot write")
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)
