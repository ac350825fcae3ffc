"""The SSD models against the same real runs: a finished `mer validate` output directory
re-predicted with the channel model and with the shared device, from the same probe.

    .venv/bin/python bench/bench_ssd_models.py TRACE.parquet VALIDATION_DIR [VALIDATION_DIR ...]

Simulation only: the real runs are the ones the validation measured (its `runs/`), the
probe is its `profile-probed.json` (the bursts and streams in `extra.probe`), refitted
both ways (`ProbeResult.fit_ssd`), everything else of the profile kept. As `mer
validate` does, each round's calibration run calibrates the profile and that round's
runs are predicted with it; the error is the median prediction against the median run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

SSD_FIELDS = (
    "latency_s",
    "bandwidth_bytes_per_s",
    "channels",
    "chunk_bytes",
    "queue_depth",
    "access_latency_s",
    "reader_bandwidth",
)
#: (column, the SSD model the probe is refitted as, whether calibration fits the wake costs)
MODELS = (
    ("channels", "channels", False),
    ("shared", "shared", False),
    ("shared + wake", "shared", True),
)


def profiles(directory: Path) -> dict[str, Any]:
    """The validation's probed profile with its SSD refitted as each model."""
    from mer.engine.probe import ProbeResult
    from mer.sim.hardware import HardwareProfile

    base = json.loads((directory / "profile-probed.json").read_text())
    probe = ProbeResult.from_dict(base["extra"]["probe"])
    out = {}
    for model in {m for _, m, _ in MODELS}:
        d = copy.deepcopy(base)
        fit = probe.fit_ssd(model)
        d["ssd"] = {k: fit[k] for k in SSD_FIELDS if k in fit}
        d["ssd"]["burst_curve"] = fit.get("burst_curve", [])
        out[model] = HardwareProfile.from_dict(d)
    return out


def errors(trace: Any, directory: Path) -> dict[str, dict[str, float]]:
    """Per model, per configuration: median predicted over median measured tokens/s - 1."""
    from mer.analysis.calibrate import _replay_config, calibrate
    from mer.sim.model import options_like, simulate
    from mer.summary import RunSummary

    runs = {
        f.stem: RunSummary.from_dict(json.loads(f.read_text()))
        for f in sorted((directory / "runs").glob("*.json"))
    }
    cals = {n: r for n, r in runs.items() if n.startswith("calibration-")}
    reps: dict[str, list[str]] = {}
    for n in runs:
        if n not in cals:
            reps.setdefault(n.rsplit("-r", 1)[0], []).append(n)
    out: dict[str, dict[str, float]] = {}
    profs = profiles(directory)
    for label, model, wake in MODELS:
        prof = profs[model]
        cal = {tag: calibrate(r, prof, trace=trace, wake=wake).profile for tag, r in cals.items()}
        out[label] = {}
        model = label
        for cfg, names in sorted(reps.items()):
            pred = []
            for n in names:
                p = cal.get(f"calibration-{n.rsplit('-r', 1)[1]}", cal["calibration-0"])
                run = runs[n]
                pred.append(simulate(trace, _replay_config(run), p, options_like(run)).summary)
            meas = statistics.median(runs[n].tokens_per_s for n in names)
            out[model][cfg] = statistics.median(s.tokens_per_s for s in pred) / meas - 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", type=Path, help="the trace the validation ran")
    ap.add_argument("dirs", type=Path, nargs="+", help="`mer validate -o` directories")
    a = ap.parse_args(argv)
    from mer.traces.format import read_trace

    trace = read_trace(a.trace)
    for d in a.dirs:
        if not (d / "profile-probed.json").exists() or not (d / "runs").is_dir():
            print(f"{d}: not a finished `mer validate` directory (no profile-probed.json/runs)")
            return 2
    for d in a.dirs:
        err = errors(trace, d)
        print(f"\n{d.name}\n")
        labels = [label for label, _, _ in MODELS]
        print("| configuration | " + " | ".join(f"{m} error (%)" for m in labels) + " |")
        print("|---|" + "---:|" * len(labels))
        for cfg in err[labels[0]]:
            print(f"| {cfg} | " + " | ".join(f"{err[m][cfg] * 100:+.1f}" for m in labels) + " |")
        for m in labels:
            e = [abs(v) for v in err[m].values()]
            print(
                f"\n{m}: median |error| {statistics.median(e) * 100:.1f}%, worst {max(e) * 100:.1f}%"
            )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
