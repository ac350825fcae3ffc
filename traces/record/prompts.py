"""Prompt files for `mer record`: plain text (one prompt per line) or JSON Lines.

The file's sha256 goes into the trace metadata and the resume fingerprint, so a
trace names exactly the prompts it was recorded from and a resumed run cannot
silently continue with a different file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mer.errors import BadInput


@dataclass
class Prompts:
    path: str
    texts: list[str]
    sha256: str
    format: str  # "text" or "jsonl"

    def __len__(self) -> int:
        return len(self.texts)


def _looks_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if not first.startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def load_prompts(path: str | Path) -> Prompts:
    """Read prompts; blank lines are skipped. Raises BadInput with the line number on problems."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"prompts file {p}: no such file.")
    if p.is_dir():
        raise BadInput(f"prompts file {p}: is a directory; give a text or JSON Lines file.")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"prompts file {p}: not UTF-8 text ({exc}).") from exc
    lines = text.splitlines()
    texts: list[str] = []
    if _looks_jsonl(p, lines):
        fmt = "jsonl"
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"prompts file {p}, line {no}: not valid JSON ({exc}).") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise BadInput(
                    f'prompts file {p}, line {no}: expected an object with a string "prompt" field.'
                )
            if obj["prompt"].strip():
                texts.append(obj["prompt"])
    else:
        fmt = "text"
        texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise BadInput(
            f"prompts file {p}: no prompts (the file is empty or blank). Write one prompt per "
            'line, or JSON Lines with a "prompt" field.'
        )
    return Prompts(str(p), texts, hashlib.sha256(raw).hexdigest(), fmt)
