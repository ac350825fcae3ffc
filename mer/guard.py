"""The one guard every command's paths go through: inputs checked, outputs safe.

Adopting it in a command (what the CLI does for you, and what you add):

    from mer.guard import input_file, input_path, output_file, output_dir, FinalWrites

    p.add_argument("trace", type=input_file)              # a file mer reads
    p.add_argument("--experts", type=input_path)          # a file or a directory it reads
    p.add_argument("-o", "--output", type=output_file)    # a file it writes
    p.add_argument("--report", type=output_dir)           # a directory it writes into

    def cmd(args):
        ...the work...
        writes = FinalWrites()
        writes.add(args.output, lambda tmp_dest: write_table(df, tmp_dest))
        writes.add(args.summary, summary.save)
        writes.run()                     # every write is tried; failures are kept
        emit(args, result, text)         # the results are printed whatever happened
        return writes.finish()           # then: what could not be written, exit 1

`mer.cli.main` calls `check_args(args)` after parsing and before the command
runs, so a bad path costs nothing. It finds the paths by their types above,
and, for commands that still use plain `type=Path`, by convention: an argument
named `output`, `summary` or `plot` is an output, every other path (or name)
that exists on disk is an input. What it promises:

- inputs: exist; a file where a file is needed; a regular file or a directory,
  never a FIFO, socket or device (reading those blocks forever or makes no
  sense), never under /proc, /sys or /dev;
- outputs: never the same file as an input (by inode, so hard and symbolic
  links count) nor as another output; never an existing directory where a file
  is written (or a file where a directory is); never a device or FIFO; the
  nearest existing parent directory must accept a new file (checked by creating
  and removing one), so a read-only or missing place fails before the work;
- during the command every input is `protect`ed: `mer.atomic.atomic_path`
  refuses to replace it, even for outputs derived inside the command (a plot's
  .svg sibling, a report's files);
- `check_free_space` refuses work whose output will not fit (when its size is
  known in advance, e.g. an expert file);
- `locked(path)` serialises read-merge-write cycles of one results file between
  processes (flock on its directory: no lock file is left behind).

For files a command opens itself (not named on the command line, e.g. a
manifest inside a directory): `check_input(path, what)` before opening, and
`load_json_input(path, what)` / `parse_json(text, where)` for JSON (size,
encoding, syntax and nesting problems are one message). Values read from such
files: `mer.validate` (integer, number, text, obj, check_memory); values on
the command line: `mer.cli.values` (positive_int, probability, int_range, ...).

Every refusal is a `BadInput` (exit 2) naming the argument, the path and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PosixPath
from typing import Any

from mer.errors import BadInput, MerError, RuntimeFailure

#: Where reading a "file" makes no sense (kernel interfaces, devices); /dev/shm is a
#: normal (memory) file system and allowed.
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")
REAL_UNDER_VIRTUAL = ("/dev/shm",)
#: Argument names that are outputs when their type does not say so.
OUTPUT_DESTS = ("output", "summary", "plot")


# -- marker types for argparse ---------------------------------------------------------
class InputFile(PosixPath):
    """A path the command reads; must be a regular file."""


class InputPath(PosixPath):
    """A path the command reads; a regular file or a directory."""


class OutputFile(PosixPath):
    """A file the command writes (atomically, via mer.atomic)."""


class OutputDir(PosixPath):
    """A directory the command creates if needed and writes files into."""


def input_file(text: str) -> InputFile:
    return InputFile(_nonempty(text))


def input_path(text: str) -> InputPath:
    return InputPath(_nonempty(text))


def output_file(text: str) -> OutputFile:
    return OutputFile(_nonempty(text))


def output_dir(text: str) -> OutputDir:
    return OutputDir(_nonempty(text))


def _nonempty(text: str) -> str:
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL byte")
    return text


# -- protected inputs ------------------------------------------------------------------
_PROTECTED: list[tuple[str, tuple[int, int] | None]] = []


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return real, (st.st_dev, st.st_ino)
    except OSError:
        return real, None


def protect(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Forbid atomic writes onto these paths for the rest of the command."""
    for p in paths:
        _PROTECTED.append(_identity(Path(p)))


def is_protected(path: str | os.PathLike[str]) -> bool:
    if not _PROTECTED:
        return False
    real, ident = _identity(Path(path))
    return any(real == r or (ident is not None and ident == i) for r, i in _PROTECTED)


@contextlib.contextmanager
def protecting(paths: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """`protect` for the duration of a block (the CLI wraps each command in one)."""
    mark = len(_PROTECTED)
    protect(paths)
    try:
        yield
    finally:
        del _PROTECTED[mark:]


# -- inputs ----------------------------------------------------------------------------
def _virtual(path: Path) -> str | None:
    real = os.path.realpath(path)
    if any(real == r or real.startswith(r + "/") for r in REAL_UNDER_VIRTUAL):
        return None
    for root in VIRTUAL_ROOTS:
        if real == root or real.startswith(root + "/"):
            return root
    return None


def check_input(
    path: str | os.PathLike[str], what: str = "input", *, directory_ok: bool = False
) -> Path:
    """A readable regular file (or a directory where `directory_ok`), else BadInput.

    Never opens the path: a FIFO without a writer would block the open forever.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise BadInput(f"{what} {p}: no such file.") from None
    except NotADirectoryError:
        raise BadInput(f"{what} {p}: a parent of this path is not a directory.") from None
    except OSError as exc:
        raise BadInput(f"{what} {p}: cannot be read ({exc.strerror}).") from None
    root = _virtual(p)
    if root is not None:
        raise BadInput(
            f"{what} {p}: is under {root}, a kernel interface, not a data file; give a regular file."
        )
    if stat.S_ISDIR(st.st_mode):
        if directory_ok:
            return p
        raise BadInput(f"{what} {p}: is a directory; give a file.")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
        )
        raise BadInput(f"{what} {p}: is {kind}, not a regular file; give a regular file.")
    if not os.access(p, os.R_OK):
        raise BadInput(f"{what} {p}: permission denied (not readable by this user).")
    return p


def read_bytes_input(path: str | os.PathLike[str], what: str, *, limit: int = 1 << 30) -> bytes:
    """The whole content of a checked input, refusing files larger than `limit`."""
    p = check_input(path, what)
    size = p.stat().st_size
    if size > limit:
        raise BadInput(
            f"{what} {p}: {size:,} bytes is larger than the {limit:,} this reader accepts; "
            "is it the right file?"
        )
    try:
        return p.read_bytes()
    except OSError as exc:
        raise BadInput(f"{what} {p}: cannot be read ({exc.strerror}).") from None


def read_text_input(path: str | os.PathLike[str], what: str, *, limit: int = 1 << 30) -> str:
    """UTF-8 text of a checked input; a binary file is a BadInput naming the byte."""
    data = read_bytes_input(path, what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{what} {path}: not a UTF-8 text file (byte {exc.start}); is it the right file?"
        ) from None


def load_json_input(path: str | os.PathLike[str], what: str, *, limit: int = 64 << 20) -> Any:
    """Parse a JSON input: any malformation (syntax, encoding, nesting) is a BadInput."""
    text = read_text_input(path, what, limit=limit)
    return parse_json(text, f"{what} {path}")


def parse_json(text: str | bytes, where: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{where}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})."
        ) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{where}: not UTF-8 text (byte {exc.start}).") from None
    except RecursionError:
        raise BadInput(f"{where}: JSON nested too deeply to be a mer file.") from None


# -- outputs ---------------------------------------------------------------------------
def _flag(dest: str) -> str:
    return "-o" if dest == "output" else f"--{dest.replace('_', '-')}"


def _same(a: Path, b: Path) -> bool:
    """One file: the same inode when both exist (links count), else the same real path."""
    try:
        if os.path.samefile(a, b):
            return True
    except (OSError, ValueError):
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_writable_place(path: Path, label: str) -> None:
    """The nearest existing parent of `path` is a directory that accepts a new file."""
    base = _nearest_existing(path.parent if path.name else path)
    if not base.is_dir():
        raise BadInput(f"{label} {path}: {base} is not a directory; give a path inside one.")
    root = _virtual(base)
    if root is not None:
        raise BadInput(f"{label} {path}: is under {root}; give a path on a normal file system.")
    probe = base / f".mer-write-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        why = {
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EROFS: "read-only file system",
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise BadInput(
            f"{label} {path}: cannot write in {base} ({why}); choose a writable place."
        ) from None


def check_output(
    path: str | os.PathLike[str],
    label: str = "output",
    *,
    kind: str = "file",
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse an output that would destroy an input or that cannot be written.

    kind: "file" (a file written atomically), "dir" (a directory written into),
    "any" (either; used when the command's intent is not declared).
    """
    p = Path(path)
    for inp in inputs:
        ip = Path(inp)
        if _same(p, ip):
            raise BadInput(
                f"{label} {p}: is also an input of this command ({ip}); refusing to overwrite "
                "it. Give another output path."
            )
    if os.path.lexists(p):
        if _virtual(p) is not None:
            raise BadInput(f"{label} {p}: is under {_virtual(p)}; give a path on a normal disk.")
        try:
            st = os.stat(p)
        except OSError as exc:
            raise BadInput(f"{label} {p}: cannot be used ({exc.strerror}).") from None
        if stat.S_ISDIR(st.st_mode):
            if kind == "file":
                raise BadInput(f"{label} {p}: is a directory; give a file name.")
        elif not stat.S_ISREG(st.st_mode):
            raise BadInput(
                f"{label} {p}: exists and is not a regular file (a device, FIFO or socket); "
                "refusing to replace it."
            )
        elif kind == "dir":
            raise BadInput(f"{label} {p}: exists and is a file; give a directory.")
    # A directory output is written into; a file output replaces itself in its parent.
    check_writable_place(p / "x" if p.is_dir() else p, label)
    return p


def check_free_space(path: str | os.PathLike[str], nbytes: int, label: str = "output") -> None:
    """Refuse to start work whose output of `nbytes` cannot fit where it goes."""
    p = Path(path)
    base = _nearest_existing(p.parent)
    try:
        st = os.statvfs(base)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    old = p.stat().st_size if p.is_file() else 0
    # The new file is written beside the old one before the rename replaces it.
    if nbytes > free:
        raise BadInput(
            f"{label} {p}: needs {nbytes / 2**20:,.1f} MiB but {base} has "
            f"{free / 2**20:,.1f} MiB free{f' (the old file, {old / 2**20:,.1f} MiB, is replaced only at the end)' if old else ''}; "
            "free some space or write elsewhere."
        )


# -- the CLI's check of a parsed command line -------------------------------------------
def _paths(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _paths(v)
    elif isinstance(value, (str, os.PathLike)) and not isinstance(value, bool):
        yield value


def classify(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, Path, str]], list[tuple[str, Path, bool]]]:
    """(outputs as (dest, path, kind), inputs as (dest, path, strict)) of a parsed command line.

    strict inputs (declared, or given as a Path) get every input check; names
    that merely exist on disk (e.g. --hardware NAME_OR_FILE) only count as
    inputs an output must not replace.
    """
    outputs: list[tuple[str, Path, str]] = []
    inputs: list[tuple[str, Path, bool]] = []
    for dest, value in vars(args).items():
        if dest.startswith("_") or callable(value):
            continue
        for v in _paths(value):
            if isinstance(v, OutputFile):
                outputs.append((dest, Path(v), "file"))
            elif isinstance(v, OutputDir):
                outputs.append((dest, Path(v), "dir"))
            elif isinstance(v, (InputFile, InputPath)):
                inputs.append((dest, Path(v), True))
            elif isinstance(v, Path) and dest in OUTPUT_DESTS:
                outputs.append((dest, v, "any"))
            elif isinstance(v, Path):
                if os.path.lexists(v):
                    inputs.append((dest, v, True))
            elif isinstance(v, str) and v and "\0" not in v and len(v) < 4096:
                try:
                    if os.path.lexists(v) and not os.path.isdir(v):
                        inputs.append((dest, Path(v), False))
                except (OSError, ValueError):
                    pass
    return outputs, inputs


def check_args(args: argparse.Namespace) -> list[Path]:
    """Check every path of a parsed command line (see module doc); returns the inputs."""
    outputs, inputs = classify(args)
    for dest, path, strict in inputs:
        if not strict:
            continue
        v = getattr(args, dest)
        declared_file = isinstance(v, InputFile) or (
            isinstance(v, list) and any(isinstance(x, InputFile) for x in _paths(v))
        )
        check_input(path, dest.replace("_", " "), directory_ok=not declared_file)
    input_paths = [p for _, p, _ in inputs]
    seen: list[tuple[str, Path]] = []
    for dest, path, kind in outputs:
        label = _flag(dest)
        for other_dest, other in seen:
            if _same(path, other):
                raise BadInput(
                    f"{label} {path} and {_flag(other_dest)} {other} are the same file; "
                    "give each output its own path."
                )
        seen.append((dest, path))
        check_output(path, label, kind=kind, inputs=input_paths)
    return input_paths


# -- final writes ----------------------------------------------------------------------
class FinalWrites:
    """Writes done after the work: all are tried, results print, then failures are told.

    A failed write (disk full, permission changed meanwhile) must not lose a
    measured run: the command prints its results first and `finish()` then
    raises one error naming every file that could not be written.
    """

    def __init__(self) -> None:
        self._jobs: list[tuple[Path, Callable[[Path], Any], str]] = []
        self.failures: list[tuple[Path, str, MerError | OSError]] = []
        self.written: list[Path] = []

    def add(
        self, path: str | os.PathLike[str] | None, write: Callable[[Path], Any], what: str = ""
    ) -> None:
        if path is not None:
            self._jobs.append((Path(path), write, what))

    def run(self) -> FinalWrites:
        for path, write, what in self._jobs:
            try:
                write(path)
                self.written.append(path)
            except (OSError, MerError) as exc:
                self.failures.append((path, what, exc))
        self._jobs = []
        return self

    def finish(self) -> int:
        """0 when everything was written; else raise one error listing the failures."""
        if not self.failures:
            return 0
        parts = []
        for path, what, exc in self.failures:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            parts.append(f"{what + ' ' if what else ''}{path} ({why})")
        msg = (
            "could not write "
            + "; ".join(parts)
            + ". The results above are complete; free space or fix the path and rerun."
        )
        if any(isinstance(e, BadInput) for _, _, e in self.failures):
            raise BadInput(msg)
        raise RuntimeFailure(msg)


# -- locking ---------------------------------------------------------------------------
@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive, inter-process lock for read-merge-write cycles of `path`.

    The lock is an flock on the directory that holds `path` (created if
    needed), so nothing is left behind when the process dies: the kernel
    drops the lock with the file descriptor.
    """
    d = Path(path).parent
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
