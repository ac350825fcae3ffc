"""mer.native: one builder, keyed builds, one fallback rule; the installed layout's names."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mer import native
from mer.native.build import KERNELS

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.fixture(autouse=True)
def _fresh():
    native.reset()
    yield
    native.reset()


def test_every_kernel_has_its_two_files_and_a_stable_key():
    for k in KERNELS.values():
        assert k.header.is_file() and k.source.is_file()
        assert k.key() == k.key() and len(k.key()) == 16


def test_key_changes_with_the_source(tmp_path, monkeypatch):
    import mer.native.build as build

    for name in ("stackdist.h", "stackdist.c"):
        shutil.copy(build.HERE / name, tmp_path / name)
    monkeypatch.setattr(build, "HERE", tmp_path)
    before = KERNELS["stackdist"].key()
    (tmp_path / "stackdist.c").write_text((tmp_path / "stackdist.c").read_text() + "\n/* x */\n")
    assert KERNELS["stackdist"].key() != before


def test_disabled_means_none_and_a_reason(monkeypatch):
    monkeypatch.setenv("MER_NO_NATIVE", "1")
    assert native.load("stackdist") is None
    assert "MER_NO_NATIVE" in native.why_unavailable("stackdist")


def test_a_module_with_another_key_is_not_loaded():
    class Lib:
        @staticmethod
        def mer_native_key():
            return b"0000000000000000"

    class FFI:
        @staticmethod
        def string(x):
            return x

    fake = types.SimpleNamespace(lib=Lib(), ffi=FFI())
    assert not native._matches(fake, KERNELS["stackdist"].key())  # type: ignore[arg-type]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler here")
def test_first_use_build_into_the_cache_when_the_installed_module_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))
    real_import = importlib.import_module

    def stale(name, *a, **kw):
        if name == "mer.native._stackdist":
            raise ImportError("pretend it is not installed")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", stale)
    mod = native.load("stackdist")
    assert mod is not None
    key = KERNELS["stackdist"].key()
    built = list((tmp_path / "native" / f"stackdist-{key}").glob("*.so"))
    assert len(built) == 1
    assert mod.ffi.string(mod.lib.mer_native_key()).decode() == key


def test_no_compiler_falls_back_with_one_note(tmp_path, monkeypatch):
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.setattr(importlib, "import_module", _refuse)
    from mer import notes

    notes.reset_notes()
    with pytest.warns(notes.MerNote, match="pure-Python stack loops"):
        assert native.load("stackdist") is None
    assert "compiler" in native.why_unavailable("stackdist")


def _refuse(name, *a, **kw):
    raise ImportError(name)


def test_only_the_mer_namespace_is_installed(tmp_path):
    """`sim`, `traces` and `analysis` are installed as mer.sim etc., never as top-level names."""
    code = (
        "import importlib.util as u, mer.sim, mer.traces, mer.analysis\n"
        "print([u.find_spec(n) is None for n in ('sim', 'traces', 'analysis')])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True, True]"
    assert Path(importlib.import_module("mer.sim").__file__).parent.name == "sim"  # type: ignore[arg-type]
