"""Model shapes: the geometry that turns an expert key into bytes and FLOPs.

Scaled shapes keep Mixtral's routing geometry (32 layers x 8 experts, top-2) and
shrink d_model / d_ff, so a real Mixtral trace replays on them unchanged while
the expert file stays small enough for tests and the demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mer.errors import BadInput

Q4_0_BLOCK = 32  # weights per q4_0 block
Q4_0_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
ALIGN = 4096  # O_DIRECT alignment and the seed engine's slot granularity


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int
    n_heads: int = 32
    n_kv_heads: int = 8
    description: str = ""

    @property
    def n_keys(self) -> int:
        """Layer-qualified experts (the global key space)."""
        return self.n_layers * self.n_experts

    @property
    def expert_params(self) -> int:
        return 3 * self.d_model * self.d_ff

    @property
    def bytes_per_expert(self) -> int:
        """q4_0 bytes of gate + up + down for one expert."""
        return self.expert_params // Q4_0_BLOCK * Q4_0_BLOCK_BYTES

    @property
    def slot_bytes(self) -> int:
        """One expert rounded up to the 4 KiB alignment O_DIRECT reads need."""
        return -(-self.bytes_per_expert // ALIGN) * ALIGN

    @property
    def dense_params_per_layer(self) -> int:
        """Attention projections per layer (q, k, v, o), the resident dense block."""
        head_dim = self.d_model // self.n_heads
        kv = self.n_kv_heads * head_dim
        return self.d_model * self.d_model * 2 + self.d_model * kv * 2

    @property
    def dense_bytes_per_layer(self) -> int:
        return self.dense_params_per_layer // Q4_0_BLOCK * Q4_0_BLOCK_BYTES

    def slots_for_gib(self, gib: float) -> int:
        """--cache-gib converted to whole expert slots."""
        return int(gib * (1 << 30) // self.bytes_per_expert)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d.update(bytes_per_expert=self.bytes_per_expert, slot_bytes=self.slot_bytes)
        return d


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("mixtral-8x7b", 32, 8, 2, 4096, 14336, description="the real Mixtral 8x7B"),
        ModelShape(
            "mixtral-8x7b-16l",
            16,
            8,
            2,
            4096,
            14336,
            description="Mixtral 8x7B's layers, 16 of its 32 (half the disk: 13 GB)",
        ),
        ModelShape(
            "mixtral-tiny", 32, 8, 2, 128, 384, n_heads=4, n_kv_heads=2, description="for tests"
        ),
        ModelShape(
            "mixtral-small",
            32,
            8,
            2,
            512,
            1792,
            n_heads=8,
            n_kv_heads=2,
            description="for the demo",
        ),
        ModelShape(
            "mixtral-medium",
            32,
            8,
            2,
            1024,
            3584,
            n_heads=16,
            n_kv_heads=4,
            description="mid-size runs",
        ),
        ModelShape(
            "mixtral-quarter",
            32,
            8,
            2,
            2048,
            7168,
            n_heads=16,
            n_kv_heads=4,
            description="a quarter of Mixtral's width",
        ),
        ModelShape(
            "seed-flat-256",
            1,
            256,
            2,
            4096,
            14336,
            description="the public engine's flat 256-id benchmark (one pseudo-layer)",
        ),
    )
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise BadInput(
            f"unknown model shape {name!r}; choose one of: {', '.join(SHAPES)}."
        ) from None


def shape_help() -> str:
    return "; ".join(
        f"{s.name} ({s.n_layers}x{s.n_experts}, top-{s.top_k}, d_model {s.d_model}, d_ff {s.d_ff}, "
        f"{s.bytes_per_expert / 2**20:.2f} MiB/expert, {s.bytes_per_expert * s.n_keys / 2**30:.2f} GiB "
        f"of experts: {s.description})"
        for s in SHAPES.values()
    )
