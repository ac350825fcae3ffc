"""compare: refuses different experiments, computes relative errors, judges hit counts."""

from __future__ import annotations

import pytest
from summaries import make_summary

from mer.analysis.compare import compare
from mer.errors import BadInput
from mer.summary import RunSummary


def _summary(**over: object) -> RunSummary:
    return make_summary(**over)


def test_refuses_runs_of_different_experiments() -> None:
    with pytest.raises(BadInput) as exc:
        compare(_summary(), _summary(kind="measured", policy="fifo", cache_slots=32))
    msg = str(exc.value)
    assert "policy" in msg and "cache_slots" in msg and "'lru' vs 'fifo'" in msg


def test_relative_errors_and_equal_hits_verdict() -> None:
    c = compare(_summary(), _summary(kind="measured", tokens_per_s=4.0, wall_s=2.5))
    row = c.row("tokens/s")
    assert row.predicted == 5.0 and row.measured == 4.0
    assert row.rel_error == pytest.approx((5.0 - 4.0) / 4.0)
    assert c.hit_counts_equal
    assert "identical" in c.verdict and "over-predicted by 25.0%" in c.verdict


def test_prefetch_off_hit_mismatch_is_called_a_bug() -> None:
    c = compare(_summary(), _summary(kind="measured", hits=399, misses=241))
    assert not c.hit_counts_equal
    assert "BUG" in c.verdict


def test_text_layout_names_every_metric() -> None:
    text = compare(_summary(), _summary(kind="measured")).format_text()
    for label in ("hit rate", "misses", "tokens/s", "I/O wait share", "verdict"):
        assert label in text
