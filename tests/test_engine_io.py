"""The engine's I/O layer: io_uring and preadv readers against plain file reads.

Expectations come from reading the same file with Python's ordinary buffered
file API (an independent reference), from the kernel's errno conventions and
from strace, never from the readers themselves.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from mer.engine import io as engine_io
from mer.engine import uring
from mer.engine.aligned import ALIGN, aligned_empty, buffer_address, is_aligned
from mer.engine.io import IOFallbackWarning, ReadError, ShortReadError, open_reader
from mer.engine.pread_pool import PreadReader
from mer.errors import RuntimeFailure

FILE_BYTES = 3 * 1024 * 1024 + 1000  # not a multiple of 4096: the tail is a short read


def _uring_available() -> str | None:
    try:
        r = uring.UringReader(queue_depth=2)
    except uring.UringUnavailable as exc:
        return str(exc)
    r.close()
    return None


_NO_URING = _uring_available()
KINDS = ["pread"] if _NO_URING else ["uring", "pread"]


@pytest.fixture(autouse=True)
def _fresh_notes() -> None:
    engine_io.reset_notes()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("io") / "data.bin"
    payload = np.random.default_rng(7).integers(0, 256, FILE_BYTES, dtype=np.uint8).tobytes()
    path.write_bytes(payload)
    return path, path.read_bytes()


def _reader(kind: str, **kw: object) -> engine_io.Reader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IOFallbackWarning)
        return open_reader(kind=kind, **kw)  # type: ignore[arg-type]


def test_aligned_buffers_are_aligned_and_writable() -> None:
    for n in (1, 4095, 4096, 100_000, 3 * 1024 * 1024 + 7):
        buf = aligned_empty(n)
        assert buf.nbytes == n and buffer_address(buf) % ALIGN == 0
        buf[:] = 0xAB
        assert int(buf[-1]) == 0xAB
    big = aligned_empty(10_000, align=1 << 16)
    assert is_aligned(big, 1 << 16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direct", [True, False])
def test_random_reads_match_plain_file_reads(kind: str, direct: bool, data_file) -> None:
    path, ref = data_file
    rng = np.random.default_rng(11)
    # small chunks and a shallow queue: many more chunks than SQ entries are queued
    with _reader(kind, queue_depth=4, chunk_bytes=2 * ALIGN, direct=direct) as r:
        fd = r.open(path)
        assert r.is_direct(fd) == direct
        reqs = []
        for i in range(40):
            if direct:
                off = int(rng.integers(0, FILE_BYTES // ALIGN - 40)) * ALIGN
                n = int(rng.integers(1, 40)) * ALIGN
            else:
                off = int(rng.integers(0, FILE_BYTES - 70_000))
                n = int(rng.integers(1, 70_000))
            reqs.append((fd, off, n, aligned_empty(n), ("t", i)))
        r.submit_reads(reqs)
        done: list[object] = []
        waiting = {q[4] for q in reqs}
        while waiting:  # mix non-blocking polls with blocking waits, as the executor will
            got = r.poll()
            done.extend(got)
            waiting.difference_update(got)
            if waiting:
                tag = min(waiting)
                assert r.wait(tag) == reqs[tag[1]][2]
                done.append(tag)
                waiting.discard(tag)
        assert sorted(done) == sorted(q[4] for q in reqs)  # type: ignore[type-var]
        for _, off, n, buf, _ in reqs:
            assert bytes(buf) == ref[off : off + n]
        assert r.outstanding == 0


@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
def test_forced_fallback_gives_same_bytes_as_uring(data_file, monkeypatch) -> None:
    path, ref = data_file
    rng = np.random.default_rng(5)
    ranges = [
        (int(rng.integers(0, FILE_BYTES // ALIGN - 64)) * ALIGN, int(rng.integers(1, 64)) * ALIGN)
        for _ in range(30)
    ]

    def read_all(r: engine_io.Reader) -> list[bytes]:
        fd = r.open(path)
        bufs = [aligned_empty(n) for _, n in ranges]
        r.submit_reads(
            [(fd, o, n, b, k) for k, ((o, n), b) in enumerate(zip(ranges, bufs, strict=True))]
        )
        r.wait_all()
        r.close()
        return [bytes(b) for b in bufs]

    real = open_reader(kind="auto", queue_depth=8, chunk_bytes=16 * 1024)
    assert real.kind == "uring"
    uring_bytes = read_all(real)

    def missing() -> types.ModuleType:
        raise uring.UringUnavailable("extension missing (test)")

    monkeypatch.setattr(uring, "load_extension", missing)
    with pytest.warns(IOFallbackWarning, match="preadv"):
        fb = open_reader(kind="auto", queue_depth=8, chunk_bytes=16 * 1024)
    assert isinstance(fb, PreadReader) and fb.fallback_reason
    pread_bytes = read_all(fb)
    expected = [ref[o : o + n] for o, n in ranges]
    assert uring_bytes == expected
    assert pread_bytes == expected
    # said once: a second fallback in the same process is silent
    with warnings.catch_warnings():
        warnings.simplefilter("error", IOFallbackWarning)
        open_reader(kind="auto").close()
    with pytest.raises(RuntimeFailure, match="--io pread"):
        open_reader(kind="uring")


@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_setup_refused_falls_back(monkeypatch, err: int) -> None:
    ext = uring.load_extension()

    class RefusingLib:
        def __getattr__(self, name: str) -> object:
            return getattr(ext.lib, name)

        @staticmethod
        def mer_ring_init(out: object, entries: int, flags: int) -> int:
            return -err

    fake = types.SimpleNamespace(ffi=ext.ffi, lib=RefusingLib())
    monkeypatch.setattr(uring, "load_extension", lambda: fake)
    with pytest.warns(IOFallbackWarning, match=os.strerror(err)):
        r = open_reader(kind="auto")
    assert r.kind == "pread"
    r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_file_is_a_short_read(kind: str, tmp_path: Path, data_file) -> None:
    _, ref = data_file
    path = tmp_path / "trunc.bin"
    path.write_bytes(ref[: 64 * 1024 + 100])  # the "store" expects 256 KiB
    with _reader(kind, queue_depth=4, chunk_bytes=64 * 1024) as r:
        fd = r.open(path)
        buf = aligned_empty(256 * 1024)
        r.submit_reads([(fd, 0, 256 * 1024, buf, "expert")])
        with pytest.raises(ShortReadError) as ei:
            r.wait("expert")
        e = ei.value
        assert isinstance(e, RuntimeFailure) and e.errno is None
        assert e.path == str(path) and e.tag == "expert"
        assert e.offset == 64 * 1024  # the chunk that crossed the end of the file
        assert "short read" in str(e) and str(path) in str(e)
        assert r.outstanding == 0


@pytest.mark.parametrize("kind", KINDS)
def test_misaligned_direct_read_is_einval(kind: str, data_file) -> None:
    path, _ = data_file
    with _reader(kind, queue_depth=4) as r:
        fd = r.open(path)
        if not r.is_direct(fd):
            pytest.skip("O_DIRECT not supported where pytest puts tmp files")
        buf = aligned_empty(2 * ALIGN)
        r.submit_reads([(fd, 100, ALIGN, buf, "bad")])
        with pytest.raises(ReadError) as ei:
            r.wait("bad")
        assert ei.value.errno == errno.EINVAL and ei.value.offset == 100
        assert "align" in str(ei.value)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_fd_is_ebadf(kind: str, data_file) -> None:
    path, _ = data_file
    with _reader(kind, queue_depth=4) as r:
        fd = os.open(path, os.O_RDONLY)
        os.close(fd)
        buf = aligned_empty(ALIGN)
        r.submit_reads([(fd, 0, ALIGN, buf, "gone")])
        with pytest.raises(ReadError) as ei:
            r.wait("gone")
        assert ei.value.errno == errno.EBADF and ei.value.offset == 0


@pytest.mark.parametrize("kind", KINDS)
def test_poll_raises_failure_once_and_keeps_completed_tags(kind: str, data_file) -> None:
    path, _ = data_file
    with _reader(kind, queue_depth=4, chunk_bytes=ALIGN) as r:
        fd = r.open(path)
        good = aligned_empty(8 * ALIGN)
        bad_fd = os.open(path, os.O_RDONLY)
        os.close(bad_fd)
        r.submit_reads([(fd, 0, 8 * ALIGN, good, "good"), (bad_fd, 0, ALIGN, good, "bad")])
        seen: list[object] = []
        failures = 0
        while len(seen) < 1 or failures < 1:
            try:
                seen.extend(r.poll())
            except ReadError as exc:
                assert exc.tag == "bad"
                failures += 1
        assert seen == ["good"] and failures == 1
        assert r.poll() == [] and r.outstanding == 0
        with pytest.raises(KeyError):
            r.wait("good")


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_tag_and_bad_destination_rejected(kind: str, data_file) -> None:
    path, _ = data_file
    with _reader(kind) as r:
        fd = r.open(path)
        buf = aligned_empty(2 * ALIGN)
        r.submit_reads([(fd, 0, ALIGN, buf[:ALIGN], "x")])
        with pytest.raises(ValueError, match="already outstanding"):
            r.submit_reads([(fd, ALIGN, ALIGN, buf[ALIGN:], "x")])
        with pytest.raises(ValueError, match="holds"):
            r.submit_reads([(fd, 0, 2 * ALIGN, buf[:ALIGN], "y")])
        with pytest.raises(ValueError, match="read-only"):
            r.submit_reads([(fd, 0, ALIGN, bytes(ALIGN), "z")])
        assert r.wait("x") == ALIGN


@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
def test_fixed_buffers_read_the_same_bytes(data_file) -> None:
    path, ref = data_file
    slots = [aligned_empty(256 * 1024) for _ in range(3)]
    with open_reader(kind="uring", queue_depth=4, chunk_bytes=64 * 1024) as r:
        registered = r.register_buffers(slots)
        assert r.info().fixed_buffers == registered
        fd = r.open(path)
        offs = [0, 512 * 1024, 2 * 1024 * 1024]
        r.submit_reads(
            [(fd, o, 256 * 1024, s, i) for i, (o, s) in enumerate(zip(offs, slots, strict=True))]
        )
        assert sorted(r.wait_all()) == [0, 1, 2]  # type: ignore[type-var]
        for o, s in zip(offs, slots, strict=True):
            assert bytes(s) == ref[o : o + 256 * 1024]
        # a destination outside the registered slots still reads (plain READ)
        other = aligned_empty(ALIGN)
        assert r.read(fd, ALIGN, ALIGN, other) == ALIGN
        assert bytes(other) == ref[ALIGN : 2 * ALIGN]


def test_buffered_fallback_when_o_direct_refused_is_noted_once(
    data_file, tmp_path: Path, monkeypatch
) -> None:
    """A file system refusing O_DIRECT at open (EINVAL, e.g. tmpfs before Linux 6.6)."""
    _, ref = data_file
    path = tmp_path / "small.bin"
    path.write_bytes(ref[: 64 * 1024])
    real_open = os.open

    def no_direct_open(p: object, flags: int, *a: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(p, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct_open)
    r = PreadReader(queue_depth=2)
    with pytest.warns(IOFallbackWarning, match="buffered"):
        fd = r.open(path)
    assert not r.is_direct(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IOFallbackWarning)
        fd2 = r.open(path)
    buf = bytearray(5000)
    assert r.read(fd2, 3, 5000, buf) == 5000 and bytes(buf) == ref[3:5003]
    info = r.info()
    assert info.buffered_files == 2 and info.direct_files == 0
    r.close()


STRACE_SCRIPT = textwrap.dedent(
    """
    import sys
    from mer.engine.aligned import aligned_empty
    from mer.engine.uring import UringReader
    r = UringReader(queue_depth=8, chunk_bytes=64 * 1024)
    fd = r.open(sys.argv[1])
    bufs = [aligned_empty(512 * 1024) for _ in range(4)]
    r.submit_reads([(fd, i * 512 * 1024, 512 * 1024, b, i) for i, b in enumerate(bufs)])
    r.wait_all()
    r.close()
    """
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
def test_strace_shows_io_uring_enter_and_no_pread(data_file, tmp_path: Path) -> None:
    path, _ = data_file
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-y",  # print the path behind each fd
            "-o",
            str(log),
            "-e",
            "trace=io_uring_enter,pread64,preadv,preadv2,read",
            sys.executable,
            "-c",
            STRACE_SCRIPT,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "PTRACE" in (proc.stderr or "").upper():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert any("io_uring_enter(" in ln for ln in lines)
    target = f"<{os.path.realpath(path)}>"
    data_reads = [
        ln
        for ln in lines
        if target in ln
        and any(f"{call}(" in ln for call in ("pread64", "preadv", "preadv2", "read"))
    ]
    assert data_reads == []


@pytest.mark.parametrize("kind", KINDS)
def test_urgent_read_overtakes_queued_background_chunks(kind: str, data_file) -> None:
    path, ref = data_file
    with _reader(kind, queue_depth=1, chunk_bytes=ALIGN) as r:
        fd = r.open(path)
        bg = aligned_empty(64 * ALIGN)
        fg = aligned_empty(ALIGN)
        r.submit_reads([(fd, 0, 64 * ALIGN, bg, "background")])
        r.submit_reads([(fd, 100 * ALIGN, ALIGN, fg, "foreground")], urgent=True)
        # one chunk on the device at a time: the urgent chunk is next, the background
        # request still has 62+ chunks to go, so completion order is fixed
        assert r.wait_all() == ["foreground", "background"]
        assert bytes(fg) == ref[100 * ALIGN : 101 * ALIGN]
        assert bytes(bg) == ref[: 64 * ALIGN]


@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
def test_background_depth_caps_background_chunks_on_the_ring(data_file) -> None:
    path, ref = data_file
    with _reader("uring", queue_depth=8, chunk_bytes=ALIGN, background_depth=2) as r:
        fd = r.open(path)
        bg = aligned_empty(64 * ALIGN)
        fg = aligned_empty(3 * ALIGN)
        r.submit_reads([(fd, 0, 64 * ALIGN, bg, "background")])
        # only submissions and reaps feed the ring, and nothing was reaped yet
        assert r.in_flight == 2
        r.submit_reads([(fd, 100 * ALIGN, 3 * ALIGN, fg, "foreground")], urgent=True)
        assert r.in_flight == 5  # the urgent chunks take free slots past the cap
        while "foreground" not in r.poll():
            assert r._bg_in_flight <= 2  # type: ignore[attr-defined]
        assert r.wait("background") == 64 * ALIGN
        assert bytes(fg) == ref[100 * ALIGN : 103 * ALIGN]
        assert bytes(bg) == ref[: 64 * ALIGN]


@pytest.mark.skipif(_NO_URING is not None, reason=f"io_uring unavailable: {_NO_URING}")
@pytest.mark.parametrize("action", ["expedite", "cancel"])
def test_a_queued_background_read_is_expedited_or_cancelled(data_file, action: str) -> None:
    path, ref = data_file
    with _reader("uring", queue_depth=8, chunk_bytes=ALIGN, background_depth=1) as r:
        fd = r.open(path)
        bg = aligned_empty(32 * ALIGN)
        other = aligned_empty(32 * ALIGN)
        r.submit_reads([(fd, 0, 32 * ALIGN, bg, "this prefetch")])
        r.submit_reads([(fd, 200 * ALIGN, 32 * ALIGN, other, "other prefetch")])
        assert r.in_flight == 1  # one background chunk on the device, the rest queued
        if action == "expedite":
            r.expedite(["this prefetch"])
            assert r.in_flight == 8  # every slot: the expedited chunks are urgent now
            assert r.queued_urgent > 0
            assert r.wait("this prefetch") == 32 * ALIGN
            assert bytes(bg) == ref[: 32 * ALIGN]
        else:
            # the chunk on the device lands; the 31 queued ones of that read are never read
            assert r.cancel(["this prefetch", "no such read"]) == 31 * ALIGN
            r.wait("this prefetch")  # completes once its chunk on the device is in
        assert r.wait("other prefetch") == 32 * ALIGN
        assert bytes(other) == ref[200 * ALIGN : 232 * ALIGN]
        assert r.outstanding == 0 and r.in_flight == 0


def _count_concurrent_preads(monkeypatch) -> dict[str, int]:
    """Wrap the pool's chunk read so the test sees how many background chunks overlap."""
    import threading
    import time

    lock = threading.Lock()
    now = {"bg": 0, "max_bg": 0}
    real = PreadReader._read

    def counted(req, off, start, n, direct):  # type: ignore[no-untyped-def]
        bg = req.tag != "foreground"
        with lock:
            now["bg"] += bg
            now["max_bg"] = max(now["max_bg"], now["bg"])
        time.sleep(0.001)  # widen the window in which chunks overlap
        try:
            return real(req, off, start, n, direct)
        finally:
            with lock:
                now["bg"] -= bg

    monkeypatch.setattr(PreadReader, "_read", staticmethod(counted))
    return now


@pytest.mark.parametrize("expedite", [False, True])
def test_background_depth_caps_concurrent_background_preads(
    data_file, monkeypatch, expedite: bool
) -> None:
    path, ref = data_file
    now = _count_concurrent_preads(monkeypatch)
    with _reader("pread", queue_depth=6, chunk_bytes=ALIGN, background_depth=2) as r:
        fd = r.open(path)
        bufs = [aligned_empty(16 * ALIGN) for _ in range(3)]
        for i, b in enumerate(bufs):
            r.submit_reads([(fd, i * 16 * ALIGN, 16 * ALIGN, b, f"bg{i}")])
        fg = aligned_empty(4 * ALIGN)
        r.submit_reads([(fd, 100 * ALIGN, 4 * ALIGN, fg, "foreground")], urgent=True)
        if expedite:
            r.expedite(["bg2"])  # its chunks go as urgent: no longer capped
        assert sorted(r.wait_all()) == ["bg0", "bg1", "bg2", "foreground"]
        if not expedite:
            assert 1 <= now["max_bg"] <= 2
        for i, b in enumerate(bufs):
            assert bytes(b) == ref[i * 16 * ALIGN : (i + 1) * 16 * ALIGN]
        assert bytes(fg) == ref[100 * ALIGN : 104 * ALIGN]


@pytest.mark.parametrize("bad", [0, -1])
def test_background_depth_out_of_range_is_bad_input(bad: int) -> None:
    from mer.errors import BadInput

    with pytest.raises(BadInput, match="--background-depth"):
        PreadReader(queue_depth=4, background_depth=bad)


def test_cancel_on_the_thread_pool_reads_each_chunk_at_most_once(data_file) -> None:
    path, ref = data_file
    with _reader("pread", queue_depth=2, chunk_bytes=ALIGN, background_depth=1) as r:
        fd = r.open(path)
        bg = aligned_empty(64 * ALIGN)
        r.submit_reads([(fd, 0, 64 * ALIGN, bg, "useless prefetch")])
        dropped = r.cancel(["useless prefetch"])
        assert 0 <= dropped <= 64 * ALIGN and dropped % ALIGN == 0
        r.wait("useless prefetch")
        assert r.outstanding == 0
        # what was read is the file's bytes: the chunks before the dropped ones (a worker
        # takes chunks in order), so the buffer's head is right however many it took
        got = 64 * ALIGN - dropped
        assert bytes(bg[:got]) == ref[:got]
