"""`mer demo`: the whole study on the bundled real trace, end to end, on a laptop.

Every step is a `mer` command a researcher could type (printed as it runs), so
the demo doubles as the worked example of the README:

    import the real trace -> statistics -> miss-ratio curves -> synthesize a
    scaled expert GGUF -> probe this machine -> sweep policies x predictors x
    scopes x cache sizes in the simulator on the probed profile -> pick the winner -> execute
    it and plain LRU at the same cache size with the real engine, alternating ->
    simulate the same runs -> compare -> calibrate and predict again -> a held-out
    validation (`mer validate`: calibrate once, predict 8 other configurations, run
    each 3 times) -> report
    (with a fitted synthetic trace's curves against the real ones).

The probe runs before the sweep so that the sweep predicts this machine and the
comparison is like for like.

The configuration is chosen so that the sweep is I/O-bound on a laptop-class
machine with the native q4_0 kernel: mixtral-small experts (1.5 MiB, about 60 us
of FFN each at memory speed) against reads of the same 1.5 MiB from the SSD
(about 1 ms), cache sizes from 12.5% to 37.5% of the 256 experts, where the
policies and the two scopes differ, and one window of the trace (the first
`tokens`) for the sweep and the runs, so the ranking predicted is the ranking
measured. The winner is then run for real against plain LRU (global, no
prefetch) at the same cache size, alternating, `rounds` times each.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mer.analysis.faceoff import Side, baseline_for, faceoff_section, label
from mer.analysis.pipeline import mer
from mer.analysis.run_report import write_run_report
from mer.analysis.sections import RunPair
from mer.shapes import get_shape
from mer.summary import RunSummary
from mer.traces.bundled import bundled_trace_path

SHARED_SOURCE = (
    Path("..") / "shared" / "data" / "external" / "mixtral-offloading-h39s" / "active_experts.txt"
)
POLICIES = "lru,fifo,lfu,clock,sieve,s3fifo,arc"
PREDICTORS = "none,previous-token,markov"
QUICK_POLICIES = "lru,fifo,clock,sieve,s3fifo,arc"
SCOPES = "global,per-layer"
SLOTS = "32,48,64,96"  # 12.5% .. 37.5% of the 256 layer-qualified experts: where policies differ
QUICK_SLOTS = "32,96"
ROUNDS = 3  # rounds of real runs (one of each side), alternating; the median round decides
# The held-out validation (`mer validate --grid quick`): 8 configurations, each run this
# many times for this many tokens (about a minute on a 2-core machine).
VALIDATE_TOKENS, VALIDATE_TOKENS_QUICK, VALIDATE_REPEATS = 16, 8, 3


ROLES = {"winner": "winner", "lru": "plain LRU", "no-prefetch": "winner without prefetch"}


def _same_cache(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(str(a.get(k)) == str(b.get(k)) for k in ("policy", "scope", "cache_slots"))


def _say(msg: str) -> None:
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def _opts(cfg: dict[str, Any], tokens: int) -> list[object]:
    return [
        "--policy",
        cfg["policy"],
        "--cache-slots",
        int(cfg["cache_slots"]),
        "--scope",
        cfg["scope"],
        "--predictor",
        cfg["predictor"],
        "--pipeline-depth",
        int(cfg.get("pipeline_depth", 1) or 1),
        "--tokens",
        tokens,
    ]


def _measure(
    trace: Path, experts: Path, cfg: dict[str, Any], tokens: int, out: Path, tag: str
) -> Path:
    """One real run; returns its per-token parquet (the summary is in it and beside it)."""
    run_tokens = out / f"run-{tag}.parquet"
    mer(
        "run",
        trace,
        "--experts",
        experts,
        *_opts(cfg, tokens),
        "--no-progress",
        "-o",
        run_tokens,
        "--summary",
        out / f"run-{tag}.json",
    )
    return run_tokens


def _predict(
    trace: Path,
    hardware: Path,
    experts: Path,
    cfg: dict[str, Any],
    tokens: int,
    out: Path,
    tag: str,
) -> Path:
    """The run's prediction, on the expert file it reads (its shape and read plans)."""
    sim_tokens = out / f"sim-{tag}.parquet"
    mer(
        "simulate",
        trace,
        *_opts(cfg, tokens),
        "--hardware",
        hardware,
        "--experts",
        experts,
        "-o",
        sim_tokens,
        "--summary",
        out / f"sim-{tag}.json",
    )
    return sim_tokens


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    shape: str = "mixtral-small",
    tokens: int = 96,
    quick: bool = False,
    rounds: int = ROUNDS,
) -> Path:
    t0 = time.perf_counter()
    get_shape(shape)  # fail early on a bad --shape, before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _say("1. the real trace (Mixtral 8x7B routing published by mixtral-offloading, MIT)")
    trace = out / "trace.parquet"
    if SHARED_SOURCE.exists():
        mer("trace", "import", "mixtral-offloading", SHARED_SOURCE, "-o", trace)
    else:
        shutil.copyfile(bundled_trace_path(), trace)
        print(
            f"(source file not found at {SHARED_SOURCE}; using the bundled conversion)",
            file=sys.stderr,
        )
    mer("trace", "stats", trace)

    _say("2. exact hit-rate curves, every policy at every cache size, OPT as the ceiling")
    mrc = out / "mrc.parquet"
    mer("mrc", trace, "-o", mrc, "--replay-step", 32 if quick else 1)
    # A fitted synthetic trace of the same length, for the report's real-vs-synthetic overlay.
    synth = out / "synthetic-fitted.parquet"
    n_trace = int(mer("trace", "info", trace, capture_json=True, echo=False)["tokens"])
    mer("trace", "synth", "fitted", "--from", trace, "--tokens", n_trace, "-o", synth)
    synth_mrc = out / "mrc-synthetic.parquet"
    mer("mrc", synth, "--policies", "lru", "--scopes", "global", "-o", synth_mrc)

    _say(f"3. a scaled expert file ({shape}: Mixtral's 32 x 8 geometry, real q4_0 GGUF layout)")
    experts = out / f"experts-{shape}.gguf"
    if not experts.exists():
        mer("experts", "synth", "--shape", shape, "-o", experts)
    mer("experts", "info", experts)

    _say("4. probe this machine (O_DIRECT reads, q4_0 FFN, memory bandwidth)")
    hardware = out / "hardware.json"
    # A full probe on a small file: the quick one's 0.15 s per point is too noisy to rank
    # configurations whose difference is the SSD's.
    probe_size = ["--quick"] if quick else ["--size-gib", "0.5"]
    mer("probe", "-o", hardware, *probe_size, "--dir", out, "--shape", shape)

    n_tok = 48 if quick else tokens
    _say("5. sweep policies x predictors x scopes x cache sizes in the simulator")
    sweep = out / "sweep.parquet"
    best = mer(
        "sweep",
        trace,
        "--policies",
        QUICK_POLICIES if quick else POLICIES,
        "--predictors",
        PREDICTORS,
        "--scopes",
        SCOPES,
        "--cache-slots",
        QUICK_SLOTS if quick else SLOTS,
        "--hardware",
        hardware,
        "--shape",
        shape,
        "--tokens",
        n_tok,
        "-o",
        sweep,
        "--best",
        "tokens_per_s",
        capture_json=True,
    )
    # The demo's grid has no offline entries (OPT, oracle), but stay safe: deploy an online one.
    winner = (
        best["best_online"]
        if best["best"].get("offline") and best.get("best_online")
        else best["best"]
    )
    sweep_df = pd.read_parquet(sweep)
    sweep_df = sweep_df[sweep_df["tokens"] == n_tok] if "tokens" in sweep_df.columns else sweep_df
    challenger, lru, note = baseline_for(winner, sweep_df)
    print(f"winner: {label(challenger)}; against {label(lru)}", file=sys.stderr)

    _say("6. the winner and plain LRU at the same cache size, for real (alternating) and predicted")
    runs: dict[str, list[Path]] = {"winner": [], "lru": []}
    for i in range(1 if quick else rounds):
        for tag, cfg in (("winner", challenger), ("lru", lru)):
            suffix = "" if i == 0 else f"-{i + 1}"
            runs[tag].append(_measure(trace, experts, cfg, n_tok, out, f"{tag}{suffix}"))
    configs = {"winner": challenger, "lru": lru}
    if challenger["predictor"] != "none" and not _same_cache(challenger, lru):
        # the winner's own cache without prefetch: what the prefetching adds, measured
        configs["no-prefetch"] = {**challenger, "predictor": "none"}
        runs["no-prefetch"] = [
            _measure(trace, experts, configs["no-prefetch"], n_tok, out, "no-prefetch")
        ]
    sims = {
        tag: _predict(trace, hardware, experts, cfg, n_tok, out, tag)
        for tag, cfg in configs.items()
    }
    pairs = [(sims[tag], runs[tag][0]) for tag in configs]

    _say("7. predicted vs measured, and a calibrated profile")
    for sim_tokens, run_tokens in pairs:
        mer(
            "compare",
            sim_tokens,
            run_tokens,
            "-o",
            sim_tokens.with_name(sim_tokens.stem.replace("sim-", "compare-") + ".json"),
        )
    calibrated = out / "hardware-calibrated.json"
    mer("calibrate", pairs[0][1], "--hardware", hardware, "--trace", trace, "-o", calibrated)
    # The same runs predicted again on the calibrated profile: in-sample for the run it was
    # fitted on (the winner's), held out for the others.
    cal_sims = {tag: out / f"sim-calibrated-{tag}.json" for tag in configs}
    for tag, cfg in configs.items():
        mer(
            "simulate",
            trace,
            *_opts(cfg, n_tok),
            "--hardware",
            calibrated,
            "--experts",
            experts,
            "--summary",
            cal_sims[tag],
        )

    def side(tag: str, cfg: dict[str, Any]) -> Side:
        return Side(
            cfg,
            RunSummary.load(out / f"sim-{tag}.json"),
            [RunSummary.load(p.with_suffix(".json")) for p in runs[tag]],
        )

    section = faceoff_section(side("winner", challenger), side("lru", lru), sweep_df, note)

    _say("8. held-out validation: calibrate once, predict and run other configurations, repeated")
    validation = out / "validation"
    mer(
        "validate",
        trace,
        "--experts",
        experts,
        "--hardware",
        hardware,
        "--grid",
        "quick",
        "--tokens",
        VALIDATE_TOKENS_QUICK if quick else VALIDATE_TOKENS,
        "--repeats",
        2 if quick else VALIDATE_REPEATS,
        "-o",
        validation,
    )

    _say("9. the report")
    result = write_run_report(
        out,
        trace=trace,
        sweep=sweep,
        mrc=mrc,
        pairs=[
            RunPair(s, r, ROLES.get(tag, tag), cal_sims[tag])
            for (s, r), tag in zip(pairs, configs, strict=True)
        ],
        hardware=str(hardware),
        calibrated=calibrated,
        synthetic_mrc=synth_mrc,
        extra={"validation": validation},
        extra_sections=section,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"\nmer demo finished in {elapsed:.0f} s. Report: {result['markdown']}  (HTML: {result['html']})"
    )
    return Path(result["markdown"])
