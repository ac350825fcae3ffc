"""Page-aligned numpy buffers for O_DIRECT and registered (fixed) io_uring buffers.

O_DIRECT needs the destination address, the file offset and the length aligned to
the device's logical block size; 4096 covers every common device. Anonymous mmap
memory is page aligned by construction, can be pinned by io_uring buffer
registration (file-backed or numpy-heap memory can not always be), and is returned
to the OS when the array is dropped.

Huge pages: a buffer of at least `HUGE_PAGE` bytes is by default 2 MiB aligned and
marked MADV_HUGEPAGE (transparent huge pages), so its memory is physically
contiguous in 2 MiB pieces. An O_DIRECT read into 4 KiB pages is a scatter list of
up to one segment per page, and which pages a fresh buffer gets differs from run
to run (on a virtual disk each segment may be its own piece of work for the host:
our reading of the figures below, not measured directly).
Measured on a 2-core VM (bench/bench_spread.py, docs/benchmarks.md): with 4 KiB
pages some runs of one configuration took 2-3x the driver's wake-ups (reads landing
in more pieces) and ran 30-40% slower than the others, at random; on huge pages
that slow mode did not occur, and the FFN reading a slot gains from fewer TLB misses.
`huge=False` (or MER_HUGE_PAGES=0 in the environment) restores plain pages.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any

import numpy as np

ALIGN = 4096
"""Alignment used for O_DIRECT offsets, lengths and buffer addresses."""

HUGE_PAGE = 2 << 20
"""Transparent huge page size on x86-64 and arm64 (4 KiB base pages)."""

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_default() -> bool:
    """Whether buffers of HUGE_PAGE bytes or more ask for huge pages when the caller does
    not say (on unless MER_HUGE_PAGES=0)."""
    return os.environ.get("MER_HUGE_PAGES", "1").strip().lower() not in ("0", "off", "no", "false")


def thp_mode() -> str:
    """The kernel's transparent huge page mode: always | madvise | never | unavailable."""
    try:
        with open(THP_ENABLED) as fh:
            text = fh.read()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


def align_up(n: int, align: int = ALIGN) -> int:
    """Smallest multiple of `align` that is >= n."""
    return -(-n // align) * align


def align_down(n: int, align: int = ALIGN) -> int:
    """Largest multiple of `align` that is <= n."""
    return n - n % align


def aligned_empty(nbytes: int, align: int = ALIGN, huge: bool | None = None) -> np.ndarray:
    """A writable uint8 array of `nbytes` whose address is a multiple of `align`.

    Backed by an anonymous private mmap rounded up to whole pages (so it is at
    least page aligned); larger alignments are obtained by over-allocating and
    slicing. The mapping lives as long as the array (or any view of it).
    `huge` (default: `huge_pages_default()` for buffers of at least HUGE_PAGE bytes)
    aligns to HUGE_PAGE and asks the kernel for transparent huge pages; where the
    kernel has none the buffer is plain pages (see `huge_page_bytes`).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    if huge is None:
        huge = nbytes >= HUGE_PAGE and huge_pages_default()
    huge = bool(huge) and nbytes > 0 and hasattr(mmap, "MADV_HUGEPAGE")
    if huge:
        align = max(align, HUGE_PAGE)
    extra = 0 if align <= mmap.PAGESIZE else align
    size = max(align_up(nbytes + extra, mmap.PAGESIZE), mmap.PAGESIZE)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        with contextlib.suppress(OSError):  # a kernel without THP: plain pages
            mem.madvise(mmap.MADV_HUGEPAGE)
    arr = np.frombuffer(mem, dtype=np.uint8)
    start = (-buffer_address(arr)) % align
    return arr[start : start + nbytes]


def aligned_zeros(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """Like `aligned_empty`; anonymous mappings are zero-filled by the kernel."""
    return aligned_empty(nbytes, align)


def buffer_address(buf: Any) -> int:
    """Address of the first byte of a buffer-protocol object (numpy, memoryview, bytearray)."""
    if isinstance(buf, np.ndarray):
        return int(buf.__array_interface__["data"][0])
    return int(np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0])


def is_aligned(buf: Any, align: int = ALIGN) -> bool:
    """True when the buffer's first byte is at a multiple of `align`."""
    return buffer_address(buf) % align == 0


def huge_page_bytes(buf: Any) -> int:
    """Bytes of the mapping holding `buf` that the kernel backs with huge pages now
    (AnonHugePages of its /proc/self/smaps entry, at most the buffer's size: the kernel
    merges adjacent mappings of the same kind into one entry; 0 where smaps is not
    readable)."""
    addr = buffer_address(buf)
    size = memoryview(buf).nbytes
    try:
        with open("/proc/self/smaps") as fh:
            inside = False
            for line in fh:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, _, hi = head.partition("-")
                    try:
                        inside = int(lo, 16) <= addr < int(hi, 16)
                    except ValueError:
                        inside = False
                elif inside and head == "AnonHugePages:":
                    return min(size, int(line.split()[1]) * 1024)
    except OSError:
        return 0
    return 0
