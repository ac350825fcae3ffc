"""Physical limits drawn next to every tokens/s result (DESIGN.md: "physical limits are
part of the answer"): no policy beats the memory-bandwidth, compute or SSD bounds."""

from __future__ import annotations

from typing import Any

from mer.shapes import get_shape
from mer.sim.hardware import load_profile

Curves = dict[str, tuple[list[float], list[float]]]


def tokens_per_s_bounds(
    shape_name: str, hardware: str, mrc: Any | None, layers: int, top_k: int
) -> tuple[dict[str, float], Curves]:
    """Horizontal bounds (memory bandwidth: every used expert and the dense block read
    from RAM once per token; compute: the profile's FFN and dense throughput) and the
    SSD bound at OPT's miss rate per cache size (or with every lookup a miss)."""
    shape = get_shape(shape_name)
    hw = load_profile(hardware)
    per_token_bytes = layers * (top_k * shape.bytes_per_expert + shape.dense_bytes_per_layer)
    c = hw.compute
    per_layer_compute = c.dense_time(shape.dense_bytes_per_layer) + top_k * c.ffn_time(
        shape.bytes_per_expert
    ) / min(c.workers, top_k)
    bounds = {
        f"memory-bandwidth bound ({hw.name})": hw.memory.read_bandwidth_bytes_per_s
        / per_token_bytes,
        f"compute bound, all hits ({hw.name})": 1.0 / (layers * per_layer_compute),
    }
    curves: Curves = {}
    miss_bytes = layers * top_k * shape.bytes_per_expert
    if mrc is not None:
        opt = mrc[(mrc["policy"] == "opt") & (mrc["scope"] == "global")].sort_values("cache_slots")
        if len(opt):
            xs = opt["cache_slots"].astype(float).tolist()
            ys = [
                hw.ssd.bandwidth_bytes_per_s / (max(1 - h, 1e-6) * miss_bytes)
                for h in opt["hit_rate"].tolist()
            ]
            curves[f"SSD bound at OPT's miss rate ({hw.name})"] = (xs, ys)
    if not curves:
        bounds[f"SSD bound, every lookup a miss ({hw.name})"] = (
            hw.ssd.bandwidth_bytes_per_s / miss_bytes
        )
    return bounds, curves
