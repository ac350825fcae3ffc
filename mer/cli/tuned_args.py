"""Options every result command shares for the held-out protocol and steady state.

`--tuned FILE` (from `mer tune`) sets a policy's parameters; every result then
says which traces they were fitted on (`tuned_on`) and whether the trace at
hand is one of them (`held_out`). `--warmup TOKENS` is the window after which
hit rates count as steady state (`warm_*`), beside the cold-cache ones.
"""

from __future__ import annotations

import argparse
from typing import Any

from mer.cli.common import input_file, non_negative_int, note
from mer.errors import BadInput

#: Default warm-up: 32 tokens (at most half the trace).
DEFAULT_WARMUP_TOKENS = 32


def add_warmup_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        metavar="TOKENS",
        help="steady state: warm_* figures count only lookups after the first TOKENS tokens "
        f"(default {DEFAULT_WARMUP_TOKENS}, at most half the trace; 0: the same as cold). "
        "Cold figures always count every lookup from an empty cache",
    )


def add_tuned_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tuned",
        type=input_file,
        action="append",
        default=[],
        metavar="FILE",
        help="a policy's parameters from `mer tune` (repeatable, one file per policy); "
        "results name the traces they were fitted on (tuned_on) and say whether this trace "
        "is held out",
    )


def load_tuned_files(paths: list[Any]) -> dict[str, Any]:
    """policy -> TunedPolicy; one file per policy."""
    from mer.sim.tune import TunedPolicy

    out: dict[str, Any] = {}
    for path in paths or []:
        t = TunedPolicy.load(path)
        if t.policy in out:
            raise BadInput(
                f"--tuned {path}: a second file for policy {t.policy!r}; pass one per policy."
            )
        out[t.policy] = t
    return out


def warmup_tokens(arg: int | None, n_tokens: int) -> int:
    if arg is None:
        return min(DEFAULT_WARMUP_TOKENS, n_tokens // 2)
    if arg >= n_tokens:
        raise BadInput(
            f"--warmup {arg}: the trace (after --phase and --tokens) has {n_tokens} tokens; "
            "choose a window shorter than the trace."
        )
    return arg


def provenance(
    trace: Any, policies: list[str], params: dict[str, dict[str, Any]], tuned: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """policy -> {tuned_on, held_out} for one trace (the whole file's routing)."""
    from mer.sim.tune import held_out, routing_digest, tuned_on_for

    digest = routing_digest(trace)
    out = {}
    for pol in policies:
        refs = tuned_on_for(pol, params.get(pol), tuned.get(pol))
        out[pol] = {
            "tuned_on": ",".join(r.name for r in refs),
            "held_out": held_out(digest, refs),
        }
        if not out[pol]["held_out"]:
            note(
                f"note: {pol}'s parameters were fitted on this trace ({out[pol]['tuned_on']}): "
                "its figures here are in-sample (held_out false); evaluate on another trace, "
                "or tune on others with `mer tune`."
            )
    return out


def held_out_columns(
    df: Any, trace: Any, params: dict[str, dict[str, Any]], tuned: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Add `tuned_on` and `held_out` columns to a frame with a `policy` column."""
    prov = provenance(trace, sorted(set(df["policy"])), params, tuned)
    df["tuned_on"] = df["policy"].map(lambda p: prov[p]["tuned_on"]).astype(str)
    df["held_out"] = df["policy"].map(lambda p: prov[p]["held_out"]).astype(bool)
    return prov


def provenance_lines(prov: dict[str, dict[str, Any]]) -> list[str]:
    tuned = {p: v for p, v in prov.items() if v["tuned_on"]}
    if not tuned:
        return []
    out = ["tuned parameters:"]
    for pol, v in tuned.items():
        state = "held out" if v["held_out"] else "IN-SAMPLE (this trace was used for tuning)"
        out.append(f"  {pol}: fitted on {v['tuned_on']}; this trace: {state}")
    return out
