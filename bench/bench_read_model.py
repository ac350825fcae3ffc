"""Where does the simulator's timing differ from the engine's? Real runs' per-read records
against the simulator's for the same configurations, with the disk's speed of the moment
taken out.

    .venv/bin/python bench/bench_read_model.py --experts EXPERTS.gguf [TRACE.parquet] \\
        [--rounds 4] [--tokens 32] [--hardware PROFILE.json]

Each round runs for real, back to back: LRU 64 slots global without prefetch (the
reference), the same with oracle prefetch at depth 2, and the same with `--queue-depth 4`.
The simulator's SSD bandwidth is bisected until it reproduces the reference run's wall
time, and the round's other runs are predicted with that bandwidth: their errors are what
the model gets wrong beyond the disk's speed, which moves by tens of percent from one
minute to the next on a shared disk. Then the reference run's reads are joined with the
simulator's (prefetch off: the same reads, in the same order) and split by how many reads
their step issued (a lone miss, the first and the second of two misses), engine against
simulator. Both SSD models are fitted from the same probe (`--hardware` must be a `mer
probe` profile: its `extra.probe` is refitted both ways, its compute figures kept) and
judged on the same real runs. Run it under the disk lock when others time the disk too;
it prints the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "data" / "mixtral-offloading-h39s.parquet"
MODELS = ("channels", "shared")
CONFIGS: dict[str, dict[str, Any]] = {
    "lru-64": {},
    "lru-64-oracle": {"predictor": "oracle", "pipeline_depth": 2},
    "lru-64-qd4": {"queue_depth": 4},
}


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


@contextlib.contextmanager
def engine_reads() -> Iterator[list[list[tuple[int, float, float]]]]:
    """Per run, every read the engine's streamer saw land: (key, submitted, seen)."""
    from mer.engine import streaming

    runs: list[list[tuple[int, float, float]]] = []
    enter = streaming.ExpertStreamer.__enter__

    def patched(self: Any) -> Any:
        out = enter(self)
        log: list[tuple[int, float, float]] = []
        runs.append(log)
        landed = self.reads.on_landed

        def on_landed(key: int, into: bool, started: float, seen: float) -> None:
            log.append((key, started, seen))
            landed(key, into, started, seen)

        self.reads.on_landed = on_landed
        return out

    streaming.ExpertStreamer.__enter__ = patched  # type: ignore[method-assign]
    try:
        yield runs
    finally:
        streaming.ExpertStreamer.__enter__ = enter  # type: ignore[method-assign]


def sim_reads(trace: Any, run: Any, profile: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """The simulated summary of `run` and its reads in issue order: keys, steps, latencies."""
    import mer.sim.model as m
    from mer.analysis.calibrate import _replay_config

    recs: list[Any] = []

    class Rec(m._Recorder):
        def __init__(self, observe: bool) -> None:
            super().__init__(observe)
            recs.append(self)

    orig = m._Recorder
    m._Recorder = Rec  # type: ignore[misc]
    try:
        res = m.simulate(trace, _replay_config(run), profile, m.options_like(run, "simpy"))
    finally:
        m._Recorder = orig  # type: ignore[misc]
    rec = recs[-1]
    issued = np.asarray(rec.issued, dtype=np.int64)
    lat = (rec.observed() - issued) / m.TICKS_PER_S
    return res.summary, np.asarray(rec.keys), np.asarray(rec.read_step), lat


def with_bandwidth(profile: Any, bw: float) -> Any:
    p = copy.deepcopy(profile)
    p.ssd.bandwidth_bytes_per_s = bw
    return p


def fit_wall(trace: Any, run: Any, profile: Any) -> float:
    """The SSD bandwidth at which the simulator reproduces `run`'s wall time."""
    from mer.analysis.calibrate import _replay_config
    from mer.sim.model import options_like, simulate

    cfg, opts = _replay_config(run), options_like(run)
    lo, hi = np.log(1e8), np.log(2e10)
    for _ in range(30):
        mid = (lo + hi) / 2
        if (
            simulate(trace, cfg, with_bandwidth(profile, float(np.exp(mid))), opts).summary.wall_s
            > run.wall_s
        ):
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("trace", nargs="?", type=Path, default=TRACE)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hardware", default=None, help="a profile (default: probe quickly)")
    a = ap.parse_args(argv)

    from mer.analysis.validate import EngineMachine
    from mer.analysis.validation_grid import GridConfig
    from mer.engine.executor import EngineConfig
    from mer.sim.hardware import load_profile
    from mer.summary import trace_digest
    from mer.traces.format import read_trace

    print(f"load average at start: {load()}")
    trace = read_trace(a.trace)
    machine = EngineMachine(
        trace,
        a.trace,
        a.experts,
        EngineConfig(threads=os.cpu_count() or 1, progress=False),
        digest=trace_digest(a.trace),
    )
    from mer.engine.probe import ProbeConfig, ProbeResult, run_probe, to_profile

    if a.hardware:
        given = load_profile(a.hardware)
        probe = (given.extra or {}).get("probe")
        if not probe:
            raise SystemExit(f"{a.hardware}: no extra.probe to refit; give a `mer probe` profile")
        result = ProbeResult.from_dict(probe)
    else:
        result = run_probe(ProbeConfig.quick(directory=a.experts.parent))
    profiles = {}
    for model in MODELS:
        p = to_profile(result, ssd_model=model)
        if a.hardware:  # the given profile's compute figures; only the SSD refitted
            p.compute = copy.deepcopy(given.compute)
        profiles[model] = p
    names = [n for n in CONFIGS if n != "lru-64"]
    errors = {m: {n: [] for n in names} for m in MODELS}
    by_pos: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {m: {} for m in MODELS}
    fitted: dict[str, list[float]] = {m: [] for m in MODELS}
    with engine_reads() as logs:
        for r in range(a.rounds):
            runs = {}
            for name, over in CONFIGS.items():
                cfg = GridConfig(name=name, policy="lru", cache_slots=64, **over)
                runs[name] = machine.run(cfg, a.tokens)
            ref = runs["lru-64"]
            ref_log = logs[-len(CONFIGS)]
            eng = sorted(ref_log, key=lambda e: e[1])  # issue order
            eng_lat = np.asarray([seen - st for _, st, seen in eng])
            for model, profile in profiles.items():
                bw = fit_wall(trace, ref, profile)
                fitted[model].append(bw)
                prof = with_bandwidth(profile, bw)
                for name in names:
                    s, *_ = sim_reads(trace, runs[name], prof)
                    errors[model][name].append(s.tokens_per_s / runs[name].tokens_per_s - 1)
                _, keys, steps, lat = sim_reads(trace, ref, prof)
                if [e[0] for e in eng] != keys.tolist():
                    raise SystemExit("the engine's reads and the simulator's differ: cannot join")
                _, first, counts = np.unique(steps, return_index=True, return_counts=True)
                n_in = np.repeat(counts, counts)
                pos = np.arange(steps.size) - np.repeat(first, counts)
                for label, mask in (
                    ("lone miss", n_in == 1),
                    ("1st of 2", (n_in == 2) & (pos == 0)),
                    ("2nd of 2", (n_in == 2) & (pos == 1)),
                ):
                    e, m = eng_lat[mask], lat[mask]
                    by_pos[model].setdefault(label, []).append(
                        (float(np.median(e)), float(np.median(m)), float(e.mean()), float(m.mean()))
                    )
            print(
                f"round {r}: "
                + ", ".join(f"{n} {runs[n].tokens_per_s:.1f} tokens/s" for n in CONFIGS)
                + "; errors "
                + "; ".join(
                    f"{m}: " + ", ".join(f"{n} {errors[m][n][-1] * 100:+.0f}%" for n in names)
                    for m in MODELS
                ),
                flush=True,
            )
    print(f"\nload average at the end: {load()}")
    for model in MODELS:
        print(f"\n### SSD model: {model}\n")
        print(
            "bandwidth fitted to the reference run's wall, per round: "
            + ", ".join(f"{b / 1e9:.3f}" for b in fitted[model])
            + " GB/s"
        )
        print("\n| configuration | error per round (%) | median error (%) |")
        print("|---|---|---:|")
        for n, es in errors[model].items():
            print(
                f"| {n} | {', '.join(f'{e * 100:+.0f}' for e in es)} | "
                f"{statistics.median(es) * 100:+.1f} |"
            )
        print(
            "\n| reference run's reads | engine p50 (ms) | simulator p50 (ms) | engine mean (ms) "
            "| simulator mean (ms) |"
        )
        print("|---|---|---|---|---|")
        for label, rows in by_pos[model].items():
            cols = list(zip(*rows, strict=True))
            print(
                f"| {label} | "
                + " | ".join(", ".join(f"{v * 1e3:.2f}" for v in c) for c in cols)
                + " |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
