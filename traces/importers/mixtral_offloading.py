"""Importer for mixtral-offloading's `active_experts.txt` (one line per token x layer).

Each line lists the comma-separated, sorted, de-duplicated local expert ids used
at one layer; line i belongs to layer i mod n_layers. A block of n_layers lines
is one forward pass. The first block of the file is the prompt (prefill): it
holds the *union* of the experts used by all prompt tokens (typically all 8), so
the per-token prefill routing is unknown and cannot be a trace token (top_k is 2).
Those blocks are dropped and counted. A later block with more than top_k
experts on a line is another prompt: it is dropped too and starts a new sequence.

Decode lines have exactly top_k experts. The source sorts them by id, so the
gate order is unknown: rank keeps the given (ascending id) order and the
weights are null. A trailing block shorter than n_layers is dropped and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mer.errors import BadInput
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    TokenAssembler,
    read_lines,
    sha256_of,
)

NAME = "mixtral-offloading"
SUMMARY = "active_experts.txt (line i = layer i mod 32); prefill sets dropped"

# The file in ../shared/data/external/mixtral-offloading-h39s, identified by content.
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    "0bb44b6ab31328e9c9662a60472925e17e89b2c7ddea218e3efb3229f7d1d708": {
        "provenance": (
            "Public repository h39s/mlsys (a fork of mixtral-offloading by Artyom Eliseev and "
            "Denis Mazur), file active_experts.txt at commit be84cfb. Routing of "
            "Mixtral-8x7B-Instruct-v0.1 (HQQ-quantized) generating for one creative-writing "
            "prompt: 773 decode tokens x 32 layers, top-2."
        ),
        "licence": "MIT (Copyright (c) 2023 Artyom Eliseev, Denis Mazur)",
        "repository": "h39s/mlsys",
        "commit": "be84cfb",
    }
}


def _parse_line(text: str, src: Path, line: int, n_experts: int) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        experts = [int(p) for p in parts]
    except ValueError:
        raise BadInput(
            f"{src}:{line}: expected comma-separated expert ids, got {text!r}."
        ) from None
    if any(e < 0 or e >= n_experts for e in experts):
        raise BadInput(f"{src}:{line}: expert id outside 0..{n_experts - 1} in {text!r}.")
    if len(set(experts)) != len(experts):
        raise BadInput(f"{src}:{line}: the same expert listed twice in {text!r}.")
    return experts


def load(src: Path, options: ImportOptions) -> ImportResult:
    """Parse the file, drop prefill blocks and a trailing partial block, build the trace."""
    n_layers = options.n_layers or 32
    n_experts = options.n_experts or 8
    top_k = options.top_k or 2
    lines = read_lines(src)
    if lines and not lines[-1].strip():
        lines = lines[:-1]
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            raise BadInput(
                f"{src}:{i}: blank line; every line must list the experts of one (token, layer)."
            )
    parsed = [_parse_line(t, src, i, n_experts) for i, t in enumerate(lines, start=1)]
    n_blocks, tail = divmod(len(parsed), n_layers)
    asm = TokenAssembler(src)
    dropped: dict[str, int] = {}
    seq = -1
    token = 0
    prefill_lines = 0
    for b in range(n_blocks):
        block = parsed[b * n_layers : (b + 1) * n_layers]
        first_line = b * n_layers + 1
        is_prompt = b == 0 or any(len(e) > top_k for e in block)
        if is_prompt:
            seq += 1
            token = 0
            prefill_lines += n_layers
            dropped["prefill_blocks"] = dropped.get("prefill_blocks", 0) + 1
            continue
        for layer, experts in enumerate(block):
            if len(experts) != top_k:
                raise BadInput(
                    f"{src}:{first_line + layer}: {len(experts)} expert(s) in a decode line, "
                    f"expected top_k {top_k}."
                )
            asm.add(seq, token, "decode", layer, experts, None, first_line + layer)
        token += 1
    if prefill_lines:
        dropped["prefill_lines"] = prefill_lines
    if tail:
        dropped["trailing_lines"] = tail
    if not asm.tokens:
        raise BadInput(
            f"{src}: no decode tokens after the prefill block(s) ({len(lines)} lines); "
            "nothing to import."
        )
    digest = sha256_of(src)
    known = KNOWN_SOURCES.get(digest, {})
    meta: dict[str, Any] = {
        "model": "mixtral-8x7b",
        "source": {
            "importer": NAME,
            "file": src.name,
            "sha256": digest,
            "lines": len(lines),
            "prefill_lines_dropped": prefill_lines,
            "prefill_blocks_dropped": dropped.get("prefill_blocks", 0),
            "trailing_lines_dropped": tail,
            "rank_order": "ascending expert id, as in the source (gate order not recorded)",
            "weights": "not recorded by the source (null)",
            **{k: v for k, v in known.items() if k in ("repository", "commit")},
        },
        "provenance": known.get(
            "provenance", f"mixtral-offloading active_experts.txt format, file {src.name}"
        ),
        "licence": known.get("licence"),
    }
    trace, incomplete = asm.build(
        {**meta, "n_layers": n_layers, "n_experts": n_experts, "top_k": top_k},
        options,
        name=src.name,
    )
    dropped.update(incomplete)
    notes = [
        f"dropped {prefill_lines} prefill line(s) ({dropped.get('prefill_blocks', 0)} prompt "
        "block(s)): they hold the union of the experts used by all prompt tokens, not per-token "
        "top-k routing",
        "rank follows the source's ascending expert ids (gate order unknown); weights are null",
    ]
    if tail:
        notes.append(f"dropped {tail} trailing line(s) that do not make a whole token")
    return ImportResult(trace, dropped, notes)
