"""`mer demo`: the whole study on the bundled real trace, end to end, on a laptop.

Every step is a `mer` command a researcher could type (printed as it runs), so
the demo doubles as the worked example of the README:

    import the real trace -> statistics -> miss-ratio curves -> synthesize a
    scaled expert GGUF -> probe this machine -> sweep policies x predictors x
    cache sizes in the simulator on the probed profile -> pick the winner ->
    execute it with the real engine (and the same policy without prefetch) ->
    simulate the same runs -> compare -> calibrate and predict again -> report
    (with a fitted synthetic trace's curves against the real ones).

The probe runs before the sweep (the issue lists it after) so that the sweep
predicts this machine and the comparison is like for like.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mer.analysis.pipeline import mer
from mer.analysis.run_report import write_run_report
from mer.analysis.sections import RunPair
from mer.shapes import get_shape
from mer.traces.bundled import bundled_trace_path

SHARED_SOURCE = (
    Path("..") / "shared" / "data" / "external" / "mixtral-offloading-h39s" / "active_experts.txt"
)
POLICIES = "lru,fifo,lfu,clock,sieve,s3fifo,arc"
PREDICTORS = "none,previous-token,markov"
QUICK_POLICIES = "lru,fifo,clock,sieve,s3fifo,arc"


def _say(msg: str) -> None:
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def _run_pair(
    trace: Path,
    experts: Path,
    hardware: Path,
    shape: str,
    cfg: dict[str, Any],
    tokens: int,
    out: Path,
    tag: str,
) -> tuple[Path, Path]:
    """Execute one configuration for real and in the simulator, same tokens."""
    opts: list[object] = [
        "--policy",
        cfg["policy"],
        "--cache-slots",
        cfg["cache_slots"],
        "--scope",
        cfg["scope"],
        "--predictor",
        cfg["predictor"],
        "--pipeline-depth",
        cfg.get("pipeline_depth", 1),
        "--tokens",
        tokens,
    ]
    run_tokens = out / f"run-{tag}.parquet"
    sim_tokens = out / f"sim-{tag}.parquet"
    mer(
        "run",
        trace,
        "--experts",
        experts,
        *opts,
        "-o",
        run_tokens,
        "--summary",
        out / f"run-{tag}.json",
    )
    mer(
        "simulate",
        trace,
        *opts,
        "--hardware",
        hardware,
        "--shape",
        shape,
        "-o",
        sim_tokens,
        "--summary",
        out / f"sim-{tag}.json",
    )
    return sim_tokens, run_tokens


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    shape: str = "mixtral-small",
    tokens: int = 96,
    quick: bool = False,
) -> Path:
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    get_shape(shape)  # fail early on a bad --shape

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
    mer("probe", "-o", hardware, "--quick", "--dir", out, "--shape", shape)

    _say("5. sweep policies x predictors x cache sizes in the simulator")
    sweep = out / "sweep.parquet"
    slots = "32,64,96,128,192"
    best = mer(
        "sweep",
        trace,
        "--policies",
        QUICK_POLICIES if quick else POLICIES,
        "--predictors",
        PREDICTORS,
        "--cache-slots",
        "32,64,128" if quick else slots,
        "--hardware",
        hardware,
        "--shape",
        shape,
        "--tokens",
        96 if quick else 256,
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
    print(f"winner: {winner}", file=sys.stderr)

    _say("6. execute the winner with the real engine, and the same policy without prefetch")
    n_tok = 24 if quick else tokens
    configs = {"winner": winner}
    if winner["predictor"] != "none":
        configs["no-prefetch"] = {**winner, "predictor": "none"}
    pairs = [
        _run_pair(trace, experts, hardware, shape, c, n_tok, out, tag) for tag, c in configs.items()
    ]

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
    mer("calibrate", pairs[0][1], "--hardware", hardware, "-o", calibrated)
    # The same runs predicted again on the calibrated profile: in-sample for the run it was
    # fitted on, held out for the others.
    cal_sims = {}
    for tag, c in configs.items():
        cal_sims[tag] = out / f"sim-calibrated-{tag}.json"
        mer(
            "simulate",
            trace,
            "--policy",
            c["policy"],
            "--cache-slots",
            c["cache_slots"],
            "--scope",
            c["scope"],
            "--predictor",
            c["predictor"],
            "--pipeline-depth",
            c.get("pipeline_depth", 1),
            "--tokens",
            n_tok,
            "--hardware",
            calibrated,
            "--shape",
            shape,
            "--summary",
            cal_sims[tag],
        )

    _say("8. the report")
    result = write_run_report(
        out,
        trace=trace,
        sweep=sweep,
        mrc=mrc,
        pairs=[
            RunPair(s, r, tag.replace("-", " "), cal_sims[tag])
            for (s, r), tag in zip(pairs, configs, strict=True)
        ],
        hardware=str(hardware),
        calibrated=calibrated,
        synthetic_mrc=synth_mrc,
    )
    elapsed = time.perf_counter() - t0
    print(
        f"\nmer demo finished in {elapsed:.0f} s. Report: {result['markdown']}  (HTML: {result['html']})"
    )
    return Path(result["markdown"])
