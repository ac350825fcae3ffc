"""The resident dense block: the attention-sized work every layer does besides its experts.

A MoE layer is attention (dense, always resident) followed by the routed
experts (streamed). For `tokens_per_s` to be a whole-model figure the engine
must do the dense work too. This module holds, per layer, q4_0 matrices of the
shape's true attention size (`ModelShape.dense_params_per_layer`: q, k, v and o
projections) in RAM and applies them to the hidden vector as two matvecs:

    qkv = W_qkv x          (d_model + 2 * kv rows, d_model columns)
    h   = W_o qkv[:d_model] (d_model rows, d_model columns)
    x   = rmsnorm(x + h)

It is the *work* of attention for one decode token (every weight read once, the
same q4_0 kernel as the experts), not its semantics: there is no KV cache and
no softmax, whose cost at these context lengths is small next to the weights.
The weights are random (seeded) because the trace fixes the routing, not the
hidden state. One matrix pair per layer (not one shared) so the working set is
the model's and the CPU cache does not flatter the figure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mer.engine.ffn import q4_matvec
from mer.engine.q4_0 import random_q4_0, row_bytes
from mer.shapes import ModelShape

F32 = npt.NDArray[np.float32]


def rmsnorm(x: F32, eps: float = 1e-6) -> F32:
    """x / rms(x): keeps the carried hidden vector at unit scale whatever the weights."""
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + eps))
    return (x / np.float32(rms)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class DenseGeometry:
    """Rows and columns of the two per-layer matrices."""

    d_model: int
    kv_dim: int

    @classmethod
    def of(cls, shape: ModelShape) -> DenseGeometry:
        head_dim = shape.d_model // shape.n_heads
        return cls(shape.d_model, shape.n_kv_heads * head_dim)

    @property
    def qkv_rows(self) -> int:
        return self.d_model + 2 * self.kv_dim

    @property
    def params(self) -> int:
        return self.qkv_rows * self.d_model + self.d_model * self.d_model

    @property
    def bytes(self) -> int:
        return (self.qkv_rows + self.d_model) * row_bytes(self.d_model)


class DenseBlock:
    """Per-layer resident q4_0 attention-sized matrices, applied as matvecs."""

    def __init__(
        self,
        shape: ModelShape,
        *,
        n_layers: int | None = None,
        seed: int = 0,
        threads: int = 1,
        pool: ThreadPoolExecutor | None = None,
        kernel: Any = None,
    ) -> None:
        """`kernel`: the expert FFN object of `mer.engine.ffn.make_ffn`, whose matvec (native or
        numpy) the block then uses; default the numpy matvec on `threads` / `pool`."""
        self.kernel = kernel
        self.shape = shape
        self.geom = DenseGeometry.of(shape)
        if (
            self.geom.params != shape.dense_params_per_layer
        ):  # pragma: no cover - shapes.py invariant
            raise AssertionError("dense geometry disagrees with ModelShape.dense_params_per_layer")
        self.n_layers = shape.n_layers if n_layers is None else n_layers
        self.threads = max(1, threads)
        self.pool = pool
        rng = np.random.default_rng(seed)
        d = self.geom.d_model
        scale = 1.0 / np.sqrt(d)
        self.qkv = [random_q4_0(rng, self.geom.qkv_rows, d, scale) for _ in range(self.n_layers)]
        self.o = [random_q4_0(rng, d, d, scale) for _ in range(self.n_layers)]

    @property
    def bytes_per_layer(self) -> int:
        return self.geom.bytes

    @property
    def resident_bytes(self) -> int:
        return self.geom.bytes * self.n_layers

    def __call__(self, layer: int, x: F32) -> F32:
        """The dense work of `layer` on hidden vector x; returns the new (normalised) x."""
        i = layer % self.n_layers
        d = self.geom.d_model
        if self.kernel is not None:
            qkv = self.kernel.matvec(self.qkv[i], d, x)
            h = self.kernel.matvec(self.o[i], d, qkv[:d])
        else:
            qkv = q4_matvec(self.qkv[i], d, x, self.threads, self.pool)
            h = q4_matvec(self.o[i], d, qkv[:d], self.threads, self.pool)
        return rmsnorm(x + h)
