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
from mer.guard import input_file
from mer.traces.format import Trace, TraceMeta, from_arrays, read_trace
from mer.traces.stats import consecutive_pairs, ranks_look_sorted, repetition_shares
from mer.traces.synth.base import check_size

CALIBRATION_TOKENS = 6000
CALIBRATION_ROUNDS = 5
MAX_REPEAT = 0.995
# Condition a fresh set on the whole previous-layer set when the source has at
# least this many tokens with that set, else on its rank-0 expert only.
MIN_SET_SUPPORT = 5


@dataclass
class FittedModel:
    """What `fit` learns: the source sets, per-layer repeat and keep-order rates."""

    experts: np.ndarray  # (T, L, k) source sets, replay order
    repeat: np.ndarray  # (L,) r_l > 0: copy probability; r_l < 0: -r_l = avoid probability
    keep_order: np.ndarray  # (L,) s_l: probability a copy keeps its rank order
    unordered: bool  # source ranks carry no order
    target_first: np.ndarray
    target_overlap: np.ndarray
    n_experts: int

    def sample(self, n_tokens: int, seed: int) -> np.ndarray:
        """int64 (n_tokens, L, k) of generated sets."""
        out, _, _ = _simulate(self, n_tokens, np.random.default_rng(seed))
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


def _overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise: do the top-k sets a[i] and b[i] share an expert?"""
    return np.asarray((a[:, :, None] == b[:, None, :]).any(axis=(1, 2)))


def _set_groups(src_layer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group source tokens by their unordered set at one layer (CSR form).

    Returns (set id per source token, token indices ordered by set id, starts, counts).
    """
    _, inverse = np.unique(np.sort(src_layer, axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return inverse, order, starts, counts


def _simulate(
    model: FittedModel, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate n tokens; also return the per-layer chance rates (q, q1) for calibration.

    q[l] / q1[l]: among non-copy tokens, the share whose first fresh draw
    overlaps / has the same rank-0 as the previous token's final set.
    """
    src = model.experts
    t_src, n_layers, k = src.shape
    out = np.empty((n, n_layers, k), dtype=np.int64)
    chance = np.zeros((2, n_layers))
    idx = np.arange(n)
    # One uniform per token shared by all layers decides the copies: a token
    # that repeats its predecessor at layer l tends to repeat it at l+1 too,
    # which keeps (layer l, layer l+1) pairs intact.
    u_copy = rng.random(n)
    used = np.zeros(n, dtype=np.int64)  # source token whose set each token used, previous layer

    def draw(ly: int) -> np.ndarray:
        """Source token indices for fresh sets at layer ly."""
        if ly == 0:
            return rng.integers(t_src, size=n)
        u = rng.random(n)
        set_id, order, starts, counts = _set_groups(src[:, ly - 1, :])
        g = set_id[used]
        pick = order[starts[g] + (u * counts[g]).astype(np.int64)]
        sparse = counts[g] < MIN_SET_SUPPORT
        if sparse.any():
            members, mstarts, mcounts = _member_index(src[:, ly - 1, :], model.n_experts)
            a = out[sparse, ly - 1, 0]
            pick[sparse] = members[mstarts[a] + (u[sparse] * mcounts[a]).astype(np.int64)]
        return pick

    for ly in range(n_layers):
        pick = draw(ly)
        r = float(model.repeat[ly])
        copy = u_copy < max(r, 0.0)
        copy[0] = False
        avoid = ~copy & (rng.random(n) < max(-r, 0.0))
        avoid[0] = False
        rotate = np.zeros(n, dtype=bool)
        if k > 1 and not model.unordered:
            rotate = copy & (rng.random(n) >= model.keep_order[ly])
        run_start = np.maximum.accumulate(np.where(copy, 0, idx))
        cum = np.cumsum(rotate)
        cols = (np.arange(k)[None, :] + ((cum - cum[run_start]) % k)[:, None]) % k

        def fill(
            pk: np.ndarray, ly: int = ly, run_start: np.ndarray = run_start, cols: np.ndarray = cols
        ) -> tuple[np.ndarray, np.ndarray]:
            # A copy repeats the last fresh set of its run, rotated once per
            # order-changing copy since the run started.
            run_pick = pk[run_start]
            return np.take_along_axis(src[run_pick, ly, :].astype(np.int64), cols, axis=1), run_pick

        fresh = src[pick, ly, :].astype(np.int64)
        layer_out, run_pick = fill(pick)
        own = ~copy
        own[0] = False
        hit = np.zeros(n, dtype=bool)
        hit[1:] = _overlaps(fresh[1:], layer_out[:-1])
        same1 = np.zeros(n, dtype=bool)
        same1[1:] = fresh[1:, 0] == layer_out[:-1, 0]
        n_own = max(int(own.sum()), 1)
        chance[0, ly] = (hit & own).sum() / n_own
        chance[1, ly] = (same1 & own).sum() / n_own
        if avoid.any():
            # Anti-repetition (source overlaps less than chance): redraw once
            # when the first draw overlaps the previous token. One pass; the
            # calibration absorbs the small cascade it ignores.
            redo = avoid & hit
            pick = np.where(redo, draw(ly), pick)
            layer_out, run_pick = fill(pick)
        out[:, ly, :] = layer_out
        used = run_pick
    if model.unordered:
        out.sort(axis=2)
    return out, chance[0], chance[1]


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
        _, q, q1 = _simulate(model, CALIBRATION_TOKENS, np.random.default_rng(rng_seed))
        q = np.clip(q, 1e-9, 1 - 1e-9)
        # overlap = r + (1 - r) q when copying; q (1 - a (1 - q)) when avoiding.
        r = np.where(
            t_overlap >= q,
            (t_overlap - q) / (1 - q),
            -np.clip((1 - t_overlap / q) / (1 - q), 0.0, 1.0),
        )
        model.repeat = np.clip(r, -1.0, MAX_REPEAT)
        if k > 1 and not unordered:
            rp = np.maximum(model.repeat, 0.0)
            s = np.where(rp > 0, (t_first - (1 - rp) * q1) / np.maximum(rp, 1e-9), 1.0)
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
        if not 0 <= seed < 2**63:
            raise BadInput(f"--seed must be from 0 to 2**63-1, got {seed}.")
        check_size(tokens, source.n_layers, source.top_k)
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
            type=input_file,
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
