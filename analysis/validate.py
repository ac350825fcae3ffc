"""`mer validate`: calibrate once, then predict held-out real runs and measure them.

The steps, on one machine (`Machine`: the real engine, or a model of one for
tests):

1. start from a hardware profile (probed, bundled or a file);
2. one calibration run of a configuration outside the grid (CALIBRATION_LENGTH
   times as many tokens as a held-out run, so its own noise is smaller), and
   `mer calibrate` on it (with the trace: the SSD is fitted by simulating it; an
   I/O-bound run refits only the I/O parameters, `calibrate.identifies`);
3. predict every configuration of the grid with the profile before and after
   calibration;
4. run every configuration `repeats` times for real, in rounds (each round in
   a rotated order, so slow moments of a shared machine do not all fall on
   one configuration); before each round a short pulse (FFN, dense block, a
   burst of reads) is held against the pulse taken right after the last
   calibration, and if any part moved by more than `drift` the calibration run
   is repeated and the profile refitted (from the starting profile) before
   the round; the predictions of that round come from the new profile;
5. the tidy table (`validation_table`), its summary, the figure and a
   Markdown section (`validation_report`).

Every real run and the state are written as they finish, so an interrupted
validation resumes where it stopped (same directory, same arguments).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from mer.analysis.calibrate import calibrate
from mer.analysis.validation_grid import Grid, GridConfig
from mer.analysis.validation_pulse import (
    COMPUTE_STAGE,
    compute_per_read,
    compute_pulse_stats,
    pulse_token_compute,
    run_compute,
)
from mer.analysis.validation_table import PULSE_STAGE, build_table, median_se, summarize
from mer.atomic import write_json_atomic, write_text_atomic
from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim.hardware import HardwareProfile
from mer.sim.model import SimOptions, simulate
from mer.summary import RunSummary

Log = Callable[[str], None]


class Machine(Protocol):
    """Where real runs happen: runs a configuration and checks its own speed."""

    description: str

    def run(self, cfg: GridConfig, tokens: int) -> RunSummary: ...

    def pulse(self) -> dict[str, float]: ...

    def disk_pulse(self) -> float: ...

    def compute_pulse(self) -> dict[str, float]: ...

    def sim_options(self, cfg: GridConfig) -> SimOptions: ...


def huge_share(extra: dict[str, Any]) -> float:
    """Share of a measured run's slot buffers the kernel put on huge pages (nan if none)."""
    total = float(extra.get("cache_buffer_bytes", 0) or 0)
    huge = float(extra.get("huge_pages", {}).get("cache_huge_bytes", 0) or 0)
    return huge / total if total else float("nan")


class EngineMachine:
    """The real engine (`mer run`'s executor) on an expert file, in this process."""

    def __init__(
        self, trace: Any, trace_path: Path, experts: Path, engine: Any, *, digest: str = ""
    ) -> None:
        from mer.engine.store import ExpertStore, read_bytes_by_key, typical_read_ranges

        self.trace = trace
        self.trace_path = trace_path
        self.experts = experts
        self.store = ExpertStore.open(experts)
        self.engine = engine  # EngineConfig: the defaults every configuration starts from
        self.digest = digest
        self.pulses = 0
        self.read_ranges = typical_read_ranges(self.store)
        self.key_bytes = read_bytes_by_key(self.store)
        self.description = (
            f"this machine, expert file {experts.name} ({self.store.shape.name}), "
            f"{engine.io} reads, queue depth {engine.queue_depth}, chunk "
            f"{engine.chunk_bytes >> 10} KiB, {engine.threads} threads"
            + ("" if getattr(engine, "huge_pages", True) else ", 4 KiB-page buffers")
        )

    def run(self, cfg: GridConfig, tokens: int) -> RunSummary:
        import warnings

        from mer.engine.executor import Executor

        ecfg = copy.deepcopy(self.engine)
        for k, v in cfg.engine_overrides().items():
            setattr(ecfg, k, v)
        ecfg.progress = False
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            ex = Executor(
                self.trace,
                self.store,
                cfg.replay_config(tokens),
                ecfg,
                trace_name=self.trace_path.name,
                trace_digest=self.digest,
                store_path=str(self.experts),
            )
            got = ex.run()
        s = got.summary
        # the run's own compute per token (FFNs + dense blocks), to see the CPU's speed
        # change within a run (`validation_pulse.run_compute`)
        tk = got.tokens
        s.extra["token_compute_s"] = [
            float(v) for v in (tk["compute_s"] + tk["dense_s"]).to_numpy(dtype=float)
        ]
        s.extra["token_misses"] = [int(v) for v in tk["misses"].to_numpy()]
        return s

    def compute_pulse(self) -> dict[str, float]:
        """The engine's FFN, dense-block and per-step figures now (`probe.compute_pulse`:
        the executor on this expert file, every step resident), each pulse routing other
        random experts."""
        from mer.engine.probe import compute_pulse

        self.pulses += 1
        return compute_pulse(self.store, self.engine, seed=self.pulses)

    def pulse(self) -> dict[str, float]:
        from mer.engine.probe import pulse

        return pulse(
            self.store,
            io=self.engine.io,
            threads=self.engine.threads,
            chunk_bytes=self.engine.chunk_bytes,
        )

    def disk_pulse(self) -> float:
        """The expert file's read rate now, in bytes/s (`probe.disk_pulse`), each pulse
        on other random experts."""
        from mer.engine.probe import disk_pulse

        self.pulses += 1
        return disk_pulse(
            self.store,
            io=self.engine.io,
            queue_depth=self.engine.queue_depth,
            chunk_bytes=self.engine.chunk_bytes,
            experts=PULSE_EXPERTS,
            seed=self.pulses,
        )["read_bytes_per_s"]

    def sim_options(self, cfg: GridConfig) -> SimOptions:
        return SimOptions(
            shape=self.store.shape.name,
            read_ranges=self.read_ranges,
            key_read_bytes=self.key_bytes,
            queue_depth=cfg.queue_depth or self.engine.queue_depth,
            chunk_bytes=cfg.chunk_bytes or self.engine.chunk_bytes,
        )


class ModelMachine:
    """A machine that behaves exactly as the simulator says on a hidden `truth` profile
    (optionally slowed by `slowdown(run_index)`): the synthetic disk and CPU against
    which a calibrated prediction must be exact. For tests and for checking a grid.
    `disk_slowdown(run_index)` slows the device alone (bandwidth / f, latencies x f), as
    a shared disk does; `disk_pulse` reports the device's bandwidth at that moment."""

    def __init__(
        self,
        trace: Any,
        truth: HardwareProfile,
        *,
        shape: str,
        read_ranges: tuple[int, ...] | None = None,
        queue_depth: int = 32,
        chunk_bytes: int = 512 << 10,
        slowdown: Callable[[int], float] | None = None,
        disk_slowdown: Callable[[int], float] | None = None,
    ) -> None:
        self.trace = trace
        self.truth = truth
        self.shape = shape
        self.read_ranges = read_ranges
        self.queue_depth = queue_depth
        self.chunk_bytes = chunk_bytes
        self.slowdown = slowdown or (lambda _i: 1.0)
        self.disk_slowdown = disk_slowdown or (lambda _i: 1.0)
        self.runs = 0
        self.description = f"a model of a machine (profile {truth.name})"

    def profile_now(self) -> HardwareProfile:
        p = copy.deepcopy(self.truth)
        f = self.slowdown(self.runs)
        p.compute.ffn_bytes_per_s /= f
        return scale_ssd(p, 1.0 / self.disk_slowdown(self.runs))

    def run(self, cfg: GridConfig, tokens: int) -> RunSummary:
        s = simulate(
            self.trace, cfg.replay_config(tokens), self.profile_now(), self.sim_options(cfg)
        )
        self.runs += 1
        d = s.summary.to_dict()
        d.update(kind="measured", hardware=self.description)
        d["extra"]["io"] = {
            "queue_depth": cfg.queue_depth or self.queue_depth,
            "chunk_bytes": cfg.chunk_bytes or self.chunk_bytes,
        }
        return RunSummary.from_dict(d)

    def pulse(self) -> dict[str, float]:
        return {"ffn_s": 1.0 / self.profile_now().compute.ffn_bytes_per_s}

    def disk_pulse(self) -> float:
        return self.profile_now().ssd.bandwidth_bytes_per_s

    def compute_pulse(self) -> dict[str, float]:
        """The compute figures the next run will get, exactly (what a perfect pulse sees)."""
        c = self.profile_now().compute
        sh = get_shape(self.shape)
        return {
            "ffn_s": c.ffn_time(sh.bytes_per_expert),
            "dense_s": c.dense_time(sh.dense_bytes_per_layer),
            "step_s": c.step_overhead_s,
        }

    def sim_options(self, cfg: GridConfig) -> SimOptions:
        return SimOptions(
            shape=self.shape,
            read_ranges=self.read_ranges,
            queue_depth=cfg.queue_depth or self.queue_depth,
            chunk_bytes=cfg.chunk_bytes or self.chunk_bytes,
        )


#: The calibration run is this many times as long as a held-out run (unless its
#: configuration sets its own tokens): a 32-token run of it moved the fitted SSD bandwidth
#: by up to 2.8x from one round to the next on a shared VM disk (bench_calibration.py).
CALIBRATION_LENGTH = 4
#: The figures of a compute pulse (`probe.compute_pulse`), per expert FFN, dense block, step.
PULSE_KEYS = ("ffn_s", "dense_s", "step_s")
#: Experts a disk pulse reads (about 50 MB of mixtral-small, a twentieth of a second).
PULSE_EXPERTS = 32


@dataclass
class ValidateOptions:
    tokens: int = 32
    repeats: int = 3
    #: tokens of the calibration run (None: CALIBRATION_LENGTH x tokens)
    calibration_tokens: int | None = None
    drift: float = 0.15  # largest relative change of a pulse figure before recalibrating
    sim_engine: str = "fast"
    #: pulse the disk before every held-out run and predict it also with the calibrated
    #: SSD scaled by that pulse over the calibration run's (the "pulse-scaled" stage)
    pulse_scale: bool = False
    #: a compute pulse (the engine's FFN, dense block and step, `probe.compute_pulse`) right
    #: before and after every held-out run, and each run predicted also with the compute
    #: figures of the pulse before it (the "compute-pulse" stage, then the headline)
    compute_pulse: bool = True
    #: more rounds, up to this many, while the median (over configurations) of the measured
    #: medians' standard error of tokens/s is above target_se (None: exactly `repeats`)
    max_repeats: int | None = None
    target_se: float = 0.025

    def check(self) -> ValidateOptions:
        if not 1 <= self.tokens <= 1 << 20:
            raise BadInput(f"--tokens must be from 1 to {1 << 20}, got {self.tokens}.")
        if self.calibration_tokens is not None and not 1 <= self.calibration_tokens <= 1 << 20:
            raise BadInput(
                f"--calibration-tokens must be from 1 to {1 << 20}, got {self.calibration_tokens}."
            )
        if not 1 <= self.repeats <= 100:
            raise BadInput(f"--repeats must be from 1 to 100, got {self.repeats}.")
        if self.max_repeats is not None and not self.repeats <= self.max_repeats <= 100:
            raise BadInput(
                f"--max-repeats must be from --repeats ({self.repeats}) to 100, got "
                f"{self.max_repeats}."
            )
        if not 0 < self.target_se < 1:
            raise BadInput(
                f"--target-se must be a share between 0 and 1 (0.025 = 2.5%), got {self.target_se}."
            )
        if not 0 < self.drift <= 10:
            raise BadInput(f"--drift must be a share above 0 (0.15 = 15%), got {self.drift}.")
        return self

    @property
    def most_repeats(self) -> int:
        return self.max_repeats if self.max_repeats is not None else self.repeats

    @property
    def cal_tokens(self) -> int:
        return self.calibration_tokens or CALIBRATION_LENGTH * self.tokens


@dataclass
class ValidationResult:
    table: pd.DataFrame
    summary: dict[str, Any]
    runs: pd.DataFrame
    profiles: list[HardwareProfile] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)


def with_compute(profile: HardwareProfile, pulse: dict[str, float], shape: str) -> HardwareProfile:
    """A copy of `profile` whose FFN, dense-block and per-step figures are a compute pulse's
    (`probe.compute_pulse`, the same measurement as the probe's engine step): the CPU's
    speed right before the run it predicts, not a fit to that run. The device and the
    per-read costs stay the calibrated ones."""
    p = copy.deepcopy(profile)
    sh = get_shape(shape)
    p.compute.ffn_bytes_per_s = sh.bytes_per_expert / pulse["ffn_s"]
    p.compute.dense_s_per_layer = None
    p.compute.dense_bytes_per_s = sh.dense_bytes_per_layer / pulse["dense_s"]
    p.compute.step_overhead_s = pulse["step_s"]
    return p


def scale_ssd(profile: HardwareProfile, ratio: float) -> HardwareProfile:
    """A copy of `profile` whose device runs `ratio` times as fast: bandwidth x ratio,
    the device's per-chunk and per-read latencies / ratio (the CPU's submission and
    reaping costs unchanged). `ratio` is a disk pulse now over the pulse taken at
    calibration: a probe of the machine, not a fit to the run it predicts."""
    p = copy.deepcopy(profile)
    p.ssd.bandwidth_bytes_per_s *= ratio
    p.ssd.latency_s /= ratio
    p.ssd.access_latency_s /= ratio
    return p


def median_se_of(measured: dict[str, list[RunSummary]]) -> float:
    """The median over configurations of the relative standard error of each one's
    measured median tokens/s (inf while any configuration has fewer than 2 runs)."""
    ses = []
    for runs in measured.values():
        v = np.array([r.tokens_per_s for r in runs], dtype=float)
        med = float(np.median(v)) if v.size else 0.0
        se = median_se(v)
        if not med or se != se:
            return math.inf
        ses.append(se / med)
    return float(np.median(ses)) if ses else math.inf


def cpu_wait_summary(runs: pd.DataFrame) -> dict[str, float | None]:
    """How much of each run its driver spent waiting for a core (median, range), and the
    correlation over runs of that share with log(measured / predicted tokens/s): on a
    shared machine most of the runs' noise, which no pulse before a run foresees."""
    if runs.empty or "cpu_wait_share" not in runs:
        return {"median": None, "min": None, "max": None, "r_with_error": None}
    w = runs["cpu_wait_share"].to_numpy(dtype=float)
    x = np.log(
        runs["tokens_per_s"].to_numpy(dtype=float)
        / runs["predicted_tokens_per_s"].to_numpy(dtype=float)
    )
    ok = np.isfinite(w) & np.isfinite(x)
    r = None
    if ok.sum() >= 3 and np.std(w[ok]) > 0 and np.std(x[ok]) > 0:
        r = float(np.corrcoef(w[ok], x[ok])[0, 1])
    if not ok.any():
        return {"median": None, "min": None, "max": None, "r_with_error": r}
    return {
        "median": float(np.median(w[ok])),
        "min": float(w[ok].min()),
        "max": float(w[ok].max()),
        "r_with_error": r,
    }


def _drift(now: dict[str, float], ref: dict[str, float]) -> float:
    keys = [k for k in ref if k in now and ref[k] > 0]
    return max((abs(now[k] / ref[k] - 1) for k in keys), default=0.0)


class _Store:
    """The validation directory: runs, profiles and state, each written atomically."""

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.runs_dir = out / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "state.json"
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "events": [], "rounds": {}}
        if self.state_path.exists():
            try:
                old = json.loads(self.state_path.read_text())
            except (OSError, ValueError, RecursionError):
                old = None  # a damaged state file: start over rather than trust it
            if isinstance(old, dict) and old.get("fingerprint") == fingerprint:
                self.state = old

    def save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def run_path(self, name: str) -> Path:
        return self.runs_dir / f"{name}.json"

    def load_run(self, name: str) -> RunSummary | None:
        p = self.run_path(name)
        if not p.exists() or name not in self.state.get("done", []):
            return None
        try:
            return RunSummary.load(p)
        except BadInput:
            return None

    def save_run(self, name: str, summary: RunSummary) -> None:
        summary.save(self.run_path(name))
        self.state.setdefault("done", []).append(name)
        self.save_state()


def run_validation(
    machine: Machine,
    trace: Any,
    grid: Grid,
    profile: HardwareProfile,
    out_dir: str | Path,
    opts: ValidateOptions | None = None,
    *,
    log: Log | None = None,
) -> ValidationResult:
    """Calibrate, predict, run, compare (see the module docstring); writes into out_dir."""
    o = (opts or ValidateOptions()).check()
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(out_dir)
    fp = {
        "grid": [c.to_dict() for c in (grid.calibration, *grid.configs)],
        "tokens": o.tokens,
        "calibration_tokens": o.cal_tokens,
        "repeats": o.repeats,
        "max_repeats": o.most_repeats,
        "target_se": o.target_se,
        "pulse_scale": o.pulse_scale,
        "compute_pulse": o.compute_pulse,
        "profile": profile.to_dict(),
        "machine": machine.description,
        "trace": getattr(trace, "name", ""),
    }
    st = _Store(out, fp)
    t_start = time.perf_counter()
    configs = list(grid.configs)

    def sim(cfg: GridConfig, prof: HardwareProfile) -> RunSummary:
        so = machine.sim_options(cfg)
        so.engine = o.sim_engine
        return simulate(trace, cfg.replay_config(o.tokens), prof, so).summary

    def real(name: str, cfg: GridConfig, tokens: int) -> RunSummary:
        got = st.load_run(name)
        if got is not None:
            say(f"validate: {name}: kept from an earlier, interrupted validation")
            return got
        t0 = time.perf_counter()
        s = machine.run(cfg, tokens)
        s.extra["validate"] = {
            "config": cfg.to_dict(),
            "run": name,
            "tokens": cfg.tokens or tokens,
        }
        st.save_run(name, s)
        say(
            f"validate: {name}: {s.tokens_per_s:.3f} tokens/s, I/O share "
            f"{s.io_wait_share * 100:.0f}% ({time.perf_counter() - t0:.1f} s)"
        )
        return s

    profiles: list[HardwareProfile] = []
    cal_runs: list[RunSummary] = []
    disk_ref: dict[int, float] = {}  # profile version -> the calibration run's disk pulse

    def disk_pulse(key: str, fresh: bool) -> float:
        """The disk pulse stored under `key`, taken now unless kept (and not `fresh`)."""
        dp = st.state.setdefault("disk_pulses", {})
        if fresh or key not in dp:
            dp[key] = machine.disk_pulse()
            st.save_state()
        return float(dp[key])

    def compute_pulse(key: str, fresh: bool) -> dict[str, float]:
        """The compute pulse stored under `key`, taken now unless kept (and not `fresh`)."""
        cp = st.state.setdefault("compute_pulses", {})
        if fresh or key not in cp:
            cp[key] = machine.compute_pulse()
            st.save_state()
        return {k: float(v) for k, v in cp[key].items()}

    def recalibrate(tag: str) -> tuple[HardwareProfile, dict[str, float]]:
        name = f"calibration-{tag}"
        if o.pulse_scale:
            before = disk_pulse(f"{name}:before", st.load_run(name) is None)
        run = real(name, grid.calibration, o.cal_tokens)
        if o.pulse_scale:
            # the calibration run spans both pulses: their geometric mean is its disk
            disk_ref[int(tag)] = math.sqrt(before * disk_pulse(f"{name}:after", False))
        cal = calibrate(run, profile, trace=trace)
        prof = cal.profile
        prof.name = f"{profile.name}-calibrated-{tag}"
        prof.save(out / f"profile-calibrated-{tag}.json")
        say("validate: " + cal.format_text().replace("\n", "\nvalidate: "))
        pulse = st.state.setdefault("pulses", {}).get(tag) or machine.pulse()
        st.state["pulses"][tag] = pulse
        st.save_state()
        profiles.append(prof)
        cal_runs.append(run)
        return prof, pulse

    profile.save(out / "profile-start.json")
    say(
        f"validate: calibration run ({grid.calibration.describe()}), "
        f"{grid.calibration.tokens or o.cal_tokens} tokens"
    )
    current, ref = recalibrate("0")
    version = 0
    before = {c.name: sim(c, profile) for c in configs}
    after_by_version = {0: {c.name: sim(c, current) for c in configs}}
    measured: dict[str, list[RunSummary]] = {c.name: [] for c in configs}
    pred_before: dict[str, list[RunSummary]] = {c.name: [] for c in configs}
    pred_after: dict[str, list[RunSummary]] = {c.name: [] for c in configs}
    pred_pulse: dict[str, list[RunSummary]] = {c.name: [] for c in configs}
    pred_compute: dict[str, list[RunSummary]] = {c.name: [] for c in configs}
    sh = machine.sim_options(configs[0]).shape if configs else None
    shape = sh if isinstance(sh, str) else getattr(sh, "name", "")
    run_rows: list[dict[str, Any]] = []
    rnd = -1
    while True:
        rnd += 1
        if rnd >= o.repeats:
            se = median_se_of(measured)
            if rnd >= o.most_repeats or se <= o.target_se:
                if o.most_repeats > o.repeats:
                    say(
                        f"validate: {rnd} rounds; the measured medians' standard error is "
                        f"{se * 100:.1f}% (median over configurations; target "
                        f"{o.target_se * 100:.1f}%)"
                    )
                break
            say(
                f"validate: the measured medians' standard error is {se * 100:.1f}% "
                f"(median over configurations), above {o.target_se * 100:.1f}%: one more round"
            )
        rkey = str(rnd)
        rstate = st.state["rounds"].get(rkey)
        if rstate is None:
            rstate = {"pulse": ref, "drift": 0.0, "version": version}
            if rnd > 0:
                now = machine.pulse()
                moved = _drift(now, ref)
                rstate.update(pulse=now, drift=moved)
                if moved > o.drift:
                    say(
                        f"validate: the machine drifted by {moved * 100:.0f}% (pulse) since the "
                        "last calibration; recalibrating before this round"
                    )
                    rstate["version"] = version + 1
                    st.state["events"].append(
                        {"round": rnd, "drift": moved, "pulse": now, "reference": ref}
                    )
            st.state["rounds"][rkey] = rstate
            st.save_state()
        if rstate["version"] != version:
            version = int(rstate["version"])
            current, ref = recalibrate(str(version))
            after_by_version[version] = {c.name: sim(c, current) for c in configs}
        shift = rnd % len(configs)
        for cfg in configs[shift:] + configs[:shift]:
            name = f"{cfg.name}-r{rnd}"
            ratio = float("nan")
            if o.pulse_scale:
                # a pulse right before the run (kept with it when the run is kept)
                rate = disk_pulse(f"{name}:before", st.load_run(name) is None)
                ratio = rate / disk_ref[version]
            cp_before: dict[str, float] = {}
            cp_after: dict[str, float] = {}
            if o.compute_pulse:
                # right before the run (and right after it): kept with it when it is kept
                cp_before = compute_pulse(f"{name}:before", st.load_run(name) is None)
            s = real(name, cfg, o.tokens)
            pc = None
            if o.compute_pulse:
                cp_after = compute_pulse(f"{name}:after", False)
                pc = sim(cfg, with_compute(current, cp_before, shape))
                pred_compute[cfg.name].append(pc)
            measured[cfg.name].append(s)
            pred_before[cfg.name].append(before[cfg.name])
            pa = after_by_version[version][cfg.name]
            pred_after[cfg.name].append(pa)
            pp = None
            if o.pulse_scale:
                pp = sim(cfg, scale_ssd(current, ratio))
                pred_pulse[cfg.name].append(pp)
            run_rows.append(
                {
                    "config": cfg.name,
                    "round": rnd,
                    "profile_version": version,
                    "tokens_per_s": s.tokens_per_s,
                    "predicted_tokens_per_s": pa.tokens_per_s,
                    "disk_pulse_ratio": ratio,
                    "pulse_scaled_tokens_per_s": (
                        pp.tokens_per_s if pp is not None else float("nan")
                    ),
                    "io_wait_share": s.io_wait_share,
                    "read_p50_s": s.latency.get("read", {}).get("p50", float("nan")),
                    "hits": s.hits,
                    "misses": s.misses,
                    "wall_s": s.wall_s,
                    # the driver's time runnable but off a core, of the run's wall time:
                    # the noise a disk pulse does not see (bench/bench_disk_noise.py)
                    "cpu_wait_share": (
                        float(s.extra.get("driver_time", {}).get("cpu_wait_s", 0.0)) / s.wall_s
                        if s.wall_s
                        else float("nan")
                    ),
                    # the arrangement the run got: realtime / off / normal (why), and the
                    # share of its slot buffers on huge pages (mer.engine.aligned)
                    "driver_priority": str(s.extra.get("driver_priority", "")),
                    "huge_page_share": huge_share(s.extra),
                    "compute_pulse_tokens_per_s": (
                        pc.tokens_per_s if pc is not None else float("nan")
                    ),
                    # the compute pulses before and after the run, and the run's own
                    # figures (whole run; first and second half of its tokens)
                    **{f"pulse_before_{k}": cp_before.get(k, math.nan) for k in PULSE_KEYS},
                    **{f"pulse_after_{k}": cp_after.get(k, math.nan) for k in PULSE_KEYS},
                    "pulse_before_token_compute_s": pulse_token_compute(
                        cp_before, int(s.layers or 1), int(s.top_k or 1)
                    ),
                    "pulse_after_token_compute_s": pulse_token_compute(
                        cp_after, int(s.layers or 1), int(s.top_k or 1)
                    ),
                    "compute_per_read_s": compute_per_read(s, cp_before),
                    **run_compute(s),
                }
            )
    stages = {"uncalibrated": pred_before, "calibrated": pred_after}
    if o.pulse_scale:
        stages[PULSE_STAGE] = pred_pulse
    if o.compute_pulse:
        stages[COMPUTE_STAGE] = pred_compute
    table = build_table(configs, measured, stages)
    summary = summarize(table, configs, headline=COMPUTE_STAGE if o.compute_pulse else "calibrated")
    summary.update(
        {
            "machine": machine.description,
            "trace": getattr(trace, "name", ""),
            "tokens": o.tokens,
            "calibration_tokens": grid.calibration.tokens or o.cal_tokens,
            "repeats": rnd,
            "min_repeats": o.repeats,
            "max_repeats": o.most_repeats,
            "target_se": o.target_se,
            "drift_threshold": o.drift,
            "pulse_scale": o.pulse_scale,
            "compute_pulse": o.compute_pulse,
            "disk_pulse_reference": [disk_ref[v] for v in sorted(disk_ref)],
            "drift_events": st.state["events"],
            "recalibrations": len(profiles) - 1,
            "profile": profile.name,
            "calibration": {
                "config": grid.calibration.to_dict(),
                "moved": [p.extra.get("calibration", {}).get("moved", {}) for p in profiles],
                "tokens_per_s": [r.tokens_per_s for r in cal_runs],
            },
            "configs": [dict(c.to_dict(), description=c.describe()) for c in configs],
            "seconds": time.perf_counter() - t_start,
        }
    )
    runs = pd.DataFrame(run_rows)
    summary["cpu_wait"] = cpu_wait_summary(runs)
    if o.compute_pulse:
        summary["compute_pulse_stats"] = compute_pulse_stats(runs)
    res = ValidationResult(table, summary, runs, profiles)
    res.paths = write_outputs(res, out)
    return res


def write_outputs(res: ValidationResult, out: Path) -> dict[str, str]:
    """validation.parquet / .csv (the tidy table), runs.parquet, summary.json, the
    figure and validation.md."""
    from mer.analysis.validation_report import FIGURE, section_markdown, validation_section
    from mer.atomic import atomic_path

    paths: dict[str, str] = {}
    for name, df in (("validation", res.table), ("runs", res.runs)):
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        paths[f"{name}_parquet"] = str(out / f"{name}.parquet")
    write_text_atomic(out / "validation.csv", res.table.to_csv(index=False))
    paths["csv"] = str(out / "validation.csv")
    write_json_atomic(out / "summary.json", _jsonable(res.summary))
    paths["summary"] = str(out / "summary.json")
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    sec = validation_section(res.table, _jsonable(res.summary), fig_dir)
    paths["figure"] = str(fig_dir / f"{FIGURE}.png")
    write_text_atomic(out / "validation.md", section_markdown(sec, out))
    paths["markdown"] = str(out / "validation.md")
    return paths


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    if hasattr(obj, "item"):
        return obj.item()
    return obj
