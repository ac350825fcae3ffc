"""Fit a hardware profile to a measured run, so the next prediction is closer.

Three quantities are refitted from what the engine measured, each from the
figure that isolates it: expert-FFN throughput from the mean compute time per
iteration, dense time from the mean dense time per iteration, and SSD bandwidth
from the median whole-expert read latency (keeping the profile's per-request
latency, channels and chunk size, which one run cannot separate). Everything
else is kept. The result says how much each field moved.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mer.errors import BadInput
from mer.shapes import get_shape
from mer.sim.hardware import HardwareProfile
from mer.summary import RunSummary


@dataclass
class Calibration:
    profile: HardwareProfile
    moved: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> before, after, rel

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "moved": self.moved}

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
        return "\n".join(lines)


def _solve_bandwidth(profile: HardwareProfile, nbytes: int, read_s: float) -> float | None:
    """Aggregate bandwidth that makes read_time(nbytes) equal the measured read time."""
    ssd = profile.ssd
    n = ssd.n_chunks(nbytes)
    waves = math.ceil(n / ssd.channels)
    transfer = read_s / waves - ssd.latency_s  # per chunk
    if transfer <= 0:
        return None
    return (nbytes / n) / transfer * ssd.channels


def calibrate(run: RunSummary, profile: HardwareProfile) -> Calibration:
    if run.kind != "measured":
        raise BadInput(f"calibrate needs a measured run (mer run --summary), got a {run.kind} one.")
    shape = get_shape(run.shape)
    iters = run.tokens * run.layers
    if iters == 0:
        raise BadInput("the run replayed no tokens; nothing to calibrate from.")
    new = copy.deepcopy(profile)
    new.name = f"{profile.name}-calibrated"
    new.source = f"{profile.source}; calibrated on a measured run of {run.trace} ({run.policy}, {run.cache_slots} slots)"
    moved: dict[str, dict[str, float]] = {}

    def record(name: str, before: float, after: float) -> None:
        moved[name] = {
            "before": before,
            "after": after,
            "rel": (after - before) / before if before else 0.0,
        }

    experts_computed = run.lookups  # every routed expert runs its FFN once
    if run.compute_s > 0 and experts_computed:
        # compute_s sums expert-FFN time; workers run them concurrently.
        per_expert = run.compute_s / experts_computed
        ffn = shape.bytes_per_expert / per_expert
        record("compute.ffn_bytes_per_s", profile.compute.ffn_bytes_per_s, ffn)
        new.compute.ffn_bytes_per_s = ffn
    if run.mode != "seed" and run.dense_s > 0:
        dense = run.dense_s / iters
        before = profile.compute.dense_time(shape.dense_bytes_per_layer)
        record("compute.dense_s_per_layer", before, dense)
        new.compute.dense_s_per_layer = dense
    read_p50 = run.latency.get("read", {}).get("p50", 0.0)
    if run.misses > 0 and read_p50 > 0:
        # The engine reads (and the simulator models) whole 4 KiB-aligned slots.
        bw = _solve_bandwidth(profile, shape.slot_bytes, read_p50)
        if bw is not None:
            record("ssd.bandwidth_bytes_per_s", profile.ssd.bandwidth_bytes_per_s, bw)
            new.ssd.bandwidth_bytes_per_s = bw
    new.extra = {**profile.extra, "calibration": {"run": asdict(run)["trace"], "moved": moved}}
    if "compute.ffn_bytes_per_s" in moved:
        new.extra["measured_shape"] = run.shape  # the FFN rate now holds for this shape
    new.validate()
    return Calibration(new, moved)
