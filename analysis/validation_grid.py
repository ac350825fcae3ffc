"""The configurations `mer validate` calibrates on and predicts: one dataclass, a few grids.

A configuration is what decides hits (policy, cache, scope, predictor, depth)
plus the reader's settings that decide how reads turn into device time (queue
depth, chunk size). The calibration configuration is never one of the grid's:
every prediction is of a run the profile was not fitted to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mer import validate
from mer.errors import BadInput

REPLAY_FIELDS = (
    "policy",
    "cache_slots",
    "scope",
    "predictor",
    "pipeline_depth",
    "prefetch_inflight",
)
ENGINE_FIELDS = ("queue_depth", "chunk_bytes")


@dataclass(frozen=True)
class GridConfig:
    """One configuration of the grid; `name` labels rows, files and plot points."""

    name: str
    policy: str = "lru"
    cache_slots: int = 64
    scope: str = "global"
    predictor: str = "none"
    pipeline_depth: int = 1
    prefetch_inflight: int = 8
    queue_depth: int | None = None  # None: the engine's default
    chunk_bytes: int | None = None
    tokens: int | None = None  # None: the validation's --tokens (longer: past the cold start)

    @property
    def prefetch_on(self) -> bool:
        return self.predictor != "none"

    def replay_config(self, tokens: int) -> Any:
        """The replay of this configuration; `tokens` unless it sets its own."""
        from mer.core.replay import ReplayConfig

        tokens = self.tokens or tokens

        return ReplayConfig(
            policy=self.policy,
            cache_slots=self.cache_slots,
            scope=self.scope,
            predictor=self.predictor,
            pipeline_depth=self.pipeline_depth,
            prefetch_inflight=self.prefetch_inflight,
            tokens=tokens,
        ).validate()

    def engine_overrides(self) -> dict[str, int]:
        return {k: v for k in ENGINE_FIELDS if (v := getattr(self, k)) is not None}

    def identity(self) -> tuple[Any, ...]:
        """Everything but the name: two configurations with the same identity are one."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "name")

    def describe(self) -> str:
        parts = [f"{self.policy} {self.cache_slots} slots {self.scope}"]
        parts.append(
            "no prefetch"
            if not self.prefetch_on
            else f"prefetch {self.predictor} depth {self.pipeline_depth}"
        )
        if self.queue_depth is not None:
            parts.append(f"QD {self.queue_depth}")
        if self.chunk_bytes is not None:
            parts.append(f"chunk {self.chunk_bytes >> 10} KiB")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _g(name: str, **kw: Any) -> GridConfig:
    return GridConfig(name=name, **kw)


#: Calibrated on: one I/O-bound run that exercises both FFN paths (a read in flight
#: or not), queued demand reads and the device; none of the grid's configurations.
CALIBRATION = _g("calibration", policy="lru", cache_slots=96, scope="global")

#: The held-out grid: 5 policies, cache sizes from 32 slots to every expert, both
#: scopes, prefetch off and on (the oracle at depth 2 prefetches usefully, markov
#: mostly wastes), I/O-bound (small caches) to compute-bound (every expert fits and
#: the run goes 6x past the cold start), and the reader's queue depth and chunk size
#: varied.
FULL: tuple[GridConfig, ...] = (
    _g("lru-32-global", policy="lru", cache_slots=32),
    _g("fifo-64-global", policy="fifo", cache_slots=64),
    _g("arc-128-global", policy="arc", cache_slots=128),
    _g("s3fifo-128-per-layer", policy="s3fifo", cache_slots=128, scope="per-layer"),
    _g(
        "lru-192-per-layer-oracle",
        cache_slots=192,
        scope="per-layer",
        predictor="oracle",
        pipeline_depth=2,
    ),
    _g("lru-64-global-oracle", cache_slots=64, predictor="oracle", pipeline_depth=2),
    _g("lru-128-global-markov", cache_slots=128, predictor="markov"),
    _g("clock-256-global", policy="clock", cache_slots=256),
    _g("clock-256-global-long", policy="clock", cache_slots=256, tokens=192),
    _g("sieve-224-per-layer-long", policy="sieve", cache_slots=224, scope="per-layer", tokens=192),
    _g("lru-64-global-qd4", cache_slots=64, queue_depth=4),
    _g("lru-64-global-chunk128k", cache_slots=64, chunk_bytes=128 << 10),
)
#: The demo's short grid: still >= 3 policies, 2 sizes, both scopes, prefetch off and
#: on, I/O- and compute-bound.
QUICK_NAMES = (
    "lru-32-global",
    "fifo-64-global",
    "arc-128-global",
    "s3fifo-128-per-layer",
    "lru-192-per-layer-oracle",
    "lru-64-global-oracle",
    "clock-256-global",
    "lru-64-global-qd4",
)
QUICK: tuple[GridConfig, ...] = tuple(c for c in FULL if c.name in QUICK_NAMES)
GRIDS = {"full": FULL, "quick": QUICK}


def _config_from(where: str, d: Any, i: int) -> GridConfig:
    w = f"{where}: configuration {i}"
    if not isinstance(d, dict):
        raise BadInput(f"{w}: expected an object, got {type(d).__name__}.")
    known = {f.name for f in fields(GridConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise BadInput(
            f"{w}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
        )
    if "name" not in d:
        raise BadInput(f"{w}: missing field name.")
    kw: dict[str, Any] = {"name": validate.text(w, "name", d["name"])}
    for key in ("policy", "scope", "predictor"):
        if key in d:
            kw[key] = validate.text(w, key, d[key])
    for key, lo, hi in (
        ("cache_slots", 1, validate.MAX_SLOTS),
        ("pipeline_depth", 0, 1024),
        ("prefetch_inflight", 1, 1 << 20),
        ("queue_depth", 1, 4096),
        ("chunk_bytes", 4096, 64 << 20),
        ("tokens", 1, 1 << 20),
    ):
        if key in d and d[key] is not None:
            kw[key] = validate.integer(w, key, d[key], lo=lo, hi=hi)
    cfg = GridConfig(**kw)
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise BadInput(f"{w}: name {cfg.name!r} must be a plain label (it names files).")
    if cfg.chunk_bytes is not None and cfg.chunk_bytes % 4096:
        raise BadInput(f"{w}: chunk_bytes {cfg.chunk_bytes} is not a multiple of 4096.")
    from mer.core import policy_class, predictor_class

    try:
        policy_class(cfg.policy)
        predictor_class(cfg.predictor)
        cfg.replay_config(tokens=1)
    except BadInput as exc:
        raise BadInput(f"{w}: {exc}") from None
    return cfg


@dataclass
class Grid:
    calibration: GridConfig
    configs: tuple[GridConfig, ...]
    name: str = "custom"
    notes: list[str] = field(default_factory=list)

    def check(self) -> Grid:
        """Distinct names, no configuration equal to the calibration run."""
        names = [c.name for c in self.configs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BadInput(f"grid {self.name}: configuration names repeat: {', '.join(dup)}.")
        if self.calibration.name in names:
            raise BadInput(
                f"grid {self.name}: the calibration run is named {self.calibration.name!r}, "
                "like a configuration of the grid; rename one."
            )
        same = [c.name for c in self.configs if c.identity() == self.calibration.identity()]
        if same:
            raise BadInput(
                f"grid {self.name}: {', '.join(same)} is the calibration configuration itself; "
                "a held-out grid must differ from the run it is calibrated on."
            )
        if not self.configs:
            raise BadInput(f"grid {self.name}: no configurations to predict.")
        return self


def load_grid(spec: str | Path) -> Grid:
    """A bundled grid by name (full, quick) or a JSON file:
    {"calibration": {...}, "configs": [{"name": ..., "policy": ..., ...}, ...]}."""
    text = str(spec)
    if text in GRIDS:
        return Grid(CALIBRATION, GRIDS[text], name=text).check()
    path = Path(text)
    if not path.exists():
        raise BadInput(
            f"--grid {text}: neither a bundled grid ({', '.join(GRIDS)}) nor a file; write one "
            'as {"calibration": {"name": "cal", ...}, "configs": [{"name": "a", ...}]}.'
        )
    from mer.guard import load_json_input

    data = load_json_input(path, "grid")
    if not isinstance(data, dict) or not isinstance(data.get("configs"), list):
        raise BadInput(f'grid {path}: expected an object with a list "configs".')
    cal = _config_from(str(path), data["calibration"], 0) if "calibration" in data else CALIBRATION
    configs = tuple(_config_from(str(path), d, i + 1) for i, d in enumerate(data["configs"]))
    return Grid(cal, configs, name=path.stem).check()
