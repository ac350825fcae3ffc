"""Shared plumbing for importers: options, results, line-aware parsing, token assembly.

Every importer reads a foreign file, reports malformed input as one `BadInput`
naming the file and line, collects (seq, token, layer) routing records, and
hands them to `TokenAssembler`, which drops incomplete tokens (counting them)
and builds a validated `Trace`. Keeping that in one place means every format
treats duplicates, ranges and incomplete tokens the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.traces.format import PHASES, Trace, TraceMeta, from_arrays


@dataclass
class ImportOptions:
    """Command-line overrides; None means 'use the format's default or infer it'."""

    model: str | None = None
    n_layers: int | None = None
    n_experts: int | None = None
    top_k: int | None = None
    experts_per_layer: int | None = None
    provenance: str | None = None
    licence: str | None = None


@dataclass
class ImportResult:
    """The imported trace plus an honest account of what was left out and why."""

    trace: Trace
    # reason -> number of tokens (or source lines, as the key says) left out
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        t = self.trace
        phases = t.token_table()["phase"].astype(str).value_counts().to_dict()
        return {
            "model": t.meta.model,
            "tokens": t.n_tokens,
            "tokens_per_phase": {p: int(phases.get(p, 0)) for p in PHASES},
            "sequences": int(t.df["seq"].nunique()),
            "lookups": t.n_lookups,
            "n_layers": t.n_layers,
            "n_experts": t.n_experts,
            "top_k": t.top_k,
            "has_weights": t.weights() is not None,
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }


def check_source(src: Path) -> Path:
    """A readable regular file, or a BadInput saying what is wrong with it."""
    if not src.exists():
        raise BadInput(f"{src}: no such file.")
    if src.is_dir():
        raise BadInput(f"{src}: is a directory; give the file to import.")
    return src


def sha256_of(src: Path) -> str:
    h = hashlib.sha256()
    with src.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_lines(src: Path) -> list[str]:
    """All lines without their newline; a binary or non-UTF-8 file is BadInput."""
    check_source(src)
    try:
        return src.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"{src}: not a UTF-8 text file (byte {exc.start}); is this the right file?"
        ) from exc


def iter_jsonl(src: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSON Lines file."""
    for i, line in enumerate(read_lines(src), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(
                f"{src}:{i}: not valid JSON ({exc.msg} at column {exc.colno})."
            ) from None
        except RecursionError:
            raise BadInput(f"{src}:{i}: JSON nested too deeply to be a routing record.") from None
        if not isinstance(rec, dict):
            raise BadInput(f"{src}:{i}: expected a JSON object, got {type(rec).__name__}.")
        yield i, rec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: What trace format v1's columns hold: seq and token int32, layer and expert int16.
MAX_INT32 = (1 << 31) - 1
MAX_INT16 = (1 << 15) - 1


def field_int(
    rec: dict[str, Any],
    key: str,
    src: Path,
    line: int,
    *,
    minimum: int = 0,
    maximum: int | None = None,
) -> int:
    """An integer field in [minimum, maximum] (default: int32 for positions, int16 for
    `layer`), as the trace columns hold them."""
    if key not in rec:
        raise BadInput(f"{src}:{line}: record has no {key!r} field (fields: {', '.join(rec)}).")
    v = rec[key]
    if not _is_int(v):
        raise BadInput(f"{src}:{line}: {key!r} must be an integer, got {v!r}.")
    if v < minimum:
        raise BadInput(f"{src}:{line}: {key!r} must be >= {minimum}, got {v}.")
    hi = maximum if maximum is not None else (MAX_INT16 if key == "layer" else MAX_INT32)
    if v > hi:
        raise BadInput(
            f"{src}:{line}: {key!r} is {v}, more than trace format v1 holds ({hi}); "
            "is the field what the format says?"
        )
    return int(v)


def field_int_list(rec: dict[str, Any], key: str, src: Path, line: int) -> list[int]:
    if key not in rec:
        raise BadInput(f"{src}:{line}: record has no {key!r} field (fields: {', '.join(rec)}).")
    v = rec[key]
    if not isinstance(v, list) or not v or not all(_is_int(x) for x in v):
        raise BadInput(f"{src}:{line}: {key!r} must be a non-empty list of integers, got {v!r}.")
    if any(x < 0 for x in v):
        raise BadInput(f"{src}:{line}: {key!r} has a negative expert id: {v}.")
    if any(x > MAX_INT16 for x in v):
        raise BadInput(
            f"{src}:{line}: {key!r} has an expert id above {MAX_INT16} (trace format v1 "
            f"holds int16 ids): {v!r:.80}."
        )
    if len(v) > 127:
        raise BadInput(f"{src}:{line}: {key!r} lists {len(v)} experts; top-k is at most 127.")
    if len(set(v)) != len(v):
        raise BadInput(f"{src}:{line}: {key!r} lists the same expert twice: {v}.")
    return [int(x) for x in v]


def field_float_list(rec: dict[str, Any], key: str, src: Path, line: int, n: int) -> list[float]:
    v = rec[key]
    ok = isinstance(v, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
    )
    if not ok:
        raise BadInput(f"{src}:{line}: {key!r} must be a list of finite numbers, got {v!r}.")
    if len(v) != n:
        raise BadInput(f"{src}:{line}: {key!r} has {len(v)} values for {n} experts.")
    if any(x < 0 for x in v):
        raise BadInput(f"{src}:{line}: {key!r} has a negative gate weight: {v}.")
    return [float(x) for x in v]


def make_meta(
    meta_kwargs: dict[str, Any],
    options: ImportOptions,
    *,
    n_layers: int,
    n_experts: int,
    top_k: int,
) -> TraceMeta:
    """TraceMeta from an importer's defaults with the command-line overrides applied."""
    kw = dict(meta_kwargs)
    for key in ("model", "provenance", "licence"):
        value = getattr(options, key)
        if value is not None:
            kw[key] = value
    kw.setdefault("model", "unknown")
    extra = dict(kw.pop("extra", {}))
    if options.experts_per_layer is not None:
        extra["experts_per_layer"] = options.experts_per_layer
    return TraceMeta(**kw, n_layers=n_layers, n_experts=n_experts, top_k=top_k, extra=extra)


@dataclass
class _Token:
    phase: str
    # layer -> (experts in rank order, weights or None, source line)
    layers: dict[int, tuple[list[int], list[float] | None, int]] = field(default_factory=dict)


class TokenAssembler:
    """Collects per-(seq, token, layer) routing and builds a Trace from complete tokens.

    Tokens that miss a layer cannot be replayed (every token visits every layer),
    so they are dropped and counted per phase, never silently filled in.
    """

    def __init__(self, src: Path) -> None:
        self.src = src
        self.tokens: dict[tuple[int, int], _Token] = {}
        self.renormalised = 0

    def add(
        self,
        seq: int,
        token: int,
        phase: str,
        layer: int,
        experts: list[int],
        weights: list[float] | None,
        line: int,
    ) -> None:
        tok = self.tokens.get((seq, token))
        if tok is None:
            tok = self.tokens[(seq, token)] = _Token(phase)
        elif tok.phase != phase:
            raise BadInput(
                f"{self.src}:{line}: seq {seq} token {token} is {phase} here but {tok.phase} "
                "on an earlier line."
            )
        if layer in tok.layers:
            first = tok.layers[layer][2]
            raise BadInput(
                f"{self.src}:{line}: duplicate routing for seq {seq} token {token} layer {layer} "
                f"(first given at line {first})."
            )
        tok.layers[layer] = (experts, weights, line)

    def build(
        self,
        meta_kwargs: dict[str, Any],
        options: ImportOptions,
        *,
        name: str,
    ) -> tuple[Trace, dict[str, int]]:
        """Infer or check the shape, drop incomplete tokens, and construct the Trace.

        `meta_kwargs` gives model/source/provenance/licence and optionally
        n_layers/n_experts/top_k defaults; `options` overrides them.
        """
        if not self.tokens:
            raise BadInput(f"{self.src}: no routing records found; nothing to import.")
        records = [
            (k, layer, v) for k, tok in self.tokens.items() for layer, v in tok.layers.items()
        ]
        n_layers = options.n_layers or meta_kwargs.pop("n_layers", None)
        n_experts = options.n_experts or meta_kwargs.pop("n_experts", None)
        top_k = options.top_k or meta_kwargs.pop("top_k", None)
        meta_kwargs.pop("n_layers", None)
        meta_kwargs.pop("n_experts", None)
        meta_kwargs.pop("top_k", None)
        if n_layers is None:
            n_layers = 1 + max(layer for _, layer, _ in records)
        if n_experts is None:
            n_experts = 1 + max(max(v[0]) for _, _, v in records)
        if top_k is None:
            top_k = len(records[0][2][0])
        for (seq, token), layer, (experts, _w, line) in records:
            if layer >= n_layers:
                raise BadInput(
                    f"{self.src}:{line}: layer {layer} >= n_layers {n_layers}; "
                    "pass --n-layers to override."
                )
            if len(experts) != top_k:
                raise BadInput(
                    f"{self.src}:{line}: {len(experts)} experts for seq {seq} token {token} "
                    f"layer {layer}, expected top_k {top_k}."
                )
            bad = [e for e in experts if e >= n_experts]
            if bad:
                raise BadInput(
                    f"{self.src}:{line}: expert {bad[0]} >= n_experts {n_experts}; "
                    "pass --n-experts to override."
                )
        has_w = {v[1] is not None for _, _, v in records}
        if len(has_w) > 1:
            line = next(v[2] for _, _, v in records if v[1] is None)
            raise BadInput(
                f"{self.src}:{line}: gate weights missing here but given on other lines."
            )
        with_weights = has_w == {True}

        keep = sorted(k for k, tok in self.tokens.items() if len(tok.layers) == n_layers)
        dropped: dict[str, int] = {}
        for tok in self.tokens.values():
            if len(tok.layers) != n_layers:
                key = f"incomplete_{tok.phase}_tokens"
                dropped[key] = dropped.get(key, 0) + 1
        if not keep:
            raise BadInput(
                f"{self.src}: no token has routing for all {n_layers} layers; nothing to import "
                "(pass --n-layers if the model has fewer layers)."
            )
        t = len(keep)
        experts_arr = np.empty((t, n_layers, top_k), np.int16)
        weights_arr = np.empty((t, n_layers, top_k), np.float64) if with_weights else None
        for i, k in enumerate(keep):
            for layer, (experts, w, _line) in self.tokens[k].layers.items():
                experts_arr[i, layer] = experts
                if weights_arr is not None and w is not None:
                    total = math.fsum(w)
                    if total <= 0:
                        raise BadInput(f"{self.src}:{_line}: gate weights sum to {total}.")
                    if abs(total - 1.0) > 1e-6:
                        self.renormalised += 1
                    weights_arr[i, layer] = [x / total for x in w]
        meta = make_meta(meta_kwargs, options, n_layers=n_layers, n_experts=n_experts, top_k=top_k)
        trace = from_arrays(
            experts_arr,
            meta,
            weights=None if weights_arr is None else weights_arr.astype(np.float32),
            seq=np.array([k[0] for k in keep], np.int32),
            token=np.array([k[1] for k in keep], np.int32),
            phase=[self.tokens[k].phase for k in keep],
            name=name,
        )
        return trace, dropped
