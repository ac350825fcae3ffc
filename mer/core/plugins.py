"""Loading a user's policy or predictor class: `module:Class` specs and entry points.

A policy or predictor name given to any command is one of
- a registered name (`lru`, `markov`, ...);
- `package.module:ClassName` or `path/to/file.py:ClassName`, imported on first use
  (the current directory is searched as `python -m` does, so a `mypolicy.py`
  next to the trace works without installing anything);
- a name that an installed distribution registers under the entry-point group
  `mer.policies` or `mer.predictors`.

The class is registered under the name it was asked by, so every result names
exactly what a user typed and worker processes (sweeps, miss-ratio curves)
resolve the same name the same way. Nothing is imported until a name needs it,
except that the registry lists installed entry points (their names are read from
distribution metadata; their modules load when the registry is first listed).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from mer.errors import BadInput

T = TypeVar("T")

POLICY_GROUP = "mer.policies"
PREDICTOR_GROUP = "mer.predictors"
GUIDE = "docs/policies.md, 'Writing a policy'"

_loaded_groups: set[str] = set()
_warned: set[str] = set()
#: source file of every loaded plugin class -> (its lines, what, name as asked, class)
#: for each class from that file: an error raised there is the plugin's (see `blame`).
_origins: dict[str, list[tuple[range, str, str, type]]] = {}


def is_spec(name: str) -> bool:
    """`module:Class` or `file.py:Class` (a registered name never contains ':')."""
    return ":" in name


def _import_module(module: str, spec: str, what: str) -> Any:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module).expanduser()
        from mer.guard import check_input

        check_input(path, f"{what} {spec!r}: file")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"mer_plugin_{path.stem}_{digest}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise BadInput(f"{what} {spec!r}: {path} cannot be imported as Python.")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except Exception as exc:
            del sys.modules[mod_name]
            raise BadInput(f"{what} {spec!r}: importing {path} failed: {exc!r}.") from exc
        return mod
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after installed packages: a local file never shadows them
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise BadInput(
                f"{what} {spec!r}: no module named {exc.name!r} (looked in the current "
                f"directory {cwd} and the installed packages); check the spelling, or give "
                "the file: path/to/file.py:ClassName."
            ) from None
        raise BadInput(f"{what} {spec!r}: importing {module} failed: {exc!r}.") from exc
    except Exception as exc:
        raise BadInput(f"{what} {spec!r}: importing {module} failed: {exc!r}.") from exc


def load_class(spec: str, base: type[T], what: str) -> type[T]:
    """The class named by `module:Class`, checked to be a subclass of `base`."""
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise BadInput(f"{what} {spec!r}: expected package.module:ClassName or file.py:ClassName.")
    mod = _import_module(module, spec, what)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"{what} {spec!r}: {module} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise BadInput(
            f"{what} {spec!r} is {obj!r}, not a subclass of {base.__module__}.{base.__name__}; "
            f"see {GUIDE}."
        )
    _remember(obj, what, spec)
    return obj


def _remember(cls: type, what: str, name: str) -> None:
    module = sys.modules.get(cls.__module__)
    source = getattr(module, "__file__", None)
    if not source:
        return
    try:
        body, start = inspect.getsourcelines(cls)
        lines = range(start, start + len(body))
    except (OSError, TypeError):
        lines = range(0)
    known = _origins.setdefault(os.path.realpath(source), [])
    if all(c is not cls for _, _, _, c in known):
        known.append((lines, what, name, cls))


class Registry(Generic[T]):
    """Names -> classes of one kind (policies, predictors): the built-in modules' classes
    (registered by decorator when imported), installed entry points of `group`, and
    `module:Class` specs, loaded on first use and kept under the name asked."""

    def __init__(self, what: str, base: type[T], group: str, builtin: tuple[str, ...]) -> None:
        self.what, self.base, self.group, self.builtin = what, base, group, builtin
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: adding a policy or predictor is one class plus this line."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        self.classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        self._load_builtin()
        cls = self.classes.get(name)
        if cls is not None:
            return cls
        if is_spec(name):
            cls = load_class(name, self.base, self.what)
            self.classes[name] = cls
            return cls
        raise BadInput(
            f"unknown {self.what} {name!r}; choose one of: {', '.join(sorted(self.classes))}, "
            f"or load your own class with package.module:ClassName ({GUIDE})."
        )

    def names(self) -> list[str]:
        """Registered names, installed plugins' included (and any `module:Class` so far)."""
        self._load_builtin()
        return sorted(self.classes)

    def _load_builtin(self) -> None:
        # Importing the modules runs their register lines.
        for mod in self.builtin:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                if exc.name != mod:
                    raise
        for name, cls in entry_point_classes(self.group, self.base, self.what).items():
            self.classes.setdefault(name, cls)


def entry_point_classes(group: str, base: type[T], what: str) -> dict[str, type[T]]:
    """Classes registered by installed distributions under `group` (once per process).

    A plugin that fails to import is skipped with one notice on stderr, so one
    broken package does not break every command.
    """
    if group in _loaded_groups:
        return {}
    _loaded_groups.add(group)
    from importlib.metadata import entry_points

    out: dict[str, type[T]] = {}
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:
            _warn_once(
                ep.name, f"{what} plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}; skipped."
            )
            continue
        if not (isinstance(obj, type) and issubclass(obj, base)):
            _warn_once(
                ep.name,
                f"{what} plugin {ep.name!r} ({ep.value}) is not a subclass of {base.__name__}; skipped.",
            )
            continue
        _remember(obj, what, ep.name)
        out[ep.name] = obj
    return out


# -- errors raised inside a plugin --------------------------------------------------------

_REMOTE_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+)', re.MULTILINE)


def _frames(exc: BaseException) -> list[tuple[str, int]]:
    """(file, line) of every frame `exc` passed through, outermost first; for an error
    re-raised from a worker process, the worker's frames (its traceback text) too."""
    out: list[tuple[str, int]] = []
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        tb: TracebackType | None = e.__traceback__
        out.extend((f.f_code.co_filename, n) for f, n in traceback.walk_tb(tb))
        remote = getattr(e, "tb", None)  # concurrent.futures' _RemoteTraceback
        if isinstance(remote, str):
            out.extend((m[1], int(m[2])) for m in _REMOTE_FRAME.finditer(remote))
        stack.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    return out


def blame(exc: BaseException) -> str | None:
    """The message for an unexpected error raised inside a user's policy or predictor
    (the innermost frame of the traceback is in a loaded plugin's file), else None.

    Such an error is a bug in the user's code, so it must not be reported as one in
    mer: it names the class, its module and line, and the exception in one line."""
    if not _origins:
        return None
    for filename, line in reversed(_frames(exc)):
        classes = _origins.get(os.path.realpath(filename))
        if not classes:
            continue
        # the class whose body holds the line (else the file's helpers: its first class)
        inside = [c for c in classes if line in c[0]]
        _, what, name, cls = min(inside, key=lambda c: len(c[0])) if inside else classes[0]
        first = str(exc).strip().splitlines()
        msg = f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
        return (
            f"{what} {name!r} (class {cls.__qualname__} in module {cls.__module__}, "
            f"{filename} line {line}) failed: {msg}. This is an error in that {what}, "
            "not in mer; rerun with MER_DEBUG=1 for the traceback."
        )
    return None


def describe_error(exc: BaseException) -> str:
    """One line for an error a configuration ended with: `blame`'s message when a
    plugin raised it, else the exception's type and first line."""
    blamed = blame(exc)
    if blamed is not None:
        return blamed
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def loaded() -> list[str]:
    """'policy NAME' for every plugin class loaded in this process."""
    return sorted({f"{c[1]} {c[2]!r}" for classes in _origins.values() for c in classes})


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"mer: {msg}", file=sys.stderr)
