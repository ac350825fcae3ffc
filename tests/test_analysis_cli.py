"""The analysis commands through `mer` itself: exit codes and messages of the CLI contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
from test_analysis_compare import _summary as make_summary

from mer.cli import build_parser, main
from mer.traces.bundled import bundled_trace_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(path: Path, **over: object) -> Path:
    """The same hand-made summary as test_analysis_compare, saved as JSON."""
    make_summary(**over).save(path)
    return path


def _commands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_compare_refuses_mismatched_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = _summary(tmp_path / "sim.json")
    run = _summary(tmp_path / "run.json", kind="measured", policy="fifo", cache_slots=32)
    assert main(["compare", str(sim), str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mer: error:")
    assert "policy" in err and "cache_slots" in err and "Traceback" not in err


def test_compare_matching_runs_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = _summary(tmp_path / "sim.json")
    run = _summary(tmp_path / "run.json", kind="measured", tokens_per_s=4.0)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(sim), str(run), "--json", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())


def test_compare_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = _summary(tmp_path / "sim.json")
    assert main(["compare", str(sim), str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_plot_mrc_rejects_a_sweep_in_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sweep = tmp_path / "sweep.parquet"
    pd.DataFrame(
        {"policy": ["lru"], "predictor": ["none"], "cache_slots": [8], "tokens_per_s": [1.0]}
    ).to_parquet(sweep)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["plot", "mrc", str(sweep), "-o", str(out / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "sweep results table" in err and "mer plot sweep" in err and "mer mrc -o" in err
    assert not list(out.iterdir())


def test_plot_mrc_rejects_a_non_parquet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    assert main(["plot", "mrc", str(bad), "-o", str(tmp_path / "m")]) == 2
    assert "not a file mer wrote" in capsys.readouterr().err


def test_plot_mrc_of_a_trace_computes_exact_curves(tmp_path: Path) -> None:
    """A trace is accepted: its LRU and OPT curves are computed (every size, one pass)."""
    from mer.traces.format import read_trace, write_trace

    small = write_trace(read_trace(bundled_trace_path()).head(20), tmp_path / "small.parquet")
    out = tmp_path / "fig" / "mrc"
    out.parent.mkdir()
    assert main(["plot", "mrc", str(small), "-o", str(out)]) == 0
    for ext in (".png", ".svg", ".pdf"):
        assert out.with_suffix(ext).exists()
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_plot_mrc_labels_must_match_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mrc = _mrc_table(tmp_path / "mrc.parquet")
    rc = main(["plot", "mrc", str(mrc), str(mrc), "--labels", "one", "-o", str(tmp_path / "m")])
    assert rc == 2
    assert "1 label(s) for 2 input(s)" in capsys.readouterr().err


def test_plot_mrc_sizes_not_in_the_table_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mrc = _mrc_table(tmp_path / "mrc.parquet")
    assert main(["plot", "mrc", str(mrc), "--sizes", "8,12", "-o", str(tmp_path / "m")]) == 2
    assert "[12]" in capsys.readouterr().err


def _mrc_table(path: Path) -> Path:
    rows = [
        ("opt", "global", s, min(1.0, s / 100), "trace-X.parquet", "model-Y") for s in (8, 16, 32)
    ] + [("lru", "global", s, s / 200, "trace-X.parquet", "model-Y") for s in (8, 16, 32)]
    pd.DataFrame(
        rows, columns=["policy", "scope", "cache_slots", "hit_rate", "trace", "model"]
    ).to_parquet(path)
    return path


def test_plot_mrc_writes_png_svg_pdf_with_trace_in_title(tmp_path: Path) -> None:
    mrc = _mrc_table(tmp_path / "mrc.parquet")
    out = tmp_path / "fig" / "mrc"
    out.parent.mkdir()
    assert main(["plot", "mrc", str(mrc), "-o", str(out)]) == 0
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    import xml.etree.ElementTree as ET

    svg = " ".join(" ".join(ET.parse(out.with_suffix(".svg")).getroot().itertext()).split())
    assert "trace-X.parquet (model-Y)" in svg
    assert "97.46%" not in svg  # the public claim is marked only when asked (--claim)


def test_plot_sweep_names_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "sweep.parquet"
    pd.DataFrame({"policy": ["lru"], "cache_slots": [8], "tokens_per_s": [1.0]}).to_parquet(bad)
    assert main(["plot", "sweep", str(bad), "-o", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "predictor" in err and "missing" in err


def test_calibrate_refuses_simulated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sim = _summary(tmp_path / "sim.json")
    rc = main(["calibrate", str(sim), "--hardware", "ci-tiny", "-o", str(tmp_path / "hw.json")])
    assert rc == 2
    assert "measured run" in capsys.readouterr().err
    assert not (tmp_path / "hw.json").exists()


def test_plot_and_report_without_kind_print_their_own_help(capsys: pytest.CaptureFixture) -> None:
    assert main(["plot"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mer plot")
    for kind in ("mrc", "sweep", "io-share", "predicted-vs-measured", "layer-hits"):
        assert kind in out
    assert main(["report"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mer report") and "claim-check" in out


@pytest.mark.slow
def test_report_claim_check_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The whole report through `mer report claim-check`, on a 40-token cut of the
    bundled trace and a shorter regenerated stream so it runs in seconds."""
    missing = {"mrc", "simulate"} - _commands()
    if missing:
        pytest.skip(f"mer {' and mer '.join(sorted(missing))} not built yet")
    import mer.analysis.claim as claim
    import mer.analysis.claim_report as claim_report
    from mer.traces.format import read_trace, write_trace

    small = write_trace(read_trace(bundled_trace_path()).head(40), tmp_path / "small.parquet")
    monkeypatch.setattr(claim_report, "bundled_trace_path", lambda: small)
    monkeypatch.setitem(claim.PUBLISHED, "iterations", 300)
    monkeypatch.setitem(claim.PUBLISHED, "scaling_iterations", 600)
    out = tmp_path / "claim"
    assert main(["report", "claim-check", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    md = (out / "claim-check.md").read_text()
    assert result["markdown"] == str(out / "claim-check.md")
    assert "97.46%" in md and "whole-model tokens/s" in md
    assert (out / "claim-check.html").exists()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["claim-mrc.pdf", "claim-mrc.png", "claim-mrc.svg"]
    assert "figures/claim-mrc.png" in md
    # the headline misses are the distinct ids of the regenerated stream
    assert result["check"]["headline"]["misses"] == result["check"]["headline"]["distinct_ids"]
