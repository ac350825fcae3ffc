"""Figures researchers take home. Each function takes tidy frames, returns the paths written.

Every figure is written as PNG and SVG, has labelled axes with units and a
title naming the trace, the model and (where timing is shown) the machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

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


def save(fig: Any, out: str | Path) -> list[Path]:
    """Write `out` as .png and .svg (atomically); returns both paths."""
    out = Path(out)
    paths = []
    for ext in (".png", ".svg"):
        dest = out.with_suffix(ext)
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format=ext[1:], dpi=130, bbox_inches="tight")
        paths.append(dest)
    plt.close(fig)
    return paths


def _color(policy: str) -> Any:
    return POLICY_COLORS.get(policy)


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
    fig, axes = plt.subplots(
        1, len(scopes), figsize=(6.2 * len(scopes), 4.6), sharey=True, squeeze=False
    )
    for ax, scope in zip(axes[0], scopes, strict=True):
        part = mrc[mrc["scope"] == scope]
        policies = sorted(set(part["policy"]), key=lambda p: (p != "opt", p))
        for policy in policies:
            d = part[part["policy"] == policy].sort_values("cache_slots")
            if policy == "opt":
                ax.fill_between(d["cache_slots"], d["hit_rate"], 1.0, color="0.92", zorder=0)
                ax.plot(
                    d["cache_slots"],
                    d["hit_rate"],
                    color="black",
                    lw=2.2,
                    label="OPT (Belady) ceiling",
                    zorder=5,
                )
            else:
                ax.plot(d["cache_slots"], d["hit_rate"], lw=1.3, label=policy, color=_color(policy))
        if claim is not None:
            ax.scatter(
                [claim["cache_slots"]],
                [claim["hit_rate"]],
                marker="*",
                s=160,
                color="crimson",
                zorder=6,
                label=claim["label"],
            )
        ax.set_xlabel("cache size (expert slots)")
        ax.set_title(f"scope: {scope}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if bytes_per_expert:
            sec = ax.secondary_xaxis(
                "top",
                functions=(
                    lambda s: s * bytes_per_expert / 2**30,
                    lambda g: g * 2**30 / bytes_per_expert,
                ),
            )
            sec.set_xlabel("cache size (GiB of q4_0 experts)")
    axes[0][0].set_ylabel("hit rate (hits / lookups)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    return save(fig, out)


def plot_sweep_tokens_per_s(
    results: pd.DataFrame,
    out: str | Path,
    *,
    title: str,
    bounds: dict[str, float] | None = None,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> list[Path]:
    """tokens/s vs cache size, one line per (policy, predictor), bandwidth bounds drawn
    (`bounds`: horizontal lines; `curves`: bounds that depend on the cache size)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (policy, predictor), d in results.groupby(["policy", "predictor"], sort=True):
        d = d.sort_values("cache_slots")
        ls = "-" if predictor == "none" else ("--" if predictor != "oracle" else ":")
        ax.plot(
            d["cache_slots"],
            d["tokens_per_s"],
            ls,
            marker="o",
            ms=3,
            color=_color(str(policy)),
            label=f"{policy} / {predictor}",
        )
    for name, (xs, ys) in (curves or {}).items():
        ax.plot(xs, ys, color="0.25", lw=1.6, ls="-.", label=name)
    for name, value in (bounds or {}).items():
        ax.axhline(value, color="0.45", lw=1.2, ls="--", label=name)
    ax.set_xlabel("cache size (expert slots)")
    ax.set_ylabel("tokens/s (whole model)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(title, fontsize=10)
    return save(fig, out)


def plot_predicted_vs_measured(
    pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    out: str | Path,
    *,
    title: str,
    token_times: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Path]:
    """Scatter of predicted vs measured tokens/s and hit rate (identity line), and
    per-token latency distributions overlaid when the per-token tables are given."""
    ncols = 3 if token_times is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.4))
    for ax, key, label in (
        (axes[0], "tokens_per_s", "tokens/s"),
        (axes[1], "hit_rate", "hit rate"),
    ):
        p = np.array([s[key] for s, _ in pairs], dtype=float)
        m = np.array([r[key] for _, r in pairs], dtype=float)
        lo, hi = float(min(p.min(), m.min())), float(max(p.max(), m.max()))
        pad = (hi - lo) * 0.1 or max(hi, 1e-9) * 0.1
        ax.plot(
            [lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls="--", label="identity"
        )
        ax.scatter(m, p, s=36, zorder=3)
        for (s, _), x, y in zip(pairs, m, p, strict=True):
            ax.annotate(
                f"{s['policy']}/{s['predictor']}/{s['cache_slots']}",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if token_times is not None:
        sim_t, run_t = token_times
        ax = axes[2]
        bins = np.linspace(
            0, float(max(np.percentile(sim_t, 99.5), np.percentile(run_t, 99.5))) * 1e3, 40
        )
        ax.hist(run_t * 1e3, bins=bins, alpha=0.55, label="measured", density=True)
        ax.hist(sim_t * 1e3, bins=bins, alpha=0.55, label="predicted", density=True)
        ax.set_xlabel("token latency (ms)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return save(fig, out)


def plot_io_share(
    results: pd.DataFrame, out: str | Path, *, title: str, max_configs: int = 24
) -> list[Path]:
    """Per configuration: mean per-token time split into I/O wait, compute and dense."""
    d = results.copy()
    d["label"] = (
        d["policy"].astype(str)
        + "/"
        + d["predictor"].astype(str)
        + "/"
        + d["cache_slots"].astype(str)
    )
    d = d.sort_values("tokens_per_s", ascending=False).head(max_configs)
    tokens = d["tokens"].clip(lower=1)
    parts = {
        "I/O wait": d["io_wait_s"] / tokens * 1e3,
        "expert compute": d["compute_s"] / tokens * 1e3,
        "dense": d["dense_s"] / tokens * 1e3,
    }
    fig, ax = plt.subplots(figsize=(max(7, 0.42 * len(d) + 2), 4.6))
    bottom = np.zeros(len(d))
    x = np.arange(len(d))
    for (name, vals), color in zip(parts.items(), ("tab:red", "tab:blue", "tab:gray"), strict=True):
        ax.bar(x, vals.to_numpy(), bottom=bottom, label=name, color=color)
        bottom += vals.to_numpy()
    ax.set_xticks(x, d["label"], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("time per token (ms), busy time by kind")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    return save(fig, out)


def plot_layer_hit_rates(
    per_layer: Mapping[str, Sequence[float]], out: str | Path, *, title: str
) -> list[Path]:
    """Hit rate per layer for a few named runs."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, rates in per_layer.items():
        ax.plot(np.arange(len(rates)), rates, marker="o", ms=3, label=name)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate (hits / lookups)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save(fig, out)


def plot_popularity_heatmap(shares: np.ndarray, out: str | Path, *, title: str) -> list[Path]:
    """Expert popularity: share of a layer's lookups per expert (layers x experts)."""
    fig, ax = plt.subplots(figsize=(5.2, 7))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(shares.shape[1]))
    fig.colorbar(im, ax=ax, label="share of the layer's lookups")
    ax.set_title(title, fontsize=10)
    return save(fig, out)


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
    fig, ax = plt.subplots(figsize=(8, 4.4))
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
        lo, hi = pr["first_range"][i]
        ax.errorbar(
            [layer],
            [(lo + hi) / 2],
            yerr=[[(hi - lo) / 2]],
            fmt="D",
            color="navy",
            capsize=4,
            label="paper: first choice" if i == 0 else None,
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
            label="paper: first or second" if i == 0 else None,
        )
    if baseline:
        b1, b2 = baseline["first"], baseline["first_or_second"]
        ax.axhline(b1, color="tab:blue", ls=":", lw=1, label=f"random, first choice ({b1:.3f})")
        ax.axhline(
            b2, color="tab:orange", ls=":", lw=1, label=f"random, first or second ({b2:.3f})"
        )
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("share of consecutive tokens with the same expert")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=10)
    return save(fig, out)
