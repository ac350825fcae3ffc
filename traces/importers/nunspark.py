"""Importer for nunspark's expert trace (`nunspark generate --expert-trace FILE`).

nunspark writes one JSON object per call of a selective MoE layer:
`{"t": call counter, "layer": model layer index, "fired": sorted distinct experts
the router chose over the whole batch, "batch_tokens": positions in the batch}`.

- A **pass** is one forward call over the model: the records of increasing
  `layer`, in `t` order (a new pass starts when the layer number does not
  increase). Layer ids are the model's; only MoE layers are traced, so the
  distinct ids, sorted, become MoE layers 0..n-1.
- A pass with `batch_tokens` 1 everywhere is one decoded token: `fired` is its
  top-k set. nunspark sorts it, so the gate order is lost: `rank` keeps the
  ascending id order and `weight` is null (as for mixtral-offloading).
- A pass over more than one position (a prompt's prefill, a prefill chunk, a
  speculative verify) records only the union of the experts of all positions,
  so no per-token routing can be recovered: it is dropped and counted, and it
  ends the current sequence (the tokens after it are a new generation or a
  new speculation window; token numbers restart at 0, the prompt length being
  unknown).
- A pass that misses a MoE layer, or whose `t` values skip, is an incomplete
  token: dropped and counted.

n_experts is the largest expert id + 1 unless --n-experts gives the model's
(recommended: a trace may never fire the last expert); top_k is the size of
`fired` on single-token records unless --top-k says otherwise.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.traces.format import from_arrays
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    field_int,
    field_int_list,
    iter_jsonl,
    make_meta,
    sha256_of,
)

NAME = "nunspark"
SUMMARY = 'nunspark --expert-trace JSON Lines {"t", "layer", "fired", "batch_tokens"}'

Record = tuple[int, int, int, list[int], int]  # line, t, layer, fired, batch_tokens


def _read(src: Path) -> list[Record]:
    recs: list[Record] = []
    for line, rec in iter_jsonl(src):
        t = field_int(rec, "t", src, line)
        layer = field_int(rec, "layer", src, line)
        fired = field_int_list(rec, "fired", src, line)
        batch = field_int(rec, "batch_tokens", src, line, minimum=1)
        recs.append((line, t, layer, fired, batch))
    if not recs:
        raise BadInput(f"{src}: no records found; nothing to import.")
    recs.sort(key=lambda r: r[1])
    for a, b in itertools.pairwise(recs):
        if a[1] == b[1]:
            raise BadInput(f"{src}:{b[0]}: call counter t={b[1]} repeats line {a[0]}.")
    return recs


def _passes(recs: list[Record]) -> list[list[Record]]:
    out: list[list[Record]] = []
    for r in recs:
        if out and r[2] > out[-1][-1][2] and r[1] == out[-1][-1][1] + 1:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def load(src: Path, options: ImportOptions) -> ImportResult:
    recs = _read(src)
    layer_ids = sorted({r[2] for r in recs})
    if options.n_layers is not None and options.n_layers != len(layer_ids):
        raise BadInput(
            f"{src}: --n-layers {options.n_layers}, but the file traces {len(layer_ids)} "
            f"distinct MoE layers ({layer_ids[:8]}{'...' if len(layer_ids) > 8 else ''})."
        )
    n_layers = len(layer_ids)
    singles = [r for r in recs if r[4] == 1]
    if options.top_k is not None:
        top_k = options.top_k
    elif singles:
        top_k = len(singles[0][3])
    else:
        raise BadInput(
            f"{src}: every record covers more than one position (batch_tokens > 1): only "
            "unions of experts were recorded, no per-token routing to import. Trace a "
            "generation without speculative decoding."
        )
    max_id = max(max(r[3]) for r in recs)
    n_experts = options.n_experts or max_id + 1
    if max_id >= n_experts:
        raise BadInput(f"{src}: expert {max_id} >= --n-experts {n_experts}.")

    tokens: list[list[list[int]]] = []
    seq_ids: list[int] = []
    positions: list[int] = []
    seq, pos = 0, 0
    dropped = {"multi_token_passes": 0, "incomplete_tokens": 0}
    for p in _passes(recs):
        if any(r[4] > 1 for r in p):
            dropped["multi_token_passes"] += 1
            if pos:
                seq, pos = seq + 1, 0
            continue
        if len(p) != n_layers:
            dropped["incomplete_tokens"] += 1
            pos += 1  # a token was decoded, even if not every layer of it was traced
            continue
        steps = []
        for line, _t, _layer, fired, _b in p:
            if len(fired) != top_k:
                raise BadInput(
                    f"{src}:{line}: a single-token call fired {len(fired)} experts, expected "
                    f"top_k {top_k} (pass --top-k if the model routes to another number)."
                )
            steps.append(sorted(fired))
        tokens.append(steps)
        seq_ids.append(seq)
        positions.append(pos)
        pos += 1
    if not tokens:
        raise BadInput(
            f"{src}: no complete single-token pass ({dropped['multi_token_passes']} multi-token "
            f"pass(es), {dropped['incomplete_tokens']} incomplete): nothing to import."
        )
    meta_kwargs: dict[str, Any] = {
        "model": "unknown",
        "source": {
            "importer": NAME,
            "file": src.name,
            "sha256": sha256_of(src),
            "moe_layer_ids": layer_ids,
            "dropped": dict(dropped),
            "rank_order_known": False,
        },
        "provenance": f"nunspark expert trace {src.name}",
    }
    meta = make_meta(meta_kwargs, options, n_layers=n_layers, n_experts=n_experts, top_k=top_k)
    trace = from_arrays(
        np.asarray(tokens, np.int16),
        meta,
        seq=np.asarray(seq_ids, np.int32),
        token=np.asarray(positions, np.int32),
        phase=[options.phase or "decode"] * len(tokens),
        name=src.name,
    )
    notes = [
        "rank follows nunspark's ascending expert ids (it records sets: gate order unknown); "
        "weights are null"
    ]
    if dropped["multi_token_passes"]:
        notes.append(
            f"dropped {dropped['multi_token_passes']} multi-token pass(es) (prefill, prefill "
            "chunks or speculative verifies): they record the union of experts over the batch, "
            "not per-token routing"
        )
    if dropped["incomplete_tokens"]:
        notes.append(f"dropped {dropped['incomplete_tokens']} pass(es) missing some MoE layer")
    if options.n_experts is None:
        notes.append(
            f"n_experts inferred as {n_experts} (largest id + 1); pass --n-experts with the "
            "model's count"
        )
    if options.model is None:
        notes.append("model recorded as 'unknown'; pass --model NAME to name it")
    return ImportResult(trace, {k: v for k, v in dropped.items() if v}, notes)
