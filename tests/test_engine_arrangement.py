"""The engine's thread and memory arrangement: huge-page slot buffers and the driver's
real-time priority. Both change timing only: the decisions, counts and bytes of a run
are the same either way, and each falls back (said once) where the kernel refuses."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest

from mer.core import ReplayConfig
from mer.engine import aligned
from mer.engine.aligned import HUGE_PAGE, aligned_empty, buffer_address, huge_page_bytes
from mer.engine.executor import EngineConfig, Executor
from mer.engine.gguf_synth import synth_gguf
from mer.engine.store import ExpertStore
from mer.engine.streaming import driver_priority
from mer.shapes import get_shape
from mer.traces.format import read_trace

BUNDLED = (
    Path(__file__).resolve().parents[1] / "traces" / "data" / "mixtral-offloading-h39s.parquet"
)
FIFO = getattr(os, "SCHED_FIFO", None)
RESET = getattr(os, "SCHED_RESET_ON_FORK", 0)


def _smaps_huge_kib(addr: int) -> int:
    """AnonHugePages (KiB) of the mapping holding `addr`, parsed here independently: the
    header line of each mapping is 'lo-hi perms ...', its fields follow until the next."""
    text = Path("/proc/self/smaps").read_text()
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line and line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    for b in blocks:
        lo, hi = (int(v, 16) for v in b[0].split()[0].split("-"))
        if lo <= addr < hi:
            for f in b[1:]:
                if f.startswith("AnonHugePages:"):
                    return int(f.split()[1])
    return 0


def test_huge_buffers_are_huge_page_aligned_and_counted() -> None:
    buf = aligned_empty(3 * HUGE_PAGE, huge=True)
    assert buf.nbytes == 3 * HUGE_PAGE
    assert buffer_address(buf) % HUGE_PAGE == 0
    buf[::4096] = 1  # fault every page in
    got = huge_page_bytes(buf)
    assert got == min(buf.nbytes, _smaps_huge_kib(buffer_address(buf)) * 1024)
    assert got % HUGE_PAGE == 0 and 0 <= got <= buf.nbytes
    small = aligned_empty(10_000)  # below HUGE_PAGE: plain pages, page aligned only
    assert buffer_address(small) % 4096 == 0 and small.nbytes == 10_000
    if aligned.thp_mode() == "madvise":  # only a madvised mapping gets huge pages then
        plain = aligned_empty(3 * HUGE_PAGE, huge=False)
        plain[::4096] = 1
        assert huge_page_bytes(plain) == 0


def test_huge_pages_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MER_HUGE_PAGES", "0")
    assert aligned.huge_pages_default() is False
    assert EngineConfig().huge_pages is False
    monkeypatch.setenv("MER_HUGE_PAGES", "1")
    assert aligned.huge_pages_default() is True
    monkeypatch.delenv("MER_HUGE_PAGES")
    assert EngineConfig().huge_pages is True


@pytest.mark.skipif(FIFO is None, reason="no sched_setscheduler on this platform")
def test_driver_priority_sets_and_restores_fifo_and_threads_start_normal() -> None:
    before = os.sched_getscheduler(0)
    with driver_priority(False) as what:
        assert what == "off" and os.sched_getscheduler(0) == before
    with driver_priority(True) as what:
        if what != "realtime":
            pytest.skip(f"the kernel refuses SCHED_FIFO here: {what}")
        assert os.sched_getscheduler(0) & ~RESET == FIFO
        assert os.sched_getparam(0).sched_priority == 1
        seen: list[int] = []
        th = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
        th.start()
        th.join()
        if RESET:  # a thread started meanwhile is a normal thread
            assert seen == [os.SCHED_OTHER]
    assert os.sched_getscheduler(0) == before


def test_driver_priority_refused_says_why_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    from mer.notes import reset_notes

    reset_notes()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with driver_priority(True) as what:
            assert what.startswith("normal (SCHED_FIFO refused: Operation not permitted")
    assert any("--no-realtime" in str(x.message) for x in w)


def test_arrangement_changes_timing_only(tmp_path: Path) -> None:
    shape = get_shape("mixtral-tiny")
    path = tmp_path / "tiny.gguf"
    synth_gguf(path, shape, seed=5)
    store = ExpertStore.open(path)
    tr = read_trace(BUNDLED)
    rcfg = ReplayConfig(policy="lru", scope="global", cache_slots=40, predictor="none")
    tr6 = tr.head(4)
    out = {}
    for name, kw in {
        "new": {"huge_pages": True, "realtime": True},
        "old": {"huge_pages": False, "realtime": False},
    }.items():
        ecfg = EngineConfig(threads=2, io="auto", queue_depth=8, **kw)  # type: ignore[arg-type]
        out[name] = Executor(tr6, store, ReplayConfig(**rcfg.to_dict()), ecfg).run().summary
    new, old = out["new"], out["old"]
    assert new.extra["huge_pages"]["asked"] is True
    assert old.extra["huge_pages"] == {
        "asked": False,
        "cache_huge_bytes": 0,
        "thp": aligned.thp_mode(),
    }
    assert old.extra["driver_priority"] == "off"
    prio = new.extra["driver_priority"]
    assert prio == "realtime" or prio.startswith("normal (")
    for k in ("hits", "misses", "bytes_read", "tokens"):
        assert getattr(new, k) == getattr(old, k), k
    assert new.extra["reads"] == old.extra["reads"]


def test_validation_runs_record_the_arrangement() -> None:
    import math

    from mer.analysis.validate import huge_share

    extra = {"cache_buffer_bytes": 8 << 20, "huge_pages": {"cache_huge_bytes": 2 << 20}}
    assert huge_share(extra) == 0.25
    assert math.isnan(huge_share({}))
