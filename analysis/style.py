"""The one plotting style of mer: every figure draws through these names.

Why one module: a reader compares figures side by side (the report, a paper's
Figure 3 against Figure 5), so a policy must look the same everywhere, OPT
must always read as the ceiling, an axis must always say what it measures and
in which unit, and a point that was computed must never be confused with a
line that was not.

What it fixes, once:

- **One colour and one marker per policy** (`policy_style`), from a
  colour-blind-safe palette; OPT is black, thick, markerless and the region it
  makes unreachable is shaded (`draw_opt`). A policy not in `POLICY_STYLES`
  gets a stable colour and marker from its name (a hash, not its position in a
  legend), so it also looks the same in every figure. To give a new policy its
  own look, add one line to `POLICY_STYLES`.
- **One line style per predictor** (`predictor_linestyle`) and per overlaid
  source (`source_linestyle`), **one look per bound** (`BOUND_STYLES`), never
  a policy's colour.
- **Metrics named as plotted** (`Metric`: `HIT_RATE`, `MISS_RATIO`,
  `TOKENS_PER_S`, ...): the axis label carries the unit, rates are in percent.
- **Exact points as points** (`draw_curve`): consecutive integer sizes are
  joined (they were all computed); a gap in the sizes breaks the line, and a
  lone size is a marker. Nothing is interpolated across sizes never computed.
- **Sizes for a two-column paper** (`COLUMN_IN`, `FULL_IN`, `figure`): figures
  are drawn at their print width with 7-8 pt text, so they are readable
  without scaling; `save` writes PNG, SVG (text kept as text) and PDF at that
  exact size (no tight-bbox growth, so the width is a promise).
- **Checkable structure**: every data artist is tagged (`tag_series`,
  `tag_decor`) and every legend records what its entries stand for
  (`legend`), so `mer.analysis.figcheck` can verify that the legend lists
  exactly the plotted series and that a policy's colour never changes.

To add a figure: write a function in `mer.analysis.figures.<topic>` decorated
with `@styled`, create the canvas with `figure(...)`, draw series with
`draw_curve` / `draw_points` (or tag what you draw with `tag_series`), build
legends with `legend(...)`, and end with `return save(fig, out, notes=...)`;
then export it from `mer.analysis.plots` and add it to the visual test's list
(tests/test_analysis_visual.py), which checks its structure.
"""

from __future__ import annotations

import functools
import textwrap
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from mer.atomic import atomic_path

# -- sizes -------------------------------------------------------------------------------

#: Width of one column of a two-column paper (ACM and IEEE: 3.33-3.5 in).
COLUMN_IN = 3.4
#: Width of a figure spanning both columns.
FULL_IN = 7.0
#: Smallest font drawn (points at print size).
MIN_FONT_PT = 6.0
#: Formats every figure is written in.
FORMATS = (".png", ".svg", ".pdf")
PNG_DPI = 200

_RC: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "figure.titlesize": 8.5,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "legend.handlelength": 1.9,
    "legend.handletextpad": 0.5,
    "legend.columnspacing": 1.0,
    "legend.borderaxespad": 0.2,
    "svg.fonttype": "none",  # text stays <text> in SVG (searchable, checked by tests)
    "pdf.fonttype": 42,  # TrueType in PDF: editable, accepted by paper submission systems
    "figure.constrained_layout.h_pad": 0.03,
    "figure.constrained_layout.w_pad": 0.03,
}

F = TypeVar("F", bound=Any)


def styled(func: F) -> F:
    """Run a figure function under the shared fonts and line widths."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(cast(Any, _RC)):
            return func(*args, **kwargs)

    return cast(F, wrapper)


def figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    width: str | float = "column",
    height: float = 2.4,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """A constrained-layout canvas at print width: "column", "full" or inches.

    `height` is the total height in inches. Returns (fig, axes) with axes
    always a 2-D array (squeeze=False), so callers index the same way for any grid.
    """
    w = COLUMN_IN if width == "column" else FULL_IN if width == "full" else float(width)
    return plt.subplots(
        nrows, ncols, figsize=(w, height), layout="constrained", squeeze=False, **kwargs
    )


# -- what is plotted ------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A plotted quantity: its name, its unit, and how a stored value becomes a drawn one."""

    column: str  # the results column it comes from
    name: str
    unit: str
    scale: float = 1.0  # drawn = stored * scale (fractions -> percent)
    invert: bool = False  # drawn from 1 - stored (miss ratio from hit rate)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})"

    def values(self, stored: Any) -> np.ndarray:
        v = np.asarray(stored, dtype=float)
        return ((1.0 - v) if self.invert else v) * self.scale


HIT_RATE = Metric("hit_rate", "hit rate", "% of lookups", 100.0)
MISS_RATIO = Metric("hit_rate", "miss ratio", "% of lookups", 100.0, invert=True)
TOKENS_PER_S = Metric("tokens_per_s", "tokens/s", "whole model, all layers")
IO_SHARE = Metric("io_wait_share", "I/O wait", "% of token time", 100.0)
CACHE_SLOTS = "cache size (expert slots, all layers)"
LAYER = "MoE layer (0-based index)"
METRICS = {"hit-rate": HIT_RATE, "miss-ratio": MISS_RATIO}


# -- who is drawn -----------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesStyle:
    color: str
    marker: str
    linewidth: float = 1.2
    zorder: float = 3.0


#: Okabe-Ito (colour-blind safe) first, then muted extras; markers tell them apart in grey print.
POLICY_STYLES: dict[str, SeriesStyle] = {
    "opt": SeriesStyle("#000000", "", 1.8, 6.0),
    "lru": SeriesStyle("#0072B2", "o"),
    "fifo": SeriesStyle("#E69F00", "s"),
    "lfu": SeriesStyle("#009E73", "^"),
    "clock": SeriesStyle("#D55E00", "D"),
    "sieve": SeriesStyle("#CC79A7", "v"),
    "s3fifo": SeriesStyle("#56B4E9", "P"),
    "arc": SeriesStyle("#8C564B", "X"),
    "seed-lru-locality": SeriesStyle("#7F7F7F", "*"),
    # mer's layer-cycle policy: drawn a little heavier, so the new curve reads against the classics
    "cycle": SeriesStyle("#AA3377", "h", 1.6, 4.0),
}
_FALLBACK_COLORS = ("#B8860B", "#17BECF", "#6A3D9A", "#A6761D", "#2F4F4F", "#E7298A")
_FALLBACK_MARKERS = ("h", "p", "<", ">", "d", "8")
#: Colours no policy gets: bounds and annotations use these.
BOUND_COLORS = ("#444444", "#882255", "#999933")
#: Measured and predicted, where a figure shows both for one run (colour, line style).
MEASURED: tuple[str, Any] = ("#000000", "-")
PREDICTED: tuple[str, Any] = ("#777777", (0, (4, 1.5)))


def _stable_index(name: str, n: int) -> int:
    return zlib.crc32(name.encode()) % n


def policy_style(policy: str) -> SeriesStyle:
    """The policy's look; an unknown policy gets one derived from its name (stable)."""
    if policy in POLICY_STYLES:
        return POLICY_STYLES[policy]
    i = _stable_index(policy, len(_FALLBACK_COLORS) * len(_FALLBACK_MARKERS))
    return SeriesStyle(
        _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)],
        _FALLBACK_MARKERS[i // len(_FALLBACK_COLORS)],
    )


def policy_color(policy: str) -> str:
    return policy_style(policy).color


def policy_order(policies: Iterable[str]) -> list[str]:
    """OPT first (the ceiling), then the rest by name: the same order in every legend."""
    return sorted(set(policies), key=lambda p: (p != "opt", p))


_PREDICTOR_STYLES: dict[str, Any] = {
    "none": "-",
    "previous-token": (0, (4, 1.5)),
    "markov": (0, (6, 1.5, 1.5, 1.5)),
    "lookahead": (0, (1.5, 1.2)),
    "oracle": (0, (1, 1)),
}
_OTHER_DASHES: tuple[Any, ...] = ((0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (5, 1, 1, 1)))


def predictor_linestyle(predictor: str) -> Any:
    if predictor in _PREDICTOR_STYLES:
        return _PREDICTOR_STYLES[predictor]
    return _OTHER_DASHES[_stable_index(predictor, len(_OTHER_DASHES))]


#: Overlaid sources (traces, runs, machines): first solid, then dashed, dotted, dash-dot.
SOURCE_LINESTYLES: tuple[Any, ...] = ("-", (0, (4, 1.5)), (0, (1.2, 1.2)), (0, (6, 1.5, 1.5, 1.5)))
#: Overlaid sources' marker fill: filled, hollow, filled, hollow.
SOURCE_FILLS = ("full", "none", "full", "none")


def source_linestyle(i: int) -> Any:
    return SOURCE_LINESTYLES[i % len(SOURCE_LINESTYLES)]


@dataclass(frozen=True)
class BoundStyle:
    color: str
    linestyle: Any
    linewidth: float = 1.1


BOUND_STYLES: dict[str, BoundStyle] = {
    "compute": BoundStyle(BOUND_COLORS[0], (0, (5, 2))),
    "memory": BoundStyle(BOUND_COLORS[2], (0, (1, 1.5))),
    "ssd": BoundStyle(BOUND_COLORS[1], (0, (4, 1, 1, 1))),
}


def bound_kind(name: str) -> str:
    low = name.lower()
    return "ssd" if "ssd" in low else "memory" if "memory" in low else "compute"


# -- tags the structure checker reads ------------------------------------------------------

SERIES_GID = "mer-series"
DECOR_GID = "mer-decor"


def tag_series(artist: Any, **keys: str) -> Any:
    """Mark `artist` as a plotted series standing for `keys` (policy=..., source=...).

    The legend must then have an entry for every (key, value) here: figcheck checks it.
    """
    artist.set_gid(SERIES_GID + ";" + ";".join(f"{k}={v}" for k, v in sorted(keys.items())))
    return artist


def tag_decor(artist: Any) -> Any:
    """Mark `artist` as drawing aid (grid band, guide), not a series the legend must list."""
    artist.set_gid(DECOR_GID)
    return artist


def series_keys(artist: Any) -> dict[str, str] | None:
    gid = artist.get_gid() or ""
    if not gid.startswith(SERIES_GID):
        return None
    parts = [p for p in gid.split(";")[1:] if "=" in p]
    return dict(p.split("=", 1) for p in parts)


@dataclass
class LegendEntry:
    """One legend line: what it stands for (`key`, `value`), its text and its handle."""

    key: str
    value: str
    text: str
    handle: Any
    covers: tuple[tuple[str, str], ...] = ()  # further (key, value) pairs this entry names


def header_entry(text: str) -> LegendEntry:
    """A bold group heading inside a legend (not a series)."""
    return LegendEntry("", "", text, Line2D([], [], ls="none"))


def policy_entry(policy: str, text: str | None = None, **line: Any) -> LegendEntry:
    s = policy_style(policy)
    if policy == "opt":
        handle = Line2D([], [], color=s.color, lw=s.linewidth)
    else:
        handle = Line2D([], [], color=s.color, marker=s.marker, lw=s.linewidth, **line)
    return LegendEntry("policy", policy, text or policy_label(policy), handle)


def policy_label(policy: str) -> str:
    return "OPT (Belady, ceiling)" if policy == "opt" else policy


def legend(
    where: Any,
    entries: Sequence[LegendEntry],
    *,
    ncol: int = 2,
    notes: Sequence[str] = (),
    **kwargs: Any,
) -> Any:
    """The legend: below the axes of a figure (never over data), or inside an axes.

    On a figure, the canvas grows by the legend's height (and the `notes`
    printed under it), so the axes keep the height they were given; the
    legend takes the most columns that fit the width. Records the (key, value)
    each entry stands for on the legend object, so the checker can hold it
    against the tagged series.
    """
    handles = [e.handle for e in entries]
    texts = [e.text for e in entries]
    on_fig = hasattr(where, "legends") and not hasattr(where, "get_xlim")
    fig = where if on_fig else where.figure
    renderer = fig.canvas.get_renderer()
    if not on_fig:
        leg = where.legend(handles, texts, ncol=ncol, **kwargs)
    else:
        for n in range(max(1, ncol), 0, -1):  # the most columns that fit the canvas's width
            leg = fig.legend(handles, texts, loc="upper center", ncol=n, **kwargs)
            if n == 1 or leg.get_window_extent(renderer).width <= fig.bbox.width * 0.98:
                break
            leg.remove()
    leg.mer_keys = [(e.key, e.value) for e in entries]
    leg.mer_covers = [c for e in entries for c in e.covers]
    for t, e in zip(leg.get_texts(), entries, strict=True):
        if not e.key:
            t.set_fontweight("bold")
    if on_fig:
        _bottom_block(fig, leg, notes)
    return leg


def legend_columns(fig: Any, columns: Sequence[Sequence[LegendEntry]], **kwargs: Any) -> Any:
    """A figure legend whose groups each fill their own column (padded with blank rows)."""
    cols = [list(c) for c in columns if c]
    rows = max((len(c) for c in cols), default=0)
    flat = []
    for c in cols:
        flat += c + [LegendEntry("", "", "", Line2D([], [], ls="none"))] * (rows - len(c))
    return legend(fig, flat, ncol=len(cols), **kwargs)


def footnote(fig: Any, notes: Sequence[str]) -> None:
    """Small print under a figure without a figure legend (what was not drawn and why)."""
    if notes:
        _bottom_block(fig, None, notes)


def _bottom_block(fig: Any, leg: Any, notes: Sequence[str]) -> None:
    """Reserve room under the axes for the legend and the notes, and place them there."""
    renderer = fig.canvas.get_renderer()
    w, h = fig.get_size_inches()
    pad = 0.04
    note = None
    note_h = 0.0
    if notes:
        note = fig.text(0.5, 0, "", ha="center", va="bottom", fontsize=6.5, color="0.3")
        fit_width(fig, note, "\n".join(notes))
        note_h = note.get_window_extent(renderer).height / fig.dpi + pad
    leg_h = leg.get_window_extent(renderer).height / fig.dpi + pad if leg is not None else 0.0
    new_h = h + leg_h + note_h
    fig.set_size_inches(w, new_h)
    block = (leg_h + note_h) / new_h
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.set(rect=(0, block, 1, 1 - block))
    if leg is not None:
        leg.set_bbox_to_anchor((0.5, block), transform=fig.transFigure)
    if note is not None:
        note.set_position((0.5, pad / 2 / new_h))


# -- drawing ---------------------------------------------------------------------------


def runs_of_consecutive(xs: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Index runs over which x grows by exactly 1: only those were computed at every size."""
    x = np.asarray(xs)
    if x.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(x) != 1) + 1
    return np.split(np.arange(x.size), breaks)


def draw_curve(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    color: str,
    marker: str,
    linestyle: Any = "-",
    linewidth: float = 1.2,
    zorder: float = 3.0,
    fill: str = "full",
    markers_every: int | None = None,
    keys: dict[str, str],
) -> list[Any]:
    """A curve over integer sizes that never interpolates across sizes not computed.

    Runs of consecutive sizes are lines (every size in them was computed); a run
    of one is a marker. Long runs get a marker every `markers_every` points (so
    the policy is told apart in grey print) offset by a stable per-colour phase
    so that overlapping curves do not stack their markers.
    """
    xs = np.asarray(x)
    ys = np.asarray(y, dtype=float)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    artists = []
    mfc = color if fill == "full" else "white"
    for idx in runs_of_consecutive(xs):
        if idx.size == 1:
            (a,) = ax.plot(
                xs[idx],
                ys[idx],
                ls="none",
                marker=marker or "o",
                color=color,
                mfc=mfc,
                ms=2.8,
                mew=0.6,
                zorder=zorder,
            )
        else:
            every = markers_every or max(1, idx.size // 8)
            phase = _stable_index(color, every) if every > 1 else 0
            (a,) = ax.plot(
                xs[idx],
                ys[idx],
                ls=linestyle,
                lw=linewidth,
                color=color,
                marker=marker or None,
                markevery=(phase % idx.size, every) if marker else None,
                mfc=mfc,
                ms=2.8,
                mew=0.6,
                zorder=zorder,
            )
        artists.append(tag_series(a, **keys))
    return artists


def draw_policy_curve(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    policy: str,
    *,
    linestyle: Any = "-",
    fill: str = "full",
    keys: dict[str, str] | None = None,
) -> list[Any]:
    s = policy_style(policy)
    return draw_curve(
        ax,
        x,
        y,
        color=s.color,
        marker=s.marker,
        linestyle=linestyle,
        linewidth=s.linewidth,
        zorder=s.zorder,
        fill=fill,
        keys={"policy": policy, **(keys or {})},
    )


def draw_opt(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    limit: float,
    above: bool = True,
    linestyle: Any = "-",
    shade: bool = True,
    keys: dict[str, str] | None = None,
) -> list[Any]:
    """OPT, always the same: a thick black curve, the region no policy reaches shaded.

    `limit`: the axis end the shading runs to (100% for hit rate, 0 for miss
    ratio); `above`: whether the unreachable side is above the curve.
    """
    xs = np.asarray(x)
    ys = np.asarray(y, dtype=float)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    out = []
    if shade:
        for idx in runs_of_consecutive(xs):
            if idx.size > 1:
                band = ax.fill_between(
                    xs[idx], ys[idx], limit, color="0.9", lw=0, zorder=0.5, step=None
                )
                out.append(tag_series(band, region="unreachable"))
    out += draw_policy_curve(ax, xs, ys, "opt", linestyle=linestyle, keys=keys)
    return out


def unreachable_entry(above: bool = True) -> LegendEntry:
    from matplotlib.patches import Patch

    side = "above" if above else "below"
    return LegendEntry(
        "region", "unreachable", f"unreachable ({side} OPT)", Patch(color="0.9", lw=0)
    )


def draw_hline_bound(ax: Any, value: float, kind: str) -> Any:
    b = BOUND_STYLES[kind]
    line = ax.axhline(value, color=b.color, ls=b.linestyle, lw=b.linewidth, zorder=2)
    return tag_series(line, bound=kind)


def bound_entry(kind: str, text: str) -> LegendEntry:
    b = BOUND_STYLES[kind]
    return LegendEntry(
        "bound", kind, text, Line2D([], [], color=b.color, ls=b.linestyle, lw=b.linewidth)
    )


# -- axes ------------------------------------------------------------------------------


def log_axis(ax: Any, which: str) -> None:
    """Log scale with plain-number ticks at 1, 2, 5 x 10^n and no crowded minor labels."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def ylabel(fig: Any, axes: Any, label: str) -> None:
    """One y label: on the axes when there is one panel, for the stack when there are several."""
    if axes.size == 1:
        axes.flat[0].set_ylabel(label)
    else:
        fig.supylabel(label, fontsize=_RC["axes.labelsize"])


def grid(ax: Any, axis: str = "both") -> None:
    ax.grid(True, axis=axis, which="major")
    ax.set_axisbelow(True)


# -- titles and files -------------------------------------------------------------------


def wrap(text: str, width: int) -> str:
    """Wrap each line of `text` at `width` characters (explicit newlines are kept)."""
    return "\n".join(
        textwrap.fill(line, width, break_on_hyphens=False) if line else line
        for line in text.splitlines() or [""]
    )


def fit_width(fig: Any, artist: Any, text: str, *, start: int | None = None) -> None:
    """Wrap `text` in `artist` at the most characters per line that fit the figure's width."""
    renderer = fig.canvas.get_renderer()
    width = start or int(fig.get_size_inches()[0] * 24)
    while True:
        artist.set_text(wrap(text, width))
        if width <= 20 or artist.get_window_extent(renderer).width <= fig.bbox.width * 0.97:
            return
        width -= 3


def title(fig: Any, text: str) -> None:
    """The figure's title, wrapped to the figure's width."""
    fit_width(fig, fig.suptitle(text), text)


class Written(list):  # type: ignore[type-arg]
    """The paths a figure was written to, with the figure itself (for checks) and notes.

    `notes`: sentences about what the figure does not show (a bound outside the
    data, identical curves merged); a report puts them in the caption.
    """

    figure: Any
    notes: list[str]

    def __init__(self, paths: Iterable[Path], fig: Any, notes: Sequence[str] = ()) -> None:
        super().__init__(paths)
        self.figure = fig
        self.notes = list(notes)


def save(
    fig: Any, out: str | Path, *, notes: Sequence[str] = (), formats: Sequence[str] = FORMATS
) -> Written:
    """Write `out` as PNG, SVG and PDF at the figure's exact size, atomically."""
    out = Path(out)
    paths = []
    with plt.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        for ext in formats:
            dest = (
                out.with_name(out.name.removesuffix(out.suffix) + ext)
                if out.suffix in FORMATS
                else out.with_name(out.name + ext)
            )
            with atomic_path(dest) as tmp:
                fig.savefig(tmp, format=ext[1:], dpi=PNG_DPI)
            paths.append(dest)
    plt.close(fig)
    return Written(paths, fig, notes)


@dataclass
class Extent:
    """Data range helper: the span of values drawn, for choosing limits honestly."""

    values: list[float] = field(default_factory=list)

    def add(self, vals: Iterable[float]) -> None:
        self.values += [float(v) for v in vals if np.isfinite(v)]

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else 0.0

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else 1.0
