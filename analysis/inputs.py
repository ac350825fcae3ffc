"""What kind of mer file a path is, so `mer plot` can refuse the wrong one in one message.

mer writes five kinds of result a figure can be drawn from; each is told apart
by what mer itself puts in it (parquet metadata keys and columns, or a JSON
object's `kind`), never by the file name:

    trace     a trace (parquet with `mer.trace` metadata)       mer trace import / record / synth
    mrc       miss-ratio curves (policy, scope, cache_slots, hit_rate, no tokens/s)   mer mrc -o
    sweep     sweep results (config_hash, tokens_per_s, ...)     mer sweep -o
    tokens    a run's per-token table (`mer.summary` metadata)   mer run / simulate -o
    summary   a run summary (JSON with kind simulated|measured)  mer run / simulate --summary

`require(path, accepted, command)` returns the kind or raises one BadInput that
names the file, what it is, what the command takes, and which command fits it.
"""

from __future__ import annotations

import json
from pathlib import Path

from mer.errors import BadInput

KINDS = ("trace", "mrc", "sweep", "tokens", "summary")
DESCRIBE = {
    "trace": "a trace (`mer trace import`, `mer record`, `mer trace synth`)",
    "mrc": "a miss-ratio-curve table (`mer mrc -o`)",
    "sweep": "a sweep results table (`mer sweep -o`)",
    "tokens": "a run's per-token table (`mer run -o` / `mer simulate -o`)",
    "summary": "a run summary (`mer run --summary` / `mer simulate --summary`)",
}
#: The `mer plot` kind that draws each input kind (for the "did you mean" hint).
PLOT_FOR = {
    "trace": "mer plot mrc | popularity | repetition | layer-hits",
    "mrc": "mer plot mrc",
    "sweep": "mer plot sweep | io-share",
    "tokens": "mer plot predicted-vs-measured --pair SIM RUN",
    "summary": "mer plot predicted-vs-measured --pair SIM RUN",
}
_MRC_COLUMNS = {"policy", "scope", "cache_slots", "hit_rate"}
#: Columns each table kind must have to be drawn.
REQUIRED = {
    "mrc": _MRC_COLUMNS,
    "sweep": {"policy", "predictor", "cache_slots", "tokens_per_s"},
}


def detect_kind(path: Path) -> str | None:
    """The kind of mer file at `path`, or None when it is none of them."""
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if isinstance(obj, dict) and obj.get("kind") in ("simulated", "measured"):
            return "summary"
        return None
    try:
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
    except Exception:
        return None
    meta = schema.metadata or {}
    if b"mer.trace" in meta:
        return "trace"
    if b"mer.summary" in meta:
        return "tokens"
    if b"mer.mrc" in meta:
        return "mrc"
    cols = set(schema.names)
    if "tokens_per_s" in cols and {"policy", "cache_slots"} <= cols:
        return "sweep"
    if cols >= _MRC_COLUMNS:
        return "mrc"
    return None


def require(path: Path, accepted: tuple[str, ...], command: str) -> str:
    """The kind of `path` if `command` accepts it; else one BadInput saying what to give."""
    from mer.guard import check_input

    check_input(path, "input")  # exists, a regular file (never a FIFO that would block)
    kind = detect_kind(path)
    takes = " or ".join(DESCRIBE[k] for k in accepted)
    if kind in accepted:
        need = REQUIRED.get(kind, set())
        if need:
            import pyarrow.parquet as pq

            missing = sorted(need - set(pq.read_schema(path).names))
            if missing:
                raise BadInput(
                    f"{path}: {DESCRIBE[kind]} missing columns {missing}; write it again with a current mer."
                )
        return kind
    if kind is None:
        raise BadInput(f"{path}: not a file mer wrote; `{command}` takes {takes}.")
    raise BadInput(
        f"{path} is {DESCRIBE[kind]}; `{command}` takes {takes}. To draw this file use `{PLOT_FOR[kind]}`."
    )


def mrc_meta(path: Path) -> dict[str, object]:
    """What `mer mrc` recorded about its curves (granularity, backend, phase); {} if nothing."""
    try:
        import pyarrow.parquet as pq

        raw = (pq.read_schema(path).metadata or {}).get(b"mer.mrc")
        obj = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def granularity_note(meta: dict[str, object]) -> str:
    """', lookup by lookup' for curves replayed with libCacheSim's semantics, else ''."""
    return ", lookup by lookup" if meta.get("granularity") == "lookup" else ""
