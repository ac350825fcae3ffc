"""Run mer subcommands in-process, through the same CLI contract a user types.

Reports and the demo compose the other parts only through their commands, so
they exercise exactly what a researcher would run and stay independent of the
parts' internal APIs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
from typing import Any

from mer.errors import RuntimeFailure


def mer(*args: object, capture_json: bool = False, echo: bool = True) -> Any:
    """Run `mer ARGS...`; return its JSON output when capture_json, else None.

    A non-zero exit becomes a RuntimeFailure naming the command, so a pipeline
    stops at the first failing step with the step's own message above it.
    """
    from mer.cli import main

    argv = [str(a) for a in args]
    if echo:
        print(f"$ mer {shlex.join(argv)}", file=sys.stderr, flush=True)
    if not capture_json:
        rc = main(argv)
        if rc:
            raise RuntimeFailure(f"step failed (exit {rc}): mer {shlex.join(argv)}")
        return None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*argv, "--json"])
    if rc:
        raise RuntimeFailure(f"step failed (exit {rc}): mer {shlex.join(argv)} --json")
    text = buf.getvalue().strip()
    try:
        return json.loads(text.splitlines()[-1]) if text else None
    except json.JSONDecodeError as exc:
        raise RuntimeFailure(
            f"mer {shlex.join(argv)} --json printed no JSON object ({exc})"
        ) from exc
