"""A ProbeResult to build tests on (the probe's fits and profiles from given measurements)."""

from __future__ import annotations

from typing import Any

from mer.engine.probe import ProbeResult, ReadPoint


def make_probe_result(
    points: list[ReadPoint], lat: float, read_bytes: int, **over: Any
) -> ProbeResult:
    base: dict[str, Any] = dict(
        shape="mixtral-8x7b",
        expert_read_bytes=read_bytes,
        file_bytes=1 << 31,
        filesystem="ext4",
        io_kind="uring",
        direct=True,
        latency_s=lat,
        latency_p90_s=lat,
        points=points,
        ffn_bytes_per_s=1e9,
        dense_bytes_per_s=1e9,
        memory_read_bytes_per_s=1e10,
        threads=2,
        ram_bytes=1 << 34,
    )
    base.update(over)
    return ProbeResult(**base)
