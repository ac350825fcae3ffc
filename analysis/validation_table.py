"""The arithmetic of `mer validate`: predicted against the median of repeated real runs.

One tidy row per (configuration, stage, metric): the prediction (the median of
the predictions in force for each repeat: one value unless the machine drifted
and the profile was recalibrated), the median of the measured repeats, their
minimum and maximum (the measured spread), the relative error against the
median, and whether the prediction lies inside the measured spread, which is
when it counts as right. `summarize` turns the table into the figures the
targets are stated in, and names the configurations whose order the model gets
wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from mer.analysis.compare import metric_value
from mer.analysis.validation_grid import GridConfig
from mer.summary import RunSummary

#: (label, RunSummary path) of every metric held against measurement.
METRICS: tuple[tuple[str, str], ...] = (
    ("tokens/s", "tokens_per_s"),
    ("I/O wait share", "io_wait_share"),
    ("read p50 (s)", "latency.read.p50"),
    ("read p99 (s)", "latency.read.p99"),
    ("token p50 (s)", "latency.token.p50"),
    ("token p99 (s)", "latency.token.p99"),
    ("bytes read", "bytes_read"),
    ("hits", "hits"),
    ("misses", "misses"),
    ("prefetch issued", "prefetch.issued"),
    ("prefetch used", "prefetch.used"),
    ("prefetch late", "prefetch.late"),
    ("prefetch wasted", "prefetch.wasted"),
    ("prefetch used bytes", "prefetch.used_bytes"),
    ("prefetch late bytes", "prefetch.late_bytes"),
    ("prefetch wasted bytes", "prefetch.wasted_bytes"),
    ("read time hidden", "hidden_read_share"),
    # the decisions' counts, whatever the timing: a late prefetch is a used one that its
    # step had to wait for (the split into on time and late is the clock's)
    ("hits incl. late prefetches", "hits+prefetch.late"),
    ("prefetch used incl. late", "prefetch.used+prefetch.late"),
)
COUNTS = ("hits", "misses", "prefetch issued", "prefetch used", "prefetch late", "prefetch wasted")
PREFETCH_COUNTS = (
    "prefetch issued",
    "prefetch used",
    "prefetch late",
    "prefetch wasted",
    "prefetch used incl. late",
)
#: What the simulator and the engine must agree on with prefetch on: every decision (reads
#: issued, prefetches used or wasted, lookups served from the cache), not the race between a
#: read and its lookup that splits the used prefetches into on time and late.
DECISION_COUNTS = (
    "hits incl. late prefetches",
    "prefetch issued",
    "prefetch used incl. late",
    "prefetch wasted",
)


def _value(summary: RunSummary, path: str) -> float:
    """metric_value, or the sum of the values of `a+b` paths."""
    return float(sum(metric_value(summary, part) for part in path.split("+")))


#: The targets, on held-out configurations of the calibrated stage.
TARGETS = {
    "tokens/s median abs. error": 0.05,
    "tokens/s worst abs. error": 0.10,
    "read p50 median abs. error": 0.15,
    "I/O wait share median abs. error": 0.15,
    "counts with prefetch on, abs. error": 0.01,
}
#: The stage predicted from the calibrated profile with its SSD scaled by a disk pulse taken
#: right before each run (over the calibration run's pulse): a probe of the machine then.
PULSE_STAGE = "pulse-scaled"
IO_BOUND, COMPUTE_BOUND = 0.5, 0.2  # measured I/O wait share at or above / at or below
#: Relative slack of "inside the spread" (a spread of one value is a point)
TOL = 1e-6


def rel_error(predicted: float, measured: float) -> float:
    """(p - m) / m; 0 when both are 0; NaN when only the measurement is 0 (or either is NaN)."""
    if math.isnan(predicted) or math.isnan(measured):
        return float("nan")
    if measured == 0:
        return 0.0 if predicted == 0 else float("nan")
    return (predicted - measured) / measured


def median_se(values: np.ndarray) -> float:
    """Standard error of the median of `values` (the large-sample sqrt(pi/2) sigma/sqrt(n)
    of a normal sample; NaN below 2 values): how far the measured median itself may sit
    from the one more repeats would find."""
    v = values[np.isfinite(values)]
    if v.size < 2:
        return float("nan")
    return float(math.sqrt(math.pi / 2) * np.std(v, ddof=1) / math.sqrt(v.size))


def bound_of(io_share: float) -> str:
    if io_share >= IO_BOUND:
        return "I/O-bound"
    if io_share <= COMPUTE_BOUND:
        return "compute-bound"
    return "mixed"


def build_table(
    configs: Sequence[GridConfig],
    measured: Mapping[str, Sequence[RunSummary]],
    predicted: Mapping[str, Mapping[str, Sequence[RunSummary]]],
) -> pd.DataFrame:
    """The tidy table. `measured[name]`: the repeats of a configuration;
    `predicted[stage][name]`: the predictions in force for them (one or one per repeat)."""
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        runs = list(measured.get(cfg.name, []))
        if not runs:
            continue
        io = float(np.median([r.io_wait_share for r in runs]))
        for stage, preds in predicted.items():
            sims = list(preds.get(cfg.name, []))
            if not sims:
                continue
            for label, path in METRICS:
                m = np.array([_value(r, path) for r in runs], dtype=float)
                p = np.array([_value(s, path) for s in sims], dtype=float)
                if np.isnan(m).all() or np.isnan(p).all():
                    continue
                med = float(np.nanmedian(m))
                lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
                pv = float(np.nanmedian(p))
                err = rel_error(pv, med)
                se = median_se(m)
                rows.append(
                    {
                        "config": cfg.name,
                        "stage": stage,
                        "metric": label,
                        "predicted": pv,
                        "measured": med,
                        "measured_min": lo,
                        "measured_max": hi,
                        "n_runs": int(np.isfinite(m).sum()),
                        "spread": (hi - lo) / abs(med) if med else (0.0 if hi == lo else math.inf),
                        # the standard error of the measured median, relative to it
                        "median_se": se / abs(med) if med else (0.0 if se == 0 else math.nan),
                        "rel_error": err,
                        "abs_rel_error": abs(err),
                        "within_spread": bool(lo - TOL * abs(lo) <= pv <= hi + TOL * abs(hi)),
                        # within two standard errors of the measured median (NaN-safe:
                        # False with a single run unless exact)
                        "within_2se": bool(
                            abs(pv - med) <= (2 * se if se == se else 0.0) + TOL * abs(med)
                        ),
                        "bound": bound_of(io),
                        **{k: v for k, v in cfg.to_dict().items() if k != "name"},
                    }
                )
    return pd.DataFrame(rows)


def ranking(
    predicted: Mapping[str, float], measured: Mapping[str, tuple[float, float, float]]
) -> dict[str, Any]:
    """Order by predicted and by measured tokens/s; every pair the two orders disagree on,
    and whether the measured spreads of the pair overlap (then the swap is within noise).
    `measured[name]` = (median, min, max)."""
    names = [n for n in predicted if n in measured]
    by_pred = sorted(names, key=lambda n: -predicted[n])
    by_meas = sorted(names, key=lambda n: -measured[n][0])
    swaps = []
    concordant = discordant = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            dp = predicted[a] - predicted[b]
            dm = measured[a][0] - measured[b][0]
            if dp * dm > 0:
                concordant += 1
            elif dp * dm < 0:
                discordant += 1
                first, second = (a, b) if dm > 0 else (b, a)  # measured faster first
                overlap = not (
                    measured[first][1] > measured[second][2]
                    or measured[second][1] > measured[first][2]
                )
                swaps.append(
                    {"measured_faster": first, "predicted_faster": second, "within_noise": overlap}
                )
    pairs = concordant + discordant
    return {
        "predicted_order": by_pred,
        "measured_order": by_meas,
        "equal": by_pred == by_meas,
        "swapped_pairs": swaps,
        "kendall_tau": (concordant - discordant) / pairs if pairs else 1.0,
    }


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], df.to_dict("records"))


def _stat(values: pd.Series) -> dict[str, Any]:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return {"n": 0, "median": None, "worst": None}
    return {"n": int(v.size), "median": float(np.median(v)), "worst": float(v.max())}


def summarize(
    table: pd.DataFrame, configs: Sequence[GridConfig], headline: str = "calibrated"
) -> dict[str, Any]:
    """Per stage and metric: median and worst abs. error, predictions inside the spread,
    median spread; the targets for the `headline` stage (the calibrated one unless
    another is named and present); the counts check; the ranking."""
    out: dict[str, Any] = {"stages": {}, "targets": {}, "counts": {}, "ranking": {}}
    if table.empty:
        return out
    prefetch_of = {c.name: c.prefetch_on for c in configs}
    for stage, st in table.groupby("stage", sort=False):
        per: dict[str, Any] = {}
        for metric, g in st.groupby("metric", sort=False):
            s = _stat(g["abs_rel_error"])
            s["within_spread"] = int(g["within_spread"].sum())
            s["within_2se"] = int(g["within_2se"].sum())
            se = g["median_se"].dropna()
            s["median_se"] = float(np.median(se)) if len(se) else None
            s["configs"] = len(g)
            s["median_spread"] = float(np.median(g["spread"])) if len(g) else None
            per[str(metric)] = s
        out["stages"][str(stage)] = per
        tps = st[st["metric"] == "tokens/s"]
        out["ranking"][str(stage)] = ranking(
            {str(r["config"]): float(r["predicted"]) for r in _records(tps)},
            {
                str(r["config"]): (
                    float(r["measured"]),
                    float(r["measured_min"]),
                    float(r["measured_max"]),
                )
                for r in _records(tps)
            },
        )
    cal = next(
        (n for n in (headline, "calibrated") if n in out["stages"]), next(iter(out["stages"]))
    )
    st = table[table["stage"] == cal]
    counts: dict[str, Any] = {
        "prefetch_off_equal": True,
        "prefetch_on_worst": 0.0,
        # how far the repeats of one configuration differ among themselves (of the issued):
        # a used / late split is a race between a read and its lookup, decided anew per run
        "prefetch_on_repeat_spread": 0.0,
        "configs": {},
    }
    for name, g in st[st["metric"].isin(COUNTS + DECISION_COUNTS)].groupby("config", sort=False):
        on = prefetch_of.get(str(name), False)
        # prefetch off: every count must be equal; on: every decision (not the on-time split)
        g = g[g["metric"].isin(DECISION_COUNTS if on else COUNTS)]
        issued = g.loc[g["metric"] == "prefetch issued", "measured"]
        scale_pf = float(issued.iloc[0]) if len(issued) else 0.0
        worst = 0.0
        exact = True
        spread = 0.0
        for r in _records(g):
            # every repeat must equal the prediction exactly when nothing depends on timing
            p, m = float(r["predicted"]), float(r["measured"])
            exact = exact and float(r["measured_min"]) == p == float(r["measured_max"])
            scale = scale_pf if r["metric"] in PREFETCH_COUNTS else abs(m)
            diff = abs(p - m)
            worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else math.inf))
            if r["metric"] in PREFETCH_COUNTS and scale_pf:
                rng = float(r["measured_max"]) - float(r["measured_min"])
                spread = max(spread, rng / scale_pf)
        counts["configs"][str(name)] = {
            "prefetch": on,
            "exact": bool(exact),
            "worst": worst,
            "repeat_spread": spread,
        }
        if on:
            counts["prefetch_on_worst"] = max(counts["prefetch_on_worst"], worst)
            counts["prefetch_on_repeat_spread"] = max(counts["prefetch_on_repeat_spread"], spread)
        else:
            counts["prefetch_off_equal"] &= bool(exact)
    out["counts"] = counts
    out["targets"] = _targets(out["stages"][cal], counts, out["ranking"].get(cal, {}))
    # the same targets for every timing stage after calibration (the counts are the
    # decisions', one for all stages)
    out["targets_by_stage"] = {
        str(stage): _targets(out["stages"][str(stage)], counts, out["ranking"].get(str(stage), {}))
        for stage in out["stages"]
        if stage != "uncalibrated"
    }
    out["calibrated_stage"] = cal
    return out


def _targets(per: dict[str, Any], counts: dict[str, Any], rk: dict[str, Any]) -> dict[str, Any]:
    def get(metric: str, key: str) -> float | None:
        v = per.get(metric, {}).get(key)
        return None if v is None else float(v)

    values = {
        "tokens/s median abs. error": get("tokens/s", "median"),
        "tokens/s worst abs. error": get("tokens/s", "worst"),
        "read p50 median abs. error": get("read p50 (s)", "median"),
        "I/O wait share median abs. error": get("I/O wait share", "median"),
        "counts with prefetch on, abs. error": counts["prefetch_on_worst"],
    }
    targets: dict[str, Any] = {
        name: {
            "value": v,
            "target": TARGETS[name],
            "met": v is not None and v <= TARGETS[name],
            "short_by": None if v is None else max(0.0, v - TARGETS[name]),
        }
        for name, v in values.items()
    }
    targets["counts equal with prefetch off"] = {
        "value": None,
        "target": None,
        "met": bool(counts["prefetch_off_equal"]),
        "short_by": None,
    }
    targets["ranking by tokens/s"] = {
        "value": rk.get("kendall_tau"),
        "target": None,
        "met": bool(rk.get("equal", False)),
        "short_by": None,
    }
    return targets
