"""The `mer` command: a thin dispatcher over one module per command group.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommands and sets `func` on them. Adding a command group is one module and
one line here. Errors become one message on stderr and the contract's exit
code (2 bad input, 1 runtime failure), never a traceback.

Around every command, `main` also:
- checks every path of the command line with `mer.guard.check_args` before the
  command runs (inputs readable regular files, outputs never an input and
  writable), and protects the inputs from being overwritten while it runs;
- prints notes (`mer.notes.MerNote` warnings: fallbacks, stale temporary
  files) as one plain line on stderr, never in Python's warning format;
- turns SIGTERM into an orderly exit (temporary files removed, exit 143), as
  Ctrl-C already is (exit 130);
- as a last resort turns an unexpected exception into one line (exit 1) naming
  it as a bug; `MER_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from mer import __version__
from mer.errors import MerError
from mer.notes import MerNote

COMMAND_MODULES = (
    "mer.cli.trace_cmd",
    "mer.cli.record_cmd",
    "mer.cli.mrc_cmd",
    "mer.cli.tune_cmd",
    "mer.cli.sim_cmd",
    "mer.cli.experts_cmd",
    "mer.cli.run_cmd",
    "mer.cli.generate_cmd",
    "mer.cli.analysis_cmd",
    "mer.cli.validate_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer",
        description=(
            "mer: router traces, cache policies, a simpy model and a real io_uring engine "
            "for SSD-streamed Mixture-of-Experts inference. Every subcommand has --help."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # group not built yet
                continue
            raise
        module.register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that cleanup (temporary files) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _show_note(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = str(message).strip()
    if issubclass(category, MerNote):
        print(text if text.startswith("mer:") else f"mer: {text}", file=sys.stderr)
    else:
        print(f"mer: warning: {text} ({category.__name__})", file=sys.stderr)


@contextlib.contextmanager
def _session() -> Iterator[None]:
    """Notes as plain lines and SIGTERM as an exception, restored afterwards (in-process use)."""
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_note
            warnings.simplefilter("always", MerNote)
            yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stop_listening() -> None:
    """After the first interrupt, cleanup and exit must not be interrupted again."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _interrupted(code: int, argv: Sequence[str] | None) -> int:
    """As the `mer` command (argv None), leave at once with `code`: cleanup has run while
    the interrupt unwound, and interpreter shutdown could be cut short by the signal's
    default action (an exit status of -2 instead of 130). In-process callers get `code`."""
    from mer.atomic import remove_live_temporaries

    remove_live_temporaries()
    if argv is not None:
        return code
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _unexpected(exc: BaseException) -> int:
    if os.environ.get("MER_DEBUG"):
        raise exc
    if isinstance(exc, MemoryError):
        print(
            "mer: error: out of memory; give smaller sizes (--cache-slots, --tokens) "
            "or free memory.",
            file=sys.stderr,
        )
        return 1
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        what = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror
        print(f"mer: error: {what or exc}{where}.", file=sys.stderr)
        return 1
    from mer.core import plugins

    blamed = plugins.blame(exc)
    if blamed is not None:
        print(f"mer: error: {blamed}", file=sys.stderr)
        return 1
    suspects = plugins.loaded()
    also = f", or in the {' or '.join(suspects)} it ran" if suspects else ""
    print(
        f"mer: internal error: {type(exc).__name__}: {exc} (this is a bug in mer{also}; "
        "rerun with MER_DEBUG=1 for the traceback and report it).",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from mer import guard

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _session():
        try:
            inputs = guard.check_args(args)
            with guard.protecting(inputs):
                rc = args.func(args)
        except MerError as exc:
            print(f"mer: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            _stop_listening()
            print("mer: interrupted; finished results were kept, rerun to resume.", file=sys.stderr)
            return _interrupted(130, argv)
        except Terminated:
            _stop_listening()
            print("mer: terminated; finished results were kept, rerun to resume.", file=sys.stderr)
            return _interrupted(143, argv)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except Exception as exc:
            return _unexpected(exc)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
