"""Trace format v1: every bad input gets its one clear message, good traces round-trip.

Bad files are written here with pyarrow directly (not with write_trace), so the
reader is tested against files it did not produce. Expected values are built
by hand or by plain loops, independently of traces.format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer.cli import main
from mer.traces import format as fmt
from mer.traces.format import Trace, TraceError, TraceMeta, from_arrays, read_meta, read_trace

N_LAYERS, N_EXPERTS, TOP_K, N_TOKENS = 3, 4, 2, 4


def good_rows() -> dict[str, list[Any]]:
    """A valid tidy table built with plain loops: 4 tokens x 3 layers x top-2."""
    cols: dict[str, list[Any]] = {c: [] for c in fmt.COLUMNS}
    for t in range(N_TOKENS):
        for layer in range(N_LAYERS):
            for r in range(TOP_K):
                cols["seq"].append(0)
                cols["token"].append(t)
                cols["phase"].append("prefill" if t == 0 else "decode")
                cols["layer"].append(layer)
                cols["rank"].append(r)
                cols["expert"].append((t + layer + 2 * r) % N_EXPERTS)
                cols["weight"].append(0.75 if r == 0 else 0.25)
                cols["lookahead"].append(None)
    return cols


def good_meta(**over: Any) -> dict[str, Any]:
    meta = {
        "schema_version": 1,
        "model": "test",
        "n_layers": N_LAYERS,
        "n_experts": N_EXPERTS,
        "top_k": TOP_K,
        "source": {"generator": "test"},
        "created": "2026-01-01T00:00:00+00:00",
    }
    meta.update(over)
    return meta


def write_raw(
    path: Path,
    cols: dict[str, list[Any]],
    meta: dict[str, Any] | None,
    types: dict[str, pa.DataType] | None = None,
) -> Path:
    """Write a parquet file with pyarrow, with the given column types and metadata."""
    types = {**fmt.COLUMNS, "phase": pa.string(), **(types or {})}
    arrays = {name: pa.array(values, type=types[name]) for name, values in cols.items()}
    table = pa.table(arrays)
    if meta is not None:
        table = table.replace_schema_metadata({b"mer.trace": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


def rows_where(cols: dict[str, list[Any]], **match: int) -> list[int]:
    return [i for i in range(len(cols["seq"])) if all(cols[k][i] == v for k, v in match.items())]


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    msg = str(exc.value)
    assert path.name in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_good_file_reads(tmp_path: Path) -> None:
    cols = good_rows()
    t = read_trace(write_raw(tmp_path / "good.parquet", cols, good_meta()))
    assert t.n_tokens == N_TOKENS
    assert t.experts.shape == (N_TOKENS, N_LAYERS, TOP_K)
    for i in range(len(cols["seq"])):
        tok, layer, r = cols["token"][i], cols["layer"][i], cols["rank"][i]
        assert t.experts[tok, layer, r] == cols["expert"][i]
        assert t.keys()[tok, layer, r] == layer * N_EXPERTS + cols["expert"][i]
    assert t.lookahead() is None
    w = t.weights()
    assert w is not None and np.allclose(w[..., 0], 0.75)
    assert t.phase_mask("prefill").tolist() == [True, False, False, False]
    assert t.select_phase("decode").n_tokens == 3
    assert t.head(2).experts.tolist() == t.experts[:2].tolist()


# -- one test per bad input -------------------------------------------------------------


def test_not_a_parquet_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.parquet"
    p.write_text("seq,token\n0,0\n")
    expect_error(p, "not a parquet file")


def test_no_such_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "absent.parquet", "no such file")


def test_missing_column(tmp_path: Path) -> None:
    cols = good_rows()
    del cols["rank"]
    p = write_raw(tmp_path / "norank.parquet", cols, good_meta())
    expect_error(p, "missing column(s) rank")


def test_mistyped_column(tmp_path: Path) -> None:
    cols = good_rows()
    cols["expert"] = [str(e) for e in cols["expert"]]
    p = write_raw(tmp_path / "strexpert.parquet", cols, good_meta(), {"expert": pa.string()})
    expect_error(p, "column 'expert'", "string")


def test_mistyped_weight(tmp_path: Path) -> None:
    cols = good_rows()
    cols["weight"] = ["x"] * len(cols["seq"])
    p = write_raw(tmp_path / "strweight.parquet", cols, good_meta(), {"weight": pa.string()})
    expect_error(p, "column 'weight'")


def test_expert_too_large(tmp_path: Path) -> None:
    cols = good_rows()
    (i,) = rows_where(cols, token=2, layer=1, rank=0)
    cols["expert"][i] = N_EXPERTS
    p = write_raw(tmp_path / "bigexpert.parquet", cols, good_meta())
    msg = expect_error(p, f"expert outside 0..{N_EXPERTS - 1}", "first offending rows")
    # The offending row is shown: token 2, layer 1, expert 4.
    shown = msg.split("first offending rows:")[1].splitlines()[2].split()
    assert shown[:5] == ["0", "2", "1", "0", str(N_EXPERTS)]


def test_negative_expert(tmp_path: Path) -> None:
    cols = good_rows()
    (i,) = rows_where(cols, token=3, layer=2, rank=1)
    cols["expert"][i] = -1
    p = write_raw(tmp_path / "negexpert.parquet", cols, good_meta())
    msg = expect_error(p, "expert outside")
    assert msg.split("first offending rows:")[1].splitlines()[2].split()[:5] == [
        "0",
        "3",
        "2",
        "1",
        "-1",
    ]


def test_expert_beyond_int16_is_not_wrapped(tmp_path: Path) -> None:
    cols = good_rows()
    cols["expert"][0] = 65536 + 1  # would wrap to 1, a valid id, if cast blindly
    p = write_raw(tmp_path / "hugeexpert.parquet", cols, good_meta(), {"expert": pa.int64()})
    expect_error(p, "column 'expert'", "outside the int16 range")


def test_layer_too_large(tmp_path: Path) -> None:
    cols = good_rows()
    (i,) = rows_where(cols, token=1, layer=2, rank=0)
    cols["layer"][i] = N_LAYERS
    p = write_raw(tmp_path / "biglayer.parquet", cols, good_meta())
    expect_error(p, f"layer outside 0..{N_LAYERS - 1}")


def test_duplicate_row(tmp_path: Path) -> None:
    cols = good_rows()
    (i,) = rows_where(cols, token=1, layer=0, rank=1)
    cols["rank"][i] = 0  # now two rows at (0, 1, 0, rank 0)
    p = write_raw(tmp_path / "dup.parquet", cols, good_meta())
    msg = expect_error(p, "duplicate (seq, token, layer, rank)")
    body = msg.split("first offending rows:")[1].splitlines()
    assert [ln.split()[:4] for ln in body[2:4]] == [["0", "1", "0", "0"]] * 2


def test_token_missing_a_layer(tmp_path: Path) -> None:
    cols = good_rows()
    drop = set(rows_where(cols, token=2, layer=1))
    cols = {k: [v for i, v in enumerate(vs) if i not in drop] for k, vs in cols.items()}
    p = write_raw(tmp_path / "nolayer.parquet", cols, good_meta())
    expect_error(p, "token (seq 0, token 2) is missing (layer, rank) [(1, 0), (1, 1)]")


def test_token_missing_a_rank(tmp_path: Path) -> None:
    cols = good_rows()
    drop = set(rows_where(cols, token=3, layer=2, rank=1))
    cols = {k: [v for i, v in enumerate(vs) if i not in drop] for k, vs in cols.items()}
    p = write_raw(tmp_path / "norank1.parquet", cols, good_meta())
    expect_error(p, "token (seq 0, token 3) is missing (layer, rank) [(2, 1)]")


def test_top_k_mismatch(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "topk.parquet", good_rows(), good_meta(top_k=1))
    expect_error(p, "top_k mismatch")


def test_weight_outside_unit_interval(tmp_path: Path) -> None:
    cols = good_rows()
    (a,) = rows_where(cols, token=0, layer=0, rank=0)
    (b,) = rows_where(cols, token=0, layer=0, rank=1)
    cols["weight"][a], cols["weight"][b] = 1.5, -0.5  # sums to 1, but not probabilities
    p = write_raw(tmp_path / "wrange.parquet", cols, good_meta())
    expect_error(p, "weight outside [0, 1]")


def test_weights_not_summing_to_one(tmp_path: Path) -> None:
    cols = good_rows()
    (a,) = rows_where(cols, token=2, layer=2, rank=0)
    cols["weight"][a] = 0.5  # 0.5 + 0.25
    p = write_raw(tmp_path / "wsum.parquet", cols, good_meta())
    msg = expect_error(p, "sum to 0.7500, not 1", "(1 such groups)")
    assert msg.split("first offending rows:")[1].splitlines()[2].split()[:3] == ["0", "2", "2"]


def test_weights_on_some_rows_only(tmp_path: Path) -> None:
    cols = good_rows()
    cols["weight"][5] = None
    p = write_raw(tmp_path / "wpart.parquet", cols, good_meta())
    expect_error(p, "weights present on some rows and null on others")


def test_prefill_after_decode(tmp_path: Path) -> None:
    cols = good_rows()
    for i in rows_where(cols, token=3):
        cols["phase"][i] = "prefill"
    p = write_raw(tmp_path / "order.parquet", cols, good_meta())
    msg = expect_error(p, "prefill token after a decode token in seq 0")
    assert msg.split("first offending rows:")[1].splitlines()[2].split()[:2] == ["0", "3"]


def test_bad_phase(tmp_path: Path) -> None:
    cols = good_rows()
    cols["phase"][0] = "generate"
    p = write_raw(tmp_path / "phase.parquet", cols, good_meta())
    expect_error(p, "column 'phase'")


def test_empty_trace(tmp_path: Path) -> None:
    cols: dict[str, list[Any]] = {c: [] for c in fmt.COLUMNS}
    p = write_raw(tmp_path / "empty.parquet", cols, good_meta())
    expect_error(p, "the trace is empty")


def test_metadata_missing(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "nometa.parquet", good_rows(), None)
    expect_error(p, "no 'mer.trace' metadata")
    with pytest.raises(TraceError, match=r"nometa\.parquet.*no .mer\.trace. metadata"):
        read_meta(p)


def test_metadata_lacks_a_field(tmp_path: Path) -> None:
    meta = good_meta()
    del meta["n_experts"]
    p = write_raw(tmp_path / "meta3.parquet", good_rows(), meta)
    expect_error(p, "metadata lacks n_experts")


def test_newer_schema_version(tmp_path: Path) -> None:
    p = write_raw(tmp_path / "future.parquet", good_rows(), good_meta(schema_version=2))
    expect_error(p, "schema_version 2 is newer", "upgrade mer")


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("cli_notparquet.parquet", None),
        ("cli_bigexpert.parquet", ("expert", N_EXPERTS)),
        ("cli_biglayer.parquet", ("layer", N_LAYERS)),
    ],
)
def test_cli_validate_exit_code_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    mutate: tuple[str, int] | None,
) -> None:
    p = tmp_path / name
    if mutate is None:
        p.write_bytes(b"PAR1 but not really")
    else:
        cols = good_rows()
        cols[mutate[0]][3] = mutate[1]
        write_raw(p, cols, good_meta())
    for action in ("validate", "info"):
        rc = main(["trace", action, str(p)])
        err = capsys.readouterr().err
        assert rc == 2
        assert name in err and err.startswith("mer: error:")
        assert "Traceback" not in err


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_raw(tmp_path / "ok.parquet", good_rows(), good_meta())
    assert main(["trace", "validate", str(p)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert main(["trace", "info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == N_TOKENS
    assert info["tokens_per_phase"] == {"prefill": 1, "decode": 3}
    assert info["lookups"] == N_TOKENS * N_LAYERS * TOP_K
    assert (info["has_weights"], info["has_lookahead"], info["has_logits"]) == (True, False, False)


# -- round trip -------------------------------------------------------------------------


@st.composite
def traces(draw: st.DrawFn) -> dict[str, Any]:
    n_layers = draw(st.integers(1, 4))
    top_k = draw(st.integers(1, 3))
    n_experts = draw(st.integers(top_k, 6))
    seq_lens = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    n_tok = sum(seq_lens)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    experts = np.array(
        [rng.permutation(n_experts)[:top_k] for _ in range(n_tok * n_layers)]
    ).reshape(n_tok, n_layers, top_k)
    seq, token, phase = [], [], []
    for s, length in enumerate(seq_lens):
        n_prefill = draw(st.integers(0, length))
        for t in range(length):
            seq.append(s)
            token.append(t)
            phase.append("prefill" if t < n_prefill else "decode")
    out: dict[str, Any] = {
        "meta": TraceMeta(model="rt", n_layers=n_layers, n_experts=n_experts, top_k=top_k),
        "experts": experts,
        "seq": np.array(seq),
        "token": np.array(token),
        "phase": phase,
        "weights": None,
        "lookahead": None,
        "logits": None,
    }
    if draw(st.booleans()):
        w = rng.random((n_tok, n_layers, top_k)) + 0.05
        out["weights"] = (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)
    if draw(st.booleans()):
        out["lookahead"] = rng.integers(0, n_experts, (n_tok, n_layers, top_k))
    if draw(st.booleans()):
        out["logits"] = rng.standard_normal((n_tok, n_layers, n_experts)).astype(np.float32)
    return out


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=traces())
def test_round_trip(tmp_path: Path, spec: dict[str, Any]) -> None:
    t = from_arrays(
        spec["experts"],
        spec["meta"],
        weights=spec["weights"],
        lookahead=spec["lookahead"],
        seq=spec["seq"],
        token=spec["token"],
        phase=spec["phase"],
    )
    t.logits = spec["logits"]
    path = tmp_path / "rt.parquet"
    fmt.write_trace(t, path)
    back = read_trace(path, with_logits=True)
    assert np.array_equal(back.experts, spec["experts"])
    if spec["weights"] is None:
        assert back.weights() is None
    else:
        w = back.weights()
        assert w is not None and np.array_equal(w, spec["weights"])
    if spec["lookahead"] is None:
        assert back.lookahead() is None
    else:
        la = back.lookahead()
        assert la is not None and np.array_equal(la, spec["lookahead"])
    if spec["logits"] is None:
        assert back.logits is None
    else:
        assert back.logits is not None
        assert np.array_equal(back.logits, spec["logits"])
    tt = back.token_table()
    assert tt["seq"].tolist() == spec["seq"].tolist()
    assert tt["token"].tolist() == spec["token"].tolist()
    assert tt["phase"].astype(str).tolist() == spec["phase"]
    assert back.meta.to_json() == spec["meta"].to_json()
    # Logits are stored once per (token, layer): on rank-0 rows only.
    table = pq.read_table(path)
    if spec["logits"] is not None:
        col = table.column("logits").to_pylist()
        ranks = table.column("rank").to_pylist()
        assert all((v is not None) == (r == 0) for v, r in zip(col, ranks, strict=True))


def test_partial_lookahead_is_not_offered() -> None:
    meta = TraceMeta(model="la", n_layers=2, n_experts=4, top_k=1)
    t = from_arrays(np.array([[[1], [2]]]), meta, lookahead=np.array([[[0], [3]]]))
    t.df.loc[t.df["layer"] == 0, "lookahead"] = None
    partial = Trace(t.df, meta)
    assert partial.lookahead() is None
    assert partial.df["lookahead"].notna().sum() == 1


# -- atomic write -----------------------------------------------------------------------


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = TraceMeta(model="a", n_layers=1, n_experts=2, top_k=1)
    t = from_arrays(np.zeros((3, 1, 1), np.int16), meta)
    dest = tmp_path / "out.parquet"

    def half_write(table: pa.Table, where: Any, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fmt.pq, "write_table", half_write)
    with pytest.raises(OSError, match="disk full"):
        fmt.write_trace(t, dest)
    assert list(tmp_path.iterdir()) == []

    # An existing file is left as it was.
    monkeypatch.undo()
    fmt.write_trace(t, dest)
    before = dest.read_bytes()
    monkeypatch.setattr(fmt.pq, "write_table", half_write)
    with pytest.raises(OSError):
        fmt.write_trace(t, dest)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


# -- logits -----------------------------------------------------------------------------


def _logits_trace(tmp_path: Path) -> tuple[Path, np.ndarray]:
    meta = TraceMeta(model="lg", n_layers=2, n_experts=3, top_k=2)
    experts = np.array([[[0, 1], [2, 0]], [[1, 2], [0, 2]], [[2, 1], [1, 0]]])
    t = from_arrays(experts, meta)
    logits = np.arange(3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3)
    t.logits = logits
    path = tmp_path / "lg.parquet"
    fmt.write_trace(t, path)
    return path, logits


def test_logits_follow_rows_written_out_of_order(tmp_path: Path) -> None:
    path, logits = _logits_trace(tmp_path)
    table = pq.read_table(path)
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    pq.write_table(shuffled, path)  # schema metadata (mer.trace) travels with the table
    back = read_trace(path, with_logits=True)
    assert back.logits is not None and np.array_equal(back.logits, logits)


def test_logits_of_wrong_length(tmp_path: Path) -> None:
    path, _ = _logits_trace(tmp_path)
    table = pq.read_table(path)
    col = table.column("logits").to_pylist()
    col[0] = [1.0, 2.0]  # 2 values where n_experts is 3
    i = table.schema.get_field_index("logits")
    table = table.set_column(i, table.schema.field(i), pa.array(col, pa.list_(pa.float32())))
    bad = tmp_path / "lg_short.parquet"
    pq.write_table(table, bad)
    with pytest.raises(TraceError, match=r"lg_short\.parquet: router logits have 2 values"):
        read_trace(bad, with_logits=True)


def test_logits_on_a_rank_1_row(tmp_path: Path) -> None:
    path, _ = _logits_trace(tmp_path)
    table = pq.read_table(path)
    col = table.column("logits").to_pylist()
    col[1] = [0.0, 0.0, 0.0]  # row 1 is rank 1
    i = table.schema.get_field_index("logits")
    table = table.set_column(i, table.schema.field(i), pa.array(col, pa.list_(pa.float32())))
    bad = tmp_path / "lg_rank1.parquet"
    pq.write_table(table, bad)
    with pytest.raises(
        TraceError, match=r"lg_rank1\.parquet: 'logits' must be set on every rank-0"
    ):
        read_trace(bad, with_logits=True)
