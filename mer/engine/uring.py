"""UringReader: reads through io_uring via the cffi extension built by uring_build.py.

Python keeps the logic (chunking, tags, queueing beyond the ring, errors); the C
helpers prepare SQEs and reap CQEs from arrays, so one syscall (io_uring_enter)
submits a batch and waits, and the per-chunk cost is a few array stores.

In flight: at most `queue_depth` chunks (the SQ size; the CQ is twice that, so it
can not overflow). More chunks wait in a software queue and are fed as
completions arrive. Each chunk's user_data is its slot in the in-flight table.
"""

from __future__ import annotations

import errno as errno_mod
import os
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from mer.engine.aligned import buffer_address
from mer.engine.io import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_QUEUE_DEPTH,
    Reader,
    _Req,
    note_once,
)
from mer.errors import RuntimeFailure

SETUP_SUBMIT_ALL = 1 << 7
SETUP_COOP_TASKRUN = 1 << 8
SETUP_TASKRUN_FLAG = 1 << 9
MAX_FIXED_BUFFER = 1 << 30  # the kernel refuses a registered iovec above 1 GiB
MAX_FIXED_BUFFERS = 1 << 14


class UringUnavailable(RuntimeFailure):
    """io_uring can not be used here (extension missing, ENOSYS, EPERM, disabled)."""


def load_extension() -> ModuleType:
    """The compiled cffi module (`mer.native`: installed, else built into the user cache)."""
    from mer import native

    mod = native.load("uring", quiet=True)
    if mod is None:
        raise UringUnavailable(
            f"the io_uring extension is unavailable: {native.why_unavailable('uring')}"
        )
    return mod


def _disabled_reason(err: int) -> str:
    text = f"io_uring_setup failed: {os.strerror(err)} (errno {err})"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as fh:
            val = fh.read().strip()
        if val != "0":
            text += f"; /proc/sys/kernel/io_uring_disabled is {val}"
    except OSError:
        pass
    if err == errno_mod.EPERM:
        text += " (not permitted here: seccomp/container policy or sysctl)"
    elif err == errno_mod.ENOSYS:
        text += " (kernel without io_uring)"
    return text


class UringReader(Reader):
    """Reader backed by one io_uring instance (see mer.engine.io for the interface)."""

    kind = "uring"

    def __init__(
        self,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool = True,
        background_depth: int | None = None,
        ext: ModuleType | None = None,
    ) -> None:
        super().__init__(queue_depth, chunk_bytes, direct, background_depth)
        if ext is None:
            try:
                ext = load_extension()
            except UringUnavailable:
                raise
            except Exception as exc:
                raise UringUnavailable(f"cannot load the io_uring extension: {exc}") from exc
        self._ffi: Any = ext.ffi
        self._lib: Any = ext.lib
        ringp = self._ffi.new("mer_ring **")
        flags = SETUP_SUBMIT_ALL | SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG
        rc = self._lib.mer_ring_init(ringp, queue_depth, flags)
        if rc < 0:
            raise UringUnavailable(_disabled_reason(-rc))
        self._ring = ringp[0]
        self._sq = int(self._lib.mer_ring_sq_entries(self._ring))
        self._cq = int(self._lib.mer_ring_cq_entries(self._ring))
        self._coop = bool(self._lib.mer_ring_setup_flags(self._ring) & SETUP_TASKRUN_FLAG)
        # in flight is bounded by the asked depth even if the kernel rounded the SQ up
        self._depth = min(queue_depth, self._sq)
        self._free: list[int] = list(range(self._depth - 1, -1, -1))
        self._slot_req: list[_Req | None] = [None] * self._depth
        self._slot_off = [0] * self._depth
        self._slot_addr = [0] * self._depth
        self._slot_len = [0] * self._depth
        # urgent chunks, then background ones (fed while fewer than background_depth of
        # them are on the device)
        self._pending: deque[tuple[_Req, int, int, int, int]] = deque()
        self._bg_pending: deque[tuple[_Req, int, int, int, int]] = deque()
        self._slot_bg = [False] * self._depth
        self._bg_in_flight = 0
        # batch arrays handed to C (no per-call allocation)
        d = self._depth
        self._a_fd = np.zeros(d, np.int32)
        self._a_off = np.zeros(d, np.uint64)
        self._a_addr = np.zeros(d, np.uint64)
        self._a_len = np.zeros(d, np.uint32)
        self._a_buf = np.zeros(d, np.int32)
        self._a_ud = np.zeros(d, np.uint64)
        self._c_ud = np.zeros(self._cq, np.uint64)
        self._c_res = np.zeros(self._cq, np.int32)
        self._p = {
            name: self._ffi.cast(ctype, arr.ctypes.data)
            for name, ctype, arr in (
                ("fd", "int32_t *", self._a_fd),
                ("off", "uint64_t *", self._a_off),
                ("addr", "uint64_t *", self._a_addr),
                ("len", "uint32_t *", self._a_len),
                ("buf", "int32_t *", self._a_buf),
                ("ud", "uint64_t *", self._a_ud),
                ("cud", "uint64_t *", self._c_ud),
                ("cres", "int32_t *", self._c_res),
            )
        }
        self._fixed_starts: list[int] = []
        self._fixed_ends: list[int] = []
        self._fixed_keep: list[Any] = []
        self.syscalls = 0

    @property
    def queued_urgent(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Chunks handed to the kernel and not yet completed."""
        return self._depth - len(self._free)

    # ---- fixed buffers ---------------------------------------------------------------------
    def register_buffers(self, buffers: Sequence[Any]) -> bool:
        """Register buffers (e.g. the cache slots) so chunks into them use READ_FIXED.

        Replaces any earlier registration; only allowed with nothing outstanding.
        Returns False (and notes once) when the kernel refuses, e.g. over
        RLIMIT_MEMLOCK without CAP_IPC_LOCK; reads then go as plain READ.
        """
        if self._reqs:
            raise ValueError("register_buffers needs no outstanding reads")
        if self._fixed:
            self._lib.mer_ring_unregister_buffers(self._ring)
            self._fixed = False
            self._fixed_starts, self._fixed_ends, self._fixed_keep = [], [], []
        regions: list[tuple[int, int]] = []
        keep: list[Any] = []
        for b in buffers:
            mv = memoryview(b)
            if mv.readonly or not mv.c_contiguous:
                raise ValueError("registered buffers must be writable and contiguous")
            addr, n = buffer_address(mv), mv.nbytes
            keep.append(b)
            for start in range(0, n, MAX_FIXED_BUFFER):
                regions.append((addr + start, min(MAX_FIXED_BUFFER, n - start)))
        if not regions:
            return False
        if len(regions) > MAX_FIXED_BUFFERS:
            note_once(
                "fixed-count",
                f"mer: {len(regions)} buffers exceed io_uring's {MAX_FIXED_BUFFERS} "
                "registered buffers; using plain reads into page-aligned buffers",
            )
            return False
        regions.sort()
        addrs = np.array([a for a, _ in regions], np.uint64)
        lens = np.array([n for _, n in regions], np.uint64)
        rc = self._lib.mer_ring_register_buffers(
            self._ring,
            self._ffi.cast("uint64_t *", addrs.ctypes.data),
            self._ffi.cast("uint64_t *", lens.ctypes.data),
            len(regions),
        )
        if rc < 0:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
            note_once(
                "fixed-refused",
                f"mer: registering {int(lens.sum()) >> 20} MiB of fixed buffers failed: "
                f"{os.strerror(-rc)} (RLIMIT_MEMLOCK {limit}); using plain reads into "
                "page-aligned buffers",
            )
            return False
        self._fixed = True
        self._fixed_starts = [a for a, _ in regions]
        self._fixed_ends = [a + n for a, n in regions]
        self._fixed_keep = keep
        return True

    def _buf_index(self, addr: int, n: int) -> int:
        if not self._fixed:
            return -1
        i = bisect_right(self._fixed_starts, addr) - 1
        if i >= 0 and addr + n <= self._fixed_ends[i]:
            return i
        return -1

    # ---- submission and completion -----------------------------------------------------------
    def _start(self, reqs: list[_Req], urgent: bool) -> None:
        new: list[tuple[_Req, int, int, int, int]] = []
        for req in reqs:
            chunks = self._chunks(req)
            req.chunks_left = len(chunks)
            if not chunks:
                self._ready[req.tag] = None
                continue
            bi = self._buf_index(req.addr, req.length)
            new.extend((req, off, addr, n, bi) for off, addr, n in chunks)
        if urgent:
            self._pending.extend(new)
        else:
            self._bg_pending.extend(new)
        self._feed()
        self._enter(0, False)

    def _expedite(self, reqs: set[int]) -> None:
        keep: deque[tuple[_Req, int, int, int, int]] = deque()
        moved = False
        for item in self._bg_pending:
            if id(item[0]) in reqs:
                self._pending.append(item)
                moved = True
            else:
                keep.append(item)
        if moved:
            self._bg_pending = keep
            self._feed()
            self._enter(0, False)

    def _cancel(self, reqs: dict[int, _Req]) -> int:
        dropped = 0
        for name in ("_pending", "_bg_pending"):
            q = getattr(self, name)
            if not any(id(item[0]) in reqs for item in q):
                continue
            keep: deque[tuple[_Req, int, int, int, int]] = deque()
            for item in q:
                if id(item[0]) in reqs:
                    dropped += item[3]
                    self._chunk_finished(item[0])
                else:
                    keep.append(item)
            setattr(self, name, keep)
        return dropped

    def _feed(self) -> None:
        """Move queued chunks into free slots / SQEs (prepared, submitted by _enter):
        every urgent chunk first, then background ones up to background_depth on the
        device."""
        pending, bg, free = self._pending, self._bg_pending, self._free
        k = 0
        while free:
            if pending:
                is_bg = False
                req, off, addr, n, bi = pending.popleft()
            elif bg and self._bg_in_flight < self.background_depth:
                is_bg = True
                req, off, addr, n, bi = bg.popleft()
            else:
                break
            if req.error is not None:  # the request already failed: skip the rest of it
                self._chunk_finished(req)
                continue
            slot = free.pop()
            self._slot_bg[slot] = is_bg
            self._bg_in_flight += is_bg
            self._slot_req[slot] = req
            self._slot_off[slot] = off
            self._slot_addr[slot] = addr
            self._slot_len[slot] = n
            self._a_fd[k] = req.fd
            self._a_off[k] = off
            self._a_addr[k] = addr
            self._a_len[k] = n
            self._a_buf[k] = bi
            self._a_ud[k] = slot
            k += 1
        if k:
            p = self._p
            got = self._lib.mer_ring_prep_reads(
                self._ring, k, p["fd"], p["off"], p["addr"], p["len"], p["buf"], p["ud"]
            )
            if got != k:  # cannot happen: in flight <= depth <= SQ entries
                raise RuntimeFailure(f"io_uring SQ full: prepared {got} of {k} reads")

    def _enter(self, min_complete: int, wait: bool) -> None:
        if not wait and not self._lib.mer_ring_unsubmitted(self._ring):
            return
        self.syscalls += 1
        rc = self._lib.mer_ring_enter(self._ring, min_complete, 1 if wait else 0)
        if rc < 0 and -rc not in (errno_mod.EAGAIN, errno_mod.EBUSY):
            raise RuntimeFailure(f"io_uring_enter failed: {os.strerror(-rc)} (errno {-rc})")

    def _reap(self) -> int:
        p = self._p
        n = int(self._lib.mer_ring_reap(self._ring, p["cud"], p["cres"], self._cq))
        if not n:
            return 0
        uds = self._c_ud[:n].tolist()
        ress = self._c_res[:n].tolist()
        for slot, res in zip(uds, ress, strict=True):
            req = self._slot_req[slot]
            assert req is not None
            off = self._slot_off[slot]
            n_want = self._slot_len[slot]
            addr = self._slot_addr[slot]
            self._slot_req[slot] = None
            self._free.append(slot)
            was_bg = self._slot_bg[slot]
            self._bg_in_flight -= was_bg
            if res < 0:
                self._fail(req, -res, off, n_want)
            elif res < n_want:
                end = off + res
                if res == 0 or (self.is_direct(req.fd) and end % 512):
                    self._fail(req, None, off, n_want, res)
                else:  # a partial read: queue the rest first
                    bi = self._buf_index(addr + res, n_want - res)
                    rest = (req, end, addr + res, n_want - res, bi)
                    (self._bg_pending if was_bg else self._pending).appendleft(rest)
                    continue
            self._chunk_finished(req)
        return n

    def _progress(self, block: bool) -> None:
        self._feed()
        if block and self.in_flight:
            self._enter(1, True)
        else:
            self._enter(0, False)
        got = self._reap()
        if (
            not got
            and not block
            and self.in_flight
            and (not self._coop or self._lib.mer_ring_taskrun_pending(self._ring))
        ):
            self._enter(0, True)  # run deferred completion work, do not wait
            got = self._reap()
        if got:
            self._feed()
            if not block:
                self._enter(0, False)
        if block and not got and not self.in_flight and (self._pending or self._bg_pending):
            self._feed()

    def _after_wait(self) -> None:
        self._feed()
        self._enter(0, False)

    def _release(self) -> None:
        if getattr(self, "_ring", None) is not None:
            self._lib.mer_ring_free(self._ring)
            self._ring = None
            self._fixed_keep = []

    def __del__(self) -> None:
        try:
            if getattr(self, "_ring", None) is not None and not self._reqs:
                self._release()
        except Exception:
            pass
