"""The report of one study: the trace, its curves, the sweep, the runs, the calibration.

The report is a list of sections (`mer.analysis.sections`), each built from
whatever inputs the study has; this module gathers the inputs, builds the
sections in order and writes Markdown and HTML side by side. To add to the
report, add a section (see `mer.analysis.sections`), not code here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mer.analysis.report import write_report
from mer.analysis.sections import (
    RunPair,
    Section,
    Study,
    StudyInputs,
    build_sections,
    markdown_section,
    render,
)


def write_study_report(
    out_dir: str | Path,
    inputs: StudyInputs,
    *,
    name: str = "report",
    extra_sections: list[Section] | None = None,
) -> dict[str, Any]:
    """Build every registered section that has its inputs, and write NAME.md and NAME.html."""
    return build_study_report(out_dir, inputs, name=name, extra_sections=extra_sections)[0]


def build_study_report(
    out_dir: str | Path,
    inputs: StudyInputs,
    *,
    name: str = "report",
    extra_sections: list[Section] | None = None,
) -> tuple[dict[str, Any], list[Section]]:
    """`write_study_report`, also returning the sections (their figures, for checks)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(inputs, out)
    check_inputs(study)
    extra = list(extra_sections or [])
    if study.pairs:
        from mer.analysis.sections.runs import run_window

        for sec in extra:
            sec.window = sec.window or run_window(study)
    sections = build_sections(study) + extra
    sections.sort(key=lambda s: s.order)
    title = f"mer report: {study.name}"
    md_path, html_path = write_report(out, name, render(study, sections, title=title), title)
    figures = [str(p) for s in sections for b in s.blocks if hasattr(b, "paths") for p in b.paths]
    comparison = None
    if study.pairs:
        from mer.analysis.compare import compare

        comparison = compare(study.pairs[0].sim, study.pairs[0].run).to_dict()
    result = {
        "markdown": str(md_path),
        "html": str(html_path),
        "figures": figures,
        "sections": [s.key for s in sections],
        "compare": comparison,
    }
    return result, sections


def check_inputs(study: Study) -> None:
    """Every input must come from the report's trace, and each run pair be one experiment."""
    from mer.analysis.compare import check_same_experiment, check_study
    from mer.traces.format import content_digest

    digest = content_digest(study.trace)
    check_study(digest, str(study.inputs.trace), sweep=study.sweep)
    for p in study.pairs:
        check_study(digest, str(study.inputs.trace), sim=p.sim, run=p.run)
        if p.calibrated is not None:
            check_same_experiment(
                p.calibrated, p.run, f"the calibrated simulation and the measured run ({p.role})"
            )


def _refuse_lone_run(trace: Path, sim: Path | None, run: Path | None) -> None:
    """A simulated or measured run without its partner: say what is wrong with it first."""
    from mer.analysis.compare import check_study
    from mer.analysis.sections import load_run
    from mer.errors import BadInput
    from mer.traces.format import content_digest, read_trace

    check_study(
        content_digest(read_trace(trace)), str(trace), sim=load_run(sim)[0], run=load_run(run)[0]
    )
    given, missing = ("--sim", "--run") if sim is not None else ("--run", "--sim")
    raise BadInput(
        f"{given} needs {missing}: the report holds a measured run against its simulation "
        "(same trace and configuration); give both, or --pair SIM RUN."
    )


def write_run_report(
    out_dir: str | Path,
    *,
    trace: Path,
    sweep: Path | None = None,
    mrc: Path | None = None,
    sim: Path | None = None,
    run: Path | None = None,
    pairs: list[RunPair] | None = None,
    hardware: str | None = None,
    calibrated: Path | None = None,
    synthetic_mrc: Path | None = None,
    extra: dict[str, Path] | None = None,
    extra_sections: list[str] | list[Section] | None = None,
    name: str = "report",
) -> dict[str, Any]:
    """The study report from paths (`mer report run` and `mer demo` call this).

    `sim` / `run`: one simulated and one measured run (the winner); `pairs`:
    several, each with a role ("winner", "no prefetch", ...); both may be given.
    `extra_sections`: Sections, or one section's Markdown lines (beginning `## title`),
    placed after the runs.
    """
    all_pairs = list(pairs or [])
    if sim is not None and run is not None:
        all_pairs.insert(0, RunPair(sim, run, "winner" if all_pairs else ""))
    elif sim is not None or run is not None:
        _refuse_lone_run(trace, sim, run)
    inputs = StudyInputs(
        trace=trace,
        mrc=mrc,
        sweep=sweep,
        pairs=all_pairs,
        hardware=hardware,
        calibrated=calibrated,
        synthetic_mrc=synthetic_mrc,
        extra=dict(extra or {}),
    )
    more: list[Section] = []
    if extra_sections and isinstance(extra_sections[0], str):
        more = [markdown_section([str(x) for x in extra_sections], key="faceoff")]
    elif extra_sections:
        more = [s for s in extra_sections if isinstance(s, Section)]
    return write_study_report(out_dir, inputs, name=name, extra_sections=more)
