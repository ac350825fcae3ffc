"""PreadReader: the fallback reader, a thread pool of os.preadv with the Reader interface.

Used where io_uring is not permitted (ENOSYS, EPERM, io_uring_disabled) or the
extension is missing, and as the baseline in bench/bench_io.py. `queue_depth`
worker threads each read one chunk at a time (preadv releases the GIL), so the
device sees up to `queue_depth` requests, as with the ring. Chunks wait in a
software queue (urgent ones first; background ones are taken only while
fewer than `background_depth` of them are being read); completions come back
through a queue drained by poll()/wait().
"""

from __future__ import annotations

import errno as errno_mod
import os
import queue
import threading
from collections import deque

from mer.engine.io import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, Reader, _Req

MAX_THREADS = 128

_Chunk = tuple[_Req, int, int, int, bool]  # request, file offset, start in dest, length, direct
_Done = tuple[_Req, int, int, int | None, int]  # request, offset, length, errno/None/0, got


class PreadReader(Reader):
    """Reader backed by a thread pool of os.preadv (see mer.engine.io for the interface)."""

    kind = "pread"

    def __init__(
        self,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool = True,
        background_depth: int | None = None,
    ) -> None:
        super().__init__(queue_depth, chunk_bytes, direct, background_depth)
        self._todo: deque[_Chunk] = deque()
        self._bg_todo: deque[_Chunk] = deque()
        self._bg_reading = 0
        self._cond = threading.Condition()
        self._stop = False
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._running = 0
        self._threads = [
            threading.Thread(target=self._worker, name=f"mer-pread-{i}", daemon=True)
            for i in range(min(queue_depth, MAX_THREADS))
        ]
        for t in self._threads:
            t.start()

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._bg_ready() and not self._stop:
                    self._cond.wait()
                if self._todo:
                    chunk, is_bg = self._todo.popleft(), False
                elif self._bg_ready():
                    chunk, is_bg = self._bg_todo.popleft(), True
                    self._bg_reading += 1
                else:
                    return  # stopping, nothing left
            done = self._read(*chunk)
            if is_bg:
                with self._cond:
                    self._bg_reading -= 1
                    if self._bg_todo:
                        self._cond.notify()
            self._done.put(done)

    @property
    def queued_urgent(self) -> int:
        return len(self._todo)

    def _bg_ready(self) -> bool:
        return bool(self._bg_todo) and self._bg_reading < self.background_depth

    @staticmethod
    def _read(req: _Req, off: int, start: int, n: int, direct: bool) -> _Done:
        """Read one chunk fully (looping over partial reads)."""
        if req.error is not None:  # the request already failed: skip
            return (req, off, n, 0, n)
        view = req.dest[start : start + n]
        got = 0
        try:
            while got < n:
                k = os.preadv(req.fd, [view[got:]], off + got)
                if k == 0:
                    return (req, off, n, None, got)
                got += k
        except OSError as exc:
            err = exc.errno or errno_mod.EIO
            # with O_DIRECT the read after a partial one at EOF is misaligned: a short read
            if got and err == errno_mod.EINVAL and direct:
                return (req, off, n, None, got)
            return (req, off, n, err, got)
        return (req, off, n, 0, n)

    def _start(self, reqs: list[_Req], urgent: bool) -> None:
        new: list[_Chunk] = []
        for req in reqs:
            chunks = self._chunks(req)
            req.chunks_left = len(chunks)
            if not chunks:
                self._ready[req.tag] = None
                continue
            direct = self.is_direct(req.fd)
            new.extend((req, off, addr - req.addr, n, direct) for off, addr, n in chunks)
        if not new:
            return
        with self._cond:
            (self._todo if urgent else self._bg_todo).extend(new)
            self._running += len(new)
            self._cond.notify(len(new))

    def _expedite(self, reqs: set[int]) -> None:
        with self._cond:
            move = [c for c in self._bg_todo if id(c[0]) in reqs]
            if move:
                self._bg_todo = deque(c for c in self._bg_todo if id(c[0]) not in reqs)
                self._todo.extend(move)
                self._cond.notify(len(move))

    def _cancel(self, reqs: dict[int, _Req]) -> int:
        dropped = 0
        gone: list[_Req] = []
        with self._cond:
            for name in ("_todo", "_bg_todo"):
                q = getattr(self, name)
                mine = [c for c in q if id(c[0]) in reqs]
                if mine:
                    setattr(self, name, deque(c for c in q if id(c[0]) not in reqs))
                    for c in mine:
                        dropped += c[3]
                        gone.append(c[0])
            self._running -= len(gone)
        for req in gone:
            self._chunk_finished(req)
        return dropped

    def _handle(self, item: _Done) -> None:
        req, off, n, err, got = item
        self._running -= 1
        if err is None:
            self._fail(req, None, off, n, got)
        elif err:
            self._fail(req, err, off, n)
        self._chunk_finished(req)

    def _progress(self, block: bool) -> None:
        if block and self._running:
            self._handle(self._done.get())
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def _release(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
