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
import os
import sys
from pathlib import Path
from typing import Any

from mer.errors import BadInput

POLICY_GROUP = "mer.policies"
PREDICTOR_GROUP = "mer.predictors"
GUIDE = "docs/policies.md, 'Writing a policy'"

_loaded_groups: set[str] = set()
_warned: set[str] = set()


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


def load_class(spec: str, base: type, what: str) -> type:
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
    return obj


def entry_point_classes(group: str, base: type, what: str) -> dict[str, type]:
    """Classes registered by installed distributions under `group` (once per process).

    A plugin that fails to import is skipped with one notice on stderr, so one
    broken package does not break every command.
    """
    if group in _loaded_groups:
        return {}
    _loaded_groups.add(group)
    from importlib.metadata import entry_points

    out: dict[str, type] = {}
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
        out[ep.name] = obj
    return out


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"mer: {msg}", file=sys.stderr)
