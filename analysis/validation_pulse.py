"""What a compute pulse tells about the run after it (`mer validate`'s compute-pulse stage).

On this project's shared 2-core VM the CPU's speed moves between a probe and a run
minutes later: the probe's FFN rate and per-step cost changed by 35-60% within hours,
and a compute-bound run went at 63-142 tokens/s. `mer validate` therefore takes a
compute pulse (`mer.engine.probe.compute_pulse`: the engine's own FFN, dense block and
driver step, the probe's engine-step measurement) right before and right after every
held-out run. Here: the run's own figures from its summary, to hold the pulses
against, and the statistics that say whether the pulse before a run predicts it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mer.summary import RunSummary

#: The stage predicted from the calibrated profile with the compute figures (FFN, dense
#: block, per-step cost) of the compute pulse taken right before each run.
COMPUTE_STAGE = "compute-pulse"
FIGURES = ("ffn_s", "dense_s", "step_s", "token_compute_s")
#: A run with at least this many tokens that read nothing has its within-run change
#: measured on those alone.
RESIDENT_TOKENS = 8


def run_compute(s: RunSummary) -> dict[str, float]:
    """The run's own compute figures: FFN per expert, dense block per step, the driver's
    work per step outside FFNs and dense blocks (NaN where the summary lacks it), and how
    its compute per token (FFNs + dense) moved from the first half of its tokens to the
    second (after the first, cold token): the CPU changing within the run."""
    dt = s.extra.get("driver_time", {}) or {}
    steps = float(dt.get("steps") or s.tokens * max(1, int(s.layers or 1)))
    n_ffn = float(dt.get("ffn_direct_n", 0.0) or 0.0) + float(dt.get("ffn_busy_n", 0.0) or 0.0)
    n_ffn = n_ffn or float(s.hits + s.misses)
    out = {
        "run_ffn_s": s.compute_s / n_ffn if n_ffn else math.nan,
        "run_dense_s": s.dense_s / steps if steps else math.nan,
        "run_step_s": float(dt["overhead_s"]) / steps if "overhead_s" in dt and steps else math.nan,
        "run_compute_drift": math.nan,
        "run_token_compute_s": math.nan,
    }
    per_token = np.asarray(s.extra.get("token_compute_s", []), dtype=float)[1:]
    misses = np.asarray(s.extra.get("token_misses", []), dtype=float)[1:]
    if misses.size == per_token.size and (misses == 0).sum() >= RESIDENT_TOKENS:
        # the run's compute per token where it read nothing: what the pulse times
        out["run_token_compute_s"] = float(np.median(per_token[misses == 0]))
        # a step's reads slow its FFNs and dense blocks: where the run has enough tokens
        # that read nothing, only those say how the CPU itself moved
        per_token = per_token[misses == 0]
    if per_token.size >= 4:
        half = per_token.size // 2
        first, second = float(np.median(per_token[:half])), float(np.median(per_token[half:]))
        if first > 0:
            out["run_compute_drift"] = second / first - 1
    return out


def pulse_token_compute(pulse: dict[str, float], layers: int, top_k: int) -> float:
    """A pulse's compute per token (FFNs and dense blocks of every layer, nothing read)."""
    if not pulse:
        return math.nan
    return layers * (top_k * pulse["ffn_s"] + pulse["dense_s"])


def compute_per_read(s: RunSummary, pulse: dict[str, float]) -> float:
    """How much longer the run's FFNs and dense blocks took than the pulse's, per read it
    made: in steps that read, the compute itself is slower (NaN without reads or pulse)."""
    reads = float(s.extra.get("reads", 0) or 0) or float(s.misses)
    base = s.tokens * pulse_token_compute(pulse, int(s.layers or 1), int(s.top_k or 1))
    if not reads or base != base:
        return math.nan
    return (s.compute_s + s.dense_s - base) / reads


def _r(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return None
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _median_abs(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(np.median(np.abs(v))) if v.size else None


def compute_pulse_stats(runs: pd.DataFrame) -> dict[str, Any]:
    """Per figure (FFN, dense, step): the correlation over runs of log(pulse before) and of
    log(pulse after) with log(the run's own figure), of before with after, and the median
    |change| from the pulse before to the run and to the pulse after. Per run: the median
    |log(measured / predicted tokens/s)| of the fixed calibration and of the compute-pulse
    prediction, and the run's own compute change within it (second half of its tokens
    over the first): what bounds any pulse taken outside the run."""
    out: dict[str, Any] = {"figures": {}}
    if runs.empty or "pulse_before_ffn_s" not in runs:
        return out

    def col(name: str) -> np.ndarray:
        return runs[name].to_numpy(dtype=float) if name in runs else np.full(len(runs), np.nan)

    for k in FIGURES:
        b, a, r = col(f"pulse_before_{k}"), col(f"pulse_after_{k}"), col(f"run_{k}")
        with np.errstate(divide="ignore", invalid="ignore"):
            lb, la, lr = np.log(b), np.log(a), np.log(r)
            out["figures"][k] = {
                "r_before_run": _r(lb, lr),
                "r_after_run": _r(la, lr),
                "r_before_after": _r(lb, la),
                "median_abs_run_vs_before": _median_abs(r / b - 1),
                "median_abs_after_vs_before": _median_abs(a / b - 1),
            }
    m = col("tokens_per_s")
    with np.errstate(divide="ignore", invalid="ignore"):
        fixed = np.log(m / col("predicted_tokens_per_s"))
        pulsed = np.log(m / col("compute_pulse_tokens_per_s"))
    drift = col("run_compute_drift")
    out["per_run_median_abs_log_error"] = {
        "calibrated": _median_abs(fixed),
        COMPUTE_STAGE: _median_abs(pulsed),
    }
    cpr = col("compute_per_read_s")
    cpr = cpr[np.isfinite(cpr)]
    out["compute_per_read_s"] = {
        "median": float(np.median(cpr)) if cpr.size else None,
        "min": float(cpr.min()) if cpr.size else None,
        "max": float(cpr.max()) if cpr.size else None,
    }
    ok = drift[np.isfinite(drift)]
    out["within_run_compute_change"] = {
        "median_abs": _median_abs(ok),
        "min": float(ok.min()) if ok.size else None,
        "max": float(ok.max()) if ok.size else None,
    }
    return out
