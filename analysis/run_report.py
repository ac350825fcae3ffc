"""The report of one study: the trace, its curves, the sweep, the winner run, predicted vs measured."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.analysis.compare import check_study, compare
from mer.analysis.plots import (
    plot_io_share,
    plot_layer_hit_rates,
    plot_mrc,
    plot_popularity_heatmap,
    plot_predicted_vs_measured,
    plot_repetition,
    plot_sweep_tokens_per_s,
)
from mer.analysis.report import md_table, write_report
from mer.core import Replay, ReplayConfig, replay_counts
from mer.errors import BadInput
from mer.summary import RunSummary, read_token_table
from mer.traces.format import content_digest, read_trace
from mer.traces.stats import trace_stats

SIZES_SHOWN = (16, 32, 64, 96, 128, 192, 256)


def _summary(path: Path | None) -> tuple[RunSummary | None, pd.DataFrame | None]:
    if path is None:
        return None, None
    if path.suffix == ".parquet":
        df, s = read_token_table(path)
        if s is None:
            raise BadInput(f"{path}: per-token parquet without a summary.")
        return s, df
    return RunSummary.load(path), None


def _sweep_table(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"sweep results {path}: cannot be read ({exc}); give `mer sweep -o`'s file."
        ) from exc


def write_run_report(
    out_dir: str | Path,
    *,
    trace: Path,
    sweep: Path | None = None,
    mrc: Path | None = None,
    sim: Path | None = None,
    run: Path | None = None,
    hardware: str | None = None,
    extra_sections: list[str] | None = None,
    name: str = "report",
) -> dict[str, Any]:
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tr = read_trace(trace)
    check_study(
        content_digest(tr),
        str(trace),
        sweep=_sweep_table(sweep),
        sim=_summary(sim)[0],
        run=_summary(run)[0],
    )
    st = trace_stats(tr, matrices=False)
    figures: list[str] = []
    md: list[str] = [
        f"# mer report: {tr.name}",
        "",
        f"Trace `{tr.name}`: model {tr.meta.model}, {tr.n_tokens:,} tokens, {tr.n_layers} MoE layers x "
        f"{tr.n_experts} experts, top-{tr.top_k}, {tr.n_lookups:,} expert lookups, "
        f"{st['totals']['distinct_keys']} distinct layer-qualified experts. Source: {tr.meta.provenance or tr.meta.source}.",
        "",
    ]

    def fig(paths: list[Path], caption: str) -> None:
        figures.extend(str(p) for p in paths)
        md.extend([f"![{caption}](figures/{paths[0].name})", ""])

    # -- the trace ----------------------------------------------------------------
    md += ["## The routing", ""]
    rep = [layer["repetition"] for layer in st["layers"]]
    md.append(
        f"Consecutive tokens reuse the same expert more often than chance: first-or-second choice "
        f"{np.mean([r['first_or_second'] for r in rep]) * 100:.1f}% on average over layers "
        f"(random routing: {st['random_baseline']['first_or_second'] * 100:.1f}%)."
    )
    for w in st.get("warnings", []):
        md.append(f"Note: {w}")
    md.append("")
    shares = np.array([layer["popularity"] for layer in st["layers"]])
    fig(
        plot_popularity_heatmap(
            shares, fig_dir / "popularity", title=f"Expert popularity: {tr.name} ({tr.meta.model})"
        ),
        "expert popularity",
    )
    fig(
        plot_repetition(
            [r["first"] for r in rep],
            [r["first_or_second"] for r in rep],
            fig_dir / "repetition",
            title=f"Consecutive-token repetition: {tr.name} vs Mixtral paper (Table 5)",
            baseline=st["random_baseline"],
        ),
        "repetition per layer",
    )

    # -- miss-ratio curves -----------------------------------------------------------
    if mrc is not None:
        curves = pd.read_parquet(mrc)
        md += ["## Hit rate at every cache size (no prefetch)", ""]
        fig(
            plot_mrc(
                curves, fig_dir / "mrc", title=f"Miss-ratio curves: {tr.name} ({tr.meta.model})"
            ),
            "miss-ratio curves",
        )
        sizes = [s for s in SIZES_SHOWN if s <= curves["cache_slots"].max()]
        g = curves[(curves["scope"] == "global") & (curves["cache_slots"].isin(sizes))]
        pivot = g.pivot_table(index="policy", columns="cache_slots", values="hit_rate")
        rows = [[p, *[float(pivot.loc[p, s]) * 100 for s in sizes]] for p in pivot.index]
        md += [
            "Hit rate (%), global scope:",
            "",
            md_table(["policy", *[f"{s} slots" for s in sizes]], rows),
            "",
        ]

    # -- sweep -------------------------------------------------------------------------
    if sweep is not None:
        res = pd.read_parquet(sweep)
        md += ["## The sweep (simulated)", ""]
        top = res.sort_values("tokens_per_s", ascending=False).head(12)
        cols = [
            "policy",
            "scope",
            "predictor",
            "cache_slots",
            "hit_rate",
            "tokens_per_s",
            "io_wait_share",
        ]
        cols = [c for c in cols if c in top.columns]
        rows = [
            [r[c] if c not in ("hit_rate", "io_wait_share") else float(r[c]) * 100 for c in cols]
            for _, r in top.iterrows()
        ]
        md += [
            f"{len(res)} configurations; the 12 fastest (hit rate and I/O share in %):",
            "",
            md_table(cols, rows),
            "",
            *_sweep_reading(res),
        ]
        hw = hardware or (str(res["hardware"].iloc[0]) if "hardware" in res.columns else None)
        shape = str(res["shape"].iloc[0]) if "shape" in res.columns else None
        bounds: dict[str, float] = {}
        bcurves: dict[str, tuple[list[float], list[float]]] = {}
        if hw and shape:
            from mer.analysis.bounds import tokens_per_s_bounds

            with contextlib.suppress(BadInput):
                bounds, bcurves = tokens_per_s_bounds(
                    shape, hw, pd.read_parquet(mrc) if mrc else None, tr.n_layers, tr.top_k
                )
        fig(
            plot_sweep_tokens_per_s(
                res,
                fig_dir / "sweep-tokens-per-s",
                title=f"Simulated tokens/s: {tr.name}, shape {shape}, hardware {hw}",
                bounds=bounds,
                curves=bcurves,
            ),
            "tokens/s vs cache size",
        )
        if {"io_wait_s", "compute_s", "dense_s", "tokens"} <= set(res.columns):
            fig(
                plot_io_share(
                    res,
                    fig_dir / "io-share",
                    title=f"Where a token's time goes (simulated): {tr.name}, hardware {hw}",
                ),
                "I/O share",
            )

    # -- predicted vs measured -----------------------------------------------------------
    s_sum, s_df = _summary(sim)
    r_sum, r_df = _summary(run)
    comparison = None
    if s_sum is not None and r_sum is not None:
        comparison = compare(s_sum, r_sum)
        md += [
            "## Predicted vs measured",
            "",
            "```",
            r_sum.format_text(),
            "```",
            "",
            "```",
            comparison.format_text(),
            "```",
            "",
        ]
        tt = (
            (s_df["time_s"].to_numpy(), r_df["time_s"].to_numpy())
            if s_df is not None and r_df is not None
            else None
        )
        fig(
            plot_predicted_vs_measured(
                [(s_sum.to_dict(), r_sum.to_dict())],
                fig_dir / "predicted-vs-measured",
                title=f"Predicted ({s_sum.hardware}) vs measured ({r_sum.hardware}): {tr.name}, shape {r_sum.shape}",
                token_times=tt,
            ),
            "predicted vs measured",
        )
        cfg = ReplayConfig(
            policy=r_sum.policy,
            cache_slots=r_sum.cache_slots,
            scope=r_sum.scope,
            tokens=r_sum.tokens,
            phase=r_sum.phase,
        )
        rates: dict[str, list[float]] = {}
        for label, c in (
            (f"{r_sum.policy} (no prefetch)", cfg),
            ("opt (no prefetch)", ReplayConfig(**{**cfg.to_dict(), "policy": "opt"})),
        ):
            try:
                stats = replay_counts(Replay.from_trace(tr, c))
            except BadInput:
                continue
            rates[f"{label}, {c.cache_slots} slots {c.scope}"] = (
                stats.hits / (stats.hits + stats.misses).clip(min=1)
            ).tolist()
        if rates:
            fig(
                plot_layer_hit_rates(
                    rates,
                    fig_dir / "layer-hit-rates",
                    title=f"Per-layer hit rate: {tr.name}, first {r_sum.tokens} tokens",
                ),
                "per-layer hit rates",
            )
    md += extra_sections or []
    md_path, html_path = write_report(out, name, "\n".join(md) + "\n", f"mer report: {tr.name}")
    return {
        "markdown": str(md_path),
        "html": str(html_path),
        "figures": figures,
        "compare": comparison.to_dict() if comparison else None,
    }


def _sweep_reading(res: pd.DataFrame) -> list[str]:
    """One sentence on what bounds the winner, from the sweep's own columns."""
    ranked = res.sort_values("tokens_per_s", ascending=False)
    best = float(ranked["tokens_per_s"].iloc[0])
    top5 = ranked["tokens_per_s"].head(5).astype(float)
    spread = (best - float(top5.min())) / best if best else 0.0
    out = [f"The 5 fastest configurations are within {spread * 100:.1f}% of each other."]
    if "bound_compute_tokens_per_s" in res.columns:
        bound = float(ranked["bound_compute_tokens_per_s"].iloc[0])
        if bound > 0:
            share = best / bound
            out[0] += (
                f" The fastest reaches {share * 100:.0f}% of the compute bound (every lookup a hit)"
            )
            out[0] += (
                ": on this machine the expert FFN, not the SSD, decides tokens/s, so the policy matters little here."
                if share > 0.9
                else ": the remaining gap is I/O the policy and predictor did not hide."
            )
    return [*out, ""]
