"""`fitted --from TRACE`: traces of any length that look like a real one.

Real traces are short (the bundled one has 773 decode tokens); cache and
simulator studies need longer ones with the same statistics. The model learns
three things from the source and reproduces them (tolerances measured and
stated in docs/trace-statistics.md):

1. inter-layer structure and popularity: a token's *fresh* top-k set at layer l
   is the layer-l set of a source token chosen uniformly among those whose
   layer-(l-1) set contains this token's rank-0 expert at l-1 (at layer 0, of a
   uniformly chosen source token). This is an empirical (bootstrap) Markov
   chain across layers: sampling "a source token that used a at l-1" and
   taking its layer-l set reproduces row a of the all-pairs transition matrix
   exactly, and keeps the source's within-set pairs and rank order.
2. temporal repetition: with probability r_l the token instead copies the
   previous token's set at layer l (the whole set); with probability 1 - s_l
   such a copy rotates its rank order by one (so the first choice changes
   while the set is kept).
3. r_l and s_l are calibrated by simulation so that the first-or-second
   (top-k overlap) and first-choice repetition shares match the source per
   layer: a fresh set also overlaps the previous one by chance, at a rate q
   measured on the fresh tokens of a calibration run, and
   overlap = r + (1 - r) q,  first = r s + (1 - r) q1. A few fixed-point rounds
   settle it, because the chance rates depend on the copies at layer l-1.

When the source recorded sets rather than ranks (no weights and every row
ascending, e.g. mixtral-offloading), copies never rotate and the generated rows
are sorted too, so the output is unordered in the same way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mer.errors import BadInput
from traces.format import Trace, TraceMeta, from_arrays, read_trace
from traces.stats import consecutive_pairs, ranks_look_sorted, repetition_shares

CALIBRATION_TOKENS = 6000
CALIBRATION_ROUNDS = 5
MAX_REPEAT = 0.995


@dataclass
class FittedModel:
    """What `fit` learns: the source sets, per-layer repeat and keep-order rates."""

    experts: np.ndarray  # (T, L, k) source sets, replay order
    repeat: np.ndarray  # (L,) r_l: probability of copying the previous token's set
    keep_order: np.ndarray  # (L,) s_l: probability a copy keeps its rank order
    unordered: bool  # source ranks carry no order
    target_first: np.ndarray
    target_overlap: np.ndarray
    n_experts: int

    def sample(self, n_tokens: int, seed: int) -> np.ndarray:
        """int64 (n_tokens, L, k) of generated sets."""
        out, _ = _simulate(self, n_tokens, np.random.default_rng(seed))
        return out


def _member_index(
    src_layer: np.ndarray, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each expert a: the source token indices whose set contains a (CSR form)."""
    t, k = src_layer.shape
    tok = np.repeat(np.arange(t), k)
    exp = src_layer.reshape(-1).astype(np.int64)
    order = np.argsort(exp, kind="stable")
    counts = np.bincount(exp, minlength=n_experts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return tok[order], starts, counts


def _simulate(
    model: FittedModel, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Generate n tokens; also return the copy mask (n, L) for calibration."""
    src = model.experts
    t_src, n_layers, k = src.shape
    out = np.empty((n, n_layers, k), dtype=np.int64)
    copied = np.zeros((n, n_layers), dtype=bool)
    idx = np.arange(n)
    for ly in range(n_layers):
        if ly == 0:
            pick = rng.integers(t_src, size=n)
        else:
            members, starts, counts = _member_index(src[:, ly - 1, :], model.n_experts)
            a = out[:, ly - 1, 0]
            if (counts[a] == 0).any():  # cannot happen: generated sets are source sets
                raise AssertionError("fitted model reached an expert unseen at the previous layer")
            pick = members[starts[a] + (rng.random(n) * counts[a]).astype(np.int64)]
        fresh = src[pick, ly, :].astype(np.int64)
        copy = rng.random(n) < model.repeat[ly]
        copy[0] = False
        copied[:, ly] = copy
        # A copy repeats the last fresh set of its run, rotated once per
        # order-changing copy since the run started.
        run_start = np.maximum.accumulate(np.where(copy, 0, idx))
        if k > 1 and not model.unordered:
            rotate = copy & (rng.random(n) >= model.keep_order[ly])
            cum = np.cumsum(rotate)
            shift = (cum - cum[run_start]) % k
            cols = (np.arange(k)[None, :] + shift[:, None]) % k
            out[:, ly, :] = np.take_along_axis(fresh[run_start], cols, axis=1)
        else:
            out[:, ly, :] = fresh[run_start]
    if model.unordered:
        out.sort(axis=2)
    return out, copied


def fit(trace: Trace, *, calibration_seed: int = 0) -> FittedModel:
    """Learn the model from a trace (all its tokens; select a phase first if needed)."""
    e = trace.experts.astype(np.int64)
    seq = trace.token_table()["seq"].to_numpy()
    if not consecutive_pairs(seq).any():
        raise BadInput(
            f"{trace.name}: no two consecutive tokens in one sequence; the fitted generator "
            "needs at least one to learn temporal repetition."
        )
    rep = repetition_shares(e, seq)
    t_first, t_overlap = rep["first"], rep["first_or_second"]
    n_layers, k = e.shape[1], e.shape[2]
    unordered = ranks_look_sorted(e, trace.weights())
    model = FittedModel(
        experts=e,
        repeat=np.zeros(n_layers),
        keep_order=np.ones(n_layers),
        unordered=unordered,
        target_first=t_first,
        target_overlap=t_overlap,
        n_experts=trace.n_experts,
    )
    rng_seed = np.random.SeedSequence(calibration_seed)
    for _ in range(CALIBRATION_ROUNDS):
        out, copied = _simulate(model, CALIBRATION_TOKENS, np.random.default_rng(rng_seed))
        fresh = ~copied[1:]
        prev, cur = out[:-1], out[1:]
        over = (cur[:, :, :, None] == prev[:, :, None, :]).any(axis=(2, 3))
        same1 = cur[:, :, 0] == prev[:, :, 0]
        nf = np.maximum(fresh.sum(axis=0), 1)
        q = (over & fresh).sum(axis=0) / nf
        q1 = (same1 & fresh).sum(axis=0) / nf
        r = np.clip((t_overlap - q) / np.maximum(1 - q, 1e-9), 0.0, MAX_REPEAT)
        model.repeat = r
        if k > 1 and not unordered:
            s = np.where(r > 0, (t_first - (1 - r) * q1) / np.maximum(r, 1e-9), 1.0)
            model.keep_order = np.clip(s, 0.0, 1.0)
    return model


class Fitted:
    """Generate traces of any length whose statistics match a real trace."""

    name: ClassVar[str] = "fitted"
    help: ClassVar[str] = (
        "learn popularity, repetition and inter-layer transitions from --from TRACE and "
        "generate --tokens N"
    )

    def __init__(
        self,
        source: Trace,
        tokens: int,
        seed: int,
        phase: str = "all",
        source_path: str | None = None,
    ) -> None:
        if tokens < 2:
            raise BadInput(f"--tokens must be >= 2, got {tokens}.")
        self.source = source.select_phase(phase)
        self.tokens = tokens
        self.seed = seed
        self.phase = phase
        self.source_path = source_path or source.name
        self.model = fit(self.source)

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--from",
            dest="source",
            type=Path,
            required=True,
            metavar="TRACE",
            help="real trace to learn from (.parquet)",
        )
        p.add_argument(
            "--tokens", type=int, default=20_000, help="tokens to generate (default 20000)"
        )
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument(
            "--phase",
            choices=("prefill", "decode", "all"),
            default="all",
            help="learn from these tokens of the source only (default all)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Fitted:
        path: Path = args.source
        if not path.exists():
            raise BadInput(f"--from {path}: no such file.")
        return cls(read_trace(path), args.tokens, args.seed, args.phase, str(path))

    def parameters(self) -> dict[str, Any]:
        return {
            "from": self.source_path,
            "source_model": self.source.meta.model,
            "source_tokens": self.source.n_tokens,
            "phase": self.phase,
            "tokens": self.tokens,
            "seed": self.seed,
        }

    def generate(self) -> Trace:
        m = self.model
        src = self.source.meta
        meta = TraceMeta(
            model=src.model,
            n_layers=src.n_layers,
            n_experts=src.n_experts,
            top_k=src.top_k,
            source={"generator": self.name, **self.parameters()},
            extra={
                "fitted_repeat": [round(float(x), 6) for x in m.repeat],
                "fitted_keep_order": [round(float(x), 6) for x in m.keep_order],
                "ranks_unordered": m.unordered,
                **({k: v for k, v in src.extra.items() if k == "experts_per_layer"}),
            },
        )
        return from_arrays(m.sample(self.tokens, self.seed), meta, name=self.name)
