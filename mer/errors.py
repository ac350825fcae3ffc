"""The two kinds of failure the CLI distinguishes.

Every user-facing error is one of these so that the CLI can print one clear
message (what, where, how to fix) and exit with the contract's code, instead of
a traceback.
"""

from __future__ import annotations


class MerError(Exception):
    """Base class: `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInput(MerError):
    """The user gave us something we cannot use (file, argument, value). Exit 2."""

    exit_code = 2


class RuntimeFailure(MerError):
    """Valid input, but the work failed (I/O error, device refused). Exit 1."""

    exit_code = 1
