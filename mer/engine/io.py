"""Asynchronous block reads for the engine: one interface, two implementations.

Usage (the expert store and the executor need only this)::

    from mer.engine.io import open_reader, ReadError
    from mer.engine.aligned import aligned_empty, ALIGN

    reader = open_reader("experts.gguf")       # kind="auto": io_uring, else preadv pool
    fd = reader.open("experts.gguf")           # O_DIRECT when the file system allows it
    buf = aligned_empty(nbytes)                # page-aligned destination
    reader.register_buffers([buf])             # optional: fixed buffers (READ_FIXED)
    reader.submit_reads([(fd, offset, nbytes, buf, "L3E5")])   # any hashable tag
    ...compute...
    for tag in reader.poll():                  # non-blocking: tags completed since last poll
        ...
    reader.wait("L3E5")                        # block for one tag, returns bytes read
    reader.close()

`open_reader(path=None, kind="auto", queue_depth=32, chunk_bytes=512 KiB, direct=True)`:
- kind "uring" insists on io_uring (RuntimeFailure naming why when it can not be
  used), "pread" forces the thread pool of os.preadv, "auto" tries io_uring and
  falls back to the pool, saying why once (an `IOFallbackWarning`).
- queue_depth: reads in flight at once (SQ entries, or pool threads).
- chunk_bytes: each request is split into chunks of this size so that one large
  expert keeps the device's queue full; requests beyond the queue depth wait in
  a software queue and are fed as completions arrive.
- direct: open files with O_DIRECT (bypassing the page cache) when the file
  system supports it, buffered otherwise (noted once). With O_DIRECT, offsets,
  lengths and buffer addresses must be multiples of `reader.alignment` (4096);
  a misaligned request fails with ReadError(errno=EINVAL).
- path: optional; when given the file is opened at once (`reader.default_fd`).

Any number of requests may be outstanding (foreground and background alike;
`submit_reads(..., urgent=True)` lets a foreground read overtake queued
background chunks, and `background_depth` caps how many background chunks may
be on the device at once, so a demand read never queues behind more than that
many prefetch chunks in the device's own queue); tags must be unique among
outstanding requests. A reader
is driven from one thread (the pool's worker threads are internal). Failures surface as `ReadError`
(a RuntimeFailure) carrying errno, path, offset, length and tag: from `wait(tag)`
for that tag, or from `poll()` (completed tags are kept for the next poll).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from mer import notes
from mer.engine.aligned import ALIGN, buffer_address
from mer.errors import BadInput, RuntimeFailure

DEFAULT_QUEUE_DEPTH = 32
DEFAULT_CHUNK_BYTES = 512 * 1024
#: How often a driver reaps completions while it computes with reads in flight (the
#: simulator models the same polls).
POLL_INTERVAL_S = 0.0005
#: Reads in flight: io_uring rings hold at most 32768 entries, and the preadv pool
#: runs one thread per read in flight, so a few thousand is already far past any SSD.
MAX_QUEUE_DEPTH = 4096
MAX_CHUNK_BYTES = 64 << 20
KINDS = ("auto", "uring", "pread")


class IOFallbackWarning(notes.MerNote):
    """Issued once per cause when the engine reads in a slower mode than asked for."""


class ReadError(RuntimeFailure):
    """A read failed: errno (None for a short read), path, offset, length and tag."""

    def __init__(
        self,
        message: str,
        *,
        errno: int | None,
        path: str,
        offset: int,
        length: int,
        tag: Hashable = None,
    ) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.offset = offset
        self.length = length
        self.tag = tag


class ShortReadError(ReadError):
    """The file ended before the requested range did (a truncated file)."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class ReadRequest(NamedTuple):
    """One read: `length` bytes at `offset` of `fd` into `dest`, reported as `tag`."""

    fd: int | _HasFileno
    offset: int
    length: int
    dest: Any
    tag: Hashable


def note_once(key: str, message: str) -> None:
    """Say a fallback once per process (an `IOFallbackWarning`, see mer.notes)."""
    notes.note_once(key, message, IOFallbackWarning)


def reset_notes() -> None:
    """Forget which notes were given (tests)."""
    notes.reset_notes()


def _fs_type(path: str) -> str:
    """File system type of `path` from /proc/self/mounts (longest matching mount point)."""
    try:
        real = os.path.realpath(path)
        best, fstype = "", "unknown"
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return "unknown"


class _Req:
    """Book-keeping of one outstanding request."""

    __slots__ = ("addr", "chunks_left", "dest", "error", "fd", "length", "offset", "tag")

    def __init__(
        self, tag: Hashable, fd: int, offset: int, length: int, dest: memoryview, addr: int
    ) -> None:
        self.tag = tag
        self.fd = fd
        self.offset = offset
        self.length = length
        self.dest = dest
        self.addr = addr
        self.chunks_left = 0
        self.error: ReadError | None = None


@dataclass
class ReaderInfo:
    """What a reader actually does, for run summaries and bench output."""

    kind: str
    queue_depth: int
    chunk_bytes: int
    direct_files: int
    buffered_files: int
    fixed_buffers: bool
    fallback_reason: str | None
    background_depth: int = 0  # background chunks allowed on the device at once


class Reader(ABC):
    """Common interface and request book-keeping of UringReader and PreadReader."""

    kind = "abstract"
    alignment = ALIGN

    def __init__(
        self,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool = True,
        background_depth: int | None = None,
    ) -> None:
        if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
            raise BadInput(
                f"--queue-depth must be from 1 to {MAX_QUEUE_DEPTH} reads in flight, got "
                f"{queue_depth}."
            )
        if chunk_bytes < ALIGN or chunk_bytes % ALIGN or chunk_bytes > MAX_CHUNK_BYTES:
            raise BadInput(
                f"--chunk-bytes must be a multiple of {ALIGN} from {ALIGN} to "
                f"{MAX_CHUNK_BYTES >> 20} MiB, got {chunk_bytes}."
            )
        if background_depth is not None and not 1 <= background_depth <= MAX_QUEUE_DEPTH:
            raise BadInput(
                f"--background-depth must be from 1 to {MAX_QUEUE_DEPTH} chunks, got "
                f"{background_depth}."
            )
        self.queue_depth = queue_depth
        self.chunk_bytes = chunk_bytes
        self.direct = direct
        #: background (non-urgent) chunks allowed on the device at once; the rest wait in
        #: the software queue behind every urgent chunk (None: the whole queue depth)
        self.background_depth = min(background_depth or queue_depth, queue_depth)
        self.fallback_reason: str | None = None
        self.default_fd: int | None = None
        self._paths: dict[int, str] = {}
        self._direct_fds: dict[int, bool] = {}
        self._reqs: dict[Hashable, _Req] = {}
        self._ready: dict[Hashable, None] = {}
        self._failed: dict[Hashable, ReadError] = {}
        self._fixed = False
        self._closed = False

    # ---- files -------------------------------------------------------------------------
    def open(self, path: str | os.PathLike[str]) -> int:
        """Open `path` read-only, with O_DIRECT when asked for and supported; returns the fd."""
        p = os.fspath(path)
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        fd = -1
        is_direct = False
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(p, flags | os.O_DIRECT)
                is_direct = True
            except OSError as exc:
                if exc.errno not in (errno_mod.EINVAL, errno_mod.EOPNOTSUPP):
                    raise BadInput(f"cannot open {p}: {exc.strerror}") from exc
                note_once(
                    f"buffered:{_fs_type(p)}",
                    f"mer: O_DIRECT is not supported for {p} (file system {_fs_type(p)}); "
                    "reading through the page cache (buffered) instead",
                )
        if fd < 0:
            try:
                fd = os.open(p, flags)
            except OSError as exc:
                raise BadInput(f"cannot open {p}: {exc.strerror}") from exc
        self._paths[fd] = p
        self._direct_fds[fd] = is_direct
        return fd

    def is_direct(self, fd: int) -> bool:
        """Whether `fd` reads bypass the page cache (O_DIRECT)."""
        if fd in self._direct_fds:
            return self._direct_fds[fd]
        try:
            import fcntl

            return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        except OSError:
            return False

    def close_file(self, fd: int) -> None:
        """Close a file opened with `open`."""
        self._paths.pop(fd, None)
        self._direct_fds.pop(fd, None)
        os.close(fd)

    def path_of(self, fd: int) -> str:
        """The path a fd was opened from (for messages)."""
        if fd in self._paths:
            return self._paths[fd]
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return f"<fd {fd}>"

    # ---- requests ----------------------------------------------------------------------
    def submit_reads(
        self, requests: Iterable[ReadRequest | tuple[Any, ...]], urgent: bool = False
    ) -> None:
        """Queue reads; each is (fd_or_file, offset, length, dest, tag). Returns at once.

        `urgent` puts these chunks ahead of everything still waiting in the
        software queue (a foreground miss overtaking background prefetches);
        chunks already on the device are not preempted. `dest` must stay alive
        and untouched until the tag is returned (the reader keeps a reference).
        """
        if self._closed:
            raise RuntimeFailure("reader is closed")
        batch: list[_Req] = []
        for item in requests:
            fd_or_file, offset, length, dest, tag = item
            fd = fd_or_file if isinstance(fd_or_file, int) else fd_or_file.fileno()
            if tag in self._reqs or any(r.tag == tag for r in batch):
                raise ValueError(f"tag {tag!r} is already outstanding")
            if offset < 0 or length < 0:
                raise ValueError(f"bad read range: offset {offset}, length {length}")
            mv = memoryview(dest)
            if mv.readonly:
                raise ValueError(f"destination for tag {tag!r} is read-only")
            if not mv.c_contiguous:
                raise ValueError(f"destination for tag {tag!r} is not contiguous")
            mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            if mv.nbytes < length:
                raise ValueError(
                    f"destination for tag {tag!r} holds {mv.nbytes} bytes, read wants {length}"
                )
            batch.append(_Req(tag, fd, offset, length, mv, buffer_address(mv)))
        for r in batch:
            self._reqs[r.tag] = r
        self._start(batch, urgent)

    def poll(self) -> list[Hashable]:
        """Non-blocking: reap completions, feed the queue, return tags completed since last poll.

        A failed request raises its ReadError here (once); completed tags stay
        queued for the next call.
        """
        self._progress(block=False)
        return self._collect()

    def wait(self, tag: Hashable) -> int:
        """Block until `tag` completes; return its length or raise its ReadError."""
        if tag not in self._reqs:
            raise KeyError(f"no outstanding read with tag {tag!r}")
        while True:
            if tag in self._failed:
                self._reqs.pop(tag, None)
                self._after_wait()
                raise self._failed.pop(tag)
            if tag in self._ready:
                del self._ready[tag]
                self._after_wait()
                return self._reqs.pop(tag).length
            self._progress(block=True)

    def expedite(self, tags: Iterable[Hashable]) -> None:
        """Make outstanding background reads urgent: their chunks not yet on the device move
        behind the urgent ones already queued and no longer count against
        background_depth (a demand step now waits for a prefetch still in flight)."""
        reqs = {id(r) for t in tags if (r := self._reqs.get(t)) is not None}
        if reqs:
            self._expedite(reqs)

    def _expedite(self, reqs: set[int]) -> None:
        """Move the queued background chunks of the requests whose id() is in `reqs`."""

    def cancel(self, tags: Iterable[Hashable]) -> int:
        """Give up outstanding reads: their chunks not yet on the device are dropped and
        the bytes they would have read returned; the chunks on the device land as usual.
        A cancelled tag completes (poll, wait) once those have landed, with its buffer only
        partly written (a prefetch the router has proven useless: nobody reads it)."""
        reqs = {id(r): r for t in tags if (r := self._reqs.get(t)) is not None}
        return self._cancel(reqs) if reqs else 0

    def _cancel(self, reqs: dict[int, _Req]) -> int:
        """Drop the queued chunks of the requests whose id() is in `reqs` (each dropped chunk
        counts as finished); return their bytes. A reader without a queue drops nothing."""
        return 0

    def wait_all(self) -> list[Hashable]:
        """Block until every outstanding read is done; return the completed tags."""
        done: list[Hashable] = []
        while True:
            done.extend(self._collect())
            if not self._reqs:
                return done
            self._progress(block=True)

    def read(self, fd: int, offset: int, length: int, dest: Any) -> int:
        """Blocking convenience: one read into `dest`."""
        tag = ("__read__", id(dest), offset)
        self.submit_reads([(fd, offset, length, dest, tag)])
        return self.wait(tag)

    @property
    def queued_urgent(self) -> int:
        """Urgent chunks waiting in the software queue (not yet on the device)."""
        return 0

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet returned by poll/wait."""
        return len(self._reqs)

    def register_buffers(self, buffers: Sequence[Any]) -> bool:
        """Register destination buffers as fixed buffers; False when not supported/allowed."""
        return False

    def info(self) -> ReaderInfo:
        """What this reader does (kind, O_DIRECT use, fixed buffers, fallback reason)."""
        direct = sum(1 for v in self._direct_fds.values() if v)
        return ReaderInfo(
            kind=self.kind,
            queue_depth=self.queue_depth,
            chunk_bytes=self.chunk_bytes,
            direct_files=direct,
            buffered_files=len(self._direct_fds) - direct,
            fixed_buffers=self._fixed,
            fallback_reason=self.fallback_reason,
            background_depth=self.background_depth,
        )

    def close(self) -> None:
        """Wait for outstanding reads (ignoring their errors), close opened files and the ring."""
        if self._closed:
            return
        while self._reqs:
            try:
                self.wait_all()
            except ReadError:
                continue
        for fd in list(self._paths):
            with contextlib.suppress(OSError):
                self.close_file(fd)
        self._release()
        self._closed = True

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- shared completion logic ---------------------------------------------------------
    def _collect(self) -> list[Hashable]:
        if self._failed:
            tag = next(iter(self._failed))
            self._reqs.pop(tag, None)
            raise self._failed.pop(tag)
        tags = list(self._ready)
        self._ready.clear()
        for t in tags:
            del self._reqs[t]
        return tags

    def _chunk_finished(self, req: _Req) -> None:
        req.chunks_left -= 1
        if req.chunks_left == 0:
            if req.error is not None:
                self._failed[req.tag] = req.error
            else:
                self._ready[req.tag] = None

    def _fail(self, req: _Req, err: int | None, offset: int, length: int, got: int = 0) -> None:
        """Record a request's error; of several, the lowest offset (where the file ends).

        Chunks of a failed request not yet handed to the device are skipped.
        """
        if req.error is None or offset < req.error.offset:
            req.error = self._make_error(req, err, offset, length, got)

    def _make_error(
        self, req: _Req, err: int | None, offset: int, length: int, got: int
    ) -> ReadError:
        path = self.path_of(req.fd)
        where = f"{length} bytes at offset {offset} of {path} (request {req.tag!r})"
        if err is None:
            end = offset + got
            try:
                size = f"{os.fstat(req.fd).st_size} bytes"
            except OSError:
                size = "unknown size"
            return ShortReadError(
                f"short read: {where} ended at byte {end} (file is {size}); the file is "
                f"shorter than expected (truncated?): re-create or re-copy it",
                errno=None,
                path=path,
                offset=offset,
                length=length,
                tag=req.tag,
            )
        msg = f"read failed: {where}: {os.strerror(err)} (errno {err})"
        if err == errno_mod.EINVAL and self.is_direct(req.fd):
            msg += (
                f"; O_DIRECT needs offset, length and buffer address aligned to "
                f"{self.alignment} (offset % {self.alignment} = {offset % self.alignment}, "
                f"length % {self.alignment} = {length % self.alignment}, address % "
                f"{self.alignment} = {(req.addr + offset - req.offset) % self.alignment}): "
                "widen the read or use mer.engine.aligned buffers"
            )
        elif err == errno_mod.EBADF:
            msg += "; the file descriptor is not open (closed before the read completed?)"
        elif err == errno_mod.EIO:
            msg += "; the device reported an I/O error: check the disk (dmesg)"
        return ReadError(msg, errno=err, path=path, offset=offset, length=length, tag=req.tag)

    def _chunks(self, req: _Req) -> list[tuple[int, int, int]]:
        """(file offset, address, length) of each chunk of a request."""
        out = []
        step = self.chunk_bytes
        for start in range(0, req.length, step):
            n = min(step, req.length - start)
            out.append((req.offset + start, req.addr + start, n))
        return out

    # ---- implementation hooks --------------------------------------------------------------
    @abstractmethod
    def _start(self, reqs: list[_Req], urgent: bool) -> None:
        """Begin the given requests (split into chunks, queue (front if urgent), submit)."""

    @abstractmethod
    def _progress(self, block: bool) -> None:
        """Reap completions and feed queued chunks; block for at least one when asked."""

    def _after_wait(self) -> None:
        """Hook after wait() returns (submit what was fed meanwhile)."""

    @abstractmethod
    def _release(self) -> None:
        """Free the ring or pool."""


def open_reader(
    path: str | os.PathLike[str] | None = None,
    kind: str = "auto",
    queue_depth: int = DEFAULT_QUEUE_DEPTH,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    direct: bool = True,
    background_depth: int | None = None,
) -> Reader:
    """A reader of the asked kind; "auto" falls back from io_uring to preadv (noted once)."""
    if kind not in KINDS:
        raise BadInput(f"unknown I/O kind {kind!r}: choose one of {', '.join(KINDS)}")
    from mer.engine.pread_pool import PreadReader

    reader: Reader
    if kind == "pread":
        reader = PreadReader(queue_depth, chunk_bytes, direct, background_depth)
    else:
        from mer.engine.uring import UringReader, UringUnavailable

        try:
            reader = UringReader(queue_depth, chunk_bytes, direct, background_depth)
        except UringUnavailable as exc:
            if kind == "uring":
                raise RuntimeFailure(f"{exc}; use the preadv pool instead (--io pread)") from exc
            note_once(
                "pread-fallback",
                f"mer: io_uring is not available ({exc}); reading with a thread pool of preadv",
            )
            reader = PreadReader(queue_depth, chunk_bytes, direct, background_depth)
            reader.fallback_reason = str(exc)
    if path is not None:
        reader.default_fd = reader.open(path)
    return reader
