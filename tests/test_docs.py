"""The README and every docs page run as written (tests/docblocks.py says how).

Each page is one test: its ```sh and ```python blocks run in order in a fresh
directory and a ```text block marked as output must be what the block above it
printed. What the test changes (smaller sizes) or provides (a source file the
page says where to download) is written next to the block, in a `doc-test`
comment; the log of what ran is printed with -s. A page whose example breaks
fails here, naming the file and line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
from docblocks import Session, SkipBlock, parse, run_page

from mer.core import policy as policy_mod
from mer.core import predictor as predictor_mod
from mer.traces.bundled import load_bundled

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _active_experts(d: Path) -> None:
    """Stands for mixtral-offloading's active_experts.txt (the README says where it is
    published): the same format, rebuilt from the bundled trace, which was imported
    from it: a prompt block of all experts, then one sorted, comma-separated pair per
    (token, layer)."""
    tr = load_bundled()
    lines = ["0,1,2,3,4,5,6,7"] * tr.n_layers
    lines += [",".join(map(str, sorted(s))) for s in tr.experts.reshape(-1, tr.top_k).tolist()]
    (d / "active_experts.txt").write_text("\n".join(lines) + "\n")


def _torch(d: Path) -> None:
    """Not a file: recording needs torch and transformers (`make test` installs them)."""
    if (
        importlib.util.find_spec("transformers") is None
        or importlib.util.find_spec("torch") is None
    ):
        raise SkipBlock("needs torch and transformers (pip install 'mer-moe[record]')")


def _libcachesim(d: Path) -> None:
    """Not a file: the GPL libCacheSim peer, an optional extra."""
    if importlib.util.find_spec("libcachesim") is None:
        raise SkipBlock(
            "needs libCacheSim, the optional peers extra (pip install 'mer-moe[peers]')"
        )


FIXTURES: dict[str, Callable[[Path], None]] = {
    "active_experts.txt": _active_experts,
    "torch": _torch,
    "libcachesim": _libcachesim,
}


@pytest.fixture
def clean_registries():
    """Pages may register policies in this process (docs/api.md does): undo it."""
    policies, predictors = dict(policy_mod.POLICIES), dict(predictor_mod.PREDICTORS)
    yield
    policy_mod.POLICIES.clear()
    policy_mod.POLICIES.update(policies)
    predictor_mod.PREDICTORS.clear()
    predictor_mod.PREDICTORS.update(predictors)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs_as_written(page: Path, tmp_path: Path, clean_registries: None) -> None:
    session = Session(tmp_path, FIXTURES)
    log = run_page(page, session)
    print("\n".join(log))


def test_every_directive_is_well_formed_and_every_fixture_known() -> None:
    for page in PAGES:
        for b in parse(page):  # parse raises on malformed directives
            for name in b.needs:
                assert name in FIXTURES, f"{page.name}:{b.line} needs unknown fixture {name!r}"
            if b.replace:
                b.source()  # raises if a substitution no longer matches


COMMAND_STARTS = ("mer ", "make ", "python ", ".venv/", "pip ")


def test_no_command_hides_outside_a_sh_block() -> None:
    """Commands live in fenced ```sh blocks, so this test runs them: an indented
    `mer ...` line, or one in a fence without a language, would be a command nobody
    checks (a usage synopsis is a ```text block starting with `usage:`)."""
    for page in PAGES:
        for b in parse(page):
            lines = [ln.strip() for ln in b.code.splitlines()]
            if b.lang == "" and any(ln.startswith(COMMAND_STARTS) for ln in lines):
                raise AssertionError(
                    f"{page.name}:{b.line}: commands in a fence without a language"
                )
        in_fence = False
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_fence = not in_fence
            elif (
                not in_fence and line.startswith("    ") and line.strip().startswith(COMMAND_STARTS)
            ):
                raise AssertionError(
                    f"{page.name}:{i}: command in an indented block: {line.strip()}"
                )
