"""Sections: measured runs against their predictions, prefetch or not, per-layer hit rates, details."""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.analysis.compare import compare
from mer.analysis.plots import (
    pair_label,
    plot_layer_hit_rates,
    plot_predicted_vs_measured,
    plot_token_latency,
)
from mer.analysis.report import signed
from mer.analysis.sections import LoadedPair, Section, Study, section, tokens_window
from mer.errors import BadInput


def _rel(p: float, m: float) -> float:
    return (p - m) / m * 100 if m else float("nan")


def run_window(study: Study) -> str:
    pairs = study.pairs
    tokens = {p.run.tokens for p in pairs}
    n = study.trace.n_tokens
    if len(tokens) == 1:
        return tokens_window(tokens.pop(), n)
    return "; ".join(
        tokens_window(p.run.tokens, n, p.role or pair_label(p.run.to_dict())) for p in pairs
    )


def _config(s: Any) -> str:
    return f"{s.policy} ({s.scope}) / {s.predictor} / {s.cache_slots} slots"


def ranking_sentence(pairs: list[LoadedPair]) -> str:
    """Whether the measured order of the runs by tokens/s is the predicted one."""
    if len(pairs) < 2:
        return ""
    names = [p.role or _config(p.run) for p in pairs]
    pred = [names[i] for i in np.argsort([-p.sim.tokens_per_s for p in pairs], kind="stable")]
    meas = [names[i] for i in np.argsort([-p.run.tokens_per_s for p in pairs], kind="stable")]
    if pred == meas:
        return f"Measured and predicted agree on the order by tokens/s: {' > '.join(meas)}."
    return (
        f"The measured order by tokens/s ({' > '.join(meas)}) disagrees with the predicted one "
        f"({' > '.join(pred)}): the simulator's ranking does not hold on this machine for these runs."
    )


def _sweep_echo(study: Study, p: LoadedPair) -> str:
    """What the sweep said about the same configuration, when its token window was different."""
    res = study.sweep
    if res is None:
        return ""
    s = p.sim
    m = res[
        (res["policy"] == s.policy)
        & (res["scope"] == s.scope)
        & (res["predictor"] == s.predictor)
        & (res["cache_slots"] == s.cache_slots)
    ]
    if m.empty or "tokens" not in m.columns or int(m["tokens"].iloc[0]) == s.tokens:
        return ""
    row = m.iloc[0]
    return (
        f"The sweep scored {_config(s)} at {float(row['hit_rate']) * 100:.2f}% hit rate and "
        f"{float(row['tokens_per_s']):.3g} tokens/s over its {int(row['tokens'])} tokens; over the "
        f"{s.tokens} tokens run here the simulator predicts {s.hit_rate * 100:.2f}% and "
        f"{s.tokens_per_s:.3g} tokens/s. The difference is the token window (different routing), not the model."
    )


@section(order=40, key="runs")
def runs_section(study: Study) -> Section | None:
    pairs = study.pairs
    if not pairs:
        return None
    tr = study.trace
    sec = Section("Measured runs against their predictions", window=run_window(study))
    s0, r0 = pairs[0].sim, pairs[0].run
    sec.text(
        f"Each configuration was executed by the real engine (expert shape {r0.shape}, on "
        f"{r0.hardware}) and simulated on the profile {s0.hardware}, over the same tokens."
    )
    rows = []
    for p in pairs:
        s, r = p.sim, p.run
        rows.append(
            [
                p.role or "-",
                _config(s),
                s.tokens_per_s,
                r.tokens_per_s,
                signed(_rel(s.tokens_per_s, r.tokens_per_s)),
                s.hit_rate * 100,
                r.hit_rate * 100,
                signed((s.hit_rate - r.hit_rate) * 100, 2),
            ]
        )
    sec.table(
        [
            "run",
            "configuration",
            "predicted tokens/s",
            "measured tokens/s",
            "tokens/s error (%, + = over-predicted)",
            "predicted hit rate (%)",
            "measured hit rate (%)",
            "hit-rate difference (points)",
        ],
        rows,
    )
    sec.text(ranking_sentence(pairs), _sweep_echo(study, pairs[0]))
    worst = max(pairs, key=lambda p: abs(_rel(p.sim.tokens_per_s, p.run.tokens_per_s)))
    err = _rel(worst.sim.tokens_per_s, worst.run.tokens_per_s)
    sec.figure(
        plot_predicted_vs_measured(
            [(p.sim.to_dict(), p.run.to_dict()) for p in pairs],
            study.figure_path("predicted-vs-measured"),
            title=(
                f"Predicted ({s0.hardware}) vs measured ({r0.hardware}): {tr.name}, expert shape "
                f"{r0.shape}, {run_window(study)}"
            ),
        ),
        f"Look at the distance from the diagonal: hit rates sit on it, tokens/s is off by up to {err:+.0f}% "
        f"({worst.role or _config(worst.run)})",
        "predicted vs measured",
    )
    lat = [
        (
            f"{p.role}: {_config(p.run)}" if p.role else _config(p.run),
            p.sim_tokens["time_s"].to_numpy(),
            p.run_tokens["time_s"].to_numpy(),
        )
        for p in pairs
        if p.sim_tokens is not None and p.run_tokens is not None
    ]
    if lat:
        sec.figure(
            plot_token_latency(
                lat,
                study.figure_path("token-latency"),
                title=f"Per-token latency, predicted vs measured: {tr.name}",
            ),
            "Compare the spread of the two curves, not only their medians: a vertical predicted curve "
            "means the simulator sees no variation the machine has",
            "per-token latency",
        )
    return sec


@section(order=45, key="prefetch")
def prefetch_section(study: Study) -> Section | None:
    """Each prefetching run beside the same configuration without prefetch."""
    pairs = study.pairs
    found = []
    for p in pairs:
        if p.run.predictor == "none":
            continue
        for q in pairs:
            r, s = q.run, p.run
            if r.predictor == "none" and (r.policy, r.scope, r.cache_slots, r.tokens) == (
                s.policy,
                s.scope,
                s.cache_slots,
                s.tokens,
            ):
                found.append((p, q))
    if not found:
        return _prefetch_in_sweep(study)
    sec = Section("Prefetch or not", window=run_window(study))
    rows = []
    for p, q in found:
        meas = _rel(p.run.tokens_per_s, q.run.tokens_per_s)
        pred = _rel(p.sim.tokens_per_s, q.sim.tokens_per_s)
        rows.append(
            [
                f"{p.run.policy} / {p.run.cache_slots} slots",
                p.run.predictor,
                p.run.tokens_per_s,
                q.run.tokens_per_s,
                signed(meas),
                signed(pred),
                p.run.hit_rate * 100,
                q.run.hit_rate * 100,
            ]
        )
    sec.table(
        [
            "configuration",
            "predictor",
            "measured tokens/s, prefetch",
            "measured tokens/s, none",
            "measured gain (%)",
            "predicted gain (%)",
            "hit rate, prefetch (%)",
            "hit rate, none (%)",
        ],
        rows,
    )
    p, q = found[0]
    meas = _rel(p.run.tokens_per_s, q.run.tokens_per_s)
    pred = _rel(p.sim.tokens_per_s, q.sim.tokens_per_s)
    pf = p.run.prefetch
    sec.text(
        f"Prefetching with {p.run.predictor} changed measured tokens/s by {meas:+.1f}% (predicted {pred:+.1f}%) "
        f"and the hit rate by {(p.run.hit_rate - q.run.hit_rate) * 100:+.1f} points; of "
        f"{pf.get('issued', 0):,} prefetches issued, {pf.get('used', 0):,} were used, {pf.get('late', 0):,} "
        f"arrived late and {pf.get('wasted', 0):,} were wasted."
    )
    return sec


def _prefetch_in_sweep(study: Study) -> Section | None:
    """No measured pair differs only in prefetching: what the sweep predicts it does at the
    first run's cache (every predictor the sweep tried, against none)."""
    res = study.sweep
    if res is None or not study.pairs or res["predictor"].nunique() < 2:
        return None
    r = study.pairs[0].run
    same = res[
        (res["policy"] == r.policy)
        & (res["scope"] == r.scope)
        & (res["cache_slots"] == r.cache_slots)
    ]
    base = same[same["predictor"] == "none"]
    if same.empty or base.empty:
        return None
    from mer.analysis.sections.sweep import sweep_window

    b = base.iloc[0]
    sec = Section("Prefetch or not", window=sweep_window(res, study))
    rows = []
    for _, row in same.sort_values("tokens_per_s", ascending=False).iterrows():
        rows.append(
            [
                str(row["predictor"]),
                float(row["tokens_per_s"]),
                signed(_rel(float(row["tokens_per_s"]), float(b["tokens_per_s"]))),
                float(row["hit_rate"]) * 100,
                float(row["io_wait_share"]) * 100,
            ]
        )
    others = same[same["predictor"] != "none"].sort_values("tokens_per_s", ascending=False)
    changes = ", ".join(
        f"{row['predictor']} {_rel(float(row['tokens_per_s']), float(b['tokens_per_s'])):+.1f}%"
        for _, row in others.iterrows()
    )
    run_pf = (
        f"The {study.pairs[0].role or 'first'} run does not prefetch"
        if r.predictor == "none"
        else f"No run here differs from the {study.pairs[0].role or 'first'} one only in prefetching"
    )
    sec.text(
        f"{run_pf}, so this comparison is the simulator's: at its cache "
        f"({_config(r).rsplit(' / ', 2)[0]}, {r.cache_slots} slots) prefetching changes predicted "
        f"tokens/s against no prefetch by: {changes}."
    )
    sec.table(
        [
            "predictor",
            "predicted tokens/s",
            "change against none (%)",
            "hit rate (%)",
            "I/O wait (% of time)",
        ],
        rows,
    )
    return sec


@section(order=50, key="layers")
def layers_section(study: Study) -> Section | None:
    """Per-layer hit rates of the first run's cache without prefetch, beside LRU and OPT."""
    pairs = study.pairs
    if not pairs:
        return None
    from mer.core import Replay, ReplayConfig, replay_counts

    r = pairs[0].run
    base = ReplayConfig(
        policy=r.policy, cache_slots=r.cache_slots, scope=r.scope, tokens=r.tokens, phase=r.phase
    )
    rates: dict[str, list[float]] = {}
    policies: dict[str, str] = {}
    for policy in dict.fromkeys([r.policy, "lru", "opt"]):
        cfg = ReplayConfig(**{**base.to_dict(), "policy": policy})
        try:
            stats = replay_counts(Replay.from_trace(study.trace, cfg))
        except BadInput:
            continue
        label = f"{policy}, no prefetch"
        rates[label] = (stats.hits / (stats.hits + stats.misses).clip(min=1)).tolist()
        policies[label] = policy
    if not rates:
        return None
    sec = Section(
        "Hit rate per layer (no prefetch)", window=tokens_window(r.tokens, study.trace.n_tokens)
    )
    prefetched = (
        f" (the run above prefetched with {r.predictor}; none here)"
        if r.predictor != "none"
        else ""
    )
    opt = np.asarray(rates.get("opt, no prefetch", []))
    mine = np.asarray(rates[f"{r.policy}, no prefetch"])
    where = ""
    if opt.size and mine.size:
        worst = int(np.argmax(opt - mine))
        where = f"; the largest gap to OPT is at layer {worst} ({(opt[worst] - mine[worst]) * 100:.0f} points)"
    sec.figure(
        plot_layer_hit_rates(
            rates,
            study.figure_path("layer-hit-rates"),
            title=f"Per-layer hit rate without prefetch, {r.cache_slots} slots ({r.scope}): {study.name}",
            policies=policies,
        ),
        f"All three replay the same cache size without prefetch{prefetched}: look at which layers "
        f"fall furthest below OPT{where}",
        "per-layer hit rates",
    )
    return sec


@section(order=90, key="details")
def details_section(study: Study) -> Section | None:
    """The engine's own run log and the field-by-field comparison, for the record."""
    pairs = study.pairs
    if not pairs:
        return None
    sec = Section("Run details", window=run_window(study))
    for p in pairs:
        sec.text(f"**{p.role or _config(p.run)}**")
        sec.code(p.run.format_text())
        sec.code(compare(p.sim, p.run).format_text())
    return sec
