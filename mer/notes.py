"""Notes said once per process: a fallback is worth one line, not one per call."""

from __future__ import annotations

import warnings


class MerNote(UserWarning):
    """A fallback or degraded path was taken (io, compiled kernels); said once per process."""


_NOTED: set[str] = set()


def note_once(key: str, message: str, category: type[Warning] = MerNote) -> None:
    """Warn the first time `key` is seen in this process (the CLI prints it as one plain line)."""
    if key in _NOTED:
        return
    _NOTED.add(key)
    warnings.warn(message, category, stacklevel=3)


def reset_notes() -> None:
    """Forget which notes were given (tests)."""
    _NOTED.clear()
