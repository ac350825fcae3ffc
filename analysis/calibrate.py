"""Fit a hardware profile to a measured run, so the next prediction is closer.

Each quantity is refitted from the figure of the run that isolates it:

- expert-FFN throughput from the mean FFN time of the FFNs the engine ran
  directly (nothing in flight), and the extra cost of an FFN run while reads
  were in flight (`ffn_busy_overhead_s`) from the mean of those;
- the dense block's time from the mean dense time per step;
- the driver's costs: submitting one read from the mean submission time; what
  is left of each token's time once reads, FFNs and dense work are taken out is
  split, by a least-squares line over the run's tokens, into a cost per step and
  a cost per read (less its submission: reaping its completion);
- the SSD: with the trace at hand, the bandwidth (the chunk time) is found by
  simulating this very run on the profile refitted so far and bisecting until
  the simulated I/O wait equals the measured one (the read p50 when the run
  hardly waited); without the trace, from the median whole-expert read.

Which of these one run identifies depends on where its time went (`identifies`):
a run that waited on reads for more than MAX_IO_SHARE_FOR_COMPUTE of its wall
time says little about compute. Its FFN and dense figures were taken while the
completion path competed for the same few cores, and together they decide less
than half of its time, so an error in them barely moves its simulated tokens/s:
fitting them to such a run mistakes I/O effects for compute (the FFN came out 44%
slower than the probe's and the compute-bound configurations were then predicted
37% too slow). From an I/O-bound run only the I/O parameters are fitted (the
SSD, the per-read submit and reap costs, the driver's time per step held at the
probe's); compute (FFN, FFN while reads are in flight, dense, per-step cost) stays
as the probe measured it. A compute-bound run refits both. The result lists what
was fitted, what was kept and why (`Calibration.kept`).

Channels, latency, chunk size and queue depth are kept: they come from the
probe (one run cannot separate them). Runs of an older mer (no driver
figures) refit only FFN throughput, dense time and bandwidth, as before.
Everything else is kept; the result says how much each field moved.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim.hardware import HardwareProfile
from mer.summary import RunSummary

#: Below this I/O wait share the bandwidth is fitted to the read p50 instead.
MIN_IO_SHARE = 0.05
#: Above this I/O wait share a run does not identify compute: its compute figures are kept.
MAX_IO_SHARE_FOR_COMPUTE = 0.5
COMPUTE_FIELDS = (
    "compute.ffn_bytes_per_s",
    "compute.ffn_busy_overhead_s",
    "compute.dense_s_per_layer",
    "compute.step_overhead_s",
)
BISECT_STEPS = 28


@dataclass
class Calibration:
    profile: HardwareProfile
    moved: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> before, after, rel
    notes: list[str] = field(default_factory=list)
    #: field -> why it was kept from the starting profile (not identified by this run)
    kept: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(),
            "moved": self.moved,
            "notes": self.notes,
            "kept": self.kept,
        }

    def format_text(self) -> str:
        lines = [f"calibrated profile {self.profile.name!r}:"]
        for name, m in self.moved.items():
            lines.append(
                f"  {name:<32} {m['before']:>14.6g} -> {m['after']:>14.6g}  ({m['rel'] * 100:+.1f}%)"
            )
        if not self.moved:
            lines.append(
                "  nothing could be fitted from this run (no reads and no compute measured)"
            )
        lines += [f"  kept {name}: {why}" for name, why in self.kept.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _solve_bandwidth(profile: HardwareProfile, nbytes: int, read_s: float) -> float | None:
    """Aggregate bandwidth that makes read_time(nbytes) equal the measured read time."""
    ssd = profile.ssd
    if ssd.shared:
        # the transfer scales as 1 / bandwidth on the shared device: rescale its time
        now = ssd.read_time(nbytes) - ssd.access_latency_s
        want = read_s - ssd.access_latency_s
        return ssd.bandwidth_bytes_per_s * now / want if want > 0 and now > 0 else None
    n = ssd.n_chunks(nbytes)
    waves = math.ceil(n / ssd.channels)
    transfer = (read_s - ssd.access_latency_s) / waves - ssd.latency_s  # per chunk
    if transfer <= 0:
        return None
    return (nbytes / n) / transfer * ssd.channels


def identifies(run: RunSummary) -> tuple[bool, str]:
    """(whether `run` identifies the compute parameters, the stated reason)."""
    share = run.io_wait_share
    if share > MAX_IO_SHARE_FOR_COMPUTE:
        return False, (
            f"the run waited on reads {share * 100:.0f}% of its time (> "
            f"{MAX_IO_SHARE_FOR_COMPUTE * 100:.0f}%): I/O-bound, it does not identify compute; "
            "kept the probe's"
        )
    return True, (
        f"the run waited on reads {share * 100:.0f}% of its time (<= "
        f"{MAX_IO_SHARE_FOR_COMPUTE * 100:.0f}%): compute fitted from it"
    )


def fit_complete(drv: dict[str, Any], layers: int, submit_s: float, step_s: float) -> float | None:
    """Reaping cost per read with the per-step cost held at `step_s` (the probe's): the
    least-squares slope through the origin of (token overhead - layers * step) against
    the token's reads, less the submission. None without reads."""
    over = np.asarray(drv.get("token_overhead_s") or [], dtype=float)
    reads = np.asarray(drv.get("token_reads") or [], dtype=float)
    if over.size != reads.size or not float(np.sum(reads * reads)) > 0:
        return None
    per_read = float(np.sum((over - layers * step_s) * reads) / np.sum(reads * reads))
    return max(0.0, per_read - submit_s)


def fit_overhead(drv: dict[str, Any], layers: int, submit_s: float) -> tuple[float, float] | None:
    """(per step, per read to reap) of the driver's time outside reads, FFNs and dense.

    Per token it is `layers * step + reads * (submit + complete)`: a least-squares
    line through the run's tokens (which differ in how many reads they issued),
    less the submission time measured on its own. None when the tokens do not
    spread over at least three read counts (then one figure per step is all a run
    gives).
    """
    over = np.asarray(drv.get("token_overhead_s") or [], dtype=float)
    reads = np.asarray(drv.get("token_reads") or [], dtype=float)
    if over.size != reads.size or over.size < 4 or len(np.unique(reads)) < 3:
        return None
    a = np.stack([np.full(over.size, float(layers)), reads], axis=1)
    (step, per_read), *_ = np.linalg.lstsq(a, over, rcond=None)
    if per_read < submit_s:  # reaping costs nothing measurable: one figure per step
        step = float(np.mean(over - reads * submit_s)) / layers
        return max(0.0, step), 0.0
    if step < 0:
        return 0.0, float(np.sum(over * reads) / np.sum(reads * reads)) - submit_s
    return float(step), float(per_read) - submit_s


def _replay_config(run: RunSummary) -> Any:
    from mer.core.replay import ReplayConfig

    cfg = (run.config or {}).get("replay", run.config or {})
    fields = ReplayConfig.__dataclass_fields__
    try:
        return ReplayConfig(**{k: v for k, v in cfg.items() if k in fields})
    except TypeError as exc:
        raise BadInput(f"the run's replay configuration cannot be read back: {exc}") from None


def fit_bandwidth(
    run: RunSummary,
    profile: HardwareProfile,
    trace: Any,
    *,
    target: str = "auto",
) -> tuple[float, str] | None:
    """The SSD bandwidth at which simulating `run` on `profile` gives its I/O wait.

    `target` "io_wait" matches the total I/O wait, "read_p50" the median read
    latency, "auto" the first unless the run waited less than MIN_IO_SHARE. Both
    fall as the bandwidth grows, so a bisection in log space finds the root;
    None when the measured value lies outside what any bandwidth in a 1000x
    range around the profile's gives.
    """
    from mer.sim.model import options_like, simulate

    cfg = _replay_config(run)
    opts = options_like(run)
    if target == "auto":
        target = "io_wait" if run.io_wait_share >= MIN_IO_SHARE else "read_p50"
    want = run.io_wait_s if target == "io_wait" else run.latency.get("read", {}).get("p50", 0.0)
    if not want > 0:
        return None

    def value(bw: float) -> float:
        p = copy.deepcopy(profile)
        p.ssd.bandwidth_bytes_per_s = bw
        s = simulate(trace, cfg, p, opts).summary
        return s.io_wait_s if target == "io_wait" else s.latency["read"]["p50"]

    bw0 = profile.ssd.bandwidth_bytes_per_s
    lo, hi = math.log(bw0 / 1000), math.log(bw0 * 1000)
    if value(math.exp(lo)) < want or value(math.exp(hi)) > want:
        return None
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        if value(math.exp(mid)) > want:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2), target


#: the wake costs the counting simulation carries: small enough to move no step, large
#: enough that the totals count the FFNs and dense blocks that woke exactly
_COUNT_WAKE_S = 1e-9


def wake_counts(
    run: RunSummary,
    profile: HardwareProfile,
    trace: Any,
    at: tuple[float, float] = (_COUNT_WAKE_S, _COUNT_WAKE_S),
) -> tuple[int, int]:
    """(FFNs that start right after the driver blocked for their weights, dense blocks of
    a step after one that blocked) when `run` is simulated on `profile` with the wake costs
    `at` (> 0; a longer FFN can land the next read before it ends, so fewer block): the
    counts its measured FFN and dense times are split over (`fit_wake`)."""
    from mer.sim.model import TICKS_PER_S, options_like, simulate, ticks, timing_of

    p = copy.deepcopy(profile)
    p.compute.wake_ffn_s, p.compute.wake_dense_s = at
    opts = options_like(run)
    s = simulate(trace, _replay_config(run), p, opts).summary
    tm, _ = timing_of(p, get_shape(run.shape), opts)
    sec = 1.0 / TICKS_PER_S
    drv = (s.extra or {}).get("driver_time") or {}
    steps = run.tokens * run.layers
    n_ffn = steps * run.top_k
    busy = int(drv.get("ffn_busy_n", 0))
    base_ffn = (n_ffn * tm.ffn + busy * tm.ffn_busy) * sec
    n_wake_ffn = round((s.compute_s - base_ffn) / (ticks(at[0]) * sec))
    n_wake_dense = round((s.dense_s - steps * tm.dense * sec) / (ticks(at[1]) * sec))
    return max(0, n_wake_ffn), max(0, n_wake_dense) if tm.dense else 0


def fit_wake(
    run: RunSummary, profile: HardwareProfile, trace: Any
) -> tuple[float, float, int, int] | None:
    """(wake_ffn_s, wake_dense_s, FFNs woken, dense blocks woken): what `run`'s FFNs and
    dense blocks took beyond `profile`'s (the probe's, taken with nothing blocking), spread
    over those that followed a block of the driver in the simulation of `run` (counted
    again with the fitted costs until the counts repeat: a longer FFN can leave the next
    read time to land). None when the run has no driver figures or never blocked."""
    drv = (run.extra or {}).get("driver_time") or {}
    if not drv.get("ffn_direct_n") and not drv.get("ffn_busy_n"):
        return None
    from mer.sim.model import TICKS_PER_S, options_like, timing_of

    tm, _ = timing_of(profile, get_shape(run.shape), options_like(run))
    sec = 1.0 / TICKS_PER_S
    steps = run.tokens * run.layers
    busy = int(drv.get("ffn_busy_n", 0))
    excess_ffn = run.compute_s - (steps * run.top_k * tm.ffn + busy * tm.ffn_busy) * sec
    excess_dense = run.dense_s - steps * tm.dense * sec if tm.dense and run.dense_s > 0 else 0.0
    at = (_COUNT_WAKE_S, _COUNT_WAKE_S)
    seen: set[tuple[int, int]] = set()
    while True:
        counts = wake_counts(run, profile, trace, at)
        n_ffn, n_dense = counts
        if n_ffn == 0 and n_dense == 0:
            return None
        ffn = max(0.0, excess_ffn / n_ffn) if n_ffn else 0.0
        dense = max(0.0, excess_dense / n_dense) if n_dense else 0.0
        if counts in seen or len(seen) >= 3:
            return ffn, dense, n_ffn, n_dense
        seen.add(counts)
        at = (max(ffn, _COUNT_WAKE_S), max(dense, _COUNT_WAKE_S))


def _set_wake(
    run: RunSummary, profile: HardwareProfile, trace: Any
) -> tuple[float, float, int, int] | None:
    """fit_wake, written into `profile` (left as it is when nothing blocked)."""
    woke = fit_wake(run, profile, trace)
    if woke is not None:
        profile.compute.wake_ffn_s, profile.compute.wake_dense_s = woke[0], woke[1]
    return woke


def calibrate(
    run: RunSummary,
    profile: HardwareProfile,
    *,
    trace: Any = None,
    trace_name: str = "the trace",
    wake: bool = True,
) -> Calibration:
    """The profile refitted to `run` (see the module docstring); `trace` (the run's
    trace, already read) enables the simulated SSD fit, so another trace is refused: it
    would fit the SSD to reads the run never made. `wake` False keeps the profile's wake
    costs (the model before they were fitted, for comparison)."""
    if run.kind != "measured":
        raise BadInput(f"calibrate needs a measured run (mer run --summary), got a {run.kind} one.")
    if trace is not None and run.trace_digest:
        from mer.traces.format import content_digest

        digest = content_digest(trace)
        if digest != run.trace_digest:
            raise BadInput(
                f"{trace_name} (content {digest}) is not the trace the run replayed "
                f"({run.trace}, content {run.trace_digest}); give that trace, or leave it out."
            )
    shape = get_shape(run.shape)
    iters = run.tokens * run.layers
    if iters == 0:
        raise BadInput("the run replayed no tokens; nothing to calibrate from.")
    new = copy.deepcopy(profile)
    new.name = f"{profile.name}-calibrated"
    new.source = f"{profile.source}; calibrated on a measured run of {run.trace} ({run.policy}, {run.cache_slots} slots)"
    moved: dict[str, dict[str, float]] = {}
    notes: list[str] = []

    def record(name: str, before: float, after: float) -> None:
        moved[name] = {
            "before": before,
            "after": after,
            "rel": (after - before) / before if before else 0.0,
        }

    drv = (run.extra or {}).get("driver_time") or {}
    bpe = shape.bytes_per_expert
    fit_compute, why = identifies(run)
    notes.append(why)
    kept: dict[str, str] = {}
    if not fit_compute:
        kept = {name: "not identified by an I/O-bound run" for name in COMPUTE_FIELDS}
    if fit_compute and drv.get("ffn_direct_n", 0) > 0 and drv.get("ffn_direct_s", 0) > 0:
        direct = drv["ffn_direct_s"] / drv["ffn_direct_n"]
        ffn = bpe / direct
        record("compute.ffn_bytes_per_s", profile.compute.ffn_bytes_per_s, ffn)
        new.compute.ffn_bytes_per_s = ffn
        if drv.get("ffn_busy_n", 0) > 0:
            extra = max(0.0, drv["ffn_busy_s"] / drv["ffn_busy_n"] - direct)
            record("compute.ffn_busy_overhead_s", profile.compute.ffn_busy_overhead_s, extra)
            new.compute.ffn_busy_overhead_s = extra
    elif fit_compute and run.compute_s > 0 and run.lookups:
        # compute_s sums expert-FFN time; every routed expert runs its FFN once.
        ffn = bpe / (run.compute_s / run.lookups)
        record("compute.ffn_bytes_per_s", profile.compute.ffn_bytes_per_s, ffn)
        new.compute.ffn_bytes_per_s = ffn
    if fit_compute and run.mode != "seed" and run.dense_s > 0:
        dense = run.dense_s / iters
        before = profile.compute.dense_time(shape.dense_bytes_per_layer)
        record("compute.dense_s_per_layer", before, dense)
        new.compute.dense_s_per_layer = dense
    if drv.get("submit_n", 0) > 0:
        sub = drv["submit_s"] / drv["submit_n"]
        record("compute.read_submit_s", profile.compute.read_submit_s, sub)
        new.compute.read_submit_s = sub
    if "overhead_s" in drv and drv.get("steps", 0) > 0:
        sub = drv["submit_s"] / drv["submit_n"] if drv.get("submit_n", 0) else 0.0
        if fit_compute:
            fit = fit_overhead(drv, run.layers, sub)
            if fit is not None:
                step, complete = fit
                record("compute.read_complete_s", profile.compute.read_complete_s, complete)
                new.compute.read_complete_s = complete
            else:
                step = max(0.0, (drv["overhead_s"] - drv.get("submit_s", 0.0)) / drv["steps"])
            record("compute.step_overhead_s", profile.compute.step_overhead_s, step)
            new.compute.step_overhead_s = step
        else:
            # the per-step cost is the probe's; what the run spent beyond it grows with its
            # reads: the cost of reaping a completion on this machine
            reap = fit_complete(drv, run.layers, sub, profile.compute.step_overhead_s)
            if reap is not None:
                record("compute.read_complete_s", profile.compute.read_complete_s, reap)
                new.compute.read_complete_s = reap
    fit_wakes = wake and trace is not None and not fit_compute and run.mode != "seed"
    woke: tuple[float, float, int, int] | None = None
    if fit_wakes:
        # The compute figures are the probe's, taken with nothing blocking; what this
        # run's FFNs and dense blocks took beyond them came after the driver slept on a
        # read: the cost of waking, per FFN and dense block that followed a block.
        woke = _set_wake(run, new, trace)
    read_p50 = run.latency.get("read", {}).get("p50", 0.0)
    if run.misses > 0 and read_p50 > 0:
        fitted: float | None = None
        if trace is not None:
            got = fit_bandwidth(run, new, trace)
            if got is not None and fit_wakes:
                # the wake costs move the reads' overlap with compute: fit both again
                new.ssd.bandwidth_bytes_per_s = got[0]
                woke = _set_wake(run, new, trace)
                got = fit_bandwidth(run, new, trace)
            if got is None:
                notes.append(
                    "no bandwidth reproduces this run's I/O wait on the model; kept the probe's"
                )
            else:
                fitted, what = got
                notes.append(f"bandwidth fitted by simulating this run to its measured {what}")
        else:
            # The engine reads (and the simulator models) whole 4 KiB-aligned slots.
            fitted = _solve_bandwidth(profile, shape.slot_bytes, read_p50)
        if fitted is not None:
            record("ssd.bandwidth_bytes_per_s", profile.ssd.bandwidth_bytes_per_s, fitted)
            new.ssd.bandwidth_bytes_per_s = fitted
        else:
            new.ssd.bandwidth_bytes_per_s = profile.ssd.bandwidth_bytes_per_s
    if woke is not None:
        w_ffn, w_dense, n_ffn, n_dense = woke
        record("compute.wake_ffn_s", profile.compute.wake_ffn_s, w_ffn)
        record("compute.wake_dense_s", profile.compute.wake_dense_s, w_dense)
        notes.append(
            f"wake costs fitted over the {n_ffn} FFNs and {n_dense} dense blocks that "
            "followed a block of the driver on a read"
        )
    new.extra = {
        **profile.extra,
        "calibration": {"run": run.trace, "moved": moved, "notes": notes, "kept": kept},
    }
    if "compute.ffn_bytes_per_s" in moved:
        new.extra["measured_shape"] = run.shape  # the FFN rate now holds for this shape
    new.validate()
    return Calibration(new, moved, notes, kept)
