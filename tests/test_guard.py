"""mer.guard, mer.atomic and mer.workers: the path guard, atomic writes, locks, workers.

Each expectation is derived from the operating system (stat, the umask, /proc),
not from running the code under test.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mer import guard
from mer.atomic import atomic_path, current_umask, stale_temporaries, write_text_atomic
from mer.errors import BadInput, RuntimeFailure
from mer.guard import FinalWrites, check_args, check_input, check_output, locked


def test_umask_is_read_without_changing_it() -> None:
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        dest = tmp_path / f"out-{mask:o}.json"
        write_text_atomic(dest, "{}")
        plain = tmp_path / f"plain-{mask:o}"
        plain.write_text("x")  # what open() gives: the reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    dest.write_text("old")
    os.chmod(dest, 0o640)
    write_text_atomic(dest, "new")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640 and dest.read_text() == "new"


def test_failed_write_leaves_destination_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "d.txt"
    dest.write_text("keep")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert dest.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt"]


def test_interrupt_between_creating_the_temporary_and_its_try_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C can land right after the temporary is created, before `atomic_path`'s own
    cleanup is armed (CI saw such a stray after a SIGINT mid-sweep). The CLI then leaves
    with os._exit, so no finaliser removes it: the CLI must."""
    from mer import atomic
    from mer.cli import main

    real_open = os.open

    def open_then_interrupt(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *a, **kw)
        if str(path).endswith(".tmp"):
            os.close(fd)
            raise KeyboardInterrupt  # as a signal handler would, once the call returned
        return fd

    monkeypatch.setattr(atomic.os, "open", open_then_interrupt)
    out = tmp_path / "t.parquet"
    rc = main(["trace", "bundled", "-o", str(out)])
    assert rc == 130
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_temporary_of_a_dead_process_is_removed_by_the_next_write(tmp_path: Path) -> None:
    dest = tmp_path / "big.gguf"
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(proc.stdout)  # exited: its pid is gone (reuse within the test is negligible)
    stale = tmp_path / f".big.gguf.{dead}-0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".big.gguf.{os.getpid()}-0123abcd.tmp"  # a live writer's: kept
    alive.write_bytes(b"y")
    other = tmp_path / f".other.{dead}-0123abcd.tmp"  # another destination's: kept
    other.write_bytes(b"z")
    assert stale_temporaries(dest) == [stale]
    with pytest.warns(UserWarning, match="removed .*interrupted run"):
        write_text_atomic(dest, "new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["big.gguf", alive.name, other.name])


def test_protected_input_is_never_replaced(tmp_path: Path) -> None:
    src = tmp_path / "trace.parquet"
    src.write_bytes(b"data")
    link = tmp_path / "link.parquet"
    link.symlink_to(src)
    hard = tmp_path / "hard.parquet"
    os.link(src, hard)
    with guard.protecting([src]):
        for dest in (src, link, hard):
            with pytest.raises(BadInput, match="also an input"):
                write_text_atomic(dest, "curves")
    assert src.read_bytes() == b"data"
    write_text_atomic(hard, "free again")  # outside the block nothing is protected


def _ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_check_args_refuses_output_equal_to_input(tmp_path: Path) -> None:
    t = tmp_path / "t.parquet"
    t.write_bytes(b"x")
    with pytest.raises(BadInput, match=r"-o .* also an input"):
        check_args(_ns(trace=guard.input_file(str(t)), output=guard.output_file(str(t))))
    # plain Path arguments by convention (commands that have not adopted the types)
    with pytest.raises(BadInput, match=r"--summary .* also an input"):
        check_args(_ns(experts=Path(t), summary=Path(t)))
    # a name argument that happens to be a file (--hardware FILE) counts too
    with pytest.raises(BadInput, match="also an input"):
        check_args(_ns(hardware=str(t), output=guard.output_file(str(t))))


def test_check_args_refuses_two_outputs_on_one_file(tmp_path: Path) -> None:
    a = str(tmp_path / "a.json")
    with pytest.raises(BadInput, match="same file"):
        check_args(_ns(output=guard.output_file(a), summary=guard.output_file(a)))


def test_inputs_that_would_block_or_are_not_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="FIFO"):
        check_input(fifo, "trace")
    with pytest.raises(BadInput, match="kernel interface"):
        check_input("/proc/self/mem", "trace")
    with pytest.raises(BadInput, match="directory"):
        check_input(tmp_path, "trace")
    assert check_input(tmp_path, "experts", directory_ok=True) == tmp_path
    with pytest.raises(BadInput, match="no such file"):
        check_input(tmp_path / "missing", "trace")
    with pytest.raises(BadInput, match="not a directory"):
        check_input(tmp_path / "fifo" / "x", "trace")


def test_outputs_that_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(BadInput, match="is a directory"):
        check_output(tmp_path / "d", "-o")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        check_output(f / "sub" / "out.json", "-o")
    with pytest.raises(BadInput, match="is a file"):
        check_output(f, "-o", kind="dir")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular file"):
        check_output(fifo, "-o")
    with pytest.raises(BadInput, match="/dev"):
        check_output("/dev/null", "-o")
    check_output(tmp_path / "new" / "deeper" / "out.parquet", "-o")  # missing parents: fine
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_read_only_place_is_refused_before_the_work(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]
        ).returncode:
            pytest.skip("root, and cannot mount a read-only tmpfs")
        try:
            with pytest.raises(BadInput, match="read-only"):
                check_output(ro / "out.json", "-o")
        finally:
            subprocess.run(["umount", str(ro)], check=True)
    else:
        ro.chmod(0o555)
        try:
            with pytest.raises(BadInput, match="permission denied"):
                check_output(ro / "out.json", "-o")
        finally:
            ro.chmod(0o755)


def test_final_writes_report_after_the_results(tmp_path: Path, capsys) -> None:
    ok = tmp_path / "ok.json"
    writes = FinalWrites()
    writes.add(ok, lambda p: write_text_atomic(p, "1"), "summary")

    def full(p: Path) -> None:
        raise OSError(28, "No space left on device")

    writes.add(tmp_path / "t.parquet", full, "per-token table")
    writes.add(None, full)  # an output not asked for
    writes.run()
    print("RESULTS")
    with pytest.raises(RuntimeFailure, match=r"per-token table .*t.parquet \(No space left"):
        writes.finish()
    assert ok.read_text() == "1" and writes.written == [ok]
    assert capsys.readouterr().out == "RESULTS\n"


def _hold_lock(path: str, hold_s: float, ready: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    with locked(path):
        ready.set()
        time.sleep(hold_s)


def test_lock_serialises_processes_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "results.parquet"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(target), 0.6, ready))
    p.start()
    assert ready.wait(10)
    t0 = time.monotonic()
    with locked(target):
        waited = time.monotonic() - t0
    p.join(10)
    assert waited > 0.3  # blocked until the other process let go
    assert list(tmp_path.iterdir()) == []  # no lock file


def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """kill -9 of a pool's parent: its workers are gone within seconds."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from mer.workers import process_pool
        with process_pool(2) as pool:
            futs = [pool.submit(time.sleep, 60) for _ in range(2)]
            time.sleep(1.0)
            print(" ".join(str(p) for p in pool._processes), flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        workers = [int(x) for x in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(Path(f"/proc/{w}").exists() for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_ignore_ctrl_c_and_are_terminated_by_the_parent() -> None:
    from mer.workers import process_pool

    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt), process_pool(1) as pool:
        pool.submit(time.sleep, 30)
        time.sleep(0.5)
        seen.extend(pool._processes)  # type: ignore[attr-defined]
        raise KeyboardInterrupt
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(w) for w in seen):
        time.sleep(0.05)
    assert seen and not any(_alive(w) for w in seen)


def test_command_outputs_honour_the_umask(kit, tmp_path: Path, capsys) -> None:
    """GGUF, curves, sweep results, summaries and profiles get open()'s permissions."""
    from corpus_kit import assert_ok

    old = os.umask(0o027)
    try:
        outs = {
            "gguf": tmp_path / "e.gguf",
            "mrc": tmp_path / "m.parquet",
            "sweep": tmp_path / "s.parquet",
            "summary": tmp_path / "sum.json",
            "profile": tmp_path / "cal.json",
        }
        assert_ok(["experts", "synth", "--shape", "mixtral-tiny", "-o", outs["gguf"]], capsys)
        assert_ok(["mrc", kit.trace, "--sizes", "4", "-o", outs["mrc"], "--no-progress"], capsys)
        assert_ok(
            [
                "sweep",
                kit.mix,
                "--hardware",
                kit.profile,
                "-o",
                outs["sweep"],
                "--jobs",
                "1",
                "--no-progress",
                "--cache-slots",
                "8",
            ],
            capsys,
        )
        assert_ok(
            ["run", kit.mix, "--experts", kit.gguf, "--no-progress", "--summary", outs["summary"]],
            capsys,
        )
        assert_ok(
            ["calibrate", outs["summary"], "--hardware", kit.profile, "-o", outs["profile"]], capsys
        )
        ref = tmp_path / "plain"
        ref.write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    want = stat.S_IMODE(ref.stat().st_mode)
    assert want == 0o640
    for name, p in outs.items():
        assert stat.S_IMODE(p.stat().st_mode) == want, name
