"""Figures researchers take home. Each function takes tidy frames, returns the paths written.

Every figure is written as PNG and SVG, has labelled axes with units and a
title naming the trace, the model and (where timing is shown) the machine.
Legends sit outside the data (beside or below the axes) so they never hide a
curve; long titles are wrapped; SVG text is kept as text (searchable, and
checked by the tests).
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from mer.atomic import atomic_path

#: The public engine's headline claim: 97.46% hit rate at 256 slots.
SEED_CLAIM = {
    "cache_slots": 256,
    "hit_rate": 0.9746,
    "label": "public engine's claim (97.46%, 256 slots, synthetic)",
}
#: Mixtral paper (arXiv 2401.04088) Table 5, consecutive-token repetition, mid-range of the domains.
PAPER_REPETITION: dict[str, Any] = {
    "layers": [0, 15, 31],
    "first": [0.14, 0.26, 0.23],
    "first_or_second": [0.475, 0.645, 0.49],
    "first_range": [(0.14, 0.14), (0.24, 0.28), (0.20, 0.26)],
    "first_or_second_range": [(0.45, 0.50), (0.62, 0.67), (0.44, 0.54)],
}
POLICY_COLORS = {
    "opt": "black",
    "lru": "tab:blue",
    "fifo": "tab:orange",
    "lfu": "tab:green",
    "clock": "tab:red",
    "sieve": "tab:purple",
    "s3fifo": "tab:brown",
    "arc": "tab:pink",
    "seed-lru-locality": "tab:gray",
}
_FALLBACK_COLORS = ["tab:olive", "tab:cyan", "darkgoldenrod", "teal", "slateblue", "indianred"]
#: Line styles by predictor: no prefetch solid, the oracle dotted, the rest dashed variants.
_PREDICTOR_STYLES = {"none": "-", "oracle": ":"}
_OTHER_STYLES = ["--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2))]
#: Characters per title line before wrapping (at the figure widths used here).
TITLE_WIDTH = 95

F = TypeVar("F", bound=Any)

_RC: Any = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "svg.fonttype": "none",  # keep text as <text> in SVG
}


def save(fig: Any, out: str | Path) -> list[Path]:
    """Write `out` as .png and .svg (atomically); returns both paths."""
    out = Path(out)
    paths = []
    with plt.rc_context({"svg.fonttype": "none"}):
        for ext in (".png", ".svg"):
            dest = out.with_suffix(ext)
            with atomic_path(dest) as tmp:
                fig.savefig(tmp, format=ext[1:], dpi=130, bbox_inches="tight")
            paths.append(dest)
    plt.close(fig)
    return paths


def wrap_title(title: str, width: int = TITLE_WIDTH) -> str:
    """Wrap each line of `title` at `width` characters (explicit newlines are kept)."""
    return "\n".join(
        textwrap.fill(line, width, break_on_hyphens=False) if line else line
        for line in title.splitlines() or [""]
    )


def _color(policy: str, i: int = 0) -> Any:
    return POLICY_COLORS.get(policy, _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


def _policy_of(label: str) -> str:
    """The policy named at the start of a label like 'lru (global, 64 slots)'."""
    return label.split(" ", 1)[0].split("/", 1)[0]


def _styled(func: F) -> F:
    """Run a plotting function under the shared font sizes (ticks, labels, legends alike)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(_RC):
            return func(*args, **kwargs)

    return cast(F, wrapper)


def _subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    return plt.subplots(*args, layout="constrained", **kwargs)


def _log_axis(ax: Any, which: str) -> None:
    """Log scale with plain-number ticks at 1, 2, 5 x 10^n and no crowded minor labels."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


@_styled
def plot_mrc(
    mrc: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    claim: dict[str, Any] | None = SEED_CLAIM,
    bytes_per_expert: int | None = None,
) -> list[Path]:
    """Hit rate vs cache size per policy, one panel per scope, OPT as the ceiling."""
    scopes = [s for s in ("global", "per-layer") if s in set(mrc["scope"])]
    fig, axes = _subplots(
        1,
        len(scopes),
        figsize=(5.6 * len(scopes) + 0.6, 4.6),
        sharey=True,
        sharex=True,
        squeeze=False,
    )
    all_policies = sorted(set(mrc["policy"]), key=lambda p: (p != "opt", p))
    colors = {p: _color(p, i) for i, p in enumerate(all_policies)}
    handles: dict[str, Any] = {}
    for ax, scope in zip(axes[0], scopes, strict=True):
        part = mrc[mrc["scope"] == scope]
        for policy in [p for p in all_policies if p in set(part["policy"])]:
            d = part[part["policy"] == policy].sort_values("cache_slots")
            if policy == "opt":
                band = ax.fill_between(
                    d["cache_slots"], d["hit_rate"], 1.0, color="0.92", zorder=0, lw=0
                )
                handles.setdefault("above OPT: no policy gets here", band)
                (line,) = ax.plot(d["cache_slots"], d["hit_rate"], color="black", lw=2.2, zorder=5)
                handles.setdefault("OPT (Belady), the ceiling", line)
            else:
                (line,) = ax.plot(
                    d["cache_slots"],
                    d["hit_rate"],
                    lw=1.4,
                    marker="o" if len(d) <= 40 else None,  # dense curves: markers smear
                    ms=2.5,
                    color=colors[policy],
                )
                handles.setdefault(policy, line)
        if claim is not None:
            star = ax.scatter(
                [claim["cache_slots"]],
                [claim["hit_rate"]],
                marker="*",
                s=170,
                color="crimson",
                edgecolor="white",
                linewidth=0.6,
                zorder=6,
            )
            handles.setdefault(claim["label"], star)
        ax.set_xlabel("cache size (expert slots, all layers)")
        ax.set_title(f"scope: {scope}" + (" (slots split evenly)" if scope == "per-layer" else ""))
        ax.set_ylim(0, 1.02)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if bytes_per_expert:
            bpe = float(bytes_per_expert)
            sec = ax.secondary_xaxis(
                "top", functions=(lambda s, b=bpe: s * b / 2**30, lambda g, b=bpe: g * 2**30 / b)
            )
            sec.set_xlabel("cache size (GiB of q4_0 experts)")
    axes[0][0].set_ylabel("hit rate (hits / lookups)")
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside lower center",
        ncol=min(4, len(handles)),
        frameon=False,
    )
    fig.suptitle(wrap_title(title, int(TITLE_WIDTH * len(scopes) / 2 + 30)), fontsize=10)
    return save(fig, out)


def _predictor_styles(predictors: Sequence[str]) -> dict[str, Any]:
    others = iter(_OTHER_STYLES * 3)
    return {p: _PREDICTOR_STYLES.get(p) or next(others) for p in predictors}


@_styled
def plot_sweep_tokens_per_s(
    results: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    bounds: dict[str, float] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> list[Path]:
    """tokens/s vs cache size, one line per (policy, predictor), bandwidth bounds drawn
    (`bounds`: horizontal lines; `curves`: bounds that depend on the cache size).

    Colour names the policy and the line style the predictor, so the legend has
    one entry per policy and per predictor rather than one per combination.
    The y axis turns logarithmic when the values drawn span more than 10x.
    """
    fig, ax = _subplots(figsize=(8.4, 4.8))
    policies = sorted(set(results["policy"].astype(str)), key=lambda p: (p != "opt", p))
    predictors = sorted(set(results["predictor"].astype(str)), key=lambda p: (p != "none", p))
    colors = {p: _color(p, i) for i, p in enumerate(policies)}
    styles = _predictor_styles(predictors)
    values: list[float] = []
    for (policy, predictor), d in results.groupby(["policy", "predictor"], sort=True):
        d = d.sort_values("cache_slots")
        ax.plot(
            d["cache_slots"],
            d["tokens_per_s"],
            ls=styles[str(predictor)],
            marker="o",
            ms=3,
            lw=1.4,
            color=colors[str(policy)],
        )
        values += [float(v) for v in d["tokens_per_s"]]
    bound_handles = []
    # Bounds are black/grey/maroon, thick, and never share a line style with a predictor.
    bound_colors = iter(["black", "0.45", "maroon", "darkgoldenrod"])
    for name, (xs, ys) in (curves or {}).items():
        (line,) = ax.plot(xs, ys, color="teal", lw=2.2, ls=(0, (8, 2, 1, 2, 1, 2)), label=name)
        bound_handles.append(line)
        values += [float(y) for y in ys]
    for name, value in (bounds or {}).items():
        line = ax.axhline(
            value, color=next(bound_colors, "0.3"), lw=2.0, ls=(0, (1, 1.5)), label=name
        )
        bound_handles.append(line)
        values.append(float(value))
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        _log_axis(ax, "y")
        ax.grid(alpha=0.3, which="both")
    else:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax.set_xlabel("cache size (expert slots, all layers)")
    ax.set_ylabel("tokens/s (whole model, all layers)")
    ax.set_xlim(left=0)

    def header(text: str) -> Line2D:
        return Line2D([], [], ls="none", label=text)

    handles: list[Any] = [header("policy (colour)")]
    handles += [Line2D([], [], color=colors[p], lw=2, label=p) for p in policies]
    handles += [header("predictor (line style)")]
    handles += [Line2D([], [], color="0.2", ls=styles[p], lw=1.4, label=p) for p in predictors]
    if bound_handles:
        handles += [header("bounds"), *bound_handles]
    leg = ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        handlelength=2.6,
    )
    for text, h in zip(leg.get_texts(), handles, strict=True):
        if h.get_linestyle() == "None":
            text.set_fontweight("bold")
    ax.set_title(wrap_title(title, 80))
    return save(fig, out)


def _identity_panel(
    ax: Any,
    predicted: np.ndarray,
    measured: np.ndarray,
    labels: Sequence[str],
    what: str,
    *,
    band: float | None = 0.25,
) -> None:
    """Predicted (y) against measured (x) with the identity line and a ±`band`
    relative band; log axes when the points span more than 10x."""
    both = np.concatenate([predicted, measured])
    positive = both[both > 0]
    log = positive.size == both.size and both.size > 0 and positive.max() / positive.min() > 10
    if log:
        lo, hi = float(positive.min()) / 1.6, float(positive.max()) * 1.6
        _log_axis(ax, "x")
        _log_axis(ax, "y")
    else:
        lo, hi = float(both.min()), float(both.max())
        pad = (hi - lo) * 0.12 or max(abs(hi), 1e-9) * 0.12
        lo, hi = max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad
    xs = np.geomspace(lo, hi, 50) if log else np.linspace(lo, hi, 50)
    if band:
        ax.fill_between(
            xs, xs * (1 - band), xs * (1 + band), color="0.9", lw=0, label=f"within ±{band:.0%}"
        )
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="identity (perfect prediction)")
    ax.scatter(measured, predicted, s=36, zorder=3, color="tab:blue")
    for label, x, y in zip(labels, measured, predicted, strict=True):
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"measured {what}")
    ax.set_ylabel(f"predicted {what}")
    ax.grid(alpha=0.3, which="both")


@_styled
def plot_predicted_vs_measured(
    pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    out: str | Path,
    *,
    title: str,
    token_times: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Path]:
    """Scatter of predicted vs measured tokens/s and hit rate (identity line), and
    per-token latency distributions overlaid (as cumulative distributions, log
    time axis when they are far apart) when the per-token tables are given."""
    ncols = 3 if token_times is not None else 2
    fig, axes = _subplots(1, ncols, figsize=(4.6 * ncols, 4.6))
    labels = [f"{s['policy']}/{s['predictor']}/{s['cache_slots']}" for s, _ in pairs]
    for ax, key, what in (
        (axes[0], "tokens_per_s", "tokens/s (whole model)"),
        (axes[1], "hit_rate", "hit rate (hits / lookups)"),
    ):
        p = np.array([s[key] for s, _ in pairs], dtype=float)
        m = np.array([r[key] for _, r in pairs], dtype=float)
        _identity_panel(ax, p, m, labels, what, band=0.25 if key == "tokens_per_s" else None)
    fig.legend(
        *axes[0].get_legend_handles_labels(), loc="outside lower left", ncol=2, frameon=False
    )
    if token_times is not None:
        sim_t, run_t = (np.sort(np.asarray(t, dtype=float)) * 1e3 for t in token_times)
        ax = axes[2]
        for vals, name, color in (
            (run_t, "measured", "tab:blue"),
            (sim_t, "predicted", "tab:orange"),
        ):
            if vals.size:
                share = np.arange(1, vals.size + 1) / vals.size
                ax.step(
                    vals,
                    share,
                    where="post",
                    color=color,
                    lw=1.6,
                    label=f"{name} (p50 {np.median(vals):.3g} ms)",
                )
        allv = np.concatenate([sim_t, run_t])
        allv = allv[allv > 0]
        if allv.size and allv.max() / allv.min() > 20:
            _log_axis(ax, "x")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("token latency (ms)")
        ax.set_ylabel("share of tokens at or below (CDF)")
        ax.set_title(f"per-token latency, {labels[0]}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(wrap_title(title, 40 * ncols), fontsize=10)
    return save(fig, out)


@_styled
def plot_io_share(
    results: pd.DataFrame, out: str | Path, *, title: str, max_configs: int = 24
) -> list[Path]:
    """Per configuration: mean per-token time split into I/O wait, compute and dense.

    Horizontal bars (configuration names read left to right), fastest at the
    top, I/O share printed at the end of each bar.
    """
    d = results.copy()
    scoped = "scope" in d.columns and d["scope"].nunique() > 1
    d["label"] = (
        d["policy"].astype(str)
        + " / "
        + d["predictor"].astype(str)
        + " / "
        + d["cache_slots"].astype(str)
        + " slots"
        + ((" / " + d["scope"].astype(str)) if scoped else "")
    )
    n_all = len(d)
    d = d.sort_values("tokens_per_s", ascending=False).head(max_configs)
    tokens = d["tokens"].clip(lower=1)
    parts = {
        "I/O wait": (d["io_wait_s"] / tokens * 1e3).to_numpy(),
        "expert compute": (d["compute_s"] / tokens * 1e3).to_numpy(),
        "dense (attention-sized block)": (d["dense_s"] / tokens * 1e3).to_numpy(),
    }
    fig, ax = _subplots(figsize=(8.4, max(3.0, 0.26 * len(d) + 1.6)))
    y = np.arange(len(d))
    left = np.zeros(len(d))
    for (name, vals), color in zip(parts.items(), ("tab:red", "tab:blue", "0.6"), strict=True):
        ax.barh(y, vals, left=left, label=name, color=color, height=0.72)
        left += vals
    io = parts["I/O wait"]
    for yi, total, io_ms in zip(y, left, io, strict=True):
        share = io_ms / total if total > 0 else 0.0
        ax.text(total, yi, f"  I/O {share * 100:.0f}%", va="center", fontsize=7, color="0.25")
    ax.set_yticks(y, d["label"].tolist())
    ax.invert_yaxis()
    ax.set_xlim(0, float(left.max()) * 1.16 if left.size and left.max() > 0 else 1)
    ax.set_xlabel("time per token (ms), busy time by kind")
    ax.set_ylabel("configuration (policy / predictor / cache)")
    ax.grid(alpha=0.3, axis="x")
    fig.legend(loc="outside lower center", ncol=3, frameon=False)
    shown = f" ({len(d)} fastest of {n_all} configurations)" if n_all > len(d) else ""
    ax.set_title(wrap_title(title + shown, 80))
    return save(fig, out)


@_styled
def plot_layer_hit_rates(
    per_layer: Mapping[str, Sequence[float]], out: str | Path, *, title: str
) -> list[Path]:
    """Hit rate per layer for a few named runs (the legend gives each run's mean)."""
    fig, ax = _subplots(figsize=(8.4, 4.2))
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (name, rates) in enumerate(per_layer.items()):
        r = np.asarray(rates, dtype=float)
        policy = _policy_of(name)
        ax.plot(
            np.arange(len(r)),
            r,
            marker=markers[i % len(markers)],
            ms=3,
            lw=1.4,
            color=_color(policy, i) if policy in POLICY_COLORS else None,
            label=f"{name}: mean {r.mean() * 100:.1f}%" if r.size else name,
        )
    ax.set_xlabel("MoE layer (0-based)")
    ax.set_ylabel("hit rate (hits / lookups)")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    ax.set_title(wrap_title(title, 85))
    return save(fig, out)


@_styled
def plot_popularity_heatmap(shares: np.ndarray, out: str | Path, *, title: str) -> list[Path]:
    """Expert popularity: share of a layer's lookups per expert (layers x experts).

    Shown as a ratio to the uniform share (1 / experts) on a diverging scale, so
    white is "as often as random routing", red hotter, blue colder; the colour
    bar is labelled in both the ratio and the share.
    """
    shares = np.asarray(shares, dtype=float)
    n_layers, n_experts = shares.shape
    uniform = 1.0 / n_experts
    ratio = shares / uniform
    span = max(float(np.nanmax(np.abs(np.log2(np.clip(ratio, 1e-3, None))))), np.log2(1.25))
    width = min(12.0, 3.2 + 0.32 * n_experts)
    fig, ax = _subplots(figsize=(width, min(9.0, 2.2 + 0.17 * n_layers)))
    from matplotlib.colors import LogNorm

    im = ax.imshow(
        np.clip(ratio, 2**-span, 2**span),
        aspect="auto",
        cmap="RdBu_r",
        norm=LogNorm(vmin=2**-span, vmax=2**span),
        interpolation="nearest",
    )
    ax.set_xlabel("expert (index within the layer)")
    ax.set_ylabel("MoE layer (0-based)")
    if n_experts <= 16:
        ax.set_xticks(range(n_experts))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=12, steps=[1, 2, 4, 5, 10]))
    if n_experts <= 16 and n_layers <= 64:  # small grids: print each cell's share
        for (li, ei), v in np.ndenumerate(shares):
            far = abs(np.log2(max(ratio[li, ei], 1e-3))) > 0.6 * span
            ax.text(
                ei,
                li,
                f"{v * 100:.0f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if far else "0.15",
            )
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"share of the layer's lookups / uniform share (1/{n_experts} = {uniform:.3g})")
    ticks = [t for t in (0.25, 0.5, 0.67, 1.0, 1.5, 2.0, 4.0) if 2**-span <= t <= 2**span]
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{t:g}x ({t * uniform * 100:.1f}%)" for t in ticks])
    cb.minorticks_off()
    note = " (cell text: share in %)" if n_experts <= 16 and n_layers <= 64 else ""
    ax.set_title(wrap_title(title + note, int(width * 9)))
    return save(fig, out)


@_styled
def plot_repetition(
    first: Sequence[float],
    first_or_second: Sequence[float],
    out: str | Path,
    *,
    title: str,
    baseline: dict[str, float] | None = None,
) -> list[Path]:
    """Consecutive-token repetition per layer beside the Mixtral paper's Table 5.

    `baseline`: the random-routing shares (`first`, `first_or_second`) from traces.stats.
    """
    layers = np.arange(len(first))
    fig, ax = _subplots(figsize=(8.4, 4.4))
    ax.plot(layers, first, marker="o", ms=3, color="tab:blue", label="this trace: first choice")
    ax.plot(
        layers,
        first_or_second,
        marker="s",
        ms=3,
        color="tab:orange",
        label="this trace: first or second choice",
    )
    pr = PAPER_REPETITION
    for i, layer in enumerate(pr["layers"]):
        if layer >= len(first):
            continue
        lo, hi = pr["first_range"][i]
        ax.errorbar(
            [layer],
            [(lo + hi) / 2],
            yerr=[[(hi - lo) / 2]],
            fmt="D",
            color="navy",
            capsize=4,
            label="Mixtral paper: first choice (range over domains)" if i == 0 else None,
        )
        lo, hi = pr["first_or_second_range"][i]
        ax.errorbar(
            [layer],
            [(lo + hi) / 2],
            yerr=[[(hi - lo) / 2]],
            fmt="D",
            color="darkorange",
            mec="black",
            capsize=4,
            label="Mixtral paper: first or second" if i == 0 else None,
        )
    if baseline:
        b1, b2 = baseline["first"], baseline["first_or_second"]
        ax.axhline(
            b1, color="tab:blue", ls=":", lw=1, label=f"random routing, first choice ({b1:.3f})"
        )
        ax.axhline(
            b2,
            color="tab:orange",
            ls=":",
            lw=1,
            label=f"random routing, first or second ({b2:.3f})",
        )
    ax.set_xlabel("MoE layer (0-based)")
    ax.set_ylabel("share of consecutive tokens\nrouted to the same expert")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    ax.set_title(wrap_title(title, 85))
    return save(fig, out)
