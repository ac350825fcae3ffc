"""Importer for bigrig's routing traces (`data/traces/TAG_full.npz`).

bigrig's reader (`bigrig_engine.pool.load_trace`) defines the file: a numpy
`.npz` with

- `idx`: integer array (layers, tokens, k) of the experts each token chose at
  each MoE layer, in router-rank order; or, instead,
- `logits`: float array (layers, tokens, n_experts) of router logits, from which
  the reader takes the top experts by descending logit;
- `seq_bounds`: sequence boundaries over the token axis (bigrig's evaluation
  never flattens across them).

What mer does with them:
- `idx` keeps its rank order; weights are null. With `logits`, the top-k
  experts are taken by descending logit (ties: smaller id first), k from
  --top-k or 8 (bigrig's reader takes 8); the weights are the softmax of the
  top-k logits (normalised over the top-k, as trace format v1 stores them) and
  the full logits are kept (`mer trace info` shows "logits yes"). When the
  file has both, `idx` gives the experts and `logits` the weights.
- `seq_bounds`: the writer is not published, only the reader, so its layout is
  read in every unambiguous form: 1-D starts beginning with 0 (`[0, 120, 300]`),
  1-D ends finishing with the token count (`[120, 300, 412]`), both
  (`[0, 120, 300, 412]`), or an (n, 2) array of [start, end) pairs. Tokens no
  pair covers are dropped and counted. Without `seq_bounds`, one sequence.
- The file records no phase: every token is imported as `decode` unless
  --as-phase prefill says otherwise. Tokens are numbered from 0 per sequence.
"""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.traces.format import from_arrays
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    check_source,
    make_meta,
    sha256_of,
)

NAME = "bigrig"
SUMMARY = "bigrig .npz routing trace (idx [layers, tokens, k] or logits, seq_bounds)"
DEFAULT_LOGIT_TOP_K = 8  # what bigrig's own reader takes from logits


def _load_npz(src: Path) -> dict[str, np.ndarray]:
    check_source(src)
    try:
        with np.load(src, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BadInput(f"{src}: not a numpy .npz archive ({exc}).") from exc


def _segments(bounds: np.ndarray, n_tokens: int, src: Path) -> list[tuple[int, int]]:
    b = np.asarray(bounds)
    if not np.issubdtype(b.dtype, np.integer):
        raise BadInput(f"{src}: seq_bounds must be integers, got {b.dtype}.")
    if b.ndim == 2 and b.shape[1] == 2:
        pairs = [(int(s), int(e)) for s, e in b.tolist()]
    elif b.ndim == 1 and b.size:
        v = b.tolist()
        if v[0] != 0:
            v = [0, *v]
        if v[-1] != n_tokens:
            v = [*v, n_tokens]
        pairs = list(itertools.pairwise(v))
    else:
        raise BadInput(
            f"{src}: seq_bounds of shape {b.shape} is neither 1-D boundaries nor (n, 2) "
            "[start, end) pairs."
        )
    for s, e in pairs:
        if not 0 <= s < e <= n_tokens:
            raise BadInput(
                f"{src}: seq_bounds segment [{s}, {e}) is empty or outside the {n_tokens} tokens."
            )
    pairs.sort()
    for (s0, e0), (s1, _e1) in itertools.pairwise(pairs):
        if s1 < e0:
            raise BadInput(f"{src}: seq_bounds segments [{s0}, {e0}) and [{s1}, ...) overlap.")
    return pairs


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load(src: Path, options: ImportOptions) -> ImportResult:
    arrays = _load_npz(src)
    idx = arrays.get("idx")
    logits = arrays.get("logits")
    if idx is None and logits is None:
        raise BadInput(
            f"{src}: no 'idx' or 'logits' array (found: {', '.join(arrays) or 'nothing'}); "
            "a bigrig trace has idx [layers, tokens, k] or logits [layers, tokens, experts]."
        )
    notes: list[str] = []
    weights = None
    logits_tle = None
    if logits is not None:
        if logits.ndim != 3 or not np.issubdtype(logits.dtype, np.floating):
            raise BadInput(
                f"{src}: 'logits' must be a float array (layers, tokens, experts), got {logits.dtype} {logits.shape}."
            )
        if not np.isfinite(logits).all():
            raise BadInput(f"{src}: 'logits' has NaN or infinite values.")
        logits_tle = np.ascontiguousarray(np.transpose(logits.astype(np.float32), (1, 0, 2)))
    if idx is not None:
        if idx.ndim != 3 or not np.issubdtype(idx.dtype, np.integer):
            raise BadInput(
                f"{src}: 'idx' must be an integer array (layers, tokens, k), got {idx.dtype} {idx.shape}."
            )
        experts = np.transpose(idx, (1, 0, 2)).astype(np.int64)  # (tokens, layers, k)
        if options.top_k is not None and options.top_k != experts.shape[2]:
            if options.top_k > experts.shape[2]:
                raise BadInput(
                    f"{src}: --top-k {options.top_k} > the {experts.shape[2]} experts per token in 'idx'."
                )
            experts = experts[:, :, : options.top_k]
            notes.append(f"kept the first {options.top_k} of {idx.shape[2]} ranks per token")
        if logits_tle is not None:
            if logits_tle.shape[:2] != experts.shape[:2]:
                raise BadInput(f"{src}: 'idx' and 'logits' cover different layers x tokens.")
            chosen = np.take_along_axis(logits_tle, experts, axis=2)
            weights = _softmax_rows(chosen.astype(np.float64))
            notes.append("experts from 'idx', weights = softmax of their logits")
        else:
            notes.append("weights are null (the file records experts only)")
    else:
        assert logits_tle is not None
        k = options.top_k or DEFAULT_LOGIT_TOP_K
        if k > logits_tle.shape[2]:
            raise BadInput(
                f"{src}: top-k {k} > the {logits_tle.shape[2]} experts of 'logits'; pass --top-k."
            )
        order = np.argsort(-logits_tle, axis=2, kind="stable")[:, :, :k]
        experts = order.astype(np.int64)
        weights = _softmax_rows(np.take_along_axis(logits_tle, order, axis=2).astype(np.float64))
        if options.top_k is None:
            notes.append(
                f"top_k = {k}, as bigrig's reader takes from logits; pass --top-k for the model's"
            )
        notes.append(
            "experts = top-k by logit (ties: smaller id); weights = softmax of those logits"
        )
    n_tokens, n_layers, top_k = experts.shape
    if n_tokens == 0:
        raise BadInput(f"{src}: the trace has no tokens.")
    if experts.min() < 0:
        raise BadInput(f"{src}: negative expert id {int(experts.min())} in 'idx'.")
    max_id = int(experts.max())
    n_experts = options.n_experts or (logits_tle.shape[2] if logits_tle is not None else max_id + 1)
    if max_id >= n_experts:
        raise BadInput(f"{src}: expert {max_id} >= n_experts {n_experts}.")
    if options.n_layers is not None and options.n_layers != n_layers:
        raise BadInput(
            f"{src}: --n-layers {options.n_layers}, but the arrays have {n_layers} layers."
        )
    srt = np.sort(experts, axis=2)
    if (srt[:, :, 1:] == srt[:, :, :-1]).any():
        t, layer = map(int, np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2))[0])
        raise BadInput(
            f"{src}: token {t} layer {layer} lists the same expert twice: {experts[t, layer].tolist()}."
        )

    bounds = arrays.get("seq_bounds")
    segments = _segments(bounds, n_tokens, src) if bounds is not None else [(0, n_tokens)]
    keep = np.concatenate([np.arange(s, e) for s, e in segments])
    seq = np.concatenate([np.full(e - s, i, np.int32) for i, (s, e) in enumerate(segments)])
    token = np.concatenate([np.arange(e - s, dtype=np.int32) for s, e in segments])
    dropped = {}
    if len(keep) < n_tokens:
        dropped["tokens_outside_seq_bounds"] = n_tokens - len(keep)
    if options.n_experts is None and logits_tle is None:
        notes.append(
            f"n_experts inferred as {n_experts} (largest id + 1); pass --n-experts with the model's"
        )
    if options.model is None:
        notes.append("model recorded as 'unknown'; pass --model NAME to name it")
    meta_kwargs: dict[str, Any] = {
        "model": "unknown",
        "source": {
            "importer": NAME,
            "file": src.name,
            "sha256": sha256_of(src),
            "arrays": sorted(arrays),
            "sequences": len(segments),
            "phase_recorded": False,
        },
        "provenance": f"bigrig routing trace {src.name}",
    }
    meta = make_meta(meta_kwargs, options, n_layers=n_layers, n_experts=n_experts, top_k=top_k)
    trace = from_arrays(
        experts[keep].astype(np.int16),
        meta,
        weights=None if weights is None else weights[keep].astype(np.float32),
        seq=seq,
        token=token,
        phase=[options.phase or "decode"] * len(keep),
        name=src.name,
    )
    if logits_tle is not None and logits_tle.shape[2] == n_experts:
        trace.logits = logits_tle[keep]
    return ImportResult(trace, dropped, notes)
