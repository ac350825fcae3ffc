"""Hypothesis fuzzing of the three readers users feed files to: the trace reader, the
importers and the hardware-profile loader.

The property is the CLI contract at the library level: every input either loads
(and then the loaded object is usable) or raises `BadInput`; nothing else
escapes, and nothing hangs. Examples are bounded so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from corpus_kit import PROFILE_DIR, small_trace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer.errors import BadInput
from mer.sim.hardware import HardwareProfile
from mer.traces.format import META_KEY, read_trace, write_trace
from mer.traces.importers import IMPORTERS, ImportOptions, import_trace

SETTINGS = settings(
    max_examples=int(os.environ.get("MER_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TMP = Path(tempfile.mkdtemp(prefix="mer-fuzz-"))

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# -- the trace reader -----------------------------------------------------------------
GOOD = small_trace(n_tokens=6, n_layers=2, n_experts=4)
GOOD_PATH = write_trace(GOOD, TMP / "good.parquet")
GOOD_TABLE = pq.read_table(GOOD_PATH)
GOOD_META = json.loads(pq.read_schema(GOOD_PATH).metadata[META_KEY])

ARROW_TYPES = [
    pa.int8(),
    pa.int16(),
    pa.int32(),
    pa.int64(),
    pa.float32(),
    pa.float64(),
    pa.string(),
]


@st.composite
def column_edit(draw: Any) -> tuple[str, Any]:
    name = draw(st.sampled_from([*GOOD_TABLE.column_names, "logits", "extra"]))
    typ = draw(st.sampled_from(ARROW_TYPES))
    n = GOOD_TABLE.num_rows
    if typ == pa.string():
        values = draw(st.lists(st.one_of(st.none(), st.text(max_size=6)), min_size=n, max_size=n))
    elif pa.types.is_floating(typ):
        values = draw(st.lists(st.one_of(st.none(), st.floats(width=32)), min_size=n, max_size=n))
    else:
        info = np.iinfo(typ.to_pandas_dtype())
        values = draw(
            st.lists(
                st.one_of(st.none(), st.integers(int(info.min), int(info.max))),
                min_size=n,
                max_size=n,
            )
        )
    return name, pa.array(values, type=typ)


@st.composite
def meta_edit(draw: Any) -> Any:
    if draw(st.booleans()):
        return draw(JSON)  # anything at all
    m = copy.deepcopy(GOOD_META)
    for key in draw(st.lists(st.sampled_from([*sorted(m), "new"]), max_size=3)):
        m[key] = draw(JSON)
    return m


@SETTINGS
@given(
    edits=st.lists(column_edit(), max_size=3),
    meta=meta_edit(),
    drop=st.lists(st.sampled_from(GOOD_TABLE.column_names), max_size=2),
    rows=st.integers(0, GOOD_TABLE.num_rows),
)
def test_trace_reader_loads_or_refuses(
    edits: list[Any], meta: Any, drop: list[str], rows: int
) -> None:
    table = GOOD_TABLE.slice(0, rows)
    for name, arr in edits:
        arr = arr.slice(0, rows)
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
    table = table.drop_columns([c for c in set(drop) if c in table.column_names])
    try:
        raw = json.dumps(meta, allow_nan=True).encode()
    except (ValueError, TypeError):
        raw = b"{}"
    path = TMP / "fuzz.parquet"
    pq.write_table(table.replace_schema_metadata({META_KEY: raw}), path)
    for with_logits in (False, True):
        try:
            trace = read_trace(path, with_logits=with_logits)
        except BadInput:
            continue
        # loaded: the replay views a command uses must work
        assert trace.keys().shape == (trace.n_tokens, trace.n_layers, trace.top_k)
        assert trace.keys().max() < trace.n_layers * trace.n_experts


@SETTINGS
@given(data=st.binary(max_size=2048), keep=st.integers(0, 4000))
def test_trace_reader_on_corrupted_bytes(data: bytes, keep: int) -> None:
    raw = GOOD_PATH.read_bytes()
    path = TMP / "bytes.parquet"
    path.write_bytes(raw[:keep] + data + raw[keep + len(data) :])
    with contextlib.suppress(BadInput):
        read_trace(path)


# -- importers ------------------------------------------------------------------------
FIELD_VALUES = st.one_of(
    JSON_SCALARS,
    st.lists(st.integers(-5, 70_000), max_size=4),
    st.lists(st.floats(allow_nan=True), max_size=4),
)


@st.composite
def jsonl_text(draw: Any, fields: list[str]) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        rec = {f: draw(FIELD_VALUES) for f in draw(st.lists(st.sampled_from(fields), max_size=7))}
        if draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.text(max_size=20)))
        else:
            lines.append(json.dumps(rec, allow_nan=True))
    return "\n".join(lines)


SEED_FIELDS = ["token", "layer", "experts", "weights", "seq", "phase"]
SPEC_FIELDS = [
    "dataset",
    "problem_id",
    "layer",
    "experts",
    "gating_probs",
    "token_idx",
    "token_pos",
]
CELL = st.one_of(
    st.integers(-3, 70_000).map(str), st.sampled_from(["", "nan", "inf", "1e30", "decode", "x"])
)


@st.composite
def csv_text(draw: Any) -> str:
    cols = draw(
        st.lists(
            st.sampled_from(
                ["seq", "token", "layer", "rank", "expert", "phase", "weight", "lookahead"]
            ),
            min_size=1,
            max_size=8,
            unique=True,
        )
    )
    rows = draw(st.lists(st.lists(CELL, min_size=len(cols), max_size=len(cols)), max_size=6))
    return ",".join(cols) + "\n" + "".join(",".join(r) + "\n" for r in rows)


@st.composite
def mixtral_text(draw: Any) -> str:
    n = draw(st.integers(0, 70))
    line = st.lists(
        st.one_of(st.integers(-2, 12).map(str), st.just("x")), min_size=1, max_size=9
    ).map(",".join)
    return "\n".join(draw(st.lists(line, min_size=n, max_size=n)))


TEXTS = {
    "seed-jsonl": jsonl_text(SEED_FIELDS),
    "speculative-moe": jsonl_text(SPEC_FIELDS),
    "csv": csv_text(),
    "mixtral-offloading": mixtral_text(),
}


@SETTINGS
@given(
    fmt=st.sampled_from(sorted(TEXTS)),
    data=st.data(),
    n_layers=st.one_of(st.none(), st.integers(1, 40)),
    n_experts=st.one_of(st.none(), st.integers(1, 300)),
)
def test_importers_load_or_refuse(
    fmt: str, data: Any, n_layers: int | None, n_experts: int | None
) -> None:
    assert fmt in IMPORTERS
    text = data.draw(TEXTS[fmt])
    src = TMP / f"fuzz-{fmt}.txt"
    src.write_text(text)
    try:
        res = import_trace(fmt, src, ImportOptions(n_layers=n_layers, n_experts=n_experts))
    except BadInput:
        return
    t = res.trace
    assert t.n_tokens >= 1 and t.keys().max() < t.n_layers * t.n_experts
    write_trace(t, TMP / "imported.parquet")
    assert read_trace(TMP / "imported.parquet").n_tokens == t.n_tokens


# -- hardware profiles ------------------------------------------------------------------
BASE = json.loads((PROFILE_DIR / "ci-tiny.json").read_text())
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)


@st.composite
def profile_dict(draw: Any) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(JSON)
    d = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["ssd", "compute", "memory", "top"]))
        if section == "top":
            d[draw(st.sampled_from(["schema_version", "name", "extra", "description"]))] = draw(
                JSON
            )
        elif draw(st.integers(0, 6)) == 0 or not isinstance(d.get(section), dict):
            d[section] = draw(JSON)
        else:
            key = draw(st.sampled_from([*sorted(d[section]), "workers", "dense_s_per_layer"]))
            d[section][key] = draw(NUMBERS)
    return d


@SETTINGS
@given(d=profile_dict())
def test_profile_loader_loads_or_refuses(d: Any) -> None:
    path = TMP / "profile.json"
    path.write_text(json.dumps(d, allow_nan=True))
    from mer.sim.hardware import load_profile

    try:
        prof = load_profile(path)
    except BadInput:
        return
    assert isinstance(prof, HardwareProfile)
    # a profile that loads gives finite, positive timings
    for nbytes in (4096, 1 << 20):
        t = prof.ssd.read_time(nbytes)
        assert math.isfinite(t) and t > 0
    assert math.isfinite(prof.compute.ffn_time(1 << 20))
