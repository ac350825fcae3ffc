"""The study report, assembled from sections that do not know about each other.

A section is one function that reads what the study has (`Study`: the trace,
the curves, the sweep, the run pairs, the calibration, any extra input) and
returns a `Section`, or None when its inputs are absent. Sections are ordered
by a number, so a new one slots in between without touching the others:

    # analysis/sections/validation.py
    from mer.analysis.sections import Section, Study, section

    @section(order=65, key="validation")
    def held_out(study: Study) -> Section | None:
        path = study.inputs.extra.get("validation")
        if path is None:
            return None
        sec = Section("Held-out validation", window="...")  # say which tokens it used
        sec.table(["configuration", "error (%)"], rows)
        sec.figure(plot_something(..., study.figure_path("validation-loglog")),
                   "Look at: how far the points sit from the diagonal.")
        return sec

and one line naming the module in `SECTION_MODULES` below. Orders in use:
10 routing, 20 curves, 25 synthetic overlay, 30 sweep, 40 runs, 45 prefetch,
50 per-layer, 60 calibration, 65 held-out validation, 90 run details; leave gaps.

Rules every section follows (the report is read by reviewers):
- `window`: which tokens the section's numbers come from ("all 773 tokens",
  "first 96 tokens"); the report's header lists them when they differ.
- every figure has a one-line caption saying what to look at (`Section.figure`).
- tables use `report.frame_rows` / `report.human` so columns read as words with
  units; add new fields to `report.COLUMN_LABELS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mer.analysis.report import md_table
from mer.errors import BadInput

#: Modules whose @section functions make up the study report (imported in this order).
SECTION_MODULES = (
    "routing",
    "curves",  # also the synthetic overlay (order 25)
    "sweep",
    "runs",
    "calibration",
    "validation",
)


@dataclass
class RunPair:
    """One configuration simulated and executed; `role` says why it was run."""

    sim: Path
    run: Path
    role: str = ""
    calibrated_sim: Path | None = None  # the same configuration simulated on the calibrated profile


@dataclass
class StudyInputs:
    """Everything a report can be built from; every field but the trace is optional."""

    trace: Path
    mrc: Path | None = None
    sweep: Path | None = None
    pairs: list[RunPair] = field(default_factory=list)
    hardware: str | None = None  # the profile the sweep and the simulations used
    calibrated: Path | None = None  # the profile `mer calibrate` fitted to the first pair's run
    synthetic_mrc: Path | None = (
        None  # curves of a fitted synthetic trace, overlaid on the real ones
    )
    extra: dict[str, Path] = field(default_factory=dict)  # inputs of sections added later


@dataclass
class LoadedPair:
    role: str
    sim: Any  # RunSummary
    run: Any  # RunSummary
    sim_tokens: Any  # per-token frame or None
    run_tokens: Any
    calibrated: Any = None  # RunSummary on the calibrated profile, or None


class Study:
    """The inputs, loaded once and shared by every section, and where figures go."""

    def __init__(self, inputs: StudyInputs, out_dir: Path) -> None:
        self.inputs = inputs
        self.out_dir = out_dir
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.shared: dict[str, Any] = {}  # what one section computes and a later one reuses

    def figure_path(self, name: str) -> Path:
        return self.fig_dir / name

    @cached_property
    def trace(self) -> Any:
        from mer.traces.format import read_trace

        return read_trace(self.inputs.trace)

    @cached_property
    def stats(self) -> dict[str, Any]:
        from mer.traces.stats import trace_stats

        return trace_stats(self.trace, matrices=False)

    @cached_property
    def mrc(self) -> Any:
        return _parquet(self.inputs.mrc, "miss-ratio curves")

    @cached_property
    def sweep(self) -> Any:
        return _parquet(self.inputs.sweep, "sweep results")

    @cached_property
    def pairs(self) -> list[LoadedPair]:
        out = []
        for p in self.inputs.pairs:
            s, s_df = load_run(p.sim)
            r, r_df = load_run(p.run)
            cal = load_run(p.calibrated_sim)[0] if p.calibrated_sim else None
            out.append(LoadedPair(p.role, s, r, s_df, r_df, cal))
        return out

    @property
    def name(self) -> str:
        return str(self.trace.name)

    def trace_window(self) -> str:
        tr = self.trace
        return f"all {tr.n_tokens:,} tokens of the trace"


def tokens_window(tokens: int, total: int, what: str = "") -> str:
    """'first 96 of the trace's 773 tokens' (or 'all 773 tokens') for a section header."""
    lead = f"{what}: " if what else ""
    if tokens >= total:
        return f"{lead}all {total:,} tokens of the trace"
    return f"{lead}first {tokens:,} of the trace's {total:,} tokens"


def _parquet(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{what} {path}: not readable as parquet ({exc}).") from exc


def load_run(path: Path | None) -> tuple[Any, Any]:
    """(RunSummary, per-token frame or None) from a summary JSON or a per-token parquet."""
    if path is None:
        return None, None
    from mer.summary import RunSummary, read_token_table

    if path.suffix == ".parquet":
        df, s = read_token_table(path)
        if s is None:
            raise BadInput(f"{path}: per-token parquet without a summary.")
        return s, df
    return RunSummary.load(path), None


@dataclass
class FigureRef:
    paths: list[Path]
    caption: str
    alt: str
    figure: Any = None  # the matplotlib figure (closed), for structure checks


@dataclass
class Section:
    """A titled part of the report: Markdown blocks, tables and captioned figures in order."""

    title: str
    window: str | None = None
    blocks: list[str | FigureRef] = field(default_factory=list)
    key: str = ""
    order: int = 0

    def text(self, *paragraphs: str) -> Section:
        self.blocks.extend(p for p in paragraphs if p)
        return self

    def table(self, header: list[str], rows: list[list[object]], lead: str = "") -> Section:
        if lead:
            self.blocks.append(lead)
        self.blocks.append(md_table(header, rows))
        return self

    def code(self, text: str) -> Section:
        self.blocks.append("```\n" + text + "\n```")
        return self

    def figure(self, written: Any, caption: str, alt: str | None = None) -> Section:
        """A figure with its one-line caption: what the reader should look at."""
        if not caption.strip() or "\n" in caption:
            raise ValueError("a figure caption is one non-empty line")
        notes = getattr(written, "notes", [])
        full = (
            caption.rstrip(".")
            + "."
            + "".join(f" {n[0].upper()}{n[1:].rstrip('.')}." for n in notes)
        )
        fig = getattr(written, "figure", None)
        self.blocks.append(FigureRef([Path(p) for p in written], full, alt or caption, fig))
        return self


def markdown_section(lines: list[str], *, key: str = "extra", order: int = 42) -> Section:
    """A section from Markdown lines that start with its `## title` (for code that writes
    Markdown itself, e.g. the demo's face-off); a section with no window is about the runs."""
    body = list(lines)
    title = "More"
    while body and not body[0].strip():
        body.pop(0)
    if body and body[0].startswith("## "):
        title = body.pop(0)[3:].strip()
    sec = Section(title, key=key, order=order)
    block: list[str] = []
    for line in [*body, ""]:
        if line.strip():
            block.append(line)
        elif block:
            sec.blocks.append("\n".join(block))
            block = []
    return sec


Builder = Callable[[Study], "Section | None"]
_REGISTRY: dict[str, tuple[int, Builder]] = {}


def section(order: int, key: str) -> Callable[[Builder], Builder]:
    """Register a section builder under `key` at position `order` (lower comes first)."""

    def register(func: Builder) -> Builder:
        _REGISTRY[key] = (order, func)
        return func

    return register


def registered() -> list[tuple[int, str, Builder]]:
    for name in SECTION_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return sorted((order, key, func) for key, (order, func) in _REGISTRY.items())


def build_sections(study: Study, only: set[str] | None = None) -> list[Section]:
    out = []
    for order, key, func in registered():
        if only is not None and key not in only:
            continue
        sec = func(study)
        if sec is not None:
            sec.key, sec.order = key, order
            out.append(sec)
    return out


def render(study: Study, sections: list[Section], *, title: str) -> str:
    """The report's Markdown: header, the token windows, then each section in order."""
    tr = study.trace
    md = [
        f"# {title}",
        "",
        f"Trace `{tr.name}`: model {tr.meta.model}, {tr.n_tokens:,} tokens, {tr.n_layers} MoE layers x "
        f"{tr.n_experts} experts, top-{tr.top_k}, {tr.n_lookups:,} expert lookups. "
        f"Source: {tr.meta.provenance or tr.meta.source}.",
        "",
    ]
    windows: dict[str, list[str]] = {}
    for s in sections:
        if s.window:
            windows.setdefault(s.window, []).append(s.title[:1].lower() + s.title[1:])
    if len(windows) > 1:
        md += [
            "The sections do not all use the same tokens, so one configuration can show different "
            "numbers in two sections (the routing differs, not the model); each section states its "
            "window under its title: "
            + "; ".join(f"{w}: {', '.join(titles)}" for w, titles in windows.items())
            + ".",
            "",
        ]
    elif windows:
        md += [f"Every section uses the same tokens: {next(iter(windows))}.", ""]
    n_fig = 0
    for i, sec in enumerate(sections, 1):
        md += [f"## {i}. {sec.title}", ""]
        if sec.window:
            md += [f"*Token window: {sec.window}.*", ""]
        for block in sec.blocks:
            if isinstance(block, FigureRef):
                n_fig += 1
                png = next((p for p in block.paths if p.suffix == ".png"), block.paths[0])
                rel = png.relative_to(study.out_dir) if png.is_relative_to(study.out_dir) else png
                others = " · ".join(
                    f"[{p.suffix[1:].upper()}]({(p.relative_to(study.out_dir) if p.is_relative_to(study.out_dir) else p).as_posix()})"
                    for p in block.paths
                    if p.suffix != ".png"
                )
                md += [
                    f"![{block.alt}]({rel.as_posix()})",
                    f"*Figure {n_fig}. {block.caption}*" + (f" ({others})" if others else ""),
                    "",
                ]
            else:
                md += [block, ""]
    return "\n".join(md) + "\n"
