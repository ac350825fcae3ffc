"""Importers: small hand-written inputs with hand-derived expectations, the real
published files when ../shared is present (expectations recomputed here from the
raw files with plain loops), and the bundled trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mer.cli import main
from mer.errors import BadInput
from mer.traces.bundled import bundled_trace_path, load_bundled
from mer.traces.format import read_trace
from mer.traces.importers import IMPORTERS, ImportOptions, import_trace

EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "external"
H39S = EXTERNAL / "mixtral-offloading-h39s" / "active_experts.txt"
SPEC = EXTERNAL / "speculative-moe-mario928"
needs_h39s = pytest.mark.skipif(not H39S.exists(), reason=f"{H39S} not present")
needs_spec = pytest.mark.skipif(not SPEC.exists(), reason=f"{SPEC} not present")

SMALL = ImportOptions(n_layers=3, n_experts=4, top_k=2)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    return write(path, [json.dumps(r) for r in records])


def test_registry_has_every_format() -> None:
    assert set(IMPORTERS) == {
        "mixtral-offloading",
        "speculative-moe",
        "seed-jsonl",
        "csv",
        "nunspark",
        "bigrig",
        "libcachesim-txt",
        "libcachesim-csv",
    }


# -- mixtral-offloading ---------------------------------------------------------------------


MIXTRAL_SMALL = [
    "0,1,2,3",  # 1-3: first prompt (union of experts): dropped
    "0,1,2",
    "1,3",
    "0,2",  # 4-6: seq 0 token 0
    "1,3",
    "2,3",
    "3,0",  # 7-9: seq 0 token 1 (order kept as given)
    "1,2",
    "0,1",
    "0,1,2",  # 10-12: second prompt: dropped, starts seq 1
    "2,3",
    "0,3",
    "1,2",  # 13-15: seq 1 token 0
    "0,3",
    "2,3",
    "0,1",  # 16: a trailing partial token
]


def test_mixtral_offloading_small(tmp_path: Path) -> None:
    src = write(tmp_path / "active_experts.txt", MIXTRAL_SMALL)
    res = import_trace("mixtral-offloading", src, SMALL)
    t = res.trace
    assert t.experts.tolist() == [
        [[0, 2], [1, 3], [2, 3]],
        [[3, 0], [1, 2], [0, 1]],
        [[1, 2], [0, 3], [2, 3]],
    ]
    tt = t.token_table()
    assert tt["seq"].tolist() == [0, 0, 1]
    assert tt["token"].tolist() == [0, 1, 0]
    assert set(tt["phase"].astype(str)) == {"decode"}
    assert t.weights() is None
    assert res.dropped == {"prefill_blocks": 2, "prefill_lines": 6, "trailing_lines": 1}
    assert t.meta.source["prefill_lines_dropped"] == 6
    assert t.meta.provenance is not None and "active_experts.txt" in t.meta.provenance


@pytest.mark.parametrize(
    ("line_no", "text", "fragment"),
    [
        (5, "1,x", "expected comma-separated expert ids"),
        (4, "2", "1 expert(s) in a decode line, expected top_k 2"),
        (8, "1,9", "expert id outside 0..3"),
        (6, "2,2", "the same expert listed twice"),
        (7, "", "blank line"),
    ],
)
def test_mixtral_offloading_malformed(
    tmp_path: Path, line_no: int, text: str, fragment: str
) -> None:
    lines = list(MIXTRAL_SMALL)
    lines[line_no - 1] = text
    src = write(tmp_path / "bad_experts.txt", lines)
    with pytest.raises(BadInput) as exc:
        import_trace("mixtral-offloading", src, SMALL)
    assert f"bad_experts.txt:{line_no}:" in str(exc.value)
    assert fragment in str(exc.value)


def test_mixtral_offloading_prefill_only(tmp_path: Path) -> None:
    src = write(tmp_path / "only_prompt.txt", MIXTRAL_SMALL[:3])
    with pytest.raises(BadInput, match="no decode tokens"):
        import_trace("mixtral-offloading", src, SMALL)


def _h39s_expected() -> np.ndarray:
    lines = H39S.read_text().split()
    decode = lines[32:]
    assert len(decode) % 32 == 0
    return np.array([[int(x) for x in ln.split(",")] for ln in decode]).reshape(-1, 32, 2)


@needs_h39s
def test_mixtral_offloading_real_file() -> None:
    res = import_trace("mixtral-offloading", H39S)
    expected = _h39s_expected()
    assert expected.shape == (773, 32, 2)
    assert np.array_equal(res.trace.experts, expected)
    assert res.dropped == {"prefill_blocks": 1, "prefill_lines": 32}
    assert res.trace.meta.licence is not None and res.trace.meta.licence.startswith("MIT")
    assert res.trace.meta.source["commit"] == "be84cfb"


@needs_h39s
def test_bundled_equals_fresh_import(tmp_path: Path) -> None:
    out = tmp_path / "fresh.parquet"
    rc = main(["trace", "import", "mixtral-offloading", str(H39S), "-o", str(out)])
    assert rc == 0
    fresh, bundled = read_trace(out), load_bundled()
    assert fresh.df.equals(bundled.df)
    a, b = fresh.meta, bundled.meta
    a.created = b.created = ""
    assert a.to_json() == b.to_json()


def test_bundled_trace_ships_with_notice() -> None:
    t = load_bundled()
    assert (t.n_tokens, t.n_layers, t.n_experts, t.top_k) == (773, 32, 8, 2)
    data = bundled_trace_path().parent
    assert "MIT License" in (data / "LICENSE-mixtral-offloading").read_text()
    readme = (data / "README.md").read_text()
    assert "be84cfb" in readme and "h39s/mlsys" in readme
    assert t.meta.licence is not None and "MIT" in t.meta.licence


# -- speculative-moe ----------------------------------------------------------------------


def _rec(ds: str, pid: int, layer: int, tok: int, experts: list[int], probs: list[float]) -> dict:
    return {
        "dataset": ds,
        "problem_id": pid,
        "layer": layer,
        "experts": experts,
        "gating_probs": probs,
        "token_idx": tok,
    }


def test_speculative_moe_small(tmp_path: Path) -> None:
    recs = [
        _rec("humaneval", 0, 0, 0, [1, 2], [0.7, 0.3]),
        _rec("humaneval", 0, 0, 1, [3, 0], [0.5, 0.5]),  # token 1 lacks layer 1
        _rec("humaneval", 0, 0, 2, [2, 3], [0.6, 0.2]),  # renormalised to 0.75 / 0.25
        _rec("humaneval", 0, 1, 0, [0, 3], [0.9, 0.1]),
        _rec("humaneval", 0, 1, 2, [1, 0], [0.55, 0.45]),
        _rec("gsm8k", 3, 1, 0, [2, 1], [0.8, 0.2]),
        _rec("gsm8k", 3, 0, 0, [0, 1], [0.6, 0.4]),
    ]
    src = jsonl(tmp_path / "routing.jsonl", recs)
    res = import_trace("speculative-moe", src, ImportOptions(n_layers=2, n_experts=4, top_k=2))
    t = res.trace
    tt = t.token_table()
    assert list(zip(tt["seq"], tt["token"], strict=True)) == [(0, 0), (0, 2), (1, 0)]
    assert t.experts.tolist() == [[[1, 2], [0, 3]], [[2, 3], [1, 0]], [[0, 1], [2, 1]]]
    w = t.weights()
    assert w is not None
    assert np.allclose(w[1, 0], [0.75, 0.25])
    assert np.allclose(w[0, 1], [0.9, 0.1])
    assert res.dropped == {"incomplete_decode_tokens": 1}
    assert t.meta.source["weights_renormalised"] == 1
    assert t.meta.source["sequences"] == [
        {"seq": 0, "dataset": "humaneval", "problem_id": 0},
        {"seq": 1, "dataset": "gsm8k", "problem_id": 3},
    ]
    assert t.meta.licence is None


def test_speculative_moe_token_pos_layout(tmp_path: Path) -> None:
    def r(layer: int, pos: int, e: list[int]) -> dict:
        return {
            "dataset": "humaneval",
            "problem_id": 0,
            "layer": layer,
            "token_pos": pos,
            "experts": e,
            "gating_probs": [0.5, 0.5],
        }

    recs = [r(0, 0, [0, 1]), r(0, 1, [1, 2]), r(0, 2, [2, 3])]  # prefill, layer 0
    recs += [r(1, 0, [3, 0]), r(1, 2, [0, 2])]  # prefill, layer 1: position 1 missing
    recs += [r(0, 0, [1, 3]), r(1, 0, [2, 0]), r(0, 0, [3, 1]), r(1, 0, [0, 1])]  # decode
    src = jsonl(tmp_path / "raw.jsonl", recs)
    res = import_trace("speculative-moe", src, ImportOptions(n_layers=2, n_experts=4, top_k=2))
    tt = res.trace.token_table()
    assert tt["token"].tolist() == [0, 2]
    assert set(tt["phase"].astype(str)) == {"prefill"}
    assert res.trace.experts.tolist() == [[[0, 1], [3, 0]], [[2, 3], [0, 2]]]
    assert res.dropped == {"incomplete_prefill_tokens": 1, "decode_records_without_position": 4}


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ('{"dataset": "x", "problem_id": 0,', "not valid JSON"),
        (
            '{"dataset": "x", "problem_id": 0, "layer": 1, "experts": [1, "a"], '
            '"gating_probs": [0.5, 0.5], "token_idx": 0}',
            "list of integers",
        ),
        (
            '{"dataset": "x", "problem_id": 0, "layer": 1, "experts": [1, 2], '
            '"gating_probs": [1.0], "token_idx": 0}',
            "has 1 values for 2 experts",
        ),
        (
            '{"dataset": "x", "problem_id": 0, "layer": 1.5, "experts": [1, 2], '
            '"gating_probs": [0.5, 0.5], "token_idx": 0}',
            "'layer' must be an integer",
        ),
        (
            '{"dataset": "x", "problem_id": 0, "layer": 0, "experts": [1, 2], '
            '"gating_probs": [0.5, 0.5], "token_idx": 0}',
            "duplicate routing",
        ),
        (
            '{"dataset": "x", "problem_id": 0, "layer": 1, "experts": [1, 2], '
            '"gating_probs": [0.5, 0.5], "token_pos": 0}',
            "earlier records use 'token_idx'",
        ),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_speculative_moe_malformed(tmp_path: Path, bad: str, fragment: str) -> None:
    good = json.dumps(_rec("x", 0, 0, 0, [1, 2], [0.5, 0.5]))
    src = write(tmp_path / "broken.jsonl", [good, "", bad])
    with pytest.raises(BadInput) as exc:
        import_trace("speculative-moe", src)
    assert "broken.jsonl:3:" in str(exc.value)
    assert fragment in str(exc.value)


def _complete_tokens(path: Path, key: str) -> dict[tuple[str, int, int], dict[int, dict]]:
    by_token: dict[tuple[str, int, int], dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_token.setdefault((rec["dataset"], rec["problem_id"], rec[key]), {})[rec["layer"]] = rec
    return {k: v for k, v in by_token.items() if len(v) == 32}


@needs_spec
@pytest.mark.parametrize("name", ["humaneval_2_routing.jsonl", "gsm8k_2_routing.jsonl"])
def test_speculative_moe_real_files(name: str) -> None:
    src = SPEC / name
    complete = _complete_tokens(src, "token_idx")
    n_all = len(
        {
            (r["dataset"], r["problem_id"], r["token_idx"])
            for r in map(json.loads, src.read_text().splitlines())
        }
    )
    res = import_trace("speculative-moe", src)
    t = res.trace
    assert t.n_tokens == len(complete)
    assert res.dropped == {"incomplete_decode_tokens": n_all - len(complete)}
    problems = [(s["dataset"], s["problem_id"]) for s in t.meta.source["sequences"]]
    tt = t.token_table()
    w = t.weights()
    assert w is not None
    for i in (0, t.n_tokens // 2, t.n_tokens - 1):
        ds, pid = problems[int(tt["seq"][i])]
        layers = complete[(ds, pid, int(tt["token"][i]))]
        assert t.experts[i].tolist() == [layers[ly]["experts"] for ly in range(32)]
        assert np.allclose(w[i], [layers[ly]["gating_probs"] for ly in range(32)], atol=1e-6)


@needs_spec
def test_speculative_moe_real_raw_prefill() -> None:
    src = SPEC / "routing_raw.jsonl"
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    last = max(i for i, r in enumerate(recs) if r["token_pos"] > 0)
    layers: dict[int, set[int]] = {}
    for r in recs[: last + 1]:
        layers.setdefault(r["token_pos"], set()).add(r["layer"])
    complete = sorted(p for p, ls in layers.items() if len(ls) == 32)
    res = import_trace("speculative-moe", src)
    tt = res.trace.token_table()
    assert tt["token"].tolist() == complete
    assert set(tt["phase"].astype(str)) == {"prefill"}
    assert res.dropped == {
        "incomplete_prefill_tokens": len(layers) - len(complete),
        "decode_records_without_position": len(recs) - last - 1,
    }


# -- seed-jsonl ---------------------------------------------------------------------------


def test_seed_jsonl_infers_shape(tmp_path: Path) -> None:
    recs = [
        {"token": t, "layer": 0, "experts": [(7 * t) % 256, (7 * t + 100) % 256]} for t in range(5)
    ]
    recs.append({"token": 5, "layer": 0, "experts": [255, 3]})
    src = jsonl(tmp_path / "seed.jsonl", recs)
    res = import_trace("seed-jsonl", src, ImportOptions(experts_per_layer=8, model="seed-flat-256"))
    t = res.trace
    assert (t.n_layers, t.n_experts, t.top_k) == (1, 256, 2)
    assert t.experts[:, 0, :].tolist() == [r["experts"] for r in recs]
    assert t.meta.extra == {"experts_per_layer": 8}
    assert t.meta.model == "seed-flat-256"


def test_seed_jsonl_weights_layers_and_override(tmp_path: Path) -> None:
    recs = [
        {"token": 0, "layer": 0, "experts": [1, 0], "weights": [0.8, 0.2]},
        {"token": 0, "layer": 1, "experts": [2, 1], "weights": [3.0, 1.0]},
        {"token": 1, "layer": 1, "experts": [0, 2], "weights": [0.5, 0.5]},  # no layer 0
    ]
    src = jsonl(tmp_path / "w.jsonl", recs)
    res = import_trace("seed-jsonl", src, ImportOptions(n_experts=8))
    t = res.trace
    assert (t.n_tokens, t.n_layers, t.n_experts) == (1, 2, 8)
    w = t.weights()
    assert w is not None and np.allclose(w[0], [[0.8, 0.2], [0.75, 0.25]])
    assert res.dropped == {"incomplete_decode_tokens": 1}


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"token": 1, "layer": 0, "experts": [1, 2, 3]}, "3 experts for seq 0 token 1"),
        ({"token": 0, "layer": 0, "experts": [3, 4]}, "first given at line 1"),
        ({"token": 1, "layer": 0}, "no 'experts' field"),
        ({"token": -1, "layer": 0, "experts": [3, 4]}, "'token' must be >= 0"),
        ({"token": 1, "layer": 0, "experts": [3, 4], "phase": "gen"}, "'phase' must be"),
    ],
)
def test_seed_jsonl_malformed(tmp_path: Path, bad: dict, fragment: str) -> None:
    src = jsonl(tmp_path / "bad_seed.jsonl", [{"token": 0, "layer": 0, "experts": [1, 2]}, bad])
    with pytest.raises(BadInput) as exc:
        import_trace("seed-jsonl", src)
    assert "bad_seed.jsonl:2:" in str(exc.value)
    assert fragment in str(exc.value)


# -- csv ----------------------------------------------------------------------------------


CSV_ROWS = [
    "seq,token,phase,layer,rank,expert,weight",
    "0,0,prefill,0,0,2,0.6",
    "0,0,prefill,0,1,0,0.4",
    "0,0,prefill,1,0,1,0.9",
    "0,0,prefill,1,1,3,0.1",
    "0,1,decode,1,1,2,0.3",  # rows need not be in order
    "0,1,decode,1,0,0,0.7",
    "0,1,decode,0,0,3,0.5",
    "0,1,decode,0,1,1,0.5",
]


def test_csv_small(tmp_path: Path) -> None:
    src = write(tmp_path / "tidy.csv", CSV_ROWS)
    t = import_trace("csv", src, ImportOptions(model="mixtral-8x7b")).trace
    assert (t.n_layers, t.n_experts, t.top_k) == (2, 4, 2)
    assert t.experts.tolist() == [[[2, 0], [1, 3]], [[3, 1], [0, 2]]]
    w = t.weights()
    assert w is not None and np.allclose(w[1], [[0.5, 0.5], [0.7, 0.3]])
    assert t.token_table()["phase"].astype(str).tolist() == ["prefill", "decode"]
    assert t.lookahead() is None


def test_csv_missing_column(tmp_path: Path) -> None:
    rows = [",".join(c for c in CSV_ROWS[0].split(",") if c != "rank")]
    src = write(tmp_path / "norank.csv", [*rows, "0,0,prefill,0,2,0.6"])
    with pytest.raises(BadInput) as exc:
        import_trace("csv", src)
    assert "norank.csv" in str(exc.value) and "missing required column(s) rank" in str(exc.value)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("0,1,decode,0,1,x,0.5", "column 'expert' must be an integer, got 'x'"),
        ("0,1,decode,0,1.5,1,0.5", "column 'rank' must be an integer"),
        ("0,1,decode,0,1,-1,0.5", "column 'expert' must be >= 0"),
        ("0,1,decode,0,1,1,abc", "column 'weight' must be a number"),
        ("0,1,answer,0,1,1,0.5", "column 'phase' must be prefill or decode"),
    ],
)
def test_csv_malformed(tmp_path: Path, row: str, fragment: str) -> None:
    rows = list(CSV_ROWS)
    rows[8] = row  # file line 9
    src = write(tmp_path / "bad.csv", rows)
    with pytest.raises(BadInput) as exc:
        import_trace("csv", src)
    assert "bad.csv:9:" in str(exc.value)
    assert fragment in str(exc.value)


def test_csv_incomplete_token_is_a_format_error(tmp_path: Path) -> None:
    src = write(tmp_path / "short.csv", CSV_ROWS[:-1])
    with pytest.raises(BadInput) as exc:
        import_trace("csv", src)
    assert "short.csv" in str(exc.value) and "is missing (layer, rank) [(0, 1)]" in str(exc.value)


# -- CLI ----------------------------------------------------------------------------------


def test_cli_import_json_and_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "tidy.csv", CSV_ROWS)
    out = tmp_path / "t.parquet"
    rc = main(["trace", "import", "csv", str(src), "-o", str(out), "--json", "--model", "m"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 2 and summary["model"] == "m"
    assert summary["tokens_per_phase"] == {"prefill": 1, "decode": 1}
    assert read_trace(out).experts.tolist() == [[[2, 0], [1, 3]], [[3, 1], [0, 2]]]


def test_cli_import_reports_drops_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write(tmp_path / "active_experts.txt", MIXTRAL_SMALL)
    out = tmp_path / "m.parquet"
    argv = ["trace", "import", "mixtral-offloading", str(src), "-o", str(out), "--json"]
    rc = main([*argv, "--n-layers", "3", "--n-experts", "4"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "dropped 6 prefill line(s)" in cap.err
    assert json.loads(cap.out)["dropped"] == {
        "prefill_blocks": 2,
        "prefill_lines": 6,
        "trailing_lines": 1,
    }


def test_cli_import_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "bad.jsonl", ["{not json"])
    rc = main(["trace", "import", "seed-jsonl", str(src), "-o", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:1: not valid JSON" in err
    assert not (tmp_path / "o.parquet").exists()
    rc = main(["trace", "import", "csv", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")])
    assert rc == 2 and "nope.csv: no such file" in capsys.readouterr().err
