"""The Mixtral-family decoder: one token at a time, its experts streamed by the engine.

Per token, per layer (llama.cpp's llama graph, which transformers' Mixtral
computes too):

    h   = rms_norm(x) * attn_norm
    q, k, v = W_q h, W_k h, W_v h           (one matvec when they share a type)
    q, k    = rope(q, pos), rope(k, pos)    adjacent pairs (2i, 2i+1) per head,
              theta_i = pos * scale * base^(-2i / rope_dim) / freq_factor_i
    K[pos], V[pos] = k, v                   (the KV cache, float32)
    a   = softmax(q K^T / sqrt(head_dim)) V   per head; head h reads KV group
                                              h // (n_heads / n_kv_heads)
    x   = x + W_o a
    h   = rms_norm(x) * ffn_norm
    p   = softmax(W_router h); top-k; weights renormalised over the top-k
    x   = x + sum_r w_r FFN_r(h)            (ExpertStreamer: cache, reads, FFNs)

then logits = W_out (rms_norm(x) * output_norm).

The routing is handed to the decision core step by step (a live `Replay`), so
each (token, layer) reaches the cache in the order a trace replay of the same
routing uses. That is also why the prompt is fed one token at a time: a batched
prefill would look experts up layer by layer over all prompt tokens, another
order, and the recorded trace would no longer replay to the same hits.

`Routing` keeps what the trace records: experts and weights in rank order,
optionally the router logits and the lookahead (router L applied to the
hidden state entering router L - 1; for layer 0, router 0 applied to the token
embedding), the same definition `mer record` uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mer.engine.streaming import ExpertStreamer, StepOutcome
from mer.model.gguf_model import MoeModel

F32 = npt.NDArray[np.float32]


def rms_norm(x: F32, weight: F32, eps: float) -> F32:
    ms = np.mean(np.square(x, dtype=np.float32), dtype=np.float32)
    return (x * np.float32(1.0 / np.sqrt(ms + np.float32(eps))) * weight).astype(
        np.float32, copy=False
    )


def softmax(z: F32) -> F32:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)


def route(logits: F32, k: int) -> tuple[npt.NDArray[np.int64], F32]:
    """Top-k experts of the softmax (rank 0 highest) and their weights renormalised to 1."""
    p = softmax(logits)
    idx = np.argsort(-p, kind="stable")[:k]
    w = p[idx]
    return idx, (w / w.sum()).astype(np.float32)


def rope_tables(model: MoeModel) -> F32:
    """Inverse frequencies of the rotated pairs (rope_dim / 2,), scaling and factors applied."""
    cfg = model.config
    i = np.arange(0, cfg.rope_dim, 2, dtype=np.float64)
    inv = cfg.rope_base ** (-i / cfg.rope_dim) / cfg.rope_factor
    if model.rope_freqs is not None:
        inv = inv / model.rope_freqs.astype(np.float64)
    return inv.astype(np.float64)


@dataclass
class Routing:
    """One token's routing, every layer (what one trace token holds)."""

    experts: npt.NDArray[np.int16]  # (L, k)
    weights: F32  # (L, k)
    logits: F32 | None  # (L, E)
    lookahead: npt.NDArray[np.int16] | None  # (L, k)


@dataclass
class TokenCost:
    """Where one token's time went, and what its steps found (summed over layers)."""

    dense_s: float
    outcomes: list[StepOutcome]
    iteration_s: list[float]


class Decoder:
    """Runs `model` one token at a time; the experts go through `streamer`.

    The KV cache is allocated per sequence (`start(max_positions)`); the
    streamer's cache of experts lives across sequences, as a server's would.
    """

    def __init__(
        self,
        model: MoeModel,
        streamer: ExpertStreamer,
        *,
        threads: int = 1,
        pool: Any = None,
        native: bool = False,
        record_logits: bool = False,
        record_lookahead: bool = False,
    ) -> None:
        self.model = model
        self.cfg = model.config
        self.streamer = streamer
        self.threads = threads
        self.pool = pool
        self.native = native  # q4_0 / q8_0 dense weights through the native kernel
        self.record_logits = record_logits
        need_la = streamer.replay.config.predictor == "lookahead"
        self.want_lookahead = record_lookahead or need_la
        self.feed_lookahead = need_la
        self.inv_freq = rope_tables(model)
        self.t = 0  # the next step index of the live replay (token * n_layers + layer)
        self.pos = 0
        self.k_cache: F32 | None = None
        self.v_cache: F32 | None = None
        self.kv_bytes_max = 0

    # ---- sequences -------------------------------------------------------------------
    def start(self, max_positions: int) -> None:
        """A new sequence: an empty KV cache for up to `max_positions` tokens."""
        cfg = self.cfg
        shape = (cfg.n_layers, cfg.n_kv_heads, max_positions, cfg.head_dim)
        self.k_cache = np.empty(shape, dtype=np.float32)
        self.v_cache = np.empty(shape, dtype=np.float32)
        self.kv_bytes_max = max(self.kv_bytes_max, 2 * self.k_cache.nbytes)
        self.pos = 0

    def kv_bytes(self, max_positions: int) -> int:
        cfg = self.cfg
        return 2 * 4 * cfg.n_layers * cfg.n_kv_heads * max_positions * cfg.head_dim

    # ---- pieces ------------------------------------------------------------------------
    def _rope(self, v: F32, n_heads: int, pos: int) -> F32:
        cfg = self.cfg
        ang = pos * self.inv_freq
        cos = np.cos(ang).astype(np.float32)
        sin = np.sin(ang).astype(np.float32)
        h = v.reshape(n_heads, cfg.head_dim)
        rot = h[:, : cfg.rope_dim].reshape(n_heads, -1, 2)
        x0 = rot[:, :, 0].copy()
        x1 = rot[:, :, 1]
        rot[:, :, 0] = x0 * cos - x1 * sin
        rot[:, :, 1] = x0 * sin + x1 * cos
        return v

    def _attention(self, layer: int, q: F32, k: F32, v: F32) -> F32:
        cfg = self.cfg
        assert self.k_cache is not None and self.v_cache is not None
        pos = self.pos
        kc = self.k_cache[layer]
        vc = self.v_cache[layer]
        kc[:, pos] = k.reshape(cfg.n_kv_heads, cfg.head_dim)
        vc[:, pos] = v.reshape(cfg.n_kv_heads, cfg.head_dim)
        group = cfg.n_heads // cfg.n_kv_heads
        qh = q.reshape(cfg.n_kv_heads, group, cfg.head_dim)
        keys = kc[:, : pos + 1]  # (kv, T, hd)
        vals = vc[:, : pos + 1]
        scores = np.matmul(qh, keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(cfg.head_dim))
        probs = softmax(scores)  # (kv, group, T)
        out = np.matmul(probs, vals)  # (kv, group, hd)
        return out.reshape(cfg.q_dim)

    # ---- one token ---------------------------------------------------------------------
    def forward(self, token_id: int) -> tuple[F32, Routing, TokenCost]:
        """Feed one token at the next position; returns its next-token logits and routing."""
        cfg = self.cfg
        model = self.model
        if self.k_cache is None or self.pos >= self.k_cache.shape[2]:
            raise RuntimeError("Decoder.start(max_positions) with room for this token first")
        clock = time.perf_counter
        L, K, E = cfg.n_layers, cfg.top_k, cfg.n_experts
        experts = np.empty((L, K), dtype=np.int16)
        weights = np.empty((L, K), dtype=np.float32)
        logits_rec = np.empty((L, E), dtype=np.float32) if self.record_logits else None
        la_rec = np.empty((L, K), dtype=np.int16) if self.want_lookahead else None
        outcomes: list[StepOutcome] = []
        iters: list[float] = []
        dense = 0.0
        tp = self.threads, self.pool, self.native
        t0 = clock()
        x = model.embedding.row(int(token_id))
        if la_rec is not None:
            la_rec[0] = route(model.layers[0].router @ x, K)[0]
        dense += clock() - t0
        for layer, lw in enumerate(model.layers):
            it0 = clock()
            h = rms_norm(x, lw.attn_norm, cfg.rms_eps)
            if lw.qkv is not None:
                qkv = lw.qkv.matvec(h, *tp)
                q = qkv[: cfg.q_dim]
                k = qkv[cfg.q_dim : cfg.q_dim + cfg.kv_dim]
                v = qkv[cfg.q_dim + cfg.kv_dim :]
            else:
                q, k, v = lw.q.matvec(h, *tp), lw.k.matvec(h, *tp), lw.v.matvec(h, *tp)
            q = self._rope(np.array(q), cfg.n_heads, self.pos)
            k = self._rope(np.array(k), cfg.n_kv_heads, self.pos)
            a = self._attention(layer, q, k, v)
            x = x + lw.o.matvec(a, *tp)
            h = rms_norm(x, lw.ffn_norm, cfg.rms_eps)
            z = lw.router @ h
            idx, w = route(z, K)
            experts[layer] = idx
            weights[layer] = w
            if logits_rec is not None:
                logits_rec[layer] = z
            nxt = None
            if la_rec is not None and layer + 1 < L:
                nxt = route(model.layers[layer + 1].router @ h, K)[0]
                la_rec[layer + 1] = nxt
            dense += clock() - it0
            base = layer * E
            y, outcome = self.streamer.step(
                self.t,
                h,
                w,
                keys=[base + int(e) for e in idx],
                lookahead=[base + E + int(e) for e in nxt]
                if (nxt is not None and self.feed_lookahead)
                else None,
            )
            self.t += 1
            x = x + y
            outcomes.append(outcome)
            iters.append(clock() - it0)
        h0 = clock()
        out = model.output.matvec(rms_norm(x, model.output_norm, cfg.rms_eps), *tp)
        dense += clock() - h0
        self.pos += 1
        return (
            np.asarray(out, dtype=np.float32),
            Routing(experts, weights, logits_rec, la_rec),
            TokenCost(dense, outcomes, iters),
        )
