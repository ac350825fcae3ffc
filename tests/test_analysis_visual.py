"""The visual test: every figure and the HTML report, rendered from a real (small) study.

The study is the demo's pipeline at test size, through `mer` itself: real routing
(the bundled trace, first 24 tokens), exact curves, a fitted synthetic trace, a
sweep in the simulator, the winner and the same cache without prefetch executed
by the real engine (mixtral-tiny experts, O_DIRECT where the filesystem allows),
a calibration and the runs predicted again on it. Then every figure is checked
the way a reviewer looks at one (mer.analysis.figcheck): axes named with units,
legend entries equal to the plotted series, no text outside the canvas or on
other text, text no smaller than 6 pt, at most two columns wide; the policy
colours are held equal across all figures and to the style's table; and the
HTML report is checked for structure (and, where a headless browser exists,
for horizontal overflow at a phone's and a laptop's width).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mer.analysis import figcheck, plots, style
from mer.analysis.run_report import build_study_report
from mer.analysis.sections import RunPair, Study, StudyInputs, render
from mer.cli import main
from mer.summary import read_token_table
from mer.traces.bundled import bundled_trace_path
from mer.traces.format import read_trace, write_trace

TOKENS = 24
RUN_TOKENS = 10
SHAPE = "mixtral-tiny"
HW = "ci-tiny"


def mer(*args: object) -> None:
    rc = main([str(a) for a in args])
    assert rc == 0, f"mer {' '.join(map(str, args))} exited {rc}"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("study")
    trace = write_trace(read_trace(bundled_trace_path()).head(TOKENS), d / "trace.parquet")
    mer("mrc", trace, "--policies", "lru,fifo,lfu", "--replay-step", 8, "-o", d / "mrc.parquet")
    mer("trace", "synth", "fitted", "--from", trace, "--tokens", TOKENS, "-o", d / "synth.parquet")
    mer(
        "mrc",
        d / "synth.parquet",
        "--policies",
        "lru",
        "--scopes",
        "global",
        "-o",
        d / "mrc-synth.parquet",
    )
    mer("experts", "synth", "--shape", SHAPE, "-o", d / "experts.gguf")
    mer(
        "sweep",
        trace,
        "--policies",
        "lru,fifo",
        "--predictors",
        "none,previous-token",
        "--cache-slots",
        "32,64,128",
        "--hardware",
        HW,
        "--shape",
        SHAPE,
        "--tokens",
        16,
        "--jobs",
        1,
        "-o",
        d / "sweep.parquet",
    )
    pairs = []
    for tag, predictor in (("winner", "previous-token"), ("no-prefetch", "none")):
        opts = [
            "--policy",
            "lru",
            "--cache-slots",
            64,
            "--predictor",
            predictor,
            "--tokens",
            RUN_TOKENS,
        ]
        mer("run", trace, "--experts", d / "experts.gguf", *opts, "-o", d / f"run-{tag}.parquet")
        mer(
            "simulate",
            trace,
            *opts,
            "--hardware",
            HW,
            "--shape",
            SHAPE,
            "-o",
            d / f"sim-{tag}.parquet",
        )
        pairs.append((tag, opts))
    mer("calibrate", d / "run-winner.parquet", "--hardware", HW, "-o", d / "cal.json")
    run_pairs = []
    for tag, opts in pairs:
        cal = d / f"sim-cal-{tag}.json"
        mer(
            "simulate",
            trace,
            *opts,
            "--hardware",
            d / "cal.json",
            "--shape",
            SHAPE,
            "--summary",
            cal,
        )
        run_pairs.append(
            RunPair(d / f"sim-{tag}.parquet", d / f"run-{tag}.parquet", tag.replace("-", " "), cal)
        )
    inputs = StudyInputs(
        trace=trace,
        mrc=d / "mrc.parquet",
        sweep=d / "sweep.parquet",
        pairs=run_pairs,
        hardware=HW,
        calibrated=d / "cal.json",
        synthetic_mrc=d / "mrc-synth.parquet",
    )
    out = d / "report"
    result, sections = build_study_report(out, inputs)
    st = {"dir": d, "inputs": inputs, "result": result, "sections": sections, "out": out}
    st["figures"] = {**_report_figures(st), **_extra_figures(st, d / "extra")}
    return st


def _report_figures(study: dict[str, Any]) -> dict[str, Any]:
    return {
        b.paths[0].stem: b.figure
        for s in study["sections"]
        for b in s.blocks
        if getattr(b, "figure", None) is not None
    }


def _extra_figures(study: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The figures only `mer plot` draws (overlays, two sizes, miss ratio, claim, latency)."""
    d = study["dir"]
    tmp.mkdir()
    mrc = pd.read_parquet(d / "mrc.parquet")
    synth = pd.read_parquet(d / "mrc-synth.parquet")
    sweep = pd.read_parquet(d / "sweep.parquet")
    s_df, _ = read_token_table(d / "sim-winner.parquet")
    r_df, _ = read_token_table(d / "run-winner.parquet")
    figs = {
        "overlay-3": plots.plot_mrc(
            [("real", mrc), ("synthetic", synth), ("real again", mrc)],
            tmp / "overlay",
            title="Overlay of three sources",
            policies=["lru", "opt"],
            scopes=["global"],
        ),
        "two-sizes": plots.plot_mrc(mrc, tmp / "two", title="Two sizes", sizes=[64, 128]),
        "miss-ratio": plots.plot_mrc(
            mrc, tmp / "miss", title="Miss ratio", metric=style.MISS_RATIO
        ),
        "claim": plots.plot_mrc(
            mrc, tmp / "claim", title="Claim marked", claim=plots.SEED_CLAIM, bytes_per_expert=2**20
        ),
        "io-forced": plots.plot_io_share(sweep, tmp / "io", title="I/O share (forced)"),
        "latency": plots.plot_token_latency(
            [("winner", s_df["time_s"].to_numpy(), r_df["time_s"].to_numpy())],
            tmp / "lat",
            title="Per-token latency",
        ),
        "validation": plots.plot_validation(
            _validation_table(), tmp / "val", title="Held-out validation"
        ),
    }
    return {k: v.figure for k, v in figs.items()}


def _validation_table() -> pd.DataFrame:
    """A `mer validate` table's tokens/s rows: three configurations, both stages."""
    rows = []
    for name, policy, predictor, meas, pred in (
        ("lru-32", "lru", "none", (4.0, 3.8, 4.3), 4.1),
        ("fifo-64", "fifo", "none", (5.0, 4.9, 5.2), 4.7),
        ("lru-64-oracle", "lru", "oracle", (7.5, 7.0, 8.1), 7.9),
    ):
        for stage, p in (("calibrated", pred), ("uncalibrated", pred * 1.4)):
            rows.append(
                {
                    "config": name,
                    "stage": stage,
                    "metric": "tokens/s",
                    "predicted": p,
                    "measured": meas[0],
                    "measured_min": meas[1],
                    "measured_max": meas[2],
                    "policy": policy,
                    "predictor": predictor,
                }
            )
    return pd.DataFrame(rows)


def test_every_figure_passes_the_structure_checks(study: dict[str, Any]) -> None:
    figs = study["figures"]
    expected = {
        "popularity",
        "repetition",
        "mrc",
        "mrc-per-layer",
        "mrc-real-vs-synthetic",
        "sweep-tokens-per-s",
        "predicted-vs-measured",
        "token-latency",
        "layer-hit-rates",
    }
    assert expected <= set(figs), sorted(expected - set(figs))
    problems = {name: figcheck.check_figure(fig) for name, fig in figs.items()}
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, "\n".join(f"{k}: {p}" for k, v in bad.items() for p in v)


def test_policy_colours_are_one_per_policy_and_the_styles(study: dict[str, Any]) -> None:
    figs = study["figures"]
    seen: dict[str, set[str]] = {}
    for fig in figs.values():
        for policy, colors in figcheck.series_colors(fig).items():
            seen.setdefault(policy, set()).update(c for c in colors if c != "#ffffff")
    assert {"lru", "fifo", "opt"} <= set(seen)
    for policy, colors in seen.items():
        assert colors == {style.policy_color(policy).lower()}, (policy, colors)


def test_figures_are_written_at_print_width_in_three_formats(study: dict[str, Any]) -> None:
    import matplotlib.image as mpimg

    fig_dir = study["out"] / "figures"
    pngs = sorted(fig_dir.glob("*.png"))
    assert pngs
    for png in pngs:
        for ext, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF-")):
            assert png.with_suffix(ext).read_bytes()[:5] == magic, png.with_suffix(ext)
        width_in = mpimg.imread(png).shape[1] / style.PNG_DPI
        assert min(abs(width_in - style.COLUMN_IN), abs(width_in - style.FULL_IN)) < 0.02, (
            png,
            width_in,
        )
        ET.parse(png.with_suffix(".svg"))  # valid XML, text kept as text


def test_exact_points_are_never_joined_across_a_gap(study: dict[str, Any]) -> None:
    """fifo was replayed at every 8th size: its curve must be points only; LRU (every size) a line."""
    fig = _report_figures(study)["mrc"]
    ax = fig.axes[0]
    for line in ax.lines:
        keys = style.series_keys(line)
        if not keys or "policy" not in keys:
            continue
        x = np.asarray(line.get_xdata())
        if line.get_linestyle() not in ("None", "none") and x.size > 1:
            assert np.all(np.diff(x) == 1), (keys, x[:10])
        if keys["policy"] == "fifo":
            assert x.size == 1 or line.get_linestyle() in ("None", "none")


class _Html(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: dict[str, list[str]] = {}
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br"):
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self._open and self._open[-1] == tag, f"</{tag}> closes {self._open[-1:]}"
        self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open:
            self.text.setdefault(self._open[-1], []).append(data)


def test_html_report_structure(study: dict[str, Any]) -> None:
    out = study["out"]
    html = (out / "report.html").read_text()
    tree = _Html()
    tree.feed(html)
    tree.close()
    imgs = [a for t, a in tree.tags if t == "img"]
    figures = [t for t, _ in tree.tags if t == "figure"]
    assert len(imgs) == len(figures) >= 9  # every image sits in a figure with its caption
    for a in imgs:
        assert (out / str(a["src"])).exists(), a["src"]
    captions = tree.text.get("figcaption", []) + tree.text.get("em", [])
    assert sum(1 for c in captions if c.startswith("Figure ")) == len(imgs)
    md = (out / "report.md").read_text()
    # every section says which tokens its numbers come from
    sections = re.split(r"\n## ", md)[1:]
    assert sections and all("*Token window:" in s for s in sections)
    assert "first 16 of the trace's 24 tokens" in md and f"first {RUN_TOKENS} of the trace's" in md
    # human column names, not fields
    assert "tokens_per_s" not in md.split("## ", 1)[1].split("Run details")[0]
    for needed in ("Prefetch or not", "Calibration and its effect", "held out", "fitted synthetic"):
        assert needed in md, needed
    # nothing scrolls the page sideways: long text wraps, tables scroll in their own box
    css = html.split("<style>", 1)[1].split("</style>", 1)[0]
    assert "white-space:pre-wrap" in css and ".table{max-width:100%;overflow-x:auto}" in css
    assert "overflow-wrap:anywhere" in css and "max-width:100%" in css
    assert "<meta name='viewport'" in html


def test_render_is_deterministic_from_sections(study: dict[str, Any]) -> None:
    study2 = Study(study["inputs"], study["dir"] / "again")
    md = render(study2, study["sections"], title="t")
    assert md.count("![") == sum(
        1 for s in study["sections"] for b in s.blocks if getattr(b, "paths", None)
    )


_BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "chrome")
_PROBE = """<script>window.addEventListener('load',()=>{const d=document.documentElement;
const wide=[...document.querySelectorAll('body *')].filter(e=>e.getBoundingClientRect().right>d.clientWidth+1
&&!e.closest('.table')).map(e=>e.tagName).slice(0,5);
document.body.setAttribute('data-overflow',JSON.stringify({scroll:d.scrollWidth,client:d.clientWidth,wide:wide}));});</script>"""


def _browser() -> str | None:
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    shell = Path("/usr/lib/chromium/chromium-headless-shell")
    return str(shell) if shell.exists() else None


@pytest.mark.parametrize("width", [390, 1280])
def test_html_report_never_scrolls_sideways_in_a_browser(study: dict[str, Any], width: int) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no headless browser (chromium) on this machine; the static checks above still ran"
        )
    out = study["out"]
    probe = out / f"probe-{width}.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    try:
        res = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--window-size={width},900",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        probe.unlink()
    m = re.search(r"data-overflow=\"([^\"]+)\"", res.stdout)
    if m is None:
        pytest.skip(f"the browser ran but reported nothing ({res.stderr.strip()[:200]})")
    import html as html_mod
    import json

    found = json.loads(html_mod.unescape(m.group(1)))
    assert found["scroll"] <= found["client"], found
    assert found["wide"] == [], found
