"""Atomic file writes: results appear whole or not at all, and never over an input.

An interrupted run must never leave a half-written parquet or JSON that a later
reader mistakes for a result, so every writer goes through a temporary file in
the destination directory and `os.replace`.

What every write through `atomic_path` guarantees:

- the destination is replaced in one rename, or left as it was;
- the new file gets the permissions `open()` would give it (0666 minus the
  umask), or keeps those of the file it replaces, never mkstemp's 0600;
- the temporary file is named `.NAME.<pid>-<random>.tmp`; it is removed when the
  write fails or the process is interrupted (SIGINT, and SIGTERM under the CLI),
  and one left behind by a killed process (kill -9, power loss) is removed by
  the next write to the same destination, which says so once;
- a path this process reads as an input (`mer.guard.protect`) is never
  replaced: that is a `BadInput`, before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mer.errors import BadInput
from mer.notes import note_once

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(dest: Path) -> Path:
    """The temporary sibling a write of `dest` goes through (pid-stamped, see module doc)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def stale_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Temporary files of earlier writes of `dest` whose process is gone."""
    dest = Path(dest)
    out = []
    try:
        entries = list(dest.parent.iterdir()) if dest.parent.is_dir() else []
    except OSError:
        return []
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m and m["name"] == dest.name and not _pid_alive(int(m["pid"])):
            out.append(p)
    return out


def remove_stale_temporaries(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove what `stale_temporaries` finds; say so once per destination."""
    removed = []
    for p in stale_temporaries(dest):
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        removed.append(p)
        note_once(
            f"stale:{p}",
            f"mer: removed {p} ({size:,} bytes), a temporary file left by an interrupted run.",
        )
    return removed


def _final_mode(dest: Path) -> int:
    try:
        st = dest.stat()
        if st.st_mode & 0o170000 == 0o100000:  # a regular file: keep its permissions
            return st.st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _check_dest(dest: Path) -> None:
    from mer import guard

    if guard.is_protected(dest):
        raise BadInput(
            f"{dest}: is also an input of this command; refusing to overwrite it. "
            "Give another output path."
        )
    if dest.is_symlink() or dest.exists():
        if dest.is_dir():
            raise BadInput(f"{dest}: is a directory; give a file name for the output.")
        if not dest.is_file():
            raise BadInput(
                f"{dest}: exists and is not a regular file (a device, FIFO or socket); "
                "give a file name for the output."
            )


#: Temporaries of writes in progress in this process. The CLI removes what is left here
#: when an interrupt unwinds (`remove_live_temporaries`), because the interrupt may have
#: hit a window that `atomic_path`'s own cleanup cannot cover (between creating the file
#: and entering its `try`, or inside the context manager's machinery) and the CLI then
#: leaves with `os._exit`, so no finaliser runs after it.
_LIVE: set[Path] = set()


def remove_live_temporaries() -> None:
    """Remove this process's temporaries of unfinished writes."""
    for p in list(_LIVE):
        with contextlib.suppress(OSError):
            p.unlink()
        _LIVE.discard(p)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` on success."""
    dest = Path(dest)
    _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp_path = temp_name(dest)
    _LIVE.add(tmp_path)  # before it exists: a signal may land between creating it and `try`
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        _LIVE.discard(tmp_path)  # not ours to remove
        raise
    os.close(fd)
    try:
        yield tmp_path
        os.chmod(tmp_path, _final_mode(dest))
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    finally:
        _LIVE.discard(tmp_path)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json_atomic(dest: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
