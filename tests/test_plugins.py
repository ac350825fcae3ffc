"""A user's policy or predictor class, loaded by `module:Class`, by file path or by
entry point, through the CLI; the docs' MRU example held against an independent MRU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mer.cli import main
from mer.core import plugins
from mer.core import policy as policy_mod
from mer.core import predictor as predictor_mod
from mer.traces.bundled import load_bundled
from mer.traces.format import Trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "policies.md"


def doc_file_block(name: str) -> str:
    """The python block that docs/policies.md marks `<!-- doc-test: file NAME -->`."""
    text = DOC.read_text()
    marker = f"<!-- doc-test: file {name} -->"
    assert marker in text, f"docs/policies.md lost its {name} example"
    rest = text.split(marker, 1)[1]
    return rest.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory holding the docs' plugin files, as cwd; the registries, sys.path and
    sys.modules are restored afterwards so no other test sees the plugins."""
    (tmp_path / "mru_policy.py").write_text(doc_file_block("mru_policy.py"))
    (tmp_path / "same_experts.py").write_text(doc_file_block("same_experts.py"))
    monkeypatch.chdir(tmp_path)
    policies, predictors = dict(policy_mod.POLICIES), dict(predictor_mod.PREDICTORS)
    path, modules = list(sys.path), set(sys.modules)
    yield tmp_path
    policy_mod.POLICIES.clear()
    policy_mod.POLICIES.update(policies)
    predictor_mod.PREDICTORS.clear()
    predictor_mod.PREDICTORS.update(predictors)
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    plugins._origins.clear()


def _trace(directory: Path, tokens: int = 40) -> Path:
    tr = load_bundled().head(tokens)
    return write_trace(Trace(tr.df, tr.meta), directory / "t.parquet")


def brute_force_mru_hits(steps: np.ndarray, capacity: int) -> int:
    """Step semantics written out for MRU: look the step's keys up (hits become the most
    recent, in rank order), then admit its misses in rank order, evicting the most recent
    resident key that is not one of the step's."""
    recency: list[int] = []  # least recent first
    hits = 0
    for keys in steps.tolist():
        missed = []
        for k in keys:
            if k in recency:
                hits += 1
                recency.remove(k)
                recency.append(k)
            else:
                missed.append(k)
        for k in missed:
            if len(recency) >= capacity:
                victim = next(r for r in reversed(recency) if r not in keys)
                recency.remove(victim)
            recency.append(k)
    return hits


def _sim(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert main(["simulate", *args, "--hardware", "ci-tiny", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("slots", [2, 5, 32, 64])
def test_doc_mru_matches_an_independent_mru(
    workdir: Path, slots: int, capsys: pytest.CaptureFixture
) -> None:
    trace = _trace(workdir)
    got = _sim([str(trace), "--policy", "mru_policy:MRU", "--cache-slots", str(slots)], capsys)
    steps = load_bundled().head(40).keys().reshape(-1, 2)
    assert got["hits"] == brute_force_mru_hits(steps, slots)
    assert got["policy"] == "mru_policy:MRU"


def test_file_path_spec_and_worker_processes_agree(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = _trace(workdir)
    by_module = _sim([str(trace), "--policy", "mru_policy:MRU", "--cache-slots", "32"], capsys)
    by_file = _sim([str(trace), "--policy", "./mru_policy.py:MRU", "--cache-slots", "32"], capsys)
    assert by_file["hits"] == by_module["hits"]
    # sweep with 2 worker processes and mrc: the same figure
    import pandas as pd

    out = workdir / "s.parquet"
    args = ["sweep", str(trace), "--policies", "mru_policy:MRU,lru", "--cache-slots", "32,64"]
    assert (
        main([*args, "-o", str(out), "--jobs", "2", "--no-progress", "--hardware", "ci-tiny"]) == 0
    )
    df = pd.read_parquet(out)
    row = df[(df.policy == "mru_policy:MRU") & (df.cache_slots == 32)]
    assert int(row["hits"].iloc[0]) == by_module["hits"]
    curves = workdir / "m.parquet"
    mrc = ["mrc", str(trace), "-o", str(curves), "--policies", "mru_policy:MRU"]
    assert main([*mrc, "--scopes", "global", "--sizes", "32"]) == 0
    c = pd.read_parquet(curves)
    assert int(c[c.policy == "mru_policy:MRU"]["hits"].iloc[0]) == by_module["hits"]


class _Oracle:  # the source of an oracle-equivalent predictor plugin
    SOURCE = """
from mer.core import Predictor


class Peek(Predictor):
    name = "peek"
    offline = True

    def predict(self, t, depth):
        steps = self.ctx.steps
        return [[(int(k), 1.0) for k in steps[u]] for u in range(t + 1, min(t + 1 + depth, len(steps)))]
"""


def test_predictor_plugin_equals_the_builtin_it_restates(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    (workdir / "peek.py").write_text(_Oracle.SOURCE)
    trace = _trace(workdir)
    base = [str(trace), "--policy", "lru", "--cache-slots", "48"]
    mine = _sim([*base, "--predictor", "peek:Peek"], capsys)
    ref = _sim([*base, "--predictor", "oracle"], capsys)
    for k in ("hits", "misses", "prefetch", "tokens_per_s", "bytes_read"):
        assert mine[k] == ref[k], k
    assert mine["predictor"] == "peek:Peek" and mine["prefetch"]["issued"] > 0
    # the docs' example predictor runs too
    doc = _sim([*base, "--predictor", "same_experts:NextLayerSame"], capsys)
    assert doc["prefetch"]["issued"] > 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule_xyz:MRU", "no module named 'nosuchmodule_xyz'"),
        ("mru_policy:Nope", "has no attribute 'Nope'"),
        ("collections:OrderedDict", "not a subclass of mer.core.policy.EvictionPolicy"),
        ("./missing.py:MRU", "no such file"),
        ("nosuch", "unknown policy 'nosuch'"),
    ],
)
def test_bad_specs_are_one_clear_error(
    workdir: Path, spec: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    trace = _trace(workdir)
    assert main(["simulate", str(trace), "--policy", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_entry_point_plugin_registers_by_name(tmp_path: Path) -> None:
    """An installed distribution's `mer.policies` entry point: a dist-info on the path."""
    pkg = tmp_path / "merplug_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(doc_file_block("mru_policy.py"))
    info = tmp_path / "merplug_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: merplug-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mer.policies]\nmru-demo = merplug_demo:MRU\n")
    _trace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    mer = [sys.executable, "-m", "mer"]
    out = subprocess.run(
        [
            *mer,
            "simulate",
            "t.parquet",
            "--policy",
            "mru-demo",
            "--cache-slots",
            "32",
            "--json",
            "--hardware",
            "ci-tiny",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    steps = load_bundled().head(40).keys().reshape(-1, 2)
    assert got["policy"] == "mru-demo" and got["hits"] == brute_force_mru_hits(steps, 32)
    helped = subprocess.run(
        [*mer, "simulate", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "mru-demo" in helped.stdout


BROKEN = """
from mer.core import EvictionPolicy, Predictor


class Raises(EvictionPolicy):
    name = "raises"

    def on_insert(self, key):
        pass

    def on_remove(self, key):
        pass

    def victim(self, protected):
        raise ValueError("no victim here\\nsecond line of the message")


class Ghost(Raises):
    name = "ghost"

    def victim(self, protected):
        return 123456  # never resident


class Lookup(Predictor):
    name = "lookup"

    def predict(self, t, depth):
        return {}[t]
"""


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mer", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_an_error_inside_a_plugin_is_the_plugins_not_mers(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Exit 1, naming the class, its module and line and the exception's first line, with
    MER_DEBUG=1 for the traceback: in this process and in sweep/mrc worker processes."""
    (workdir / "broken.py").write_text(BROKEN)
    trace = str(_trace(workdir))
    line = (
        BROKEN.splitlines().index(
            '        raise ValueError("no victim here\\nsecond line of the message")'
        )
        + 1
    )

    def failed(args: list[str]) -> str:
        capsys.readouterr()
        assert main(args) == 1
        return capsys.readouterr().err

    sim = ["simulate", trace, "--cache-slots", "8", "--hardware", "ci-tiny"]
    err = failed([*sim, "--policy", "broken:Raises"])
    assert err.strip() == (
        "mer: error: policy 'broken:Raises' (class Raises in module broken, "
        f"{workdir / 'broken.py'} line {line}) failed: ValueError: no victim here. This is "
        "an error in that policy, not in mer; rerun with MER_DEBUG=1 for the traceback."
    )
    err = failed([*sim, "--policy", "lru", "--predictor", "broken:Lookup"])
    assert "predictor 'broken:Lookup' (class Lookup in module broken" in err
    assert "KeyError: 0" in err and "internal error" not in err
    err = failed([*sim, "--policy", "broken:Ghost"])
    assert "policy 'ghost' (class Ghost in module broken) chose 123456 as the victim" in err
    mrc = ["mrc", trace, "-o", "m.parquet", "--sizes", "8", "--processes", "2"]
    err = failed([*mrc, "--policies", "lru,broken:Raises", "--scopes", "global"])
    assert "policy 'broken:Raises' (class Raises in module broken" in err
    assert "internal error" not in err and not (workdir / "m.parquet").exists()
    sweep = ["sweep", trace, "--cache-slots", "8", "--jobs", "2", "--no-progress"]
    err = failed([*sweep, "--policies", "lru,broken:Raises", "-o", "s.parquet"])
    assert "broken:Raises (global) at 8 slots, predictor none: policy 'broken:Raises'" in err
    assert "ValueError: no victim here." in err and "second line" not in err
    # the real command: the same message, and MER_DEBUG=1 gives the traceback
    cmd = [*sim, "--policy", "broken:Raises"]
    plain = _cli(cmd, workdir)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "class Raises in module broken" in plain.stderr
    debug = _cli(cmd, workdir, MER_DEBUG="1")
    assert "Traceback" in debug.stderr and f'broken.py", line {line}, in victim' in debug.stderr
