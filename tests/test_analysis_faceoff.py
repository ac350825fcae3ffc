"""The winner-vs-LRU face-off: which configurations, and what the report says about them."""

from __future__ import annotations

import pandas as pd
from test_analysis_compare import _summary

from mer.analysis.faceoff import Side, baseline_for, faceoff_section, spread_sentence

WIN = {"policy": "s3fifo", "scope": "per-layer", "predictor": "none", "cache_slots": 128}
LRU = {"policy": "lru", "scope": "global", "predictor": "none", "cache_slots": 128}


def _sweep() -> pd.DataFrame:
    rows = [
        {**WIN, "pipeline_depth": 1, "tokens_per_s": 12.0},
        {**LRU, "pipeline_depth": 1, "tokens_per_s": 10.0},
        {**LRU, "cache_slots": 64, "pipeline_depth": 1, "tokens_per_s": 6.0},
    ]
    df = pd.DataFrame(rows)
    df["bound_compute_tokens_per_s"] = 40.0
    df["io_wait_share"] = [0.6, 0.65, 0.8]
    return df


def test_baseline_is_plain_lru_at_the_winners_size_and_a_challenger_when_lru_wins() -> None:
    ch, base, note = baseline_for(WIN, _sweep())
    assert ch["policy"] == "s3fifo" and base == {**LRU, "pipeline_depth": 1} and note == ""
    ch, base, note = baseline_for({**LRU, "pipeline_depth": 1}, _sweep())
    assert ch["policy"] == "s3fifo" and ch["cache_slots"] == 128  # the best other at that size
    assert "plain LRU itself" in note


def _side(cfg: dict, pred: float, meas: list[float], hit: float = 0.5) -> Side:
    kw = dict(policy=cfg["policy"], scope=cfg["scope"], cache_slots=cfg["cache_slots"])
    return Side(
        cfg,
        _summary(tokens_per_s=pred, hit_rate=hit, **kw),
        [_summary(kind="measured", tokens_per_s=m, hit_rate=hit, **kw) for m in meas],
    )


def test_the_section_says_when_the_measured_ranking_agrees_or_disagrees() -> None:
    agree = "\n".join(
        faceoff_section(
            _side(WIN, 12.0, [9.0, 11.0, 13.0], 0.56),
            _side(LRU, 10.0, [10.0, 8.0, 13.5], 0.5),
            _sweep(),
        )
    )
    # rounds: 0.9, 1.375, 0.963 -> median 0.963 < 1: disagrees, though the median runs agree
    assert "disagrees" in agree and "0.96x" in agree and "1 of 3 rounds" in agree
    agree = "\n".join(
        faceoff_section(
            _side(WIN, 12.0, [9.0, 11.0, 13.0], 0.56),
            _side(LRU, 10.0, [8.0, 10.0, 12.0], 0.5),
            _sweep(),
        )
    )
    assert (
        "agrees with the predicted one" in agree and "1.10x" in agree
    )  # median of 9/8, 1.1, 13/12
    assert "3 of 3 rounds" in agree
    assert "disagrees" not in agree
    assert "2.00x between the best and the worst" in agree  # 12 / 6
    assert "30% of the compute bound" in agree and "the SSD, not the FFN" in agree
    disagree = "\n".join(
        faceoff_section(_side(WIN, 12.0, [7.0], 0.5), _side(LRU, 10.0, [8.0], 0.5), _sweep())
    )
    assert "disagrees with the predicted one" in disagree
    assert "plain LRU ran faster" in disagree and "hit rates are the same" in disagree


def test_spread_sentence_says_compute_bound_when_it_is() -> None:
    df = _sweep()
    df["bound_compute_tokens_per_s"] = 12.5
    assert "compute, not the SSD" in spread_sentence(df)
