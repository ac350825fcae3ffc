"""PreadReader: the fallback reader, a thread pool of os.preadv with the Reader interface.

Used where io_uring is not permitted (ENOSYS, EPERM, io_uring_disabled) or the
extension is missing, and as the baseline in bench/bench_io.py. `queue_depth`
threads each read one chunk at a time (preadv releases the GIL), so the device
sees up to `queue_depth` requests, as with the ring. Completions come back
through a queue drained by poll()/wait().
"""

from __future__ import annotations

import errno as errno_mod
import os
import queue
from concurrent.futures import ThreadPoolExecutor

from mer.engine.io import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, Reader, _Req

MAX_THREADS = 128


class PreadReader(Reader):
    """Reader backed by a thread pool of os.preadv (see mer.engine.io for the interface)."""

    kind = "pread"

    def __init__(
        self,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool = True,
    ) -> None:
        super().__init__(queue_depth, chunk_bytes, direct)
        self._pool = ThreadPoolExecutor(
            max_workers=min(queue_depth, MAX_THREADS), thread_name_prefix="mer-pread"
        )
        # (request, chunk offset, chunk length, errno or None for short / 0 ok, bytes got)
        self._done: queue.SimpleQueue[tuple[_Req, int, int, int | None, int]] = queue.SimpleQueue()
        self._running = 0

    def _work(self, req: _Req, off: int, start: int, n: int, direct: bool) -> None:
        """Read one chunk fully (looping over partial reads); report on the queue."""
        if req.error is not None:
            self._done.put((req, off, n, 0, n))
            return
        view = req.dest[start : start + n]
        got = 0
        try:
            while got < n:
                k = os.preadv(req.fd, [view[got:]], off + got)
                if k == 0:
                    self._done.put((req, off, n, None, got))
                    return
                got += k
        except OSError as exc:
            err = exc.errno or errno_mod.EIO
            # with O_DIRECT the read after a partial one at EOF is misaligned: a short read
            if got and err == errno_mod.EINVAL and direct:
                self._done.put((req, off, n, None, got))
            else:
                self._done.put((req, off, n, err, got))
            return
        self._done.put((req, off, n, 0, n))

    def _start(self, reqs: list[_Req]) -> None:
        for req in reqs:
            chunks = self._chunks(req)
            req.chunks_left = len(chunks)
            if not chunks:
                self._ready[req.tag] = None
                continue
            direct = self.is_direct(req.fd)
            for off, addr, n in chunks:
                self._running += 1
                self._pool.submit(self._work, req, off, addr - req.addr, n, direct)

    def _handle(self, item: tuple[_Req, int, int, int | None, int]) -> None:
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
        self._pool.shutdown(wait=True)
