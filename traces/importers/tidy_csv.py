"""Importer for tidy CSV: one row per routed expert, with a header naming the columns.

Required columns: seq, token, layer, rank, expert (integers; rank 0 = highest
gate weight). Optional: phase ("prefill"/"decode", default decode), weight
(float, blank = null), lookahead (integer, blank = null). Other columns are
ignored. The shape is inferred (n_layers = max layer + 1, n_experts = max
expert + 1, top_k = max rank + 1) unless given. Unlike the other importers,
nothing is dropped: the rows must already form complete tokens, and any
format-v1 violation is reported with the offending rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mer.errors import BadInput
from mer.traces.format import PHASES, Trace
from mer.traces.importers.common import (
    ImportOptions,
    ImportResult,
    check_source,
    make_meta,
    sha256_of,
)

NAME = "csv"
SUMMARY = "tidy rows: seq,token,layer,rank,expert (+ phase, weight, lookahead)"
REQUIRED = ("seq", "token", "layer", "rank", "expert")
OPTIONAL = ("phase", "weight", "lookahead")


def _ints(df: pd.DataFrame, name: str, src: Path, *, nullable: bool = False) -> pd.Series:
    raw = df[name].str.strip()
    blank = raw == ""
    num = pd.to_numeric(raw.where(~blank, None), errors="coerce")
    bad = (num.isna() & ~blank) | (blank & (not nullable))
    values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    frac = np.isfinite(values) & (values != np.round(values))
    # inf, and values no integer column of format v1 holds (beyond int32), are not ids
    wild = ~np.isnan(values) & (~np.isfinite(values) | (np.abs(values) > 2**31))
    bad_arr = bad.to_numpy(dtype=bool) | frac | wild
    if bad_arr.any():
        i = int(np.flatnonzero(bad_arr)[0])
        raise BadInput(
            f"{src}:{i + 2}: column {name!r} must be an integer, got {df[name].iloc[i]!r}."
        )
    if nullable:
        return pd.Series(pd.array(values, dtype="Float64").astype("Int64"))
    out = values.astype(np.int64)
    neg = np.flatnonzero(out < 0)
    if len(neg):
        i = int(neg[0])
        raise BadInput(f"{src}:{i + 2}: column {name!r} must be >= 0, got {out[i]}.")
    return pd.Series(out)


def load(src: Path, options: ImportOptions) -> ImportResult:
    check_source(src)
    try:
        df = pd.read_csv(src, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"{src}: not a readable CSV file ({exc}).") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise BadInput(
            f"{src}: missing required column(s) {', '.join(missing)}; the header has "
            f"{', '.join(df.columns) or 'nothing'}. Needed: {', '.join(REQUIRED)} "
            f"(optional: {', '.join(OPTIONAL)})."
        )
    if len(df) == 0:
        raise BadInput(f"{src}: no data rows; nothing to import.")
    frame: dict[str, Any] = {name: _ints(df, name, src) for name in REQUIRED}
    if "phase" in df.columns:
        phase = df["phase"].str.strip().replace("", "decode")
        bad = ~phase.isin(PHASES).to_numpy(dtype=bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BadInput(
                f"{src}:{i + 2}: column 'phase' must be prefill or decode, got {phase.iloc[i]!r}."
            )
        frame["phase"] = phase.to_numpy(dtype=object)
    else:
        frame["phase"] = np.array(["decode"] * len(df), dtype=object)
    if "weight" in df.columns:
        raw = df["weight"].str.strip()
        blank = raw == ""
        num = pd.to_numeric(raw.where(~blank, None), errors="coerce")
        bad = (num.isna() & ~blank).to_numpy(dtype=bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BadInput(f"{src}:{i + 2}: column 'weight' must be a number, got {raw.iloc[i]!r}.")
        frame["weight"] = pd.array(num.to_numpy(dtype=np.float64, na_value=np.nan), dtype="Float64")
    else:
        frame["weight"] = pd.array([None] * len(df), dtype="Float64")
    if "lookahead" in df.columns:
        frame["lookahead"] = _ints(df, "lookahead", src, nullable=True)
    else:
        frame["lookahead"] = pd.array([None] * len(df), dtype="Int64")
    tidy = pd.DataFrame(frame)
    meta_kwargs: dict[str, Any] = {
        "model": "unknown",
        "source": {"importer": NAME, "file": src.name, "sha256": sha256_of(src), "rows": len(df)},
        "provenance": f"tidy CSV file {src.name}",
    }
    meta = make_meta(
        meta_kwargs,
        options,
        n_layers=options.n_layers or int(tidy["layer"].max()) + 1,
        n_experts=options.n_experts or int(tidy["expert"].max()) + 1,
        top_k=options.top_k or int(tidy["rank"].max()) + 1,
    )
    trace = Trace(tidy, meta, name=src.name)
    notes = [] if options.model else ["model recorded as 'unknown'; pass --model NAME to name it"]
    return ImportResult(trace, {}, notes)
