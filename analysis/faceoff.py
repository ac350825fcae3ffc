"""The sweep's winner against plain LRU at the same cache size, both run for real.

A sweep ranks configurations by predicted tokens/s; the claim worth checking is
that its winner beats the default (LRU, global, no prefetch) on the machine
itself. `baseline_for` picks the two configurations, the demo runs each for real
(alternating, so that drift in the machine's speed hits both; the median of
the rounds' ratios decides) and in the
simulator, and `faceoff_section` writes the report's section: both predictions
next to both measurements, the sweep's spread, and in words whether the
measured ranking agrees with the predicted one, and what differs when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mer.analysis.report import md_table
from mer.summary import RunSummary

CONFIG_KEYS = ("policy", "scope", "predictor", "cache_slots", "pipeline_depth")
PLAIN_LRU = {"policy": "lru", "scope": "global", "predictor": "none", "pipeline_depth": 1}


def label(cfg: dict[str, Any]) -> str:
    pf = "" if cfg["predictor"] == "none" else f" + {cfg['predictor']} prefetch"
    return f"{cfg['policy']} ({cfg['scope']}){pf}, {int(cfg['cache_slots'])} slots"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(
        str(a.get(k, PLAIN_LRU.get(k))) == str(b.get(k, PLAIN_LRU.get(k))) for k in CONFIG_KEYS
    )


def baseline_for(
    winner: dict[str, Any], sweep: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(challenger, plain LRU at the challenger's cache size, note).

    The challenger is the winner; when the winner is plain LRU itself, it is the fastest other
    configuration at that cache size, and the note says so.
    """
    base = {**PLAIN_LRU, "cache_slots": int(winner["cache_slots"])}
    if not _same(winner, base):
        return dict(winner), base, ""
    same_size = sweep[sweep["cache_slots"] == base["cache_slots"]].sort_values(
        "tokens_per_s", ascending=False
    )
    for _, row in same_size.iterrows():
        cand = {k: row[k] for k in CONFIG_KEYS if k in row}
        if not _same(cand, base):
            return (
                cand,
                base,
                (
                    "The sweep's winner is plain LRU itself; the challenger below is the fastest "
                    "other configuration at the same cache size."
                ),
            )
    return dict(winner), base, "The sweep holds no configuration other than plain LRU at this size."


@dataclass
class Side:
    """One configuration: its prediction and its measured runs."""

    cfg: dict[str, Any]
    predicted: RunSummary
    measured: list[RunSummary] = field(default_factory=list)

    @property
    def best(self) -> RunSummary:
        """The median run by tokens/s (the upper one of an even count): robust to one run
        that load on a shared machine slowed down."""
        ranked = sorted(self.measured, key=lambda s: s.tokens_per_s)
        return ranked[len(ranked) // 2]


def spread_sentence(sweep: pd.DataFrame) -> str:
    """How far the sweep's configurations are apart, and how far the best is from compute."""
    tps = sweep["tokens_per_s"].astype(float)
    best, worst = float(tps.max()), float(tps.min())
    text = (
        f"The sweep's {len(sweep)} configurations spread from {worst:.2f} to {best:.2f} predicted "
        f"tokens/s ({best / worst:.2f}x between the best and the worst)"
        if worst > 0
        else f"The sweep's best configuration predicts {best:.2f} tokens/s"
    )
    if "bound_compute_tokens_per_s" in sweep.columns:
        row = sweep.iloc[int(np.argmax(tps.to_numpy()))]
        bound = float(row["bound_compute_tokens_per_s"])
        if bound > 0:
            text += (
                f"; the fastest reaches {best / bound:.0%} of the compute bound, and its I/O share "
                f"is {float(row['io_wait_share']):.0%}"
            )
            text += (
                ": the SSD, not the FFN, decides tokens/s here, so the policy matters."
                if best / bound < 0.8
                else ": compute, not the SSD, bounds it, so policies differ little."
            )
            return text
    return text + "."


def faceoff_section(challenger: Side, lru: Side, sweep: pd.DataFrame, note: str = "") -> list[str]:
    """The report's section (Markdown lines)."""
    rows = []
    for side in (challenger, lru):
        p = side.predicted
        runs = ", ".join(f"{m.tokens_per_s:.2f}" for m in side.measured)
        b = side.best
        rows.append(
            [
                label(side.cfg),
                round(p.tokens_per_s, 3),
                runs,
                round(p.hit_rate * 100, 2),
                round(b.hit_rate * 100, 2),
                round(p.io_wait_share * 100, 1),
                round(b.io_wait_share * 100, 1),
            ]
        )
    pc, pl = challenger.predicted.tokens_per_s, lru.predicted.tokens_per_s
    mc, ml = challenger.best.tokens_per_s, lru.best.tokens_per_s
    p_ratio = pc / pl
    # Runs alternate (challenger, LRU, challenger, ...): each round's ratio compares runs a few
    # seconds apart, so drift in the machine's speed cancels; the median round decides.
    rounds = [
        c.tokens_per_s / b.tokens_per_s
        for c, b in zip(challenger.measured, lru.measured, strict=False)
        if b.tokens_per_s > 0
    ]
    m_ratio = float(np.median(rounds)) if rounds else mc / ml
    wins = sum(r > 1 for r in rounds)
    name = label(challenger.cfg)
    if (p_ratio > 1) == (m_ratio > 1):
        verdict = (
            f"The measured ranking agrees with the predicted one: {name} ran at {m_ratio:.2f}x "
            f"plain LRU's tokens/s (predicted {p_ratio:.2f}x)"
        )
    else:
        faster, slower = ("plain LRU", name) if m_ratio < 1 else (name, "plain LRU")
        verdict = (
            f"**The measured ranking disagrees with the predicted one**: the simulator predicted "
            f"{name} at {p_ratio:.2f}x plain LRU's tokens/s, but {faster} ran faster than "
            f"{slower} (median run {mc:.2f} vs {ml:.2f} tokens/s, median round {m_ratio:.2f}x)"
        )
    if rounds:
        verdict += f"; {name} was the faster in {wins} of {len(rounds)} rounds."
    else:
        verdict += "."
    if (p_ratio > 1) != (m_ratio > 1):
        verdict += " " + _why(challenger, lru)
    hit_gap = (challenger.best.hit_rate - lru.best.hit_rate) * 100
    detail = (
        f"Measured hit rates differ by {hit_gap:+.1f} points and I/O shares are "
        f"{challenger.best.io_wait_share:.0%} vs {lru.best.io_wait_share:.0%}; measured "
        f"against predicted tokens/s (median run): {challenger.best.tokens_per_s / pc - 1:+.0%} "
        f"for {name}, {lru.best.tokens_per_s / pl - 1:+.0%} for plain LRU."
    )
    n_runs = len(challenger.measured)
    return [
        "## The winner against plain LRU, run for real",
        "",
        *([note, ""] if note else []),
        spread_sentence(sweep),
        "",
        f"Both configurations ran on the real engine {n_runs} time(s), alternating (a round is "
        "one run of each, seconds apart, so that drift in the machine's speed hits both; the "
        "median round decides), and in the simulator on the probed profile, over the same "
        "tokens:",
        "",
        md_table(
            [
                "configuration",
                "predicted tokens/s",
                "measured tokens/s (each run)",
                "predicted hit rate %",
                "measured hit rate %",
                "predicted I/O share %",
                "measured I/O share %",
            ],
            rows,
        ),
        "",
        verdict,
        "",
        detail,
        "",
    ]


def _why(challenger: Side, lru: Side) -> str:
    c, b = challenger.best, lru.best
    if abs(c.hit_rate - b.hit_rate) < 0.005:
        return (
            "Their hit rates are the same, so the difference is timing the simulator does not "
            "see (load on the machine during the runs, the FFN's speed varying between them)."
        )
    if (c.hit_rate > b.hit_rate) != (
        challenger.predicted.tokens_per_s > lru.predicted.tokens_per_s
    ):
        return "The hit rates rank them the other way round from the predicted tokens/s."
    return (
        "The hit rates rank them as predicted, so the measured times differ from the model's: "
        f"I/O wait per token {c.io_wait_s / max(c.tokens, 1):.3f} s vs "
        f"{b.io_wait_s / max(b.tokens, 1):.3f} s, compute {c.compute_s / max(c.tokens, 1):.3f} s vs "
        f"{b.compute_s / max(b.tokens, 1):.3f} s per token."
    )
