"""libCacheSim's plain-text and CSV traces, in and out: one request (key) per line.

libCacheSim replays a stream of object ids, one request at a time (lookup
granularity). mer writes that stream as the trace's global keys
`layer * n_experts + expert` in replay order, rank order within a step
(`mer trace export`), and reads such a stream back:

- `txt` (libCacheSim's `txt` trace type): one integer id per line; blank lines
  and lines starting with `#` are skipped.
- `csv` (its `csv` type): a column holds the id. `--key-column` names it (a
  header name or libCacheSim's 1-based `obj-id-col`); without it, a header
  column called obj_id, obj-id, id or key, or the only column. The delimiter
  (`,`, tab, space or `;`) and a header row are detected. Other columns (time,
  size, op) are ignored: mer's order is the file's order.

How ids become a trace:
- With --n-experts (the layout mer exports), an id is the key
  `layer * n_experts + expert`, and the stream must walk the layers in order,
  top_k keys per layer (top_k from --top-k, else the run of layer-0 keys that
  starts the file); n_layers from --n-layers, else the largest layer + 1. A key
  of the wrong layer for its position is refused, naming the line. A trailing
  partial token is dropped and counted.
- Without it, the stream is flat, as libCacheSim sees it: one pseudo-layer,
  top_k 1 (every request its own step) or --top-k, ids kept as they are when
  they fit (below 32,768) and otherwise renumbered in order of first
  appearance (the count is in the metadata).
No gate weights; every token is `decode` unless --as-phase says otherwise.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import BadInput
from mer.traces.format import Trace, from_arrays
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    make_meta,
    read_lines,
    sha256_of,
)

TXT = "libcachesim-txt"
CSV = "libcachesim-csv"
TXT_SUMMARY = "libCacheSim plain-text trace: one object id (expert key) per line"
CSV_SUMMARY = "libCacheSim CSV trace: the object-id column (--key-column) is the expert key"
KEY_HEADERS = ("obj_id", "obj-id", "objid", "object_id", "id", "key")
INT16_LIMIT = 32768


def _int(text: str, src: Path, line: int) -> int:
    t = text.strip()
    try:
        v = int(t)
    except ValueError:
        raise BadInput(f"{src}:{line}: expected an integer object id, got {t!r}.") from None
    if v < 0:
        raise BadInput(f"{src}:{line}: negative object id {v}.")
    return v


def read_txt(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, 1-based line numbers) of a plain-text trace."""
    ids, lines = [], []
    for i, raw in enumerate(read_lines(src), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        ids.append(_int(s, src, i))
        lines.append(i)
    return np.asarray(ids, np.int64), np.asarray(lines, np.int64)


def read_csv(src: Path, key_column: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, line numbers, the column used) of a CSV trace."""
    text = "\n".join(read_lines(src))
    rows = [r for r in csv.reader(io.StringIO(text), _dialect(text)) if any(c.strip() for c in r)]
    if not rows:
        raise BadInput(f"{src}: no rows; nothing to import.")
    first = [c.strip() for c in rows[0]]
    has_header = not all(_is_int(c) for c in first if c)
    col = _key_column(first if has_header else None, len(first), key_column, src)
    ids, lines = [], []
    start = 1 if has_header else 0
    for i, row in enumerate(rows[start:], start=start + 1):
        if col >= len(row):
            raise BadInput(f"{src}:{i}: row has {len(row)} column(s), the key is column {col + 1}.")
        ids.append(_int(row[col], src, i))
        lines.append(i)
    name = first[col] if has_header else f"column {col + 1}"
    return np.asarray(ids, np.int64), np.asarray(lines, np.int64), name


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _dialect(text: str) -> Any:
    sample = "\n".join(text.splitlines()[:20])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t ;")
    except csv.Error:
        return csv.excel


def _key_column(header: list[str] | None, n_cols: int, wanted: str | None, src: Path) -> int:
    if wanted is not None:
        if wanted.isdigit():
            col = int(wanted) - 1
            if not 0 <= col < n_cols:
                raise BadInput(f"{src}: --key-column {wanted}: the file has {n_cols} column(s).")
            return col
        if header is None or wanted not in header:
            raise BadInput(
                f"{src}: --key-column {wanted!r} is not a header of this file "
                f"({', '.join(header) if header else 'it has no header'}); give a 1-based number."
            )
        return header.index(wanted)
    if header is not None:
        for name in KEY_HEADERS:
            if name in header:
                return header.index(name)
    if n_cols == 1:
        return 0
    raise BadInput(
        f"{src}: {n_cols} columns and none is called {'/'.join(KEY_HEADERS)}: say which holds "
        "the object id with --key-column (a header name, or libCacheSim's 1-based obj-id-col)."
    )


def keys_to_trace(
    ids: np.ndarray,
    lines: np.ndarray,
    src: Path,
    options: ImportOptions,
    fmt: str,
    extra_source: dict[str, Any],
) -> ImportResult:
    if ids.size == 0:
        raise BadInput(f"{src}: no object ids found; nothing to import.")
    notes: list[str] = []
    dropped: dict[str, int] = {}
    source: dict[str, Any] = {
        "importer": fmt,
        "file": src.name,
        "sha256": sha256_of(src),
        **extra_source,
    }
    if options.n_experts is None:
        if options.n_layers not in (None, 1):
            raise BadInput("--n-layers needs --n-experts: the key is layer * n_experts + expert.")
        top_k = options.top_k or 1
        if int(ids.max()) >= INT16_LIMIT:
            uniq, first = np.unique(ids, return_index=True)
            order = np.argsort(first, kind="stable")
            remap = np.empty(len(uniq), np.int64)
            remap[order] = np.arange(len(uniq))
            ids = remap[np.searchsorted(uniq, ids)]
            source["ids_renumbered"] = len(uniq)
            notes.append(
                f"renumbered {len(uniq)} distinct ids in order of first appearance (some were >= {INT16_LIMIT})"
            )
        n_layers, n_experts = 1, int(ids.max()) + 1
        notes.append(
            f"flat stream: 1 pseudo-layer x {n_experts} ids, top_k {top_k}; pass --n-experts "
            "(and --n-layers, --top-k) for keys laid out as layer * n_experts + expert"
        )
        layer_of = np.zeros_like(ids)
        expert_of = ids
    else:
        n_experts = options.n_experts
        layer_of, expert_of = np.divmod(ids, n_experts)
        n_layers = options.n_layers or int(layer_of.max()) + 1
        if int(layer_of.max()) >= n_layers:
            bad = int(np.argmax(layer_of >= n_layers))
            raise BadInput(
                f"{src}:{lines[bad]}: key {ids[bad]} is layer {layer_of[bad]}, beyond --n-layers {n_layers}."
            )
        if options.top_k is not None:
            top_k = options.top_k
        else:
            top_k = int(np.argmax(layer_of != 0)) if (layer_of != 0).any() else len(ids)
            if n_layers == 1:
                top_k = 1
            notes.append(
                f"top_k inferred as {top_k} (the run of layer-0 keys that starts the file); pass --top-k to say it"
            )
        if top_k < 1:
            raise BadInput(
                f"{src}:{lines[0]}: the stream does not start at layer 0 (key {ids[0]})."
            )
    per_token = n_layers * top_k
    n_tokens = len(ids) // per_token
    if len(ids) % per_token:
        dropped["trailing_partial_token_lookups"] = len(ids) % per_token
        notes.append(f"dropped the last {len(ids) % per_token} lookup(s): not a whole token")
    if n_tokens == 0:
        raise BadInput(
            f"{src}: {len(ids)} lookup(s), fewer than one token of {n_layers} layers x top-{top_k}."
        )
    use = n_tokens * per_token
    want_layer = np.tile(np.repeat(np.arange(n_layers), top_k), n_tokens)
    wrong = np.flatnonzero(layer_of[:use] != want_layer)
    if len(wrong):
        i = int(wrong[0])
        raise BadInput(
            f"{src}:{lines[i]}: key {ids[i]} is layer {layer_of[i]} (key // {n_experts}), but its "
            f"position is a lookup of layer {want_layer[i]} ({n_layers} layers x top-{top_k} per "
            "token, layer order); check --n-experts, --n-layers and --top-k."
        )
    experts = expert_of[:use].reshape(n_tokens, n_layers, top_k)
    srt = np.sort(experts, axis=2)
    dup = (
        (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
        if top_k > 1
        else np.zeros((n_tokens, n_layers), bool)
    )
    if dup.any():
        t, layer = map(int, np.argwhere(dup)[0])
        i = (t * n_layers + layer) * top_k
        raise BadInput(
            f"{src}:{lines[i]}: the same key twice in one step (token {t}, layer {layer}: "
            f"{ids[i : i + top_k].tolist()}); --top-k {top_k} may be wrong."
        )
    if options.model is None:
        notes.append("model recorded as 'unknown'; pass --model NAME to name it")
    meta = make_meta(
        {
            "model": "unknown",
            "source": source,
            "provenance": f"libCacheSim {fmt.split('-')[1]} trace {src.name}",
        },
        options,
        n_layers=n_layers,
        n_experts=n_experts,
        top_k=top_k,
    )
    trace = from_arrays(
        experts.astype(np.int16), meta, phase=[options.phase or "decode"] * n_tokens, name=src.name
    )
    return ImportResult(trace, dropped, notes)


def load_txt(src: Path, options: ImportOptions) -> ImportResult:
    ids, lines = read_txt(src)
    return keys_to_trace(ids, lines, src, options, TXT, {})


def load_csv(src: Path, options: ImportOptions) -> ImportResult:
    ids, lines, column = read_csv(src, options.key_column)
    return keys_to_trace(ids, lines, src, options, CSV, {"key_column": column})


# -- export ---------------------------------------------------------------------------

#: The `cachesim` options that read what `export` writes (counting objects, not bytes).
CACHESIM_CSV_PARAMS = "time-col=1,obj-id-col=2,obj-size-col=3,delimiter=,,has-header=true"


def export_keys(trace: Trace) -> np.ndarray:
    """The lookup stream libCacheSim replays: global keys in replay order, rank order."""
    return trace.keys().reshape(-1).astype(np.int64)


def write_txt(trace: Trace, out: Path, **_: Any) -> dict[str, Any]:
    keys = export_keys(trace)
    out.write_text("\n".join(map(str, keys.tolist())) + "\n")
    return {"lookups": int(keys.size)}


def write_csv(trace: Trace, out: Path, *, obj_size: int = 1, **_: Any) -> dict[str, Any]:
    """time = the step (token, layer) a lookup belongs to; obj_size = bytes per expert."""
    keys = export_keys(trace)
    steps = np.repeat(np.arange(keys.size // trace.top_k), trace.top_k)
    with out.open("w") as fh:
        fh.write("time,obj_id,obj_size\n")
        fh.writelines(
            f"{t},{k},{obj_size}\n" for t, k in zip(steps.tolist(), keys.tolist(), strict=True)
        )
    return {"lookups": int(keys.size)}


def cachesim_command(fmt: str, path: Path | str, slots: int = 64) -> str:
    """The libCacheSim command that replays an exported file with LRU at `slots` objects."""
    if fmt == TXT:
        return f"cachesim {path} txt lru {slots} --ignore-obj-size 1"
    return f'cachesim {path} csv lru {slots} --ignore-obj-size 1 -t "{CACHESIM_CSV_PARAMS}"'


EXPORTERS = {TXT: write_txt, CSV: write_csv}
