"""mer's figures, imported from one place: `from mer.analysis.plots import plot_mrc`.

The figures live in `mer.analysis.figures` (one module per topic) and all draw
through `mer.analysis.style` (colours, markers, units, sizes, files). To add a
figure, write it there (see `mer.analysis.style` for the recipe) and export it
here.
"""

from __future__ import annotations

from mer.analysis.figures.mrc import SEED_CLAIM, plot_mrc
from mer.analysis.figures.routing import PAPER_REPETITION, plot_popularity_heatmap, plot_repetition
from mer.analysis.figures.runs import (
    pair_label,
    plot_layer_hit_rates,
    plot_predicted_vs_measured,
    plot_token_latency,
)
from mer.analysis.figures.sweep import io_share_spread, plot_io_share, plot_sweep_tokens_per_s
from mer.analysis.figures.validation import plot_validation
from mer.analysis.style import Written, wrap

#: Kept for callers of the first version: `wrap_title(text, width)`.
wrap_title = wrap

__all__ = [
    "PAPER_REPETITION",
    "SEED_CLAIM",
    "Written",
    "io_share_spread",
    "pair_label",
    "plot_io_share",
    "plot_layer_hit_rates",
    "plot_mrc",
    "plot_popularity_heatmap",
    "plot_predicted_vs_measured",
    "plot_repetition",
    "plot_sweep_tokens_per_s",
    "plot_token_latency",
    "plot_validation",
    "wrap_title",
]
