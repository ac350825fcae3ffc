"""Running `mer` as a user does (a subprocess), for the tests of several commands."""

from __future__ import annotations

import subprocess
import sys
from typing import Any


def run_mer(*args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m mer ARGS...`; with `check`, the run must succeed (else its stderr shows)."""
    out = subprocess.run(
        [sys.executable, "-m", "mer", *map(str, args)], capture_output=True, text=True
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out
