"""Page-aligned numpy buffers for O_DIRECT and registered (fixed) io_uring buffers.

O_DIRECT needs the destination address, the file offset and the length aligned to
the device's logical block size; 4096 covers every common device. Anonymous mmap
memory is page aligned by construction, can be pinned by io_uring buffer
registration (file-backed or numpy-heap memory can not always be), and is returned
to the OS when the array is dropped.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

ALIGN = 4096
"""Alignment used for O_DIRECT offsets, lengths and buffer addresses."""


def align_up(n: int, align: int = ALIGN) -> int:
    """Smallest multiple of `align` that is >= n."""
    return -(-n // align) * align


def align_down(n: int, align: int = ALIGN) -> int:
    """Largest multiple of `align` that is <= n."""
    return n - n % align


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """A writable uint8 array of `nbytes` whose address is a multiple of `align`.

    Backed by an anonymous private mmap rounded up to whole pages (so it is at
    least page aligned); larger alignments are obtained by over-allocating and
    slicing. The mapping lives as long as the array (or any view of it).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    extra = 0 if align <= mmap.PAGESIZE else align
    size = max(align_up(nbytes + extra, mmap.PAGESIZE), mmap.PAGESIZE)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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
