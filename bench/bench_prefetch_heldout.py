"""Prefetch that pays, held out: the rule chosen without the trace it is shown on.

    .venv/bin/python bench/bench_prefetch_heldout.py A.parquet B.parquet [C.parquet ...] \\
        [--select loo|single] [--policy cycle] [--cache-slots 128] [--hardware nvme-desktop]
        [--rotations all|first] [--json]

Every rule of the grid below runs in `mer simulate` on each trace (decode phase, global
scope), scored by its simulated tokens/s gain over the same policy without prefetch.
`--select loo` (the default with three traces or more): each trace in turn is held out
and the rule is chosen on all the others, as the one whose smallest gain there is the
largest (ties: the larger mean); it is then shown, unchanged, on the held-out trace.
`--select single`: the rule is chosen on one trace alone and shown on every other. The
table prints the chosen rule, its gain on the held-out trace (the held-out figure) and,
beside it, its gains where it was chosen (in sample), to show how much of it is selection.

The grid: the cooccur predictor's weight of the token's routed layers (beta 0.3, 0.4;
beta_prev 0.1, near 0.3 fixed), the calibrated probability threshold (0.35, 0.45,
0.55), guesses per layer (1, 2), the lead in steps (3, 4), the window read most probable
first (0: nearest layer first; 2 or 3: among the layers lead .. lead + W - 1, the most
probable guess first), one prefetch read in flight held for at most 4 steps (about read
time / step time on nvme-desktop), depth 12: 72 rules (`--grid hold` is the earlier grid
without the window: hold 0 or 4, depth 12 or 16, 96 rules; `--grid window-lead3` only
min prob 0.45 and lead 3, which every rotation of that earlier grid chose: 12 rules); then, on the best of those, each
of: a speculative-slot budget of 8, reclaim of proven-wrong guesses, cancellation of
those read from at most 3 steps before (`--prefetch-cancel 3`), and cancellation with
the budget (tried on top of the best, kept if better where the rule is chosen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "predictor": "cooccur",
    "prefetch_inflight": 1,
}
GRIDS = {
    "window": {
        "beta": (0.3, 0.4),
        "prefetch_min_prob": (0.35, 0.45, 0.55),
        "prefetch_top_n": (1, 2),
        "prefetch_lead": (3, 4),
        "prefetch_hold": (4,),
        "pipeline_depth": (12,),
        "prefetch_window": (0, 2, 3),
    },
    "window-lead3": {  # the window grid at the earlier grid's choice of min prob and lead
        "beta": (0.3, 0.4),
        "prefetch_min_prob": (0.45,),
        "prefetch_top_n": (1, 2),
        "prefetch_lead": (3,),
        "prefetch_hold": (4,),
        "pipeline_depth": (12,),
        "prefetch_window": (0, 2, 3),
    },
    "hold": {
        "beta": (0.3, 0.4),
        "prefetch_min_prob": (0.35, 0.45, 0.55),
        "prefetch_top_n": (1, 2),
        "prefetch_lead": (3, 4),
        "prefetch_hold": (0, 4),
        "pipeline_depth": (12, 16),
        "prefetch_window": (0,),
    },
}
EXTRAS: tuple[dict[str, Any], ...] = (
    {"prefetch_slots": 8},
    {"prefetch_reclaim": True},
    {"prefetch_cancel": 3},
    {"prefetch_cancel": 3, "prefetch_slots": 8},
)


def rule_of(
    beta: float, min_prob: float, top_n: int, lead: int, hold: int, depth: int, window: int = 0
) -> dict[str, Any]:
    extra = {"prefetch_window": window} if window else {}
    return {
        **extra,
        **BASE,
        "pipeline_depth": depth,
        "predictor_params": {"beta": beta, "beta_prev": 0.1, "near": 0.3},
        "prefetch_min_prob": min_prob,
        "prefetch_top_n": top_n,
        "prefetch_lead": lead,
        "prefetch_hold": hold,
    }


def label(rule: dict[str, Any]) -> str:
    p = rule["predictor_params"]
    s = (
        f"beta {p['beta']}, min prob {rule['prefetch_min_prob']}, top {rule['prefetch_top_n']}, "
        f"lead {rule['prefetch_lead']}, depth {rule['pipeline_depth']}"
    )
    if rule.get("prefetch_hold"):
        s += f", hold {rule['prefetch_hold']}"
    if rule.get("prefetch_window"):
        s += f", window {rule['prefetch_window']}"
    if rule.get("prefetch_slots"):
        s += f", slots {rule['prefetch_slots']}"
    if rule.get("prefetch_reclaim"):
        s += ", reclaim"
    if rule.get("prefetch_cancel"):
        s += f", cancel {rule['prefetch_cancel']}"
    return s


#: What the simulations share (set by main before any worker is forked).
_STATE: dict[str, Any] = {}


def _summary(name: str, rule: dict[str, Any] | None) -> Any:
    from mer.core import ReplayConfig
    from mer.sim.model import simulate

    cfg = ReplayConfig(
        policy=_STATE["policy"], cache_slots=_STATE["slots"], phase="decode", **(rule or {})
    ).validate()
    return simulate(_STATE["traces"][name], cfg, _STATE["hw"]).summary


def _tokens_per_s(name: str, rule: dict[str, Any] | None) -> float:
    return float(_summary(name, rule).tokens_per_s)


def _gain(name: str, rule: dict[str, Any], base_tps: float) -> dict[str, Any]:
    s = _summary(name, rule)
    pf = s.prefetch
    return {
        "gain": s.tokens_per_s / base_tps - 1,
        "hit_rate": s.hit_rate,
        "precision": pf["precision"],
        "recall": pf["recall"],
        "issued": pf["issued"],
        "cancelled": pf["cancelled"],
    }


def main(argv: list[str] | None = None) -> int:
    from mer.sim.hardware import load_profile
    from mer.traces.format import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument(
        "--select",
        choices=("loo", "single"),
        default=None,
        help="loo: choose on every trace but the held-out one (default with 3+ traces); "
        "single: choose on one trace, show on the others (default with 2)",
    )
    ap.add_argument("--policy", default="cycle")
    ap.add_argument("--cache-slots", type=int, default=128)
    ap.add_argument("--hardware", default="nvme-desktop")
    ap.add_argument("--rotations", choices=("all", "first"), default="all")
    ap.add_argument(
        "--grid",
        choices=tuple(GRIDS),
        default="window",
        help="window (default): the window read most probable first, 0, 2 or 3, with the "
        "hold of 4 and depth 12 (72 rules); window-lead3: the same at min prob 0.45 and lead "
        "3 only, what every rotation of the hold grid chose (12 rules); hold: the earlier "
        "grid, hold 0 or 4, depth 12 or 16, nearest first (96 rules)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="simulate the grid in this many processes (default 1)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if len(args.traces) < 2:
        ap.error("give at least two traces: one to choose the rule on, one to show it on")
    hw = load_profile(args.hardware)
    traces = {p.name: read_trace(p) for p in args.traces}
    t0 = time.perf_counter()
    base_tps: dict[str, float] = {}
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    _STATE.update(traces=traces, hw=hw, policy=args.policy, slots=args.cache_slots)
    base_tps.update({n: _tokens_per_s(n, None) for n in traces})

    def gain(name: str, rule: dict[str, Any]) -> dict[str, Any]:
        key = (name, json.dumps(rule, sort_keys=True))
        if key not in cache:
            cache[key] = _gain(name, rule, base_tps[name])
        return cache[key]

    names = list(traces)
    select = args.select or ("loo" if len(names) >= 3 else "single")
    if select == "loo" and len(names) < 3:
        ap.error("--select loo needs three traces or more: one held out, two to choose on")
    rotate = names if args.rotations == "all" else names[:1]
    # loo: rotation r holds trace r out and chooses on the others; single: chooses on r
    rotations = [[n for n in names if n != r] if select == "loo" else [r] for r in rotate]

    grid = [rule_of(*values) for values in itertools.product(*GRIDS[args.grid].values())]
    if args.processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            todo = [(n, rule) for rule in grid for n in names]
            jobs = [(n, rule, base_tps[n]) for n, rule in todo]
            for (n, rule), out in zip(todo, pool.starmap(_gain, jobs), strict=True):
                cache[(n, json.dumps(rule, sort_keys=True))] = out

    def score(rule: dict[str, Any], on: list[str]) -> tuple[float, float]:
        gains = [gain(n, rule)["gain"] for n in on]
        return min(gains), sum(gains) / len(gains)

    rows = []
    for chosen_on in rotations:
        best: dict[str, Any] | None = None
        best_score = (float("-inf"), float("-inf"))
        for rule in grid:
            sc = score(rule, chosen_on)
            if sc > best_score:
                best, best_score = rule, sc
        assert best is not None
        for extra in EXTRAS:
            rule = {**best, **extra}
            sc = score(rule, chosen_on)
            if sc > best_score:
                best, best_score = rule, sc
        on = ", ".join(chosen_on)
        print(
            f"  chosen on {on}: {label(best)} (smallest gain there {100 * best_score[0]:+.2f}%)",
            file=sys.stderr,
        )
        for name in names:
            g = gain(name, best)
            rows.append(
                {
                    "chosen_on": chosen_on,
                    "trace": name,
                    "held_out": name not in chosen_on,
                    "rule": best,
                    **g,
                }
            )
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"select": select, "rows": rows, "seconds": seconds}, indent=1))
        return 0
    print(
        f"\n{args.hardware}, {args.cache_slots} slots, {args.policy}, global, decode; "
        "cooccur (beta_prev 0.1, near 0.3), 1 in flight; "
        f"{'leave-one-out' if select == 'loo' else 'chosen on one trace'}\n"
    )
    print(
        "| chosen on | rule | shown on | held out | gain | hit rate | precision | recall | "
        "prefetches issued |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {', '.join(r['chosen_on'])} | {label(r['rule'])} | {r['trace']} | "
            f"{'yes' if r['held_out'] else 'no (in sample)'} | {100 * r['gain']:+.2f}% | "
            f"{100 * r['hit_rate']:.1f}% | {100 * r['precision']:.1f}% | "
            f"{100 * r['recall']:.1f}% | {r['issued']:,} |"
        )
    held = [r["gain"] for r in rows if r["held_out"]]
    if held:
        print(
            f"\nheld out: {100 * min(held):+.2f}% to {100 * max(held):+.2f}% over "
            f"{len(held)} (rule, trace) pairs ({seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
