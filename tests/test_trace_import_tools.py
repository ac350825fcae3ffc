"""Other tools' traces: nunspark's --expert-trace JSONL, bigrig's npz, libCacheSim's
txt and csv (in and out). Fixtures are written here following each tool's writer
(nunspark's `_trace_moe`, bigrig's `load_trace` reader, libCacheSim's readers);
expectations are worked out by hand from the fixtures, and libCacheSim itself
reads mer's exports when it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mer.cli import main
from mer.errors import BadInput
from mer.summary import trace_digest
from mer.traces.bundled import bundled_trace_path, load_bundled
from mer.traces.format import read_trace
from mer.traces.importers import ImportOptions, import_trace

# -- nunspark ----------------------------------------------------------------------------

MOE_LAYERS = [1, 3, 5]  # a model whose MoE layers are every other layer


def _nunspark_file(
    path: Path, passes: list[tuple[int, list[list[int]] | dict[int, list[int]]]]
) -> Path:
    """Records as nunspark's engine writes them: one per MoE layer call, t counting up."""
    t = 0
    lines = []
    for batch, fired in passes:
        items = fired.items() if isinstance(fired, dict) else zip(MOE_LAYERS, fired, strict=True)
        for layer, experts in items:
            t += 1
            lines.append(
                json.dumps(
                    {"t": t, "layer": layer, "fired": sorted(experts), "batch_tokens": batch}
                )
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nunspark_decode_passes_become_tokens(tmp_path: Path) -> None:
    src = _nunspark_file(
        tmp_path / "trace.jsonl",
        [
            (7, [[0, 1, 2, 5], [1, 2, 3, 4], [0, 6, 7, 2]]),  # prefill of 7 positions: a union
            (1, [[5, 2], [3, 1], [7, 0]]),
            (1, [[2, 4], [1, 6], [0, 3]]),
            (1, {1: [6, 7], 5: [1, 2]}),  # layer 3 not traced: incomplete
            (1, [[0, 1], [4, 5], [6, 7]]),
            (3, [[0, 1, 2], [4, 5, 6], [1, 2, 3]]),  # a speculative verify: a union, new seq
            (1, [[3, 4], [2, 5], [1, 6]]),
        ],
    )
    res = import_trace("nunspark", src, ImportOptions(n_experts=8, model="toy"))
    tr = res.trace
    assert (tr.n_layers, tr.n_experts, tr.top_k) == (3, 8, 2)
    assert tr.experts.tolist() == [
        [[2, 5], [1, 3], [0, 7]],
        [[2, 4], [1, 6], [0, 3]],
        [[0, 1], [4, 5], [6, 7]],
        [[3, 4], [2, 5], [1, 6]],
    ]
    tt = tr.token_table()
    assert tt["seq"].tolist() == [0, 0, 0, 1]
    assert tt["token"].tolist() == [0, 1, 3, 0]  # the incomplete pass was token 2
    assert set(tt["phase"].astype(str)) == {"decode"}
    assert res.dropped == {"multi_token_passes": 2, "incomplete_tokens": 1}
    assert tr.weights() is None
    assert tr.meta.source["moe_layer_ids"] == MOE_LAYERS


def test_nunspark_errors(tmp_path: Path) -> None:
    src = _nunspark_file(tmp_path / "multi.jsonl", [(4, [[0, 1, 2], [1, 2, 3], [0, 2, 3]])])
    with pytest.raises(BadInput, match="more than one position"):
        import_trace("nunspark", src, ImportOptions())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "layer": 0, "fired": [1, 2]}\n')
    with pytest.raises(BadInput, match="batch_tokens"):
        import_trace("nunspark", bad, ImportOptions())
    src = _nunspark_file(tmp_path / "k.jsonl", [(1, [[0, 1], [2, 3, 4], [5, 6]])])
    with pytest.raises(BadInput, match="fired 3 experts, expected top_k 2"):
        import_trace("nunspark", src, ImportOptions())


# -- bigrig --------------------------------------------------------------------------------


def _idx(n_layers: int = 2, n_tokens: int = 6, k: int = 2, n_experts: int = 8) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.stack(
        [
            [rng.choice(n_experts, k, replace=False) for _ in range(n_tokens)]
            for _ in range(n_layers)
        ]
    )  # (layers, tokens, k), rank order


@pytest.mark.parametrize(
    ("bounds", "seqs", "tokens"),
    [
        (None, [0] * 6, list(range(6))),
        (np.array([0, 2]), [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 2, 3]),  # starts
        (np.array([2, 6]), [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 2, 3]),  # ends
        (np.array([0, 2, 6]), [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 2, 3]),  # both
        (np.array([[0, 2], [3, 6]]), [0, 0, 1, 1, 1], [0, 1, 0, 1, 2]),  # pairs; token 2 dropped
    ],
)
def test_bigrig_idx_and_sequence_bounds(tmp_path: Path, bounds, seqs, tokens) -> None:
    idx = _idx()
    arrays = {"idx": idx} if bounds is None else {"idx": idx, "seq_bounds": bounds}
    np.savez_compressed(tmp_path / "t_full.npz", **arrays)
    res = import_trace("bigrig", tmp_path / "t_full.npz", ImportOptions(n_experts=8))
    tr = res.trace
    kept = [t for t in range(6) if not (bounds is not None and bounds.ndim == 2 and t == 2)]
    for i, t in enumerate(kept):
        for layer in range(2):
            assert tr.experts[i, layer].tolist() == idx[layer, t].tolist()  # rank order kept
    tt = tr.token_table()
    assert tt["seq"].tolist() == seqs and tt["token"].tolist() == tokens
    assert res.dropped == ({"tokens_outside_seq_bounds": 1} if len(kept) < 6 else {})


def test_bigrig_logits_give_top_k_and_softmax_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 8)).astype(np.float32)  # (layers, tokens, experts)
    np.savez(tmp_path / "l.npz", logits=logits)
    tr = import_trace("bigrig", tmp_path / "l.npz", ImportOptions(top_k=2)).trace
    assert (tr.n_layers, tr.n_experts, tr.top_k, tr.n_tokens) == (2, 8, 2, 5)
    w = tr.weights()
    for t in range(5):
        for layer in range(2):
            row = logits[layer, t].astype(np.float64)
            best = sorted(range(8), key=lambda e: -row[e])[:2]
            assert tr.experts[t, layer].tolist() == best
            p = np.exp(row[best] - row[best].max())
            assert w[t, layer] == pytest.approx(p / p.sum(), abs=1e-6)
    assert tr.logits is not None and np.allclose(tr.logits[3, 1], logits[1, 3])
    out = tmp_path / "l.parquet"
    assert (
        main(["trace", "import", "bigrig", str(tmp_path / "l.npz"), "-o", str(out), "--top-k", "2"])
        == 0
    )
    assert read_trace(out, with_logits=True).logits is not None


def test_bigrig_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", other=np.zeros(3))
    with pytest.raises(BadInput, match="no 'idx' or 'logits'"):
        import_trace("bigrig", tmp_path / "x.npz", ImportOptions())
    np.savez(tmp_path / "o.npz", idx=_idx(), seq_bounds=np.array([[0, 4], [3, 6]]))
    with pytest.raises(BadInput, match="overlap"):
        import_trace("bigrig", tmp_path / "o.npz", ImportOptions())
    (tmp_path / "n.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInput, match=r"not a numpy \.npz"):
        import_trace("bigrig", tmp_path / "n.npz", ImportOptions())
    dup = _idx()
    dup[1, 2] = [4, 4]
    np.savez(tmp_path / "d.npz", idx=dup)
    with pytest.raises(BadInput, match="token 2 layer 1 lists the same expert twice"):
        import_trace("bigrig", tmp_path / "d.npz", ImportOptions())


# -- libCacheSim -----------------------------------------------------------------------------


def test_libcachesim_txt_by_hand(tmp_path: Path) -> None:
    # 2 layers x 4 experts, top-2: keys layer*4+expert, layer order, one token per 4 lines
    src = tmp_path / "k.txt"
    src.write_text("# a comment\n1\n3\n4\n6\n\n2\n0\n7\n5\n1\n")  # the last key: a partial token
    res = import_trace("libcachesim-txt", src, ImportOptions(n_layers=2, n_experts=4, top_k=2))
    assert res.trace.experts.tolist() == [[[1, 3], [0, 2]], [[2, 0], [3, 1]]]
    assert res.dropped == {"trailing_partial_token_lookups": 1}
    flat = import_trace("libcachesim-txt", src, ImportOptions()).trace
    assert (flat.n_layers, flat.top_k, flat.n_experts, flat.n_tokens) == (1, 1, 8, 9)
    bad = tmp_path / "b.txt"
    bad.write_text("1\n6\n3\n4\n")  # key 6 is layer 1 in a layer-0 position
    with pytest.raises(BadInput, match=r"b.txt:2: key 6 is layer 1"):
        import_trace("libcachesim-txt", bad, ImportOptions(n_experts=4, top_k=2))


def test_libcachesim_big_ids_are_renumbered(tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    src.write_text("900000\n12\n900000\n70000\n12\n")
    tr = import_trace("libcachesim-txt", src, ImportOptions()).trace
    assert tr.experts.reshape(-1).tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize(
    ("text", "key_column"),
    [
        ("time,obj_id,obj_size\n0,1,10\n0,3,10\n1,4,10\n1,6,10\n", None),
        ("0 1 10\n0 3 10\n1 4 10\n1 6 10\n", "2"),
        ("ts;key\n5;1\n5;3\n6;4\n6;6\n", None),
        ("1\n3\n4\n6\n", None),
    ],
)
def test_libcachesim_csv_columns(tmp_path: Path, text: str, key_column: str | None) -> None:
    src = tmp_path / "k.csv"
    src.write_text(text)
    opts = ImportOptions(n_layers=2, n_experts=4, top_k=2, key_column=key_column)
    assert import_trace("libcachesim-csv", src, opts).trace.experts.tolist() == [[[1, 3], [0, 2]]]


def test_libcachesim_csv_needs_a_key_column(tmp_path: Path) -> None:
    src = tmp_path / "k.csv"
    src.write_text("0,1,10\n0,3,10\n")
    with pytest.raises(BadInput, match="--key-column"):
        import_trace("libcachesim-csv", src, ImportOptions(n_experts=4))


@pytest.mark.parametrize("fmt", ["libcachesim-txt", "libcachesim-csv"])
def test_export_then_import_is_the_same_routing(tmp_path: Path, fmt: str, capsys) -> None:
    out = tmp_path / "keys.out"
    assert main(["trace", "export", fmt, str(bundled_trace_path()), "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lookups"] == 49472 and info["cachesim"].startswith("cachesim ")
    back = tmp_path / "back.parquet"
    args = [
        "trace",
        "import",
        fmt,
        str(out),
        "-o",
        str(back),
        "--n-layers",
        "32",
        "--n-experts",
        "8",
        "--top-k",
        "2",
    ]
    assert main(args) == 0
    assert trace_digest(back) == trace_digest(bundled_trace_path())
    lines = out.read_text().splitlines()
    keys = load_bundled().keys().reshape(-1)
    first = lines[1].split(",") if fmt.endswith("csv") else [lines[0]]
    assert int(first[-2] if fmt.endswith("csv") else first[0]) == keys[0]


def test_libcachesim_reads_the_export_and_its_lru_is_the_lookup_lru(tmp_path: Path) -> None:
    lcs = pytest.importorskip("libcachesim", reason="libCacheSim (GPL) is an optional peer")
    import mer

    txt, csvf = tmp_path / "k.txt", tmp_path / "k.csv"
    assert (
        main(["trace", "export", "libcachesim-txt", str(bundled_trace_path()), "-o", str(txt)]) == 0
    )
    assert (
        main(["trace", "export", "libcachesim-csv", str(bundled_trace_path()), "-o", str(csvf)])
        == 0
    )
    keys = load_bundled().keys().reshape(-1).tolist()
    reader = lcs.TraceReader(str(txt), lcs.TraceType.PLAIN_TXT_TRACE)
    assert [req.obj_id for req in reader] == keys
    p = lcs.ReaderInitParam(ignore_obj_size=True, has_header=True, delimiter=",")
    p.time_field, p.obj_id_field, p.obj_size_field = 1, 2, 3
    reader = lcs.TraceReader(str(csvf), lcs.TraceType.CSV_TRACE, p)
    assert [req.obj_id for req in reader] == keys
    lru = lcs.LRU(cache_size=64)
    miss_ratio, _ = lru.process_trace(
        lcs.TraceReader(
            str(txt), lcs.TraceType.PLAIN_TXT_TRACE, lcs.ReaderInitParam(ignore_obj_size=True)
        )
    )
    stats = mer.trace_stats(load_bundled())["reuse_distance"]["lru_hit_rate"]["64"]
    assert 1 - miss_ratio == pytest.approx(stats, abs=1e-6)


# -- speculative-moe's routing_raw.jsonl: why its decode records cannot be placed -----------

_ROOT = Path(__file__).resolve().parents[1]
SPEC_DIRS = [
    d / "shared" / "data" / "external" / "speculative-moe-mario928" for d in _ROOT.parents[:2]
]
SPEC = next((d for d in SPEC_DIRS if d.exists()), SPEC_DIRS[0])


@pytest.mark.skipif(not (SPEC / "routing_raw.jsonl").exists(), reason=f"{SPEC} not present")
def test_routing_raw_decode_figures_the_docs_quote() -> None:
    """2,579 decode records, 83 steps (83 x 32 = 2,656 records needed), all of them in
    humaneval_2_routing.jsonl problem 0, 364 of them in a later step's run."""
    res = import_trace("speculative-moe", SPEC / "routing_raw.jsonl", ImportOptions())
    assert res.dropped["decode_records_without_position"] == 2579
    assert "83 decode steps would need 2656 records" in res.notes[0]
    raw = [json.loads(x) for x in (SPEC / "routing_raw.jsonl").read_text().splitlines() if x]
    last_prefill = max(i for i, r in enumerate(raw) if r["token_pos"] > 0)
    ref: dict[tuple[int, tuple], int] = {}
    for r in map(json.loads, (SPEC / "humaneval_2_routing.jsonl").read_text().splitlines()):
        if r["problem_id"] == 0:
            ref[
                (r["layer"], tuple(r["experts"]), tuple(round(x, 6) for x in r["gating_probs"]))
            ] = r["token_idx"]
    step, prev, late = 0, -1, 0
    for r in raw[last_prefill + 1 :]:
        if r["layer"] <= prev:
            step += 1
        prev = r["layer"]
        true = ref[(r["layer"], tuple(r["experts"]), tuple(round(x, 6) for x in r["gating_probs"]))]
        late += true < step
    assert step + 1 == 83 and late == 364
