"""Figures, one at a time: what each must and must not draw, from hand-made frames.

Expectations come from the frames themselves (which sizes exist, which values
are out of range), never from running the figure code; the shared structure
checks (units, legends, canvas) are in test_analysis_visual.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mer.analysis import figcheck, plots, style

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _svg_text(out: Path) -> str:
    root = ET.parse(out.with_suffix(".svg")).getroot()
    return " ".join(" ".join(root.itertext()).split())


def _files(paths: list[Path], out: Path) -> None:
    assert sorted(p.suffix for p in paths) == [".pdf", ".png", ".svg"]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    # atomic writes leave nothing else behind
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in paths)


def _mrc(sizes: list[int], policies: dict[str, float]) -> pd.DataFrame:
    rows = []
    for scope in ("global", "per-layer"):
        for policy, offset in policies.items():
            for s in sizes:
                rows.append((policy, scope, s, min(1.0, s / 160 + offset)))
    return pd.DataFrame(rows, columns=["policy", "scope", "cache_slots", "hit_rate"])


def _series(fig: object, **match: str) -> list[object]:
    out = []
    for ax in fig.axes:  # type: ignore[attr-defined]
        for a in [*ax.lines, *ax.collections]:
            keys = style.series_keys(a)
            if keys is not None and all(keys.get(k) == v for k, v in match.items()):
                out.append(a)
    return out


def test_runs_of_consecutive_sizes() -> None:
    runs = style.runs_of_consecutive([1, 2, 3, 8, 16, 17])
    assert [r.tolist() for r in runs] == [[0, 1, 2], [3], [4, 5]]


def test_curve_is_a_line_only_across_computed_sizes(tmp_path: Path) -> None:
    sizes = [1, 2, 3, 8, 16, 17]
    out = tmp_path / "mrc"
    w = plots.plot_mrc(_mrc(sizes, {"opt": 0.1, "fifo": 0.0}), out, title="t", scopes=["global"])
    _files(w, out)
    lines = _series(w.figure, policy="fifo")
    drawn = sorted(float(x) for a in lines for x in a.get_xdata())
    assert drawn == [float(s) for s in sizes]  # every computed size, nothing else
    for a in lines:
        x = np.asarray(a.get_xdata())
        if a.get_linestyle() not in ("None", "none"):
            assert np.all(np.diff(x) == 1)  # a line never crosses a size that was not computed
        else:
            assert x.size == 1
    assert figcheck.check_figure(w.figure) == []


def test_identical_curves_are_named_together(tmp_path: Path) -> None:
    df = _mrc(list(range(1, 65)), {"opt": 0.1, "lfu": 0.0, "sieve": 0.0, "lru": 0.05})
    w = plots.plot_mrc(df, tmp_path / "m", title="t", scopes=["global"])
    text = _svg_text(tmp_path / "m")
    assert "sieve (= lfu at every size)" in text
    assert any("lfu" in n and "sieve" in n for n in w.notes)


def test_claim_is_marked_only_inside_the_sizes_drawn(tmp_path: Path) -> None:
    small = _mrc([8, 16, 32], {"opt": 0.1, "lru": 0.0})
    w = plots.plot_mrc(small, tmp_path / "a", title="t", claim=plots.SEED_CLAIM)
    assert not _series(w.figure, claim="published")
    assert any("256 slots" in n for n in w.notes)
    assert w.figure.axes[0].get_xlim()[1] < 40  # the axis is the data's, not the claim's
    big = _mrc([64, 128, 256], {"opt": 0.1, "lru": 0.0})
    (tmp_path / "b").mkdir()
    w = plots.plot_mrc(big, tmp_path / "b" / "m", title="t", claim=plots.SEED_CLAIM)
    assert len(_series(w.figure, claim="published")) == 2  # one star per scope panel
    assert "97.46%" in _svg_text(tmp_path / "b" / "m")


def test_miss_ratio_is_one_minus_hit_rate_and_named_so(tmp_path: Path) -> None:
    df = _mrc([1, 2, 3], {"opt": 0.5, "lru": 0.0})
    w = plots.plot_mrc(df, tmp_path / "m", title="t", scopes=["global"], metric=style.MISS_RATIO)
    (line,) = _series(w.figure, policy="lru")
    expected = [(1 - min(1.0, s / 160)) * 100 for s in (1, 2, 3)]
    assert np.allclose(line.get_ydata(), expected)
    assert w.figure.axes[0].get_ylabel().startswith("miss ratio (%")


def test_overlay_keeps_policy_colour_and_varies_line_style(tmp_path: Path) -> None:
    a = _mrc(list(range(1, 40)), {"opt": 0.1, "lru": 0.0})
    b = _mrc(list(range(1, 40)), {"opt": 0.12, "lru": 0.02})
    w = plots.plot_mrc(
        [("real", a), ("synthetic", b)], tmp_path / "o", title="t", scopes=["global"]
    )
    real = _series(w.figure, policy="lru", source="real")
    synth = _series(w.figure, policy="lru", source="synthetic")
    assert real and synth
    assert {r.get_color() for r in real + synth} == {style.policy_color("lru")}
    assert real[0].get_linestyle() != synth[0].get_linestyle()
    text = _svg_text(tmp_path / "o")
    assert "real" in text and "synthetic" in text
    assert figcheck.check_figure(w.figure) == []


def _sweep() -> pd.DataFrame:
    rows = []
    for policy in ("lru", "fifo"):
        for predictor in ("none", "markov"):
            for slots in (32, 64, 128):
                rows.append(
                    dict(
                        policy=policy,
                        predictor=predictor,
                        scope="global",
                        cache_slots=slots,
                        tokens=100,
                        tokens_per_s=2.0 + slots / 64,
                        hit_rate=slots / 256,
                        io_wait_share=0.5 - slots / 512,
                    )
                )
    return pd.DataFrame(rows)


def test_sweep_draws_bounds_only_inside_the_data(tmp_path: Path) -> None:
    df = _sweep()
    top = float(df["tokens_per_s"].max())  # 4.0
    w = plots.plot_sweep_tokens_per_s(
        df,
        tmp_path / "s",
        title="t",
        bounds={"compute bound (hw)": top * 1.1, "memory-bandwidth bound (hw)": top * 50},
        curves={"SSD bound at OPT's miss rate (hw)": ([32, 64, 128], [3.0, 4.2, 900.0])},
    )
    assert _series(w.figure, bound="compute")
    assert not _series(w.figure, bound="memory")
    ssd = _series(w.figure, bound="ssd")
    # one segment per predictor panel at each size below the reach, none at 128 (900 tokens/s)
    assert sorted({round(float(a.get_ydata()[0]), 3) for a in ssd}) == [3.0, 4.2]
    assert any("memory-bandwidth" in n for n in w.notes) and any("128" in n for n in w.notes)
    ax = w.figure.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] < top * 2  # the data fill the axis
    assert figcheck.check_figure(w.figure) == []


def test_io_share_is_a_sentence_when_it_does_not_differ() -> None:
    df = _sweep().assign(io_wait_share=0.013)
    differs, sentence = plots.io_share_spread(df)
    assert not differs and "1.3% to 1.3%" in sentence and "not drawn" in sentence
    differs, sentence = plots.io_share_spread(_sweep())
    assert differs and "25.0% to 43.8%" in sentence  # 0.5 - 128/512 and 0.5 - 32/512


def test_predicted_vs_measured_axes_start_at_zero(tmp_path: Path) -> None:
    sim = dict(policy="lru", predictor="none", cache_slots=64, tokens_per_s=6.0, hit_rate=0.8114)
    run = dict(sim, tokens_per_s=4.0, hit_rate=0.8109)
    w = plots.plot_predicted_vs_measured([(sim, run)], tmp_path / "p", title="P vs M")
    tps, hit = w.figure.axes[:2]
    assert tps.get_xlim()[0] == 0 and tps.get_ylim()[0] == 0
    assert tps.get_xlim()[1] >= 6.0
    assert hit.get_xlim() == (0.0, 100.0) and hit.get_ylim() == (0.0, 100.0)
    text = _svg_text(tmp_path / "p")
    assert "+50%" in text  # (6 - 4) / 4
    assert "within ±10%" in text and "within ±25%" in text and "y = x" in text
    assert figcheck.check_figure(w.figure) == []


def test_popularity_scale_spans_exactly_the_data(tmp_path: Path) -> None:
    shares = np.array([[0.05, 0.15, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25]])
    w = plots.plot_popularity_heatmap(shares, tmp_path / "h", title="t")
    im = w.figure.axes[0].images[0]
    lo, hi = im.norm.vmin, im.norm.vmax
    assert np.isclose(2**lo, 0.05 * 4) and np.isclose(2**hi, 0.6 * 4)
    assert "0.20x to 2.40x" in _svg_text(tmp_path / "h")


@pytest.mark.parametrize("rank_known", [True, False])
def test_repetition_has_no_first_choice_without_ranks(tmp_path: Path, rank_known: bool) -> None:
    first = list(np.linspace(0.1, 0.3, 32))
    fos = list(np.linspace(0.4, 0.6, 32))
    w = plots.plot_repetition(
        first,
        fos,
        tmp_path / "r",
        title="t",
        baseline={"first": 0.125, "first_or_second": 0.464},
        rank_known=rank_known,
    )
    text = _svg_text(tmp_path / "r")
    assert "first or second choice" in text and "(46.4%)" in text
    assert ("this trace: first choice" in text) is rank_known
    assert bool(_series(w.figure, series="trace-first")) is rank_known
    assert figcheck.check_figure(w.figure) == []


def test_unknown_policies_get_a_stable_look() -> None:
    a = style.policy_style("layer-aware-lru")
    assert style.policy_style("layer-aware-lru") == a
    assert a.color not in {s.color for s in style.POLICY_STYLES.values()}
    assert style.policy_order(["sieve", "opt", "arc"]) == ["opt", "arc", "sieve"]


def test_checker_catches_what_it_claims(tmp_path: Path) -> None:
    """The checker fails a figure with an unlabelled axis, a stray series and clipped text."""
    import matplotlib.pyplot as plt

    fig, axes = style.figure()
    ax = axes[0, 0]
    ax.plot([1, 2], [1, 2])  # untagged
    style.tag_series(ax.plot([1, 2], [2, 1])[0], policy="lru")
    ax.set_ylabel("no unit here")
    fig.text(1.2, 0.5, "off the canvas")
    problems = figcheck.check_figure(fig)
    plt.close(fig)
    joined = " | ".join(problems)
    assert "no x label" in joined and "has no unit" in joined
    assert "untagged Line2D" in joined and "plotted but not in any legend: policy=lru" in joined
    assert "text outside the canvas: 'off the canvas'" in joined
