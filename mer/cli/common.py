"""Shared CLI plumbing: --json / -o handling and common options.

Paths and values: use the types of `mer.guard` (input_file, input_path,
output_file, output_dir; FinalWrites for writes after the work) and of
`mer.cli.values` (positive_int, probability, int_range, ...), re-exported
here, so that every bad path or value is one message and exit 2 before the
work starts. See those modules' docstrings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mer.cli.values import (  # noqa: F401  (re-exported for command modules)
    finite_float,
    float_range,
    int_list,
    int_range,
    name_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed_int,
    slot_count,
)
from mer.errors import BadInput
from mer.guard import (  # noqa: F401  (re-exported for command modules)
    FinalWrites,
    check_input,
    input_file,
    input_path,
    output_dir,
    output_file,
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already says its default
    or there is none worth saying (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


def add_output_args(p: argparse.ArgumentParser, *, parquet: bool = True) -> None:
    p.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of text"
    )
    if parquet:
        p.add_argument(
            "-o",
            "--output",
            type=output_file,
            default=None,
            help="write the detailed result to this file (parquet)",
        )


def add_trace_and_experts(p: argparse.ArgumentParser, experts_help: str) -> None:
    """The trace positional and a required --experts file: what every real run reads."""
    p.add_argument("trace", type=input_file, help="trace parquet (trace format v1)")
    p.add_argument("--experts", type=input_path, required=True, help=experts_help)


def add_phase_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--phase",
        choices=("prefill", "decode", "all"),
        default="all",
        help="replay only prompt tokens, only generated tokens, or all (default: all)",
    )


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def to_json(obj: Any) -> str:
    return json.dumps(obj, default=_default, sort_keys=False)


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    """Print `obj` as one JSON object with --json, else the human text."""
    if getattr(args, "json", False):
        print(to_json(obj))
    else:
        print(text)


def note(msg: str) -> None:
    """Progress and notices go to stderr so that --json stdout stays parseable."""
    print(msg, file=sys.stderr)


def str_list(text: str) -> list[str]:
    """'lru,arc' -> ['lru', 'arc']; at least one name (an empty list runs nothing)."""
    return name_list(text)


def resolve_names(kind: str, names: list[str]) -> list[str]:
    """Load policy or predictor names now (a plugin's `module:Class` included), so that a
    bad one is one clear error before any work starts and worker processes find it."""
    from mer.core import policy_class, predictor_class

    load = policy_class if kind == "policy" else predictor_class
    for name in names:
        load(name)
    return names


def require_file(path: Path, what: str) -> Path:
    """A readable regular file (mer.guard.check_input), else BadInput naming `what`."""
    return check_input(path, what)


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip() or not key.replace("-", "_").isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a name as KEY, got {text!r}")
    parsed: Any = value
    for conv in (int, float):
        try:
            parsed = conv(value)
            break
        except ValueError:
            continue
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise argparse.ArgumentTypeError(f"expected a finite value, got {text!r}")
    if value.lower() in ("true", "false"):
        parsed = value.lower() == "true"
    return key.replace("-", "_"), parsed


def add_replay_args(p: argparse.ArgumentParser, *, sweep: bool = False, live: bool = False) -> None:
    """The options that decide hits and prefetches, shared by simulate, sweep and run.

    `live` (mer generate): no --pin, --tokens, --phase, which need a whole trace.
    """
    from mer.core import policy_names, predictor_names

    if not sweep:
        p.add_argument(
            "--policy",
            default="lru",
            help=f"eviction policy: {', '.join(policy_names())}, or your own class as "
            "package.module:ClassName (default: lru)",
        )
        g = p.add_mutually_exclusive_group()
        g.add_argument(
            "--cache-slots",
            type=slot_count,
            default=None,
            help="total expert slots (any scope; default 64)",
        )
        g.add_argument(
            "--cache-gib",
            type=positive_float,
            default=None,
            help="cache size in GiB, converted through the shape's bytes per expert",
        )
        p.add_argument(
            "--scope",
            choices=("global", "per-layer"),
            default="global",
            help="one cache over all layers, or the same total split evenly per layer",
        )
        p.add_argument(
            "--predictor",
            default="none",
            help=f"prefetch predictor: {', '.join(predictor_names())}, or your own class as "
            "package.module:ClassName (default: none)",
        )
    p.add_argument(
        "--pipeline-depth",
        type=int_range(0, 1024),
        default=1,
        help="prefetch for the next N layers (default 1)",
    )
    p.add_argument(
        "--prefetch-top-n",
        type=positive_int,
        default=None,
        help="prefetch at most N predicted experts per future layer (default top_k)",
    )
    p.add_argument(
        "--prefetch-min-prob",
        type=probability,
        default=0.0,
        help="only prefetch predictions with probability >= P (default 0)",
    )
    p.add_argument(
        "--prefetch-inflight",
        type=positive_int,
        default=8,
        help="at most N prefetches outstanding: aimed at a step still ahead and not yet "
        "looked up (default 8; decided from the trace, never from when reads land)",
    )
    p.add_argument(
        "--prefetch-slots",
        type=non_negative_int,
        default=0,
        help="speculative budget: at most N prefetched, not yet used experts per cache "
        "partition; a prefetch beyond it replaces the oldest landed guess instead of "
        "evicting the policy's victim, so wrong guesses cannot push out likely hits "
        "(default 0: no budget)",
    )
    p.add_argument(
        "--prefetch-lead",
        type=_lead,
        default=1,
        metavar="N|auto",
        help="prefetch only for layers at least N steps ahead, so that reads can land in "
        "time; auto (simulate and sweep): read time / step compute time from the hardware "
        "profile (default 1: from the next layer on)",
    )
    p.add_argument(
        "--prefetch-reclaim",
        action="store_true",
        help="a prefetched expert whose step came and went without it is proven wrong: "
        "once landed it is the first victim of the next read, giving back the slot it took",
    )
    p.add_argument(
        "--prefetch-cancel",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="a prefetched expert whose layer was routed without it (the router has proven "
        "it useless), read from at most N steps before, is dropped at that step, landed or "
        "not: its slot goes to the step's misses and what is still queued of its read is "
        "never read; older guesses have landed and stay (default 0: never drop; about read "
        "time / step time, 1024: always)",
    )
    p.add_argument(
        "--prefetch-hold",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="a prefetch counts against --prefetch-inflight for at most N steps after it "
        "was issued (about read time / step time: the steps its read takes), so the next "
        "guess starts when the read would have landed rather than when its layer comes; a "
        "count of steps, never a clock, so the simulator and the engine issue the same "
        "reads (default 0: until its layer is looked up)",
    )
    p.add_argument(
        "--prefetch-window",
        type=non_negative_int,
        default=0,
        metavar="W",
        help="read the most probable guess among those for the W nearest layers from "
        "--prefetch-lead on first, then the farther ones nearest first: a guess for those "
        "layers must start now or never, since by the next free place in flight they are "
        "nearer than the lead (about --prefetch-hold or the lead; default 0: nearest first)",
    )
    if not live:
        p.add_argument(
            "--pin",
            type=non_negative_int,
            default=0,
            help="statically pin the N most popular experts of the trace (offline knowledge; default 0)",
        )
    p.add_argument(
        "--policy-param",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy parameter, repeatable (e.g. decay=0.9)",
    )
    p.add_argument(
        "--predictor-param",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="predictor parameter, repeatable",
    )
    if not live:
        p.add_argument(
            "--tokens",
            type=positive_int,
            default=None,
            help="replay only the first N tokens (after --phase; default all)",
        )
        add_phase_arg(p)
    p.add_argument(
        "--granularity",
        choices=("step", "lookup"),
        default="step",
        help="step: a layer's top-k are looked up together and never evict each other (mer's "
        "step semantics, default); lookup: every lookup is its own step, request by request "
        "as in libCacheSim and most papers (the timing still runs a layer's FFNs together)",
    )


def _lead(text: str) -> int:
    """--prefetch-lead: an integer >= 1, or auto (0, resolved from a hardware profile)."""
    if text.strip().lower() == "auto":
        return 0
    return int_range(1, 1024)(text)


def replay_config_from_args(
    args: argparse.Namespace, bytes_per_expert: int | None = None, **overrides: Any
) -> Any:
    """ReplayConfig from add_replay_args options (--cache-gib needs bytes_per_expert)."""
    from mer.core import ReplayConfig
    from mer.validate import MAX_COUNT

    slots = getattr(args, "cache_slots", None)
    if isinstance(slots, list):  # a sweep's grid axis: the base config is checked per size
        slots = max(slots)
    gib = getattr(args, "cache_gib", None)
    if gib is not None:
        if not bytes_per_expert:
            raise BadInput(
                "--cache-gib needs a model shape (--shape) to convert GiB to expert slots."
            )
        slots = int(gib * (1 << 30) // bytes_per_expert)
        if slots > MAX_COUNT:
            raise BadInput(f"--cache-gib {gib} is more memory than any machine has.")
        if slots < 1:
            raise BadInput(
                f"--cache-gib {gib} holds no expert of {bytes_per_expert:,} bytes; give more memory."
            )
    resolve_names("policy", [getattr(args, "policy", "lru")])
    resolve_names("predictor", [getattr(args, "predictor", "none")])
    values: dict[str, Any] = dict(
        policy=getattr(args, "policy", "lru"),
        cache_slots=slots if slots is not None else 64,
        scope=getattr(args, "scope", "global"),
        predictor=getattr(args, "predictor", "none"),
        pipeline_depth=args.pipeline_depth,
        prefetch_top_n=args.prefetch_top_n,
        prefetch_min_prob=args.prefetch_min_prob,
        prefetch_inflight=args.prefetch_inflight,
        prefetch_slots=getattr(args, "prefetch_slots", 0),
        prefetch_reclaim=bool(getattr(args, "prefetch_reclaim", False)),
        prefetch_cancel=getattr(args, "prefetch_cancel", 0),
        prefetch_hold=getattr(args, "prefetch_hold", 0),
        prefetch_window=getattr(args, "prefetch_window", 0),
        prefetch_lead=getattr(args, "prefetch_lead", 1),
        pin=getattr(args, "pin", 0),
        phase=getattr(args, "phase", "all"),
        tokens=getattr(args, "tokens", None),
        policy_params=dict(args.policy_param),
        predictor_params=dict(args.predictor_param),
        granularity=getattr(args, "granularity", "step"),
    )
    values.update(overrides)
    if values["prefetch_lead"] == 0 and not hasattr(args, "hardware"):
        # mer run / mer generate: no hardware profile to read the times from
        raise BadInput(
            "--prefetch-lead auto reads the read and step times from a hardware profile: "
            "use it with mer simulate or mer sweep, and pass their resolved lead "
            "(summary extra.auto_prefetch_lead) here as a number."
        )
    return ReplayConfig(**values).validate()
