"""Predicted against measured: one simulated and one measured run side by side.

The two must describe the same experiment (the trace's content, the model and
its expert shape, the timing mode, policy, scope, cache, predictor, phase, depth,
tokens); otherwise the comparison is meaningless and is refused, naming every
field that differs and how to make them agree. With
prefetch off the hit counts must agree exactly (same decision core), so any
difference there is a bug, not a modelling error, and the verdict says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mer.errors import BadInput
from mer.summary import RunSummary

IDENTITY = (
    "trace_digest",
    "model",
    "shape",
    "mode",
    "policy",
    "scope",
    "cache_slots",
    "predictor",
    "pipeline_depth",
    "phase",
    "tokens",
)
#: How to make a differing field agree, for the refusal message.
FIXES = {
    "trace_digest": "replay the same trace file (same routing rows) in both",
    "model": "use traces of the same model",
    "shape": "simulate with the run's expert file (`mer simulate --experts FILE`) or its "
    "--shape, so both use the same bytes per expert",
    "mode": "use the same --mode in both",
    "tokens": "use the same --tokens and --phase in both",
}
#: (label, getter) rows of the comparison table.
METRICS: tuple[tuple[str, str], ...] = (
    ("hit rate", "hit_rate"),
    ("hits", "hits"),
    ("misses", "misses"),
    ("prefetch issued", "prefetch.issued"),
    ("prefetch used", "prefetch.used"),
    ("prefetch late", "prefetch.late"),
    ("prefetch wasted", "prefetch.wasted"),
    ("tokens/s", "tokens_per_s"),
    ("layer iterations/s", "layer_iterations_per_s"),
    ("I/O wait share", "io_wait_share"),
    ("bytes read", "bytes_read"),
    ("read p50 (s)", "latency.read.p50"),
    ("read p99 (s)", "latency.read.p99"),
    ("compute p50 (s)", "latency.compute.p50"),
    ("token p50 (s)", "latency.token.p50"),
    ("token p99 (s)", "latency.token.p99"),
)
#: Relative error within which a timing prediction is called good.
GOOD_TIMING = 0.15


def metric_value(summary: RunSummary | Mapping[str, Any], path: str) -> float:
    """The number at a dotted path of a summary (`latency.read.p50`); NaN where absent."""
    obj: Any = summary.to_dict() if isinstance(summary, RunSummary) else summary
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return float("nan")
        obj = obj[part]
    try:
        return float(obj)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class CompareRow:
    metric: str
    predicted: float
    measured: float
    rel_error: float | None  # (predicted - measured) / measured; None when measured is 0


@dataclass
class Comparison:
    simulated: dict[str, Any]
    measured: dict[str, Any]
    rows: list[CompareRow] = field(default_factory=list)
    hit_counts_equal: bool = False
    prefetch_on: bool = False
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, metric: str) -> CompareRow:
        for r in self.rows:
            if r.metric == metric:
                return r
        raise KeyError(metric)

    def format_text(self) -> str:
        s = self.simulated
        lines = [
            f"=== predicted vs measured: {s['trace']} ({s['model']}), policy {s['policy']} ({s['scope']}), "
            f"cache {s['cache_slots']} slots, predictor {s['predictor']} ===",
            f"simulated on {s['hardware']}; measured on {self.measured['hardware']}",
            f"{'metric':<22}{'predicted':>16}{'measured':>16}{'rel. error':>12}",
        ]
        for r in self.rows:
            err = "" if r.rel_error is None else f"{r.rel_error * 100:+.1f}%"
            lines.append(f"{r.metric:<22}{_fmt(r.predicted):>16}{_fmt(r.measured):>16}{err:>12}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "-"
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    if v == int(v) and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:.4g}"


def check_same_experiment(sim: RunSummary, run: RunSummary, what: str = "these two runs") -> None:
    """Refuse runs of different experiments, naming every field that differs."""
    diffs = []
    fixes = []
    for name in IDENTITY:
        a, b = getattr(sim, name), getattr(run, name)
        if a != b:
            label = "trace content" if name == "trace_digest" else name
            diffs.append(f"{label}: {a!r} vs {b!r}")
            if name in FIXES:
                fixes.append(FIXES[name])
    if diffs:
        fixes.append("`mer sweep --best` prints the run command of its winner")
        raise BadInput(
            f"{what} are not the same experiment, so they cannot be compared ("
            + "; ".join(diffs)
            + "). To fix: "
            + "; ".join(fixes)
            + "."
        )


def check_study(
    trace_digest: str,
    trace_name: str,
    *,
    sweep: Any = None,
    sim: RunSummary | None = None,
    run: RunSummary | None = None,
) -> None:
    """A report's inputs must all come from its trace, and its simulated and measured
    runs must be one experiment; refuse otherwise, naming what differs."""
    for what, s in (("simulated run (--sim)", sim), ("measured run (--run)", run)):
        if s is not None and s.trace_digest != trace_digest:
            raise BadInput(
                f"the {what} replayed another trace ({s.trace}, content {s.trace_digest}) "
                f"than the report's {trace_name} (content {trace_digest}); give the trace "
                "it was run on, or rerun it on this one."
            )
    if sweep is not None and "trace_digest" in getattr(sweep, "columns", ()):
        other = sorted(set(map(str, sweep["trace_digest"])) - {trace_digest})
        if other:
            raise BadInput(
                f"the sweep (--sweep) holds results of another trace (content {other[0]}) than "
                f"the report's {trace_name} (content {trace_digest}); give the trace it swept."
            )
    if sim is not None and run is not None:
        check_same_experiment(sim, run, "the simulated (--sim) and measured (--run) runs")


def compare(sim: RunSummary, run: RunSummary) -> Comparison:
    check_same_experiment(sim, run)
    rows = []
    for label, path in METRICS:
        p, m = metric_value(sim, path), metric_value(run, path)
        rel = None if m == 0 or m != m or p != p else (p - m) / m
        rows.append(CompareRow(label, p, m, rel))
    prefetch_on = sim.predictor != "none"
    equal = sim.hits == run.hits and sim.misses == run.misses
    tps = next(r for r in rows if r.metric == "tokens/s").rel_error
    parts = []
    if not prefetch_on:
        parts.append(
            "hit counts identical (as they must be with prefetch off)"
            if equal
            else f"BUG: hit counts differ with prefetch off ({sim.hits} vs {run.hits}); the decision core must make them equal"
        )
    else:
        hr = next(r for r in rows if r.metric == "hit rate").rel_error
        parts.append(
            f"hit rate {'matches' if equal else f'differs by {hr * 100:+.1f}%'} (prefetch on: timing decides late prefetches)"
            if hr is not None
            else "hit rate not comparable"
        )
    measured_on = (sim.extra or {}).get("hardware_measured_shape")
    if measured_on and measured_on != run.shape:
        parts.append(
            f"the profile {sim.hardware!r} measured the FFN on {measured_on} experts, not "
            f"{run.shape}: probe with --shape {run.shape} (or calibrate) before trusting tokens/s"
        )
    if tps is None:
        parts.append("tokens/s not comparable")
    elif abs(tps) <= GOOD_TIMING:
        parts.append(
            f"tokens/s predicted within {abs(tps) * 100:.1f}% (good: <= {GOOD_TIMING * 100:.0f}%)"
        )
    else:
        direction = "over" if tps > 0 else "under"
        parts.append(
            f"tokens/s {direction}-predicted by {abs(tps) * 100:.1f}%; run `mer calibrate` on the measured run to fit the profile"
        )
    return Comparison(
        simulated=sim.to_dict(),
        measured=run.to_dict(),
        rows=rows,
        hit_counts_equal=equal,
        prefetch_on=prefetch_on,
        verdict="; ".join(parts) + ".",
    )
