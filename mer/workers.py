"""Worker processes that die with their parent.

A sweep or a miss-ratio curve fans out to a ProcessPoolExecutor. If the parent
is killed (kill -9, OOM killer, a closed terminal), plain pool workers live on,
each holding a trace in memory. `process_pool` gives workers that:

- die when the parent dies: PR_SET_PDEATHSIG (SIGKILL) on Linux, and a watcher
  thread that exits the worker when its parent process is gone (for kernels
  or start methods where the death signal does not apply);
- ignore SIGINT (Ctrl-C reaches the whole process group; the parent decides)
  and take SIGTERM's default action (the parent's CLI handler is not theirs);
- are terminated by the parent when it leaves the pool with an exception
  (Ctrl-C, SIGTERM, an error), instead of waiting for running tasks.

    with process_pool(2) as pool:
        for fut in as_completed([pool.submit(f, x) for x in xs]): ...
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


def _set_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int, ppid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != ppid or not _alive(parent):
            os._exit(1)


def die_with_parent(parent: int) -> None:
    """Initializer of a worker of `parent` (see module doc); safe to call in any child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ppid = os.getppid()
    _set_death_signal()
    if not _alive(parent) or (ppid == 1 and parent != 1):
        os._exit(1)  # the parent died before the death signal was armed
    threading.Thread(target=_watch, args=(parent, ppid), daemon=True, name="mer-parent").start()


def _init(parent: int, user_init: Callable[..., Any] | None, user_args: tuple[Any, ...]) -> None:
    die_with_parent(parent)
    if user_init is not None:
        user_init(*user_args)


def _terminate(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 2.0
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)


@contextlib.contextmanager
def process_pool(
    max_workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor whose workers die with this process (see module doc)."""
    pool = ProcessPoolExecutor(
        max_workers=max_workers, initializer=_init, initargs=(os.getpid(), initializer, initargs)
    )
    try:
        yield pool
    except BaseException:
        _terminate(pool)
        raise
    pool.shutdown(wait=True)
