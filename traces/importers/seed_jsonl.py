"""Importer for the public engine's replay input: JSON Lines {"token", "layer", "experts"}.

Optional fields: "weights" (gate weights in the order of "experts",
renormalised over the top-k), "seq" (default 0) and "phase" ("prefill" or
"decode", default decode). The shape is inferred from the data (n_layers =
max layer + 1, n_experts = max expert + 1, top_k = experts per record) unless
--n-layers / --n-experts / --top-k say otherwise; the public engine's flat
streams use layer 0 and flat ids, for which --experts-per-layer records the
real geometry in the metadata. Tokens that miss a layer are dropped and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mer.errors import BadInput
from mer.traces.format import PHASES
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    TokenAssembler,
    field_float_list,
    field_int,
    field_int_list,
    iter_jsonl,
    sha256_of,
)

NAME = "seed-jsonl"
SUMMARY = 'replay JSON Lines {"token", "layer", "experts"} (+ "weights")'


def load(src: Path, options: ImportOptions) -> ImportResult:
    asm = TokenAssembler(src)
    for line, rec in iter_jsonl(src):
        token = field_int(rec, "token", src, line)
        layer = field_int(rec, "layer", src, line)
        seq = field_int(rec, "seq", src, line) if "seq" in rec else 0
        phase = rec.get("phase", "decode")
        if phase not in PHASES:
            raise BadInput(f"{src}:{line}: 'phase' must be 'prefill' or 'decode', got {phase!r}.")
        experts = field_int_list(rec, "experts", src, line)
        weights = None
        if rec.get("weights") is not None:
            weights = field_float_list(rec, "weights", src, line, len(experts))
        asm.add(seq, token, phase, layer, experts, weights, line)
    meta: dict[str, Any] = {
        "model": "unknown",
        "source": {"importer": NAME, "file": src.name, "sha256": sha256_of(src)},
        "provenance": f"seed-jsonl file {src.name}",
    }
    trace, dropped = asm.build(meta, options, name=src.name)
    notes = []
    if dropped:
        notes.append(f"dropped {sum(dropped.values())} incomplete token(s) missing some layer(s)")
    if asm.renormalised:
        notes.append(f"renormalised the weights of {asm.renormalised} (token, layer) group(s)")
    if options.model is None:
        notes.append("model recorded as 'unknown'; pass --model NAME to name it")
    return ImportResult(trace, dropped, notes)
