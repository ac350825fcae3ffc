"""Run the code blocks of a Markdown page as written: the machinery of tests/test_docs.py.

A page's fenced blocks run top to bottom in one fresh directory, so later blocks
use what earlier ones wrote (the README's workflow is one session):

- ```sh blocks run with bash (-e -u -o pipefail), `mer` and `python` being this
  environment's;
- ```python blocks run in one namespace per page, like notebook cells;
- a ```text block marked `output` must equal what the block before it printed;
- any other block (```json, ```toml, ```text, ```console, ...) is not run.

What the test does differently from a reader is said next to the block, in an
HTML comment the rendered page hides and its source shows:

    <!-- doc-test: replace "--tokens 96" "--tokens 8"; needs active_experts.txt -->

- `replace "OLD" "NEW"`: run with OLD replaced by NEW (smaller sizes); OLD must
  occur in the block, so a substitution cannot silently stop applying;
- `needs NAME`: the test provides NAME first (see `FIXTURES` in
  tests/test_docs.py; each says what it stands for): a file, or an optional
  package, without which this block alone is skipped (logged);
- `file NAME`: write this block to NAME instead of running it (a module a later
  block imports);
- `skip REASON`: not run, for the stated reason (e.g. a 90 GB download); it comes
  last, the reason being the rest of the comment;
- `output`: this block is the expected output of the one before.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```([\w-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
RUNNABLE = ("sh", "python")


class SkipBlock(Exception):
    """Raised by a fixture that cannot be provided here (a missing optional package):
    that block is skipped, with the reason in the log, and the page goes on."""


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    replace: list[tuple[str, str]] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    file: str | None = None
    skip: str | None = None
    output: bool = False

    def source(self) -> str:
        code = self.code
        for old, new in self.replace:
            if old not in code:
                raise AssertionError(
                    f"line {self.line}: the doc-test substitution {old!r} no longer matches "
                    "the block; update the directive with the block."
                )
            code = code.replace(old, new)
        return code


def _directives(text: str, line: int) -> dict[str, object]:
    out: dict[str, object] = {"replace": [], "needs": []}
    head, sep, reason = text.partition("skip ")
    if sep:  # the reason is free text (it may hold ';'): skip comes last
        if not reason.strip():
            raise AssertionError(f"line {line}: skip needs a reason")
        out["skip"] = reason.strip()
        text = head
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        word, _, rest = part.partition(" ")
        if word == "replace":
            args = shlex.split(rest)
            if len(args) != 2:
                raise AssertionError(f"line {line}: replace needs two quoted strings: {part!r}")
            out["replace"].append((args[0], args[1]))  # type: ignore[attr-defined]
        elif word == "needs":
            out["needs"].extend(rest.split())  # type: ignore[attr-defined]
        elif word == "file":
            out["file"] = rest.strip()
        elif word == "output":
            out["output"] = True
        else:
            raise AssertionError(f"line {line}: unknown doc-test directive {word!r}")
    return out


def parse(path: Path) -> list[Block]:
    """Every fenced block of a page with the directives written just above it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    pending: dict[str, object] | None = None
    i = 0
    while i < len(lines):
        m = DIRECTIVE.match(lines[i])
        if m:
            pending = _directives(m.group(1), i + 1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            start = i
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            d = pending or {}
            blocks.append(
                Block(
                    lang=f.group(1),
                    code="\n".join(body) + "\n",
                    line=start + 1,
                    replace=list(d.get("replace", [])),  # type: ignore[call-overload]
                    needs=list(d.get("needs", [])),  # type: ignore[call-overload]
                    file=d.get("file"),  # type: ignore[arg-type]
                    skip=d.get("skip"),  # type: ignore[arg-type]
                    output=bool(d.get("output", False)),
                )
            )
            pending = None
        elif lines[i].strip():
            pending = None  # a directive applies to the block right below it only
        i += 1
    return blocks


@dataclass
class Session:
    """One page's run: its directory, its Python namespace, its shell environment."""

    workdir: Path
    fixtures: dict[str, Callable[[Path], None]]
    timeout: float = 300.0
    namespace: dict[str, object] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.pop("MER_DEBUG", None)
        return env

    def provide(self, names: list[str]) -> None:
        for name in names:
            if not (self.workdir / name).exists():
                self.fixtures[name](self.workdir)

    def run_sh(self, code: str, where: str) -> str:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=self.timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{where}: exit {proc.returncode}\n--- block ---\n{code}--- stderr ---\n"
                f"{proc.stderr[-3000:]}--- stdout ---\n{proc.stdout[-2000:]}"
            )
        return proc.stdout

    def run_python(self, code: str, where: str) -> str:
        buf = io.StringIO()
        old = os.getcwd()
        os.chdir(self.workdir)
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(code, where, "exec"), self.namespace)
        finally:
            os.chdir(old)
        return buf.getvalue()


def run_page(path: Path, session: Session) -> list[str]:
    """Run every runnable block of `path`; returns one line per block saying what ran."""
    blocks = parse(path)
    last_out: str | None = None
    last_where = ""
    for b in blocks:
        where = f"{path.name}:{b.line}"
        if b.skip:
            session.log.append(f"{where} skipped: {b.skip}")
            last_out = None
            continue
        if b.output:
            if last_out is None:
                raise AssertionError(f"{where}: an output block must follow a block that ran")
            want, got = b.code.rstrip(), last_out.rstrip()
            if want != got:
                raise AssertionError(
                    f"{where}: the output shown is not what {last_where} prints\n"
                    f"--- shown ---\n{want}\n--- printed ---\n{got}"
                )
            last_out = None
            continue
        if b.file:
            (session.workdir / b.file).write_text(b.source())
            session.log.append(f"{where} written to {b.file}")
            continue
        if b.lang not in RUNNABLE:
            last_out = None
            continue
        try:
            session.provide(b.needs)
        except SkipBlock as exc:
            session.log.append(f"{where} skipped: {exc}")
            last_out = None
            continue
        code = b.source()
        t0 = time.perf_counter()
        last_out = (session.run_sh if b.lang == "sh" else session.run_python)(code, where)
        last_where = where
        note = f" (with {', '.join(f'{o!r} -> {n!r}' for o, n in b.replace)})" if b.replace else ""
        session.log.append(f"{where} ran in {time.perf_counter() - t0:.1f} s{note}")
    return session.log
