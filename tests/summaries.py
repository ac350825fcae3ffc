"""One RunSummary factory for the tests of compare, calibrate and validate: a plausible
run of 10 tokens on 32 layers (top-2); each test overrides the fields it reasons about."""

from __future__ import annotations

from typing import Any

from mer.summary import RunSummary


def make_summary(**over: Any) -> RunSummary:
    base: dict[str, Any] = dict(
        kind="simulated",
        trace="t.parquet",
        trace_digest="abc",
        model="m",
        shape="mixtral-tiny",
        mode="model",
        policy="lru",
        scope="global",
        cache_slots=64,
        predictor="none",
        pipeline_depth=1,
        phase="all",
        hardware="hw",
        tokens=10,
        layers=32,
        top_k=2,
        hits=400,
        misses=240,
        hit_rate=400 / 640,
        bytes_read=240 * 1000,
        wall_s=2.0,
        tokens_per_s=5.0,
        layer_iterations_per_s=160.0,
        io_wait_s=0.5,
        compute_s=1.0,
        dense_s=0.5,
        io_wait_share=0.25,
        prefetch={"issued": 0, "used": 0, "late": 0, "wasted": 0},
        latency={"read": {"p50": 0.001, "p99": 0.002}, "token": {"p50": 0.2, "p99": 0.3}},
    )
    base.update(over)
    return RunSummary(**base)
