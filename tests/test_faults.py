"""Fault injection: processes killed mid-work, concurrent writers, a full disk, a file
truncated under a running engine, io_uring and O_DIRECT unavailable.

Where a process boundary matters (signals, orphans) the real `mer` runs as a
subprocess, in its own session, with a timeout on every wait. The promises
checked are docs/reliability.md's: nothing lost, nothing destroyed, no orphan
worker, no stray temporary file once the next run is done, and resume gives
exactly what an uninterrupted run gives.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from corpus_kit import Kit, run_cli, small_trace

from mer.traces.format import write_trace

WAIT_S = 120


def _default_sigint() -> None:
    # A suite started in the background (`make test &`, nohup, some CI runners) inherits
    # SIGINT ignored, and a program rightly keeps an inherited "ignore"; the child here
    # stands for a command typed at a terminal, where Ctrl-C is live.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mer(*args: Any, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mer", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_default_sigint,
    )


def finish(p: subprocess.Popen[str], timeout: float = WAIT_S) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"hung: {p.args}\n{err}") from None
    return p.returncode, out, err


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(cond: Any, timeout: float = WAIT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_and_check_no_orphans(p: subprocess.Popen[str], sig: int = signal.SIGKILL) -> set[int]:
    """Signal the parent only; every worker it had must be gone within seconds."""
    workers = descendants(p.pid)
    os.kill(p.pid, sig)
    p.wait(WAIT_S)
    wait_for(lambda: not any(alive(w) for w in workers), 15, f"workers {workers} to die")
    return workers


def stray(d: Path) -> list[Path]:
    return sorted(x for x in d.rglob(".*.tmp"))


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 x 8 routing, long enough that a sweep or an mrc runs for seconds."""
    return write_trace(
        small_trace(n_tokens=150, n_layers=32, seed=7, prefill=8),
        tmp_path_factory.mktemp("long") / "long.parquet",
    )


# The prefetch path (a predictor) keeps each configuration slow enough (about 0.2 s)
# that a signal sent after the first result still lands mid-sweep on an idle machine;
# prefetch-off configurations finish in milliseconds and the sweep could end first.
SWEEP = [
    "--policies",
    "lru,s3fifo",
    "--cache-slots",
    "8,16,24,32,48,64,96,128",
    "--predictors",
    "previous-token",
]
N_SWEEP = 16


def _sweep_args(trace: Path, kit: Kit, out: Path) -> list[Any]:
    """The interrupted sweep of these tests; the last five items are its output and jobs."""
    return [
        "sweep",
        trace,
        *SWEEP,
        "--hardware",
        kit.profile,
        "-o",
        out,
        "--jobs",
        "2",
        "--no-progress",
    ]


def _rows(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path).drop(columns=["sim_seconds", "trace"])
    return df.sort_values("config_hash").reset_index(drop=True)


def test_kill9_mid_sweep_no_orphans_and_exact_resume(
    long_trace: Path, kit: Kit, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "sweep.parquet"
    args = _sweep_args(long_trace, kit, out)
    p = mer(*args)
    wait_for(
        lambda: out.exists() and len(descendants(p.pid)) >= 2, what="a first result and workers"
    )
    workers = kill_and_check_no_orphans(p)
    assert len(workers) >= 2
    done = len(pd.read_parquet(out))
    assert 1 <= done < N_SWEEP  # killed mid-way, the finished rows are there
    r = run_cli([*args, "--json"], capsys)  # the rerun resumes (no process boundary needed)
    no_traceback(r.err)
    assert r.rc == 0, r.err
    summary = json.loads(r.out)
    assert summary["skipped"] == done and summary["ran"] == N_SWEEP - done
    assert stray(tmp_path) == []
    ref = tmp_path / "ref.parquet"  # uninterrupted, in this process
    r = run_cli([*args[:-5], "-o", ref, "--jobs", "1", "--no-progress"], capsys)
    assert r.rc == 0, r.err
    pd.testing.assert_frame_equal(_rows(out), _rows(ref))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_sweep(long_trace: Path, kit: Kit, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "sweep.parquet"
    p = mer(*_sweep_args(long_trace, kit, out))
    wait_for(lambda: out.exists() and len(descendants(p.pid)) >= 2, what="workers")
    workers = descendants(p.pid)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)  # Ctrl-C reaches the whole process group
    else:
        os.kill(p.pid, sig)
    rc, _, err = finish(p)
    no_traceback(err)
    assert rc == (143 if sig == signal.SIGTERM else 130), err
    assert "rerun to resume" in err
    wait_for(lambda: not any(alive(w) for w in workers), 15, "workers to die")
    assert stray(tmp_path) == []
    assert len(pd.read_parquet(out)) >= 1


@pytest.fixture(scope="module")
def longer_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten times longer: an all-sizes mrc of it runs for many seconds (killed after one)."""
    return write_trace(
        small_trace(n_tokens=1500, n_layers=32, seed=7, prefill=8),
        tmp_path_factory.mktemp("longer") / "longer.parquet",
    )


def test_kill9_mid_mrc_no_orphans(long_trace: Path, longer_trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "mrc.parquet"
    p = mer(
        "mrc",
        longer_trace,
        "-o",
        out,
        "--policies",
        "fifo,clock,sieve,arc,s3fifo,lfu",
        "--processes",
        "2",
    )
    wait_for(lambda: len(descendants(p.pid)) >= 2, what="mrc workers")
    time.sleep(0.5)
    assert p.poll() is None, "mrc finished before it could be killed"
    kill_and_check_no_orphans(p)
    assert not out.exists() and stray(tmp_path) == []
    # rerun (a smaller grid) completes and gives the clock-free replay's hit counts
    rc, _, err = finish(
        mer(
            "mrc",
            long_trace,
            "-o",
            out,
            "--policies",
            "fifo",
            "--scopes",
            "global",
            "--sizes",
            "8,64",
            "--processes",
            "2",
        )
    )
    assert rc == 0, err
    from mer.core import Replay, ReplayConfig, replay_counts
    from mer.traces.format import read_trace

    tr = read_trace(long_trace)
    df = pd.read_parquet(out)
    for size in (8, 64):
        cfg = ReplayConfig(policy="fifo", cache_slots=size)
        hits = replay_counts(Replay.from_trace(tr, cfg)).total("hits")
        row = df[(df.policy == "fifo") & (df.cache_slots == size)]
        assert int(row.hits.iloc[0]) == hits


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def test_kill_mid_synth_temp_files_and_exact_rerun(tmp_path: Path, capsys) -> None:
    """SIGTERM removes the temporary file at once; kill -9 cannot, so the next run does."""
    from mer.shapes import get_shape

    shape = "mixtral-small"  # 378 MiB: a second or more to write
    out = tmp_path / "e.gguf"

    def temp_grown() -> bool:
        return any(t.stat().st_size > 32 << 20 for t in stray(tmp_path) if t.exists())

    p = mer("experts", "synth", "--shape", shape, "-o", out)
    wait_for(temp_grown, what="the temporary file to grow")
    os.kill(p.pid, signal.SIGTERM)
    rc, _, err = finish(p)
    no_traceback(err)
    assert rc == 143 and stray(tmp_path) == [] and not out.exists(), err

    p = mer("experts", "synth", "--shape", shape, "-o", out)
    wait_for(temp_grown, what="the temporary file to grow")
    os.kill(p.pid, signal.SIGKILL)
    p.wait(WAIT_S)
    left = stray(tmp_path)
    assert len(left) == 1 and not out.exists()  # what kill -9 leaves
    r = run_cli(["experts", "synth", "--shape", shape, "-o", out], capsys)  # the next run
    assert r.rc == 0, r.err
    assert "removed" in r.err and left[0].name in r.err and "interrupted run" in r.err
    assert stray(tmp_path) == []
    # exactly what an uninterrupted run writes: every tensor's bytes from the seeded
    # generator at the offsets the file's own table gives, and nothing after the padding
    from gguf import GGUFReader

    from mer.engine.gguf_synth import plan_tensors, tensor_data

    specs = {s.name: s for s in plan_tensors(get_shape(shape))}
    reader = GGUFReader(str(out))
    assert sorted(t.name for t in reader.tensors) == sorted(specs)
    for t in reader.tensors[:4] + reader.tensors[-4:]:
        want = np.asarray(tensor_data(specs[t.name], 0)).view(np.uint8).reshape(-1)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want), t.name
    last = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert out.stat().st_size == -(-last // 4096) * 4096


@pytest.mark.record
def test_kill9_mid_record_resumes_exactly(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_record import _build, _tokenizer

    model = tmp_path / "tiny-mixtral"
    _build("mixtral").save_pretrained(model)
    _tokenizer().save_pretrained(model)
    words = ["alpha", "beta", "gamma", "delta"]
    prompts = tmp_path / "prompts.txt"
    n = 8
    prompts.write_text(
        "".join(f"{words[i % 4]} {words[(i * 3) % 4]} {words[(i + 1) % 4]}\n" for i in range(n))
    )
    out = tmp_path / "rec.parquet"
    args = [
        "record",
        "--model",
        model,
        "--prompts",
        prompts,
        "-o",
        out,
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--quiet",
        "--device",
        "cpu",
    ]
    p = mer(*args)
    parts = out.with_name(out.name + ".parts")
    wait_for(lambda: len(list(parts.glob("part-*.parquet"))) >= 2, what="two finished prompts")
    os.kill(p.pid, signal.SIGKILL)
    p.wait(WAIT_S)
    n_parts = len(list(parts.glob("part-*.parquet")))
    assert not out.exists() and n_parts < n
    r = run_cli([*args, "--json"], capsys)  # the rerun resumes, in this process
    no_traceback(r.err)
    assert r.rc == 0, r.err
    assert json.loads(r.out)["resumed_prompts"] >= n_parts
    assert not parts.exists() and stray(tmp_path) == []
    ref = tmp_path / "ref.parquet"  # uninterrupted, in this process
    r = run_cli([ref if a == out else a for a in args], capsys)
    assert r.rc == 0, r.err
    a = pd.read_parquet(out)
    b = pd.read_parquet(ref)
    pd.testing.assert_frame_equal(a, b)


def test_two_concurrent_sweeps_into_one_file(kit: Kit, tmp_path: Path) -> None:
    out = tmp_path / "shared.parquet"
    sizes = ",".join(str(s) for s in range(4, 44, 4))  # 10 sizes
    base = [
        "--hardware",
        kit.profile,
        "-o",
        out,
        "--jobs",
        "1",
        "--no-progress",
        "--cache-slots",
        sizes,
    ]
    a = mer("sweep", kit.mix, "--policies", "lru,fifo", *base)
    b = mer("sweep", kit.mix, "--policies", "clock,sieve", *base)
    for p in (a, b):
        rc, _, err = finish(p)
        no_traceback(err)
        assert rc == 0, err
    df = pd.read_parquet(out)
    assert len(df) == 40 and df["config_hash"].nunique() == 40
    assert sorted(df["policy"].unique()) == ["clock", "fifo", "lru", "sieve"]
    assert stray(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> None:
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_disk_full(kit: Kit, tiny_tmpfs: Path, capsys) -> None:
    mnt = tiny_tmpfs
    # known size: refused before any work
    r = run_cli(["experts", "synth", "--shape", "mixtral-tiny", "-o", mnt / "e.gguf"], capsys)
    assert r.rc == 2 and "MiB free" in r.err and list(mnt.iterdir()) == []
    # unknown size: the results print, then what could not be written; nothing half-written
    _fill(mnt, 8192)
    r = run_cli(
        [
            "simulate",
            kit.mix,
            "--hardware",
            kit.profile,
            "--json",
            "-o",
            mnt / "t.parquet",
            "--summary",
            mnt / "s.json",
        ],
        capsys,
    )
    no_traceback(r.err)
    assert r.rc == 1, r.err
    summary = json.loads(r.out)  # the results are on stdout, whole
    assert summary["tokens"] == 6
    assert "could not write" in r.err and "No space left" in r.err
    assert sorted(p.name for p in mnt.iterdir()) <= ["filler", "s.json"] and stray(mnt) == []
    # a sweep stops at the first result it cannot keep, saying so
    (mnt / "s.json").unlink(missing_ok=True)
    r = run_cli(
        [
            "sweep",
            kit.mix,
            "--hardware",
            kit.profile,
            "-o",
            mnt / "sw.parquet",
            "--jobs",
            "1",
            "--no-progress",
            "--cache-slots",
            "8,16",
        ],
        capsys,
    )
    no_traceback(r.err)
    assert r.rc == 1 and "could not write the sweep results" in r.err, r.err
    assert stray(mnt) == [] and not (mnt / "sw.parquet").exists()


def reading_without_mmap(pid: int, path: Path, timeout: float = 120.0) -> None:
    """Wait until the run holds `path` open for its reads and no longer maps it.

    The GGUF header is parsed through gguf's memory map; cutting the file while
    that map is being read kills the process with SIGBUS, which no program can
    turn into a message. On a loaded machine a fixed sleep landed inside that
    window, so the test waits for the state it means to test: reads under way.
    """
    target = str(path.resolve())
    deadline = time.monotonic() + timeout
    time.sleep(1.0)
    steady = 0
    while time.monotonic() < deadline and steady < 3:
        try:
            fds = {os.path.realpath(f) for f in Path(f"/proc/{pid}/fd").iterdir()}
            mapped = target in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return  # the process ended; the caller's poll() says so
        steady = steady + 1 if target in fds and not mapped else 0
        time.sleep(0.3)


def test_expert_file_truncated_mid_run(kit: Kit, tmp_path: Path) -> None:
    import shutil

    gguf = tmp_path / "e.gguf"
    shutil.copy(kit.gguf, gguf)
    trace = write_trace(
        small_trace(n_tokens=3000, n_layers=32, seed=3, prefill=0), tmp_path / "t.parquet"
    )
    summary = tmp_path / "s.json"
    p = mer(
        "run",
        trace,
        "--experts",
        gguf,
        "--cache-slots",
        "8",
        "--summary",
        summary,
        "--no-progress",
        "--threads",
        "1",
    )
    reading_without_mmap(p.pid, gguf)
    assert p.poll() is None, "the run finished before the file could be cut"
    with open(gguf, "r+b") as fh:
        fh.truncate(8192)
    rc, _, err = finish(p)
    no_traceback(err)
    assert rc == 1, err
    assert str(gguf) in err and ("short read" in err or "truncated" in err or "end of" in err), err
    assert not summary.exists() and stray(tmp_path) == []


def test_io_uring_disabled_is_one_plain_note(kit: Kit) -> None:
    rc, out, err = finish(
        mer(
            "run",
            kit.mix,
            "--experts",
            kit.gguf,
            "--no-progress",
            "--json",
            env={"MER_NO_NATIVE": "1"},
        )
    )
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "io_uring" in line]
    assert len(notes) == 1 and notes[0].startswith("mer: "), err
    assert "Warning" not in err and "warnings.warn" not in err and "note_once(" not in err
    assert json.loads(out)["extra"]["io"]["kind"] == "pread"


def test_o_direct_refused_is_one_plain_note(kit: Kit, monkeypatch, capsys) -> None:
    from mer import notes

    notes.reset_notes()
    real_open = os.open

    def no_direct(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    r = run_cli(["run", kit.mix, "--experts", kit.gguf, "--no-progress", "--json"], capsys)
    assert r.rc == 0, r.err
    notes_ = [line for line in r.err.splitlines() if "O_DIRECT" in line]
    assert len(notes_) == 1 and notes_[0].startswith("mer: "), r.err
    assert "Warning:" not in r.err and "warn(" not in r.err
    assert json.loads(r.out)["extra"]["io"]["direct"] is False
