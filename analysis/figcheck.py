"""Structure checks for a drawn figure: what a reviewer checks by eye, made mechanical.

`check_figure(fig)` draws the figure and returns a list of problems (empty when
it passes):

- every axes that shows data names both axes, each with a unit in parentheses
  (a colour bar names its scale);
- every data artist is tagged as a series or as decoration (mer.analysis.style),
  and the legends list exactly the (key, value) pairs the series stand for:
  nothing plotted is missing from a legend, no legend entry is for something
  not plotted;
- no text reaches outside the canvas (matplotlib's window extents of every
  visible text against the figure's box);
- no two texts overlap (labels, annotations, ticks);
- no text is smaller than `style.MIN_FONT_PT`, and the figure is no wider than
  two columns of a paper.

`series_colors(fig)` returns the colour each policy is drawn in, so a test can
hold the same policy's colour across all figures.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from matplotlib.axis import Axis as MplAxis
from matplotlib.collections import Collection
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.text import Text

from mer.analysis import style

_UNIT = re.compile(r"\(.+\)")
#: Slack in pixels for the canvas and overlap tests (antialiasing, rounding).
_SLACK = 1.0


def _data_artists(ax: Any) -> list[Any]:
    return [*ax.lines, *ax.collections, *ax.images]


def _is_colorbar(ax: Any) -> bool:
    return hasattr(ax, "_colorbar")


def _undrawn_tick_labels(fig: Any) -> set[int]:
    """Tick labels matplotlib keeps but does not draw (ticks outside the view limits)."""
    undrawn: set[int] = set()
    for axis in fig.findobj(MplAxis):
        drawn = {id(t) for t in axis._update_ticks()}
        for tick in [*axis.majorTicks, *axis.minorTicks]:
            if id(tick) not in drawn:
                undrawn |= {id(tick.label1), id(tick.label2)}
    return undrawn


def _visible_texts(fig: Any) -> list[Text]:
    out = []
    undrawn = _undrawn_tick_labels(fig)
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip() or id(t) in undrawn:
            continue
        # texts inside an invisible parent (a hidden axis, a removed legend) are not drawn
        parent = getattr(t, "axes", None)
        if parent is not None and not parent.get_visible():
            continue
        out.append(t)
    return out


def check_figure(fig: Any) -> list[str]:
    if not hasattr(fig.canvas, "get_renderer"):  # closed by style.save: give it a canvas again
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems: list[str] = []
    canvas = fig.bbox

    width_in = fig.get_size_inches()[0]
    if width_in > style.FULL_IN + 0.01:
        problems.append(
            f"figure is {width_in:.2f} in wide, more than two columns ({style.FULL_IN} in)"
        )

    sup = {
        "x": getattr(fig, "_supxlabel", None),
        "y": getattr(fig, "_supylabel", None),
    }
    plotted: set[tuple[str, str]] = set()
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        if _is_colorbar(ax):
            label = ax.get_ylabel() or ax.get_xlabel()
            if not _UNIT.search(label or ""):
                problems.append(f"colour bar without a label and unit: {label!r}")
            continue
        artists = _data_artists(ax)
        if not artists:
            continue
        for which, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            axis = ax.xaxis if which == "x" else ax.yaxis
            shows_ticks = any(t.get_visible() for t in axis.get_ticklabels())
            if not label.strip() and not shows_ticks:
                continue  # an inner panel of a shared axis: the outer panel names it
            shared = sup[which]
            if not label.strip() and shared is not None:
                label = shared.get_text()  # one label for a stack of panels
            if not label.strip():
                problems.append(f"axes {ax.get_title()!r}: no {which} label")
            elif not _UNIT.search(label):
                problems.append(f"axes {ax.get_title()!r}: {which} label {label!r} has no unit")
        for a in artists:
            keys = style.series_keys(a)
            if keys is None:
                if (a.get_gid() or "") != style.DECOR_GID:
                    problems.append(
                        f"axes {ax.get_title()!r}: untagged {type(a).__name__} "
                        f"(label {a.get_label()!r}): tag it as a series or decoration"
                    )
                continue
            plotted |= set(keys.items())

    legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend()]]
    listed: set[tuple[str, str]] = set()
    for leg in legends:
        keys = getattr(leg, "mer_keys", None)
        if keys is None:
            problems.append("a legend not built with style.legend (its entries are unchecked)")
            continue
        if len(leg.get_texts()) != len(keys):
            problems.append(f"legend has {len(leg.get_texts())} texts for {len(keys)} entries")
        listed |= {k for k in keys if k[0]} | set(getattr(leg, "mer_covers", []))
    if any(_is_colorbar(ax) for ax in fig.axes):
        listed |= {k for k in plotted if k[0] == "colorbar"}  # a colour bar is its legend
    for k in sorted(plotted - listed):
        problems.append(f"plotted but not in any legend: {k[0]}={k[1]}")
    for k in sorted(listed - plotted):
        problems.append(f"in a legend but not plotted: {k[0]}={k[1]}")

    texts = _visible_texts(fig)
    boxes = []
    for t in texts:
        bb = t.get_window_extent(renderer)
        if (
            bb.x0 < canvas.x0 - _SLACK
            or bb.y0 < canvas.y0 - _SLACK
            or bb.x1 > canvas.x1 + _SLACK
            or bb.y1 > canvas.y1 + _SLACK
        ):
            problems.append(f"text outside the canvas: {t.get_text()[:60]!r}")
        if float(t.get_fontsize()) < style.MIN_FONT_PT - 1e-6:
            problems.append(f"text smaller than {style.MIN_FONT_PT} pt: {t.get_text()[:40]!r}")
        boxes.append((t, bb))
    for i, (t1, b1) in enumerate(boxes):
        for t2, b2 in boxes[i + 1 :]:
            w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
            h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
            if w > 1.5 and h > 1.5:
                problems.append(f"texts overlap: {t1.get_text()[:40]!r} and {t2.get_text()[:40]!r}")
    return problems


def series_colors(fig: Any) -> dict[str, set[str]]:
    """policy -> the colours its tagged series are drawn in (one expected)."""
    out: dict[str, set[str]] = defaultdict(set)
    for ax in fig.axes:
        for a in _data_artists(ax):
            keys = style.series_keys(a)
            if not keys or "policy" not in keys:
                continue
            if isinstance(a, Line2D):
                out[keys["policy"]].add(to_hex(a.get_color()))
            elif isinstance(a, Collection):
                colors: Any = (
                    a.get_edgecolor() if len(a.get_facecolor()) == 0 else a.get_facecolor()
                )
                for c in colors:
                    out[keys["policy"]].add(to_hex(c))
    return dict(out)
