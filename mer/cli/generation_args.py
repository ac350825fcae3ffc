"""The options `mer record` and `mer generate` share: how tokens are chosen, what a trace holds.

One definition so that both commands accept the same values with the same
messages, and a trace recorded by either is described by the same flags.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mer.cli.values import float_range, int_range, seed_int

if TYPE_CHECKING:
    from mer.traces.record.generate import GenerationSettings

MAX_NEW_TOKENS = 1 << 20


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --sample, --seed, --temperature, --ignore-eos."""
    p.add_argument(
        "--max-new-tokens",
        type=int_range(0, MAX_NEW_TOKENS, "an integer from 0 to 1,048,576"),
        default=32,
        help="decode tokens per prompt (default 32; fewer if the model ends early)",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--seed", type=seed_int, default=0, help="sampling seed (prompt i uses seed + i)"
    )
    p.add_argument(
        "--temperature",
        type=float_range(0.0, 100.0, lo_open=True, what="a temperature > 0 and <= 100"),
        default=1.0,
        help="sampling temperature (with --sample)",
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens"
    )


def add_trace_content_args(p: argparse.ArgumentParser, with_o: bool = False) -> None:
    """--logits, --lookahead, --keep-parts (`with_o`: the trace is optional, say they need -o)."""
    pre = "with -o: " if with_o else ""
    p.add_argument("--logits", action="store_true", help=f"{pre}also store full router logits")
    p.add_argument(
        "--lookahead",
        action="store_true",
        help=f"{pre}also store the next layer's router applied to the current hidden state",
    )
    p.add_argument(
        "--keep-parts", action="store_true", help="keep OUT.parts/ (per-prompt files) at the end"
    )


def generation_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The settings of `add_generation_args` (what changes the tokens generated)."""
    from mer.traces.record.generate import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
    )
