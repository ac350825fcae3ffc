"""One experiment, one identity: content digests, and every command that holds two
results side by side (compare, calibrate, report) refusing results of different
experiments; simulate and probe using the shape that will be run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from summaries import make_summary as _summary

from mer.analysis.compare import check_study, compare
from mer.cli import main
from mer.errors import BadInput
from mer.sim.hardware import load_profile
from mer.summary import RunSummary, trace_digest
from mer.traces.bundled import bundled_trace_path, load_bundled
from mer.traces.format import Trace, read_trace, write_trace


def _head(tmp_path: Path, tokens: int = 6, name: str = "t.parquet") -> Path:
    tr = load_bundled().head(tokens)
    return write_trace(Trace(tr.df, tr.meta, name=name), tmp_path / name)


# -- the content digest ------------------------------------------------------------------


def test_digest_ignores_metadata_times_but_not_routing(tmp_path: Path) -> None:
    tr = load_bundled().head(20)
    a = write_trace(
        Trace(tr.df, replace(tr.meta, created="2001-01-01T00:00:00+00:00")), tmp_path / "a.parquet"
    )
    b = write_trace(
        Trace(tr.df, replace(tr.meta, created="2030-06-01T12:00:00+00:00", provenance="other")),
        tmp_path / "b.parquet",
    )
    assert a.read_bytes() != b.read_bytes()  # the files differ (their metadata) ...
    assert trace_digest(a) == trace_digest(b)  # ... the routing does not
    df = tr.df.copy()
    i = int(np.flatnonzero((df["layer"] == 5).to_numpy())[0])
    df.loc[i, "expert"] = next(
        e
        for e in range(8)
        if e not in set(df[(df["token"] == df.loc[i, "token"]) & (df["layer"] == 5)]["expert"])
    )
    c = write_trace(Trace(df, tr.meta), tmp_path / "c.parquet")
    assert trace_digest(c) != trace_digest(a)
    # Reading gives the same digest as the path.
    assert trace_digest(read_trace(a)) == trace_digest(a)


def test_two_imports_of_one_file_are_one_experiment(tmp_path: Path) -> None:
    """The bundled trace and the same routing re-imported from its source text agree."""
    tr = load_bundled()
    lines = ["0,1,2,3,4,5,6,7"] * tr.n_layers  # the prompt block the importer drops
    lines += [
        ",".join(map(str, sorted(step))) for step in tr.experts.reshape(-1, tr.top_k).tolist()
    ]
    src = tmp_path / "active_experts.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "again.parquet"
    assert main(["trace", "import", "mixtral-offloading", str(src), "-o", str(out)]) == 0
    assert trace_digest(out) == trace_digest(bundled_trace_path())


# -- compare -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("shape", "mixtral-small", "--experts"),
        ("trace_digest", "fff", "same trace"),
        ("model", "other-model", "same model"),
        ("scope", "per-layer", None),
        ("phase", "decode", None),
        ("mode", "seed", "--mode"),
    ],
)
def test_compare_refuses_each_identity_field(field: str, value: str, hint: str | None) -> None:
    with pytest.raises(BadInput) as exc:
        compare(_summary(), _summary(kind="measured", **{field: value}))
    msg = str(exc.value)
    label = "trace content" if field == "trace_digest" else field
    assert f"{label}:" in msg and "not the same experiment" in msg
    if hint:
        assert hint in msg


def test_compare_warns_when_the_profile_measured_another_shape() -> None:
    sim = _summary(extra={"hardware_measured_shape": "mixtral-8x7b"})
    c = compare(sim, _summary(kind="measured"))
    assert "measured the FFN on mixtral-8x7b experts, not mixtral-tiny" in c.verdict


# -- report and calibrate -----------------------------------------------------------------


def test_study_check_names_the_input_of_another_trace() -> None:
    sim, run = _summary(), _summary(kind="measured")
    check_study("abc", "t.parquet", sim=sim, run=run)
    with pytest.raises(BadInput, match=r"--run\) replayed another trace"):
        check_study("abc", "t.parquet", sim=sim, run=_summary(kind="measured", trace_digest="x"))
    with pytest.raises(BadInput, match="sweep"):
        check_study("abc", "t.parquet", sweep=pd.DataFrame({"trace_digest": ["abc", "zzz"]}))
    with pytest.raises(BadInput, match="shape"):
        check_study(
            "abc", "t.parquet", sim=sim, run=_summary(kind="measured", shape="mixtral-small")
        )


def test_report_run_refuses_a_run_of_another_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = _head(tmp_path)
    _summary(kind="measured").save(tmp_path / "run.json")  # digest "abc": not this trace
    rc = main(
        [
            "report",
            "run",
            "--trace",
            str(trace),
            "--run",
            str(tmp_path / "run.json"),
            "-o",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 2
    assert "replayed another trace" in capsys.readouterr().err


def test_calibrate_refuses_a_simulation_of_another_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _summary(kind="measured").save(tmp_path / "run.json")
    _summary(shape="mixtral-small", hardware="ci-tiny").save(tmp_path / "sim.json")
    _summary(hardware="nvme-desktop").save(tmp_path / "sim-hw.json")
    base = [
        "calibrate",
        str(tmp_path / "run.json"),
        "--hardware",
        "ci-tiny",
        "-o",
        str(tmp_path / "c.json"),
    ]
    assert main([*base, "--sim", str(tmp_path / "sim.json")]) == 2
    assert "shape: 'mixtral-small' vs 'mixtral-tiny'" in capsys.readouterr().err
    assert main([*base, "--sim", str(tmp_path / "sim-hw.json")]) == 2
    assert "used hardware 'nvme-desktop'" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


# -- simulate: shape from the expert file, sizes within the key space --------------------


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "tiny.gguf"
    assert main(["experts", "synth", "--shape", "mixtral-tiny", "-o", str(out)]) == 0
    return out


def test_simulate_takes_the_shape_of_the_expert_file(
    tmp_path: Path, tiny_experts: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = _head(tmp_path)
    capsys.readouterr()
    assert (
        main(
            [
                "simulate",
                str(trace),
                "--experts",
                str(tiny_experts),
                "--hardware",
                "ci-tiny",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got["shape"] == "mixtral-tiny"
    # The same bytes per expert as the file: a miss reads its expert's read plan (gate, up
    # and down, each page-aligned), as `mer run` does.
    from mer.engine.store import ExpertStore, read_bytes_by_key, typical_read_ranges

    store = ExpertStore.open(tiny_experts)
    per_key = read_bytes_by_key(store)
    assert got["misses"] * min(per_key) <= got["bytes_read"] <= got["misses"] * max(per_key)
    assert got["extra"]["read_ranges"] == list(typical_read_ranges(store))
    rc = main(["simulate", str(trace), "--experts", str(tiny_experts), "--shape", "mixtral-small"])
    assert rc == 2
    assert "disagrees with the expert file" in capsys.readouterr().err


def test_simulate_refuses_an_expert_file_of_another_geometry(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flat = tmp_path / "seed.parquet"
    assert main(["trace", "synth", "seed-skewed", "-o", str(flat), "--iterations", "32"]) == 0
    experts = tmp_path / "tiny.gguf"
    assert main(["experts", "synth", "--shape", "mixtral-tiny", "-o", str(experts)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(flat), "--experts", str(experts)]) == 2
    assert "routes over 1 layers x 256 experts" in capsys.readouterr().err


def test_simulate_refuses_more_slots_than_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = _head(tmp_path)
    assert main(["simulate", str(trace), "--cache-slots", "999"]) == 2
    err = capsys.readouterr().err
    assert "--cache-slots 999 is more than the trace's 256 expert keys" in err
    assert main(["simulate", str(trace), "--cache-slots", "256", "--hardware", "ci-tiny"]) == 0


def test_simulate_notes_a_profile_measured_on_another_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prof = load_profile("ci-tiny")
    prof.extra = {"measured_shape": "mixtral-8x7b"}
    prof.save(tmp_path / "hw.json")
    trace = _head(tmp_path)
    rc = main(
        [
            "simulate",
            str(trace),
            "--shape",
            "mixtral-small",
            "--hardware",
            str(tmp_path / "hw.json"),
            "--json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr()
    assert "measured the expert FFN on mixtral-8x7b experts" in out.err
    assert json.loads(out.out)["extra"]["hardware_measured_shape"] == "mixtral-8x7b"


def test_seed_mode_is_not_labelled_whole_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flat = tmp_path / "seed.parquet"
    assert main(["trace", "synth", "seed-skewed", "-o", str(flat), "--iterations", "128"]) == 0
    capsys.readouterr()
    assert main(["simulate", str(flat), "--mode", "seed", "--cache-slots", "64"]) == 0
    text = capsys.readouterr().out
    assert "(whole model)" not in text
    assert "NOT whole-model" in text and "--mode seed" in text and "1-layer trace" in text
    assert main(["simulate", str(_head(tmp_path)), "--hardware", "ci-tiny"]) == 0
    assert "tokens/s (whole model)" in capsys.readouterr().out


def test_summary_json_says_what_its_rates_are() -> None:
    d = _summary().to_dict()
    assert d["tokens_per_s_whole_model"] is True
    assert d["hit_rate_definition"].startswith("step granularity")
    assert "global scope" in d["hit_rate_definition"] and "cold start" in d["hit_rate_definition"]
    assert RunSummary.from_dict(d) == _summary()  # the derived keys do not break loading


# -- probe: the profile says which shape it measured ---------------------------------------


def test_probe_measures_the_expert_file_shape(
    tmp_path: Path, tiny_experts: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "hw.json"
    rc = main(
        ["probe", "--quick", "--dir", str(tmp_path), "--experts", str(tiny_experts), "-o", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "measured on mixtral-tiny experts" in text
    prof = json.loads(out.read_text())
    assert prof["extra"]["measured_shape"] == "mixtral-tiny"
    assert prof["extra"]["probe"]["shape"] == "mixtral-tiny"
    rc = main(
        [
            "probe",
            "--quick",
            "--dir",
            str(tmp_path),
            "--experts",
            str(tiny_experts),
            "--shape",
            "mixtral-small",
        ]
    )
    assert rc == 2


# -- mrc: the summary shows the sizes asked for --------------------------------------------


def test_mrc_summary_columns_are_the_requested_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trace = _head(tmp_path, tokens=40)
    out = tmp_path / "m.parquet"
    args = [
        "mrc",
        str(trace),
        "-o",
        str(out),
        "--policies",
        "lru",
        "--scopes",
        "global",
        "--sizes",
        "64,128",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.strip().startswith("scope/policy"))
    assert header.split()[1:3] == ["64", "128"]
    df = pd.read_parquet(out)
    lru = df[(df.policy == "lru") & (df.scope == "global")].set_index("cache_slots")["hit_rate"]
    row = next(line for line in lines if line.strip().startswith("global/lru")).split()
    assert row[1:3] == [f"{100 * lru[64]:.2f}%", f"{100 * lru[128]:.2f}%"]
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["at_sizes"] == [64, 128]
    assert set(got["at"]["global/lru"]) == {"64", "128"}
