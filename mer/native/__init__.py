"""mer's compiled kernels: one folder, one builder, one fallback rule.

Each kernel is `NAME.c` + `NAME.h` here, built by `mer.native.build` (at
install, or at first use into the user cache). `load(NAME)` returns the cffi
module, or None; on None the caller runs the kernel's Python reference, which
is the definition the compiled code is tested against. The rule is the same for
every kernel:

1. the installed module `mer.native._NAME`, if it was built from the sources
   in this folder (its embedded key matches);
2. else a module in `<cache>/native/NAME-<key>/`, building it there first if
   needed (`<cache>` is $MER_CACHE_DIR, else $XDG_CACHE_HOME/mer, else
   ~/.cache/mer);
3. else None, with one note per process that says which Python path runs
   instead. `MER_NO_NATIVE=1` forces 3 (tests and comparisons).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from mer.native.build import KERNELS, builder
from mer.notes import note_once

_LOADED: dict[str, ModuleType | None] = {}
_WHY: dict[str, str] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """Where mer writes compiled kernels (and nothing else) outside the paths it is given."""
    if os.environ.get("MER_CACHE_DIR"):
        return Path(os.environ["MER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mer"


def disabled() -> bool:
    return bool(os.environ.get("MER_NO_NATIVE") or os.environ.get("MER_NO_C_KERNELS"))


def _matches(mod: ModuleType, key: str) -> bool:
    try:
        return bool(mod.ffi.string(mod.lib.mer_native_key()).decode() == key)
    except Exception:
        return False


def _import_file(modname: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


STALE_BUILD_S = 3600


def _remove_stale_builds(target_dir: Path) -> None:
    """Build directories a killed build left behind (older than an hour: no build takes that)."""
    import time

    for d in target_dir.glob(".build-*"):
        try:
            if time.time() - d.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _build_cached(name: str, key: str) -> ModuleType:
    modname = f"_mer_{name}_{key}"
    target_dir = cache_root() / "native" / f"{name}-{key}"
    target = target_dir / f"{modname}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if not target.exists():
        if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
            raise RuntimeError("no C compiler (cc/gcc) on PATH")
        target_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(target_dir)
        with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as tmp:
            built = Path(builder(name, modname).compile(tmpdir=tmp, verbose=False))
            os.replace(built, target)  # atomic: a concurrent builder never sees half a file
    mod = _import_file(modname, target)
    if not _matches(mod, key):
        raise ImportError(f"{target} does not carry key {key}")
    return mod


def _load(name: str) -> ModuleType:
    k = KERNELS[name]
    if k.linux_only and not sys.platform.startswith("linux"):
        raise RuntimeError(f"{k.what} exists on Linux only")
    key = k.key()
    try:
        mod = importlib.import_module(f"mer.native._{name}")
        if _matches(mod, key):
            return mod
        why = "the installed module was built from other sources"
    except ImportError:
        why = "not installed"
    try:
        return _build_cached(name, key)
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
        raise RuntimeError(f"{why}, and building it failed: {last[0]}") from exc


def load(name: str, *, quiet: bool = False) -> ModuleType | None:
    """The compiled module of kernel `name`, or None (the caller runs the Python reference).

    `quiet`: the caller says its own fallback note (the reader does, naming the file).
    """
    try:  # no lock once loaded: kernels sit on hot paths
        return _LOADED[name]
    except KeyError:
        pass
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        mod: ModuleType | None = None
        if disabled():
            _WHY[name] = "disabled by MER_NO_NATIVE"
        else:
            try:
                mod = _load(name)
            except Exception as exc:
                _WHY[name] = str(exc)
                k = KERNELS[name]
                if not quiet:
                    note_once(
                        f"native:{name}",
                        f"mer: {k.what} is not compiled here ({exc}); using {k.fallback} instead.",
                    )
        _LOADED[name] = mod
        return mod


def why_unavailable(name: str) -> str:
    """Why `load(name)` returned None ('' if it did not)."""
    load(name, quiet=True)
    return _WHY.get(name, "")


def status() -> dict[str, str]:
    """Every kernel: 'compiled' or the reason it is not (for `mer probe` and docs)."""
    return {n: ("compiled" if load(n) is not None else _WHY.get(n, "?")) for n in KERNELS}


def reset() -> None:
    """Forget loaded modules (tests that toggle MER_NO_NATIVE)."""
    with _LOCK:
        _LOADED.clear()
        _WHY.clear()
