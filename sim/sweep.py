"""Sweeps: one simulation per point of a grid, in parallel, resumable, with a winner.

Each configuration is a flat dict (policy, cache_slots, scope, predictor,
hardware, mode, shape and the shared replay options) named by a hash of its
content and of the trace's digest. Finished rows are written to the results
parquet atomically after every configuration, so an interrupted sweep keeps
what it finished and a rerun skips every configuration already present.
Each write merges under a lock (`mer.guard.locked`): it re-reads the file,
keeps every row another sweep wrote there meanwhile and adds its own, so two
sweeps into one results file lose nothing.

Backends: `local` runs a ProcessPoolExecutor (or in-process with one job);
`dask` submits the same function to a dask.distributed scheduler.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from mer.atomic import atomic_path
from mer.errors import BadInput, RuntimeFailure
from mer.guard import check_input, locked
from mer.summary import RunSummary

OBJECTIVES = ("tokens_per_s", "hit_rate", "tokens_per_s_per_gib")
BACKENDS = ("local", "dask")
#: Replay options every configuration carries (besides the grid axes).
BASE_KEYS = (
    "pipeline_depth",
    "prefetch_top_n",
    "prefetch_min_prob",
    "prefetch_inflight",
    "prefetch_slots",
    "prefetch_reclaim",
    "prefetch_cancel",
    "prefetch_hold",
    "prefetch_window",
    "prefetch_lead",
    "pin",
    "phase",
    "tokens",
    "policy_params",
    "predictor_params",
    "granularity",
    "warmup_tokens",
)
#: Base keys left out of a configuration at their default, so that results written
#: before the key existed keep their hashes (and resume).
OMIT_AT_DEFAULT: dict[str, Any] = {
    "warmup_tokens": None,
    "granularity": "step",
    "prefetch_slots": 0,
    "prefetch_reclaim": False,
    "prefetch_cancel": 0,
    "prefetch_hold": 0,
    "prefetch_window": 0,
    "prefetch_lead": 1,
}


@dataclass
class SweepSpec:
    """The grid: every combination of the list fields, with `base` replay options."""

    trace: str
    policies: list[str]
    cache_slots: list[int]
    predictors: list[str] = field(default_factory=lambda: ["none"])
    scopes: list[str] = field(default_factory=lambda: ["global"])
    hardware: list[str] = field(default_factory=lambda: ["nvme-desktop"])
    mode: str = "model"
    shape: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    #: parameters of one policy (e.g. from `mer tune`), instead of base["policy_params"]
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def configs(self, trace_digest: str) -> list[dict[str, Any]]:
        out = []
        for hw in self.hardware:
            for scope in self.scopes:
                for predictor in self.predictors:
                    for policy in self.policies:
                        for slots in self.cache_slots:
                            cfg: dict[str, Any] = {
                                "trace": self.trace,
                                "trace_digest": trace_digest,
                                "policy": policy,
                                "cache_slots": int(slots),
                                "scope": scope,
                                "predictor": predictor,
                                "hardware": hw,
                                "mode": self.mode,
                                "shape": self.shape,
                            }
                            base = dict(self.base)
                            if policy in self.policy_params:
                                base["policy_params"] = dict(self.policy_params[policy])
                            for key in BASE_KEYS:
                                if key in base:
                                    if OMIT_AT_DEFAULT.get(key, object()) == base[key]:
                                        continue
                                    cfg[key] = base[key]
                            cfg["config_hash"] = config_hash(cfg)
                            out.append(cfg)
        return out


def config_hash(cfg: dict[str, Any]) -> str:
    """Content hash of a configuration (the trace by digest, not by path)."""
    ident = {k: v for k, v in cfg.items() if k not in ("config_hash", "trace")}
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _load_trace(path: str) -> Any:
    from mer.traces.format import read_trace

    return read_trace(path)


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Simulate one configuration; the flat result row (runs in a worker process)."""
    from mer.core import ReplayConfig
    from mer.sim.hardware import load_profile
    from mer.sim.model import SimOptions, simulate

    trace = _load_trace(cfg["trace"])
    replay_keys = set(ReplayConfig.__dataclass_fields__)
    rc = ReplayConfig(**{k: v for k, v in cfg.items() if k in replay_keys})
    hw = load_profile(cfg["hardware"])
    res = simulate(
        trace,
        rc,
        hw,
        SimOptions(
            mode=cfg["mode"], shape=cfg.get("shape"), warmup_tokens=cfg.get("warmup_tokens")
        ),
        trace_path=cfg["trace"],
        trace_digest=cfg["trace_digest"],
    )
    return flatten(cfg, res.summary)


def flatten(cfg: dict[str, Any], s: RunSummary) -> dict[str, Any]:
    """Config columns + the summary's fields as scalar columns."""
    row: dict[str, Any] = {k: _scalar(v) for k, v in cfg.items() if k != "tokens"}
    row["replay_tokens"] = cfg.get("tokens")  # the --tokens limit; `tokens` is the count run
    row["granularity"] = cfg.get("granularity", "step")
    row["shape"] = s.shape
    row["offline"] = is_offline(str(cfg["policy"]), str(cfg["predictor"]))
    for name in (
        "tokens",
        "layers",
        "top_k",
        "hits",
        "misses",
        "hit_rate",
        "bytes_read",
        "wall_s",
        "tokens_per_s",
        "layer_iterations_per_s",
        "io_wait_s",
        "compute_s",
        "dense_s",
        "io_wait_share",
    ):
        row[name] = getattr(s, name)
    row["lookups"] = s.lookups
    for name, value in s.prefetch.items():
        row[f"prefetch_{name}"] = value
    for block, stats in s.latency.items():
        for p in ("p50", "p95", "p99", "max"):
            row[f"{block}_{p}_s"] = stats.get(p, 0.0)
    ex = s.extra
    row["cache_bytes"] = ex.get("cache_bytes")
    gib = (ex.get("cache_bytes") or 0) / (1 << 30)
    row["tokens_per_s_per_gib"] = s.tokens_per_s / gib if gib > 0 else 0.0
    row["bound_compute_tokens_per_s"] = ex.get("bound_compute_tokens_per_s")
    row["evictions"] = ex.get("evictions")
    row["bypass"] = ex.get("bypass")
    row["sim_seconds"] = ex.get("sim_seconds")
    if "prefetch_lead" in s.config:  # `auto` (0) resolved from the hardware profile
        row["prefetch_lead"] = s.config["prefetch_lead"]
    warm = ex.get("warm") or {}
    row["warmup_tokens"] = warm.get("warmup_tokens")
    row["warm_hits"] = warm.get("hits")
    row["warm_misses"] = warm.get("misses")
    row["warm_hit_rate"] = warm.get("hit_rate")
    return row


def annotate(df: pd.DataFrame, trace: Any, provenance: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Beside each row's hit rates: LRU's and OPT's at the same size, scope, phase, tokens
    and granularity (prefetch off, cold and warm), the share of the gap the row closes,
    and which traces its policy's parameters were fitted on (`held_out`).

    With prefetch on, a prefetched expert that arrives in time is a hit, so a row may
    close more than the whole gap: OPT bounds eviction without prefetch only.
    """
    from mer.sim.mrc import MRCRequest, compute_mrc, gap_share

    if not len(df):
        return df
    df = df.copy()
    cols: dict[str, list[float]] = {
        c: [] for c in ("lru_hit_rate", "opt_hit_rate", "gap_closed", "warm_gap_closed")
    }
    cache: dict[tuple[Any, ...], pd.DataFrame] = {}
    for _, r in df.iterrows():
        phase = str(r.get("phase") or "all")
        tokens = r.get("replay_tokens")
        tokens = None if tokens is None or tokens != tokens else int(tokens)
        gran = str(r.get("granularity") or "step")
        warm = r.get("warmup_tokens")
        warm = 0 if warm is None or warm != warm else int(warm)
        key = (phase, tokens, gran, str(r["scope"]), warm)
        if key not in cache:
            tr = trace.select_phase(phase)
            if tokens is not None and tokens < tr.n_tokens:
                tr = tr.head(tokens)
            steps = tr.keys().reshape(-1, tr.top_k)
            per = tr.n_layers * (tr.top_k if gran == "lookup" else 1)
            sizes = sorted({int(c) for c in df["cache_slots"]})
            req = MRCRequest(
                policies=["lru", "opt"],
                scopes=[key[3]],
                sizes=sizes,
                processes=1,
                granularity=gran,
                warmup_steps=min(warm, max(tr.n_tokens - 1, 0)) * per,
            )
            cache[key] = compute_mrc(steps, tr.n_layers, tr.n_experts, req).set_index(
                ["policy", "cache_slots"]
            )
        m = cache[key]
        c = int(r["cache_slots"])
        lru: Any = m.loc[("lru", c)]
        opt: Any = m.loc[("opt", c)]
        look = lru["hits"] + lru["misses"]
        cols["lru_hit_rate"].append(lru["hit_rate"])
        cols["opt_hit_rate"].append(opt["hit_rate"])
        cols["gap_closed"].append(gap_share(float(r["hits"]), lru["hits"], opt["hits"]))
        wh = r.get("warm_hits")
        cols["warm_gap_closed"].append(
            gap_share(float(wh), lru["warm_hits"], opt["warm_hits"])
            if wh is not None and wh == wh and look
            else float("nan")
        )
    for name, v in cols.items():
        df[name] = v
    df["tuned_on"] = df["policy"].map(lambda p: provenance.get(p, {}).get("tuned_on", ""))
    df["held_out"] = df["policy"].map(lambda p: bool(provenance.get(p, {}).get("held_out", True)))
    return df


def _scalar(v: Any) -> Any:
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def read_results(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        return pd.DataFrame()
    check_input(p, "sweep results")
    try:
        # One open file: pyarrow given a path may open it twice (footer, then pages), and
        # a concurrent sweep's atomic rename in between would pair one file's footer with
        # another's pages. An open descriptor keeps its own inode through a rename.
        with open(p, "rb") as f:
            df = pd.read_parquet(f)
    except Exception as exc:
        raise BadInput(
            f"{p}: exists but is not a sweep results parquet ({exc}); choose another -o path."
        ) from exc
    if len(df) and "config_hash" not in df.columns:
        raise BadInput(
            f"{p}: exists but is not a sweep results parquet (no config_hash column); "
            "choose another -o path."
        )
    return df


def write_results(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def merge_results(rows: list[dict[str, Any]], path: str | Path) -> pd.DataFrame:
    """Write `rows` plus every row already in the file that they do not replace, under
    the results file's lock; returns what was written (rows first, in their order)."""
    with locked(path):
        on_disk = read_results(path)
        mine = pd.DataFrame(rows)
        if len(on_disk) and len(mine):
            others = on_disk[~on_disk["config_hash"].isin(set(mine["config_hash"]))]
            df = pd.concat([mine, others], ignore_index=True) if len(others) else mine
        elif len(on_disk):
            df = on_disk
        else:
            df = mine
        write_results(df, path)
    return df


@dataclass
class SweepOutcome:
    results: pd.DataFrame  # every row of the results file (earlier grids included)
    ran: int
    skipped: int
    failed: list[tuple[str, str]]
    hashes: list[str] = field(default_factory=list)  # this grid's configurations

    def grid(self) -> pd.DataFrame:
        """Only this grid's rows: a results file may also hold earlier, other grids."""
        if not len(self.results) or not self.hashes:
            return self.results
        return self.results[self.results["config_hash"].isin(self.hashes)].reset_index(drop=True)


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    trace_digest: str,
    jobs: int = 2,
    backend: str = "local",
    scheduler: str | None = None,
    progress: bool = True,
) -> SweepOutcome:
    """Run every configuration not yet in `out`; rewrite `out` after each one."""
    if backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    configs = spec.configs(trace_digest)
    with locked(out):
        existing = read_results(out)
    done = set(existing["config_hash"]) if "config_hash" in existing.columns else set()
    todo = [c for c in configs if c["config_hash"] not in done]
    rows: list[dict[str, Any]] = (
        [{str(k): v for k, v in r.items()} for r in existing.to_dict("records")]
        if len(existing)
        else []
    )
    failed: list[tuple[str, str]] = []

    def finished(row: dict[str, Any]) -> None:
        rows.append(row)
        try:
            merge_results(rows, out)
        except OSError as exc:
            raise RuntimeFailure(
                f"could not write the sweep results to {out} ({exc.strerror or exc}); "
                f"{len(rows)} configuration(s) finished, those already in the file are kept "
                "there; free space and rerun the same command to resume."
            ) from None

    def failure(cfg: dict[str, Any], exc: BaseException) -> None:
        if os.environ.get("MER_DEBUG"):
            raise exc  # the traceback (a worker's included), as the CLI promises
        from mer.core.plugins import describe_error

        what = (
            f"{cfg['policy']} ({cfg['scope']}) at {cfg['cache_slots']} slots, "
            f"predictor {cfg['predictor']}"
        )
        failed.append((cfg["config_hash"], f"{what}: {describe_error(exc)}"))

    if todo:
        with _progress(progress, len(todo), len(configs) - len(todo)) as advance:
            if backend == "dask":
                _run_dask(todo, scheduler, finished, failure, advance)
            elif jobs <= 1:
                for cfg in todo:
                    try:
                        row = run_config(cfg)
                    except Exception as exc:
                        failure(cfg, exc)
                    else:
                        finished(row)
                    advance()
            else:
                _run_local(todo, jobs, finished, failure, advance)
    df = pd.DataFrame(rows)
    if len(df):
        order = {c["config_hash"]: i for i, c in enumerate(configs)}
        with locked(out):
            on_disk = read_results(out)
            if len(on_disk):
                extra = on_disk[~on_disk["config_hash"].isin(set(df["config_hash"]))]
                if len(extra):
                    df = pd.concat([df, extra], ignore_index=True)
            df = df.assign(_o=df["config_hash"].map(order).fillna(len(order)))
            df = df.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
            write_results(df, out)
    return SweepOutcome(
        df,
        len(todo) - len(failed),
        len(configs) - len(todo),
        failed,
        [c["config_hash"] for c in configs],
    )


def _run_local(
    todo: list[dict[str, Any]],
    jobs: int,
    finished: Callable[[dict[str, Any]], None],
    failure: Callable[[dict[str, Any], BaseException], None],
    advance: Callable[[], None],
) -> None:
    from concurrent.futures import as_completed

    from mer.workers import process_pool

    with process_pool(jobs) as pool:
        futures = {pool.submit(run_config, cfg): cfg for cfg in todo}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:
                failure(futures[fut], exc)
            else:
                finished(row)
            advance()


def _run_dask(
    todo: list[dict[str, Any]],
    scheduler: str | None,
    finished: Callable[[dict[str, Any]], None],
    failure: Callable[[dict[str, Any], BaseException], None],
    advance: Callable[[], None],
) -> None:
    if not scheduler:
        raise BadInput("--backend dask needs --scheduler ADDRESS (e.g. tcp://127.0.0.1:8786).")
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dask is a dependency
        raise RuntimeFailure(f"--backend dask needs dask.distributed ({exc}).") from exc
    try:
        client = Client(scheduler, timeout=10)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot reach the dask scheduler at {scheduler} ({exc}); start one with "
            "`dask scheduler` or use --backend local."
        ) from exc
    try:
        futures = {client.submit(run_config, cfg, pure=False): cfg for cfg in todo}
        for fut in as_completed(list(futures)):
            try:
                row = fut.result()
            except Exception as exc:
                failure(futures[fut], exc)
            else:
                finished(row)
            advance()
    finally:
        client.close()


class _progress:
    """A rich progress bar on stderr (or nothing), yielding an advance() callable."""

    def __init__(self, enabled: bool, total: int, skipped: int) -> None:
        self.enabled = enabled and total > 0
        self.total = total
        self.skipped = skipped
        self._bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._bar.start()
        desc = f"sweep ({self.skipped} already done)" if self.skipped else "sweep"
        task = self._bar.add_task(desc, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def is_offline(policy: str, predictor: str) -> bool:
    """True when the policy or the predictor reads the trace's future (OPT, oracle):
    an upper bound, not something a deployment can run."""
    from mer.core.policy import POLICIES, policy_names
    from mer.core.predictor import PREDICTORS, predictor_names

    policy_names()
    predictor_names()  # load the registries
    pol = POLICIES.get(policy)
    pred = PREDICTORS.get(predictor)
    return bool((pol is not None and pol.needs_future) or (pred is not None and pred.offline))


def best_row(df: pd.DataFrame, objective: str, *, online: bool = False) -> dict[str, Any]:
    """The configuration that maximises `objective` (ties: the earlier row); `online`
    skips configurations that read the future (OPT, oracle)."""
    if objective not in OBJECTIVES:
        raise BadInput(f"--best must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    if online and "offline" in df.columns:
        df = df[~df["offline"].astype(bool)]
    if not len(df):
        raise RuntimeFailure("the sweep has no results to choose from.")
    pos = int(df[objective].astype(float).to_numpy().argmax())
    return {str(k): v for k, v in df.iloc[pos].to_dict().items()}


def run_command(row: dict[str, Any], experts: str = "EXPERTS.gguf") -> str:
    """The `mer run` command that executes a configuration on the real engine."""
    parts = [
        "mer run",
        _quote(str(row["trace"])),
        f"--experts {experts}",
        f"--policy {row['policy']}",
        f"--cache-slots {int(row['cache_slots'])}",
        f"--scope {row['scope']}",
        f"--predictor {row['predictor']}",
        f"--pipeline-depth {int(row.get('pipeline_depth', 1))}",
    ]
    defaults: dict[str, Any] = {
        "prefetch_inflight": 8,
        "prefetch_top_n": None,
        "prefetch_slots": 0,
        "prefetch_lead": 1,
        "prefetch_cancel": 0,
        "prefetch_hold": 0,
        "prefetch_window": 0,
        "pin": 0,
    }
    for key, flag in (
        ("prefetch_inflight", "--prefetch-inflight"),
        ("prefetch_top_n", "--prefetch-top-n"),
        ("prefetch_slots", "--prefetch-slots"),
        ("prefetch_lead", "--prefetch-lead"),
        ("prefetch_cancel", "--prefetch-cancel"),
        ("prefetch_hold", "--prefetch-hold"),
        ("prefetch_window", "--prefetch-window"),
        ("pin", "--pin"),
    ):
        value = row.get(key)
        default = defaults[key]
        if value is not None and not _isnan(value) and value != default:
            parts.append(f"{flag} {int(value)}")
    if row.get("prefetch_reclaim") is True:
        parts.append("--prefetch-reclaim")
    for key, flag in (
        ("policy_params", "--policy-param"),
        ("predictor_params", "--predictor-param"),
    ):
        raw = row.get(key)
        params = json.loads(raw) if isinstance(raw, str) and raw else (raw or {})
        for k, v in sorted(params.items()):
            parts.append(f"{flag} {_quote(f'{k}={v}')}")
    mp = row.get("prefetch_min_prob")
    if mp is not None and not _isnan(mp) and float(mp) != 0.0:
        parts.append(f"--prefetch-min-prob {float(mp):g}")
    tokens = row.get("replay_tokens")
    if tokens is not None and not _isnan(tokens):
        parts.append(f"--tokens {int(tokens)}")
    phase = row.get("phase")
    if phase and phase != "all":
        parts.append(f"--phase {phase}")
    gran = row.get("granularity")
    if isinstance(gran, str) and gran != "step":
        parts.append(f"--granularity {gran}")
    return " ".join(parts)


def _isnan(v: Any) -> bool:
    try:
        return bool(v != v)
    except Exception:  # pragma: no cover
        return False


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def check_names(kind: str, names: Iterable[str], known: Iterable[str]) -> None:
    known_set = set(known)
    bad = [n for n in names if n not in known_set]
    if bad:
        raise BadInput(
            f"unknown {kind} {', '.join(repr(b) for b in bad)}; choose from: "
            f"{', '.join(sorted(known_set))}."
        )


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
