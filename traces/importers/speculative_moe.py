"""Importer for speculative-moe's routing JSON Lines (vLLM, Mixtral-8x7B-Instruct FP8).

One record per (problem, layer, token) with `experts` in rank order and their
`gating_probs`. Two layouts exist in the published files:

* `token_idx` (e.g. humaneval_2_routing.jsonl): decode tokens only, numbered per
  problem. token = token_idx, phase decode.
* `token_pos` (routing_raw.jsonl): the position inside the forward batch. The
  file starts with the prompt's prefill pass (for each layer, positions 0..P-1),
  which is imported as prefill tokens (token = token_pos). After it come the
  decode steps: one record per layer per step, all at position 0, with no step
  number. Their order cannot be recovered, for two reasons measured on the
  published file (problem 0, whose 2,579 decode records all appear, with the
  same gate probabilities, in humaneval_2_routing.jsonl, which numbers them):
  records are lost (splitting where the layer number restarts gives 83 steps,
  but 2,579 records instead of 83 x 32 = 2,656), and 364 records (14%) sit in a
  later step's run than their own, one or two steps late. Inside the file a
  late record looks exactly like a lost one followed by an on-time one, so a
  layer's records can be placed only until its first gap; layer 2 loses its
  very first record, so no step has all 32 layers placed and no decode token
  can be recovered. They are dropped and counted; import the token_idx file
  of the same problem for its decode tokens.

Each (dataset, problem_id) is one sequence, numbered in order of first appearance.
Weights are the gate probabilities renormalised over the top-k (the published
ones already sum to 1 within 1e-7; the count renormalised is reported).
Tokens that miss a layer are dropped and counted per phase.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from mer.errors import BadInput
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

NAME = "speculative-moe"
SUMMARY = "vLLM JSON Lines (problem_id, layer, experts, gating_probs, token_idx)"

Record = tuple[int, int, list[int], list[float], int]  # line, layer, experts, probs, position


def load(src: Path, options: ImportOptions) -> ImportResult:
    """Group records by problem, number tokens, and drop incomplete tokens."""
    problems: dict[tuple[str, int], list[Record]] = {}
    layout: str | None = None
    for line, rec in iter_jsonl(src):
        key = "token_idx" if "token_idx" in rec else "token_pos" if "token_pos" in rec else None
        if key is None:
            raise BadInput(f"{src}:{line}: record has neither 'token_idx' nor 'token_pos'.")
        if layout is None:
            layout = key
        elif key != layout:
            raise BadInput(f"{src}:{line}: record uses {key!r} but earlier records use {layout!r}.")
        dataset = rec.get("dataset", "")
        if not isinstance(dataset, str):
            raise BadInput(f"{src}:{line}: 'dataset' must be a string, got {dataset!r}.")
        problem = field_int(rec, "problem_id", src, line)
        layer = field_int(rec, "layer", src, line)
        experts = field_int_list(rec, "experts", src, line)
        if "gating_probs" not in rec:
            raise BadInput(f"{src}:{line}: record has no 'gating_probs' field.")
        probs = field_float_list(rec, "gating_probs", src, line, len(experts))
        pos = field_int(rec, key, src, line)
        problems.setdefault((dataset, problem), []).append((line, layer, experts, probs, pos))
    if not problems:
        raise BadInput(f"{src}: no records found; nothing to import.")

    asm = TokenAssembler(src)
    sequences: list[dict[str, Any]] = []
    unplaced = 0
    steps = 0
    for seq, ((dataset, problem), recs) in enumerate(problems.items()):
        sequences.append({"seq": seq, "dataset": dataset, "problem_id": problem})
        if layout == "token_idx":
            for line, layer, experts, probs, pos in recs:
                asm.add(seq, pos, "decode", layer, experts, probs, line)
        else:
            n_dropped, n_steps = _add_positional(asm, seq, recs)
            unplaced += n_dropped
            steps += n_steps

    digest = sha256_of(src)
    meta: dict[str, Any] = {
        "model": "mixtral-8x7b",
        "source": {
            "importer": NAME,
            "file": src.name,
            "sha256": digest,
            "layout": layout,
            "sequences": sequences,
        },
        "provenance": (
            f"speculative-moe routing file {src.name} (public repository Mario928/speculative-moe; "
            "Mixtral-8x7B-Instruct-v0.1 FP8 served by vLLM)"
        ),
        "licence": None,
    }
    trace, dropped = asm.build(
        {**meta, "n_layers": 32, "n_experts": 8, "top_k": 2}, options, name=src.name
    )
    trace.meta.source["incomplete_tokens_dropped"] = dict(dropped)
    trace.meta.source["weights_renormalised"] = asm.renormalised
    notes = []
    if unplaced:
        dropped["decode_records_without_position"] = unplaced
        trace.meta.source["decode_records_without_position_dropped"] = unplaced
        notes.append(
            f"dropped {unplaced} decode record(s) of the token_pos layout: they carry no step "
            f"number, and {steps} decode steps would need {steps * 32} records, so records are "
            "lost; a late record cannot be told from a lost one, so no step can be placed "
            "whole (docs/trace-format.md explains; import the token_idx file of the same "
            "problem instead)"
        )
    incomplete = {k: v for k, v in dropped.items() if k.startswith("incomplete_")}
    total = sum(incomplete.values())
    if total:
        detail = ", ".join(f"{v} {k.split('_')[1]}" for k, v in sorted(incomplete.items()))
        notes.append(f"dropped {total} incomplete token(s) missing some layer(s) ({detail})")
    notes.append(
        f"weights = gating_probs renormalised over the top-k; {asm.renormalised} (token, layer) "
        "group(s) did not sum to 1 within 1e-6"
    )
    return ImportResult(trace, dropped, notes)


def _add_positional(asm: TokenAssembler, seq: int, recs: list[Record]) -> tuple[int, int]:
    """token_pos layout: import the prefill block; return (decode records dropped, decode
    steps found by splitting where the layer number restarts).

    Records up to the last one with token_pos > 0 are the prefill pass; all
    later records are decode steps at position 0 with no step number.
    """
    last_prefill = max((i for i, r in enumerate(recs) if r[4] > 0), default=-1)
    for line, layer, experts, probs, pos in recs[: last_prefill + 1]:
        asm.add(seq, pos, "prefill", layer, experts, probs, line)
    decode = recs[last_prefill + 1 :]
    steps = sum(1 for a, b in itertools.pairwise(decode) if b[1] <= a[1]) + (1 if decode else 0)
    return len(decode), steps
