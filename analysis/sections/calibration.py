"""Section: the profile fitted to a measured run, and what it does to the predictions.

The profile is fitted on the first run pair's measured run (`mer calibrate`),
so re-predicting that run is in-sample; re-predicting every other run is a
held-out test of the calibration, and the table says which is which.
"""

from __future__ import annotations

import json

from mer.analysis.report import signed
from mer.analysis.sections import Section, Study, section
from mer.analysis.sections.runs import _config, _rel, run_window

#: Calibrated fields as people read them: label, unit, scale from the stored value.
FIELDS = {
    "compute.ffn_bytes_per_s": ("expert FFN throughput", "MB/s", 1e-6),
    "compute.dense_s_per_layer": ("dense time per layer", "ms", 1e3),
    "ssd.bandwidth_bytes_per_s": ("SSD bandwidth", "MB/s", 1e-6),
    "compute.ffn_busy_overhead_s": (
        "extra time of an FFN run while reads are in flight",
        "us",
        1e6,
    ),
    "compute.read_submit_s": ("time to submit one expert read", "us", 1e6),
    "compute.read_complete_s": ("time to reap one read outside a wait", "us", 1e6),
    "compute.step_overhead_s": ("driver time per step", "us", 1e6),
    "compute.wake_ffn_s": ("extra time of an FFN right after the driver blocked", "us", 1e6),
    "compute.wake_dense_s": ("extra time of a dense block after a blocked step", "us", 1e6),
}


@section(order=60, key="calibration")
def calibration_section(study: Study) -> Section | None:
    path = study.inputs.calibrated
    if path is None:
        return None
    profile = json.loads(path.read_text())
    moved = profile.get("extra", {}).get("calibration", {}).get("moved", {})
    pairs = study.pairs
    sec = Section("Calibration and its effect", window=run_window(study) if pairs else None)
    fit_on = f" on the measured run of {pairs[0].role or _config(pairs[0].run)}" if pairs else ""
    sec.text(
        f"`mer calibrate` refits the profile's compute and SSD figures{fit_on}, each from the "
        f"measurement that isolates it (profile `{profile.get('name', path.name)}`)."
    )
    if moved:
        rows = []
        for name, m in moved.items():
            label, unit, scale = FIELDS.get(name, (name, "as stored", 1.0))
            rows.append(
                [
                    f"{label} ({unit})",
                    m["before"] * scale,
                    m["after"] * scale,
                    signed(m["rel"] * 100),
                ]
            )
        sec.table(["profile field", "before", "after", "change (%)"], rows)
    else:
        sec.text("Nothing could be fitted from the run (no reads and no compute measured).")
    with_cal = [p for p in pairs if p.calibrated is not None]
    if not with_cal:
        return sec
    rows = []
    held = []
    for p in with_cal:
        before = _rel(p.sim.tokens_per_s, p.run.tokens_per_s)
        after = _rel(p.calibrated.tokens_per_s, p.run.tokens_per_s)
        fitted = p is pairs[0]
        if not fitted:
            held.append((p, before, after))
        rows.append(
            [
                p.role or _config(p.run),
                "fitted on this run" if fitted else "held out",
                p.run.tokens_per_s,
                p.sim.tokens_per_s,
                signed(before),
                p.calibrated.tokens_per_s,
                signed(after),
            ]
        )
    sec.table(
        [
            "run",
            "calibration",
            "measured tokens/s",
            "predicted before",
            "error before (%)",
            "predicted after",
            "error after (%)",
        ],
        rows,
    )
    if held:
        mean_before = sum(abs(b) for _, b, _ in held) / len(held)
        mean_after = sum(abs(a) for _, _, a in held) / len(held)
        sec.text(
            f"On the {len(held)} run(s) the calibration did not see, the mean absolute tokens/s error "
            f"goes from {mean_before:.1f}% to {mean_after:.1f}%: that is the held-out effect; the fitted "
            "run's own error after calibration says only that the fit worked."
        )
    else:
        sec.text("Every run here was used for the fit, so no held-out error exists yet.")
    return sec
