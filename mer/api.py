"""The Python API: what the `mer` commands do, as functions returning their results.

`import mer` exposes these lazily (nothing heavy is imported until a function is
used), so a notebook can say `mer.simulate(trace, policy="arc", cache_slots=64)`
and get the very `RunSummary` that `mer simulate --json` prints, or
`mer.mrc(trace)` and get the frame `mer mrc -o` writes. docs/api.md walks through
them; tests/test_api.py holds each against its command.

Conventions, as on the command line:
- a `trace` argument is a `Trace` (from `read_trace`, `import_trace`,
  `bundled_trace`) or the path of a trace file;
- options have the names and defaults of the command's flags (`cache_slots`,
  `scope`, `phase`, ...), and the replay options of `mer simulate --help`
  (`pipeline_depth`, `prefetch_top_n`, `pin`, `tokens`, `policy_params`, ...)
  are keyword arguments of `simulate`, `sweep` and `run`;
- policies and predictors are names, including your own `module:Class`;
- bad input raises `mer.errors.BadInput` with the message the CLI would print.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mer.errors import BadInput

if TYPE_CHECKING:  # imported for the annotations only: `import mer` stays light
    import pandas as pd

    from mer.analysis.calibrate import Calibration
    from mer.analysis.compare import Comparison
    from mer.engine.executor import RunResult
    from mer.sim.hardware import HardwareProfile
    from mer.sim.model import SimResult
    from mer.summary import RunSummary
    from mer.traces.format import Trace
    from mer.traces.importers import ImportResult

PathLike = str | os.PathLike[str]

__all__ = [
    "bundled_trace",
    "calibrate",
    "compare",
    "hardware_profile",
    "import_trace",
    "load_summary",
    "mrc",
    "plot",
    "probe",
    "read_trace",
    "report",
    "run",
    "simulate",
    "sweep",
    "synth_experts",
    "trace_stats",
    "write_trace",
]


# -- traces ----------------------------------------------------------------------------


def read_trace(path: PathLike) -> Trace:
    """Read and validate a trace file (`mer trace validate` accepts exactly these)."""
    from mer.traces.format import read_trace as _read

    return _read(path)


def write_trace(trace: Trace, path: PathLike) -> Path:
    """Write a trace atomically (format v1)."""
    from mer.traces.format import write_trace as _write

    return _write(trace, path)


def bundled_trace() -> Trace:
    """The real Mixtral-8x7B trace shipped with mer (`mer trace bundled`)."""
    from mer.traces.bundled import load_bundled

    return load_bundled()


def import_trace(
    fmt: str, src: PathLike, output: PathLike | None = None, **options: Any
) -> ImportResult:
    """`mer trace import FORMAT SRC [-o OUTPUT]`: the result's `.trace`, `.dropped`
    (what the source could not give, counted) and `.notes`; `options` are the
    command's (`model`, `n_layers`, `n_experts`, `top_k`, ...)."""
    from mer.traces.importers import ImportOptions
    from mer.traces.importers import import_trace as _import

    known = set(ImportOptions.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise BadInput(
            f"import_trace: unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}."
        )
    result = _import(fmt, Path(src), ImportOptions(**options))
    if output is not None:
        write_trace(result.trace, output)
    return result


def trace_stats(
    trace: Trace | PathLike, phase: str = "all", matrices: bool = False
) -> dict[str, Any]:
    """`mer trace stats --json`: popularity, repetition, reuse distance, transitions."""
    from mer.traces.stats import trace_stats as _stats

    return _stats(_trace(trace), phase, matrices=matrices)


def _trace(trace: Trace | PathLike) -> Trace:
    from mer.traces.format import Trace

    return trace if isinstance(trace, Trace) else read_trace(trace)


def _trace_label(trace: Trace | PathLike) -> str:
    from mer.traces.format import Trace

    return trace.name if isinstance(trace, Trace) else str(trace)


# -- curves, simulation, sweeps --------------------------------------------------------


def mrc(
    trace: Trace | PathLike,
    *,
    policies: Sequence[str] | None = None,
    scopes: Sequence[str] = ("global", "per-layer"),
    sizes: Sequence[int] | None = None,
    phase: str = "all",
    output: PathLike | None = None,
    **options: Any,
) -> pd.DataFrame:
    """`mer mrc`: the tidy curve frame `-o` writes (policy, scope, cache_slots, hits,
    misses, hit_rate, and the command's further columns), step granularity, no
    prefetch, cold start; OPT is always added. It runs the command itself, so every
    option of `mer mrc --help` is a keyword (`granularity="lookup"`, `warmup=100`,
    `replay_step=8`, `processes=2`, `backend="dask"`, ...)."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="mer-mrc-") as tmp:
        src = _as_file(trace, Path(tmp), "trace")
        dest = Path(output) if output is not None else Path(tmp) / "curves.parquet"
        argv = ["mrc", src, "-o", str(dest), "--no-progress", "--json", "--phase", phase]
        argv += ["--scopes", ",".join(scopes)]
        if policies:
            argv += ["--policies", ",".join(policies)]
        if sizes:
            argv += ["--sizes", ",".join(str(int(c)) for c in sizes)]
        _cli(argv + _flags(options))
        return pd.read_parquet(dest)


def _flags(options: dict[str, Any]) -> list[str]:
    """Keyword arguments as command-line flags (`replay_step=8` -> `--replay-step 8`)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            if key == "tuned":
                for v in value:
                    argv += [flag, str(v)]
            else:
                argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def hardware_profile(name_or_path: PathLike) -> HardwareProfile:
    """A bundled hardware profile by name (`nvme-desktop`, ...) or a `mer probe` JSON."""
    from mer.sim.hardware import load_profile

    return load_profile(
        Path(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    )


def _replay_config(
    policy: str, cache_slots: int, scope: str, predictor: str, phase: str, options: dict[str, Any]
) -> Any:
    from mer.core import ReplayConfig, policy_class, predictor_class

    known = set(ReplayConfig.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise BadInput(
            f"unknown replay option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}."
        )
    policy_class(policy)
    predictor_class(predictor)
    return ReplayConfig(
        policy=policy,
        cache_slots=cache_slots,
        scope=scope,
        predictor=predictor,
        phase=phase,
        **options,
    )


def simulate(
    trace: Trace | PathLike,
    *,
    policy: str = "lru",
    cache_slots: int = 64,
    scope: str = "global",
    predictor: str = "none",
    hardware: PathLike | HardwareProfile = "nvme-desktop",
    shape: str | None = None,
    experts: PathLike | None = None,
    mode: str = "model",
    engine: str = "fast",
    phase: str = "all",
    **replay_options: Any,
) -> SimResult:
    """`mer simulate`: `.summary` (the `RunSummary` of `--json`) and `.tokens` (the
    per-token frame of `-o`). The shape comes from `experts` (the file `run` will read)
    when given, else `shape`, else the trace's geometry."""
    from mer.core.replay import check_cache_fits_keys
    from mer.sim.hardware import HardwareProfile
    from mer.sim.model import SimOptions
    from mer.sim.model import simulate as _simulate
    from mer.summary import trace_digest

    tr = _trace(trace)
    config = _replay_config(policy, cache_slots, scope, predictor, phase, replay_options)
    check_cache_fits_keys(config, tr.n_layers, tr.n_experts)
    hw = hardware if isinstance(hardware, HardwareProfile) else hardware_profile(hardware)
    the_shape = _shape(tr, shape, experts, _trace_label(trace))
    return _simulate(
        tr,
        config,
        hw,
        SimOptions(mode=mode, engine=engine, shape=the_shape),
        trace_path=_trace_label(trace),
        trace_digest=trace_digest(tr),
    )


def _shape(tr: Trace, shape: str | None, experts: PathLike | None, label: str) -> Any:
    import argparse

    from mer.cli.sim_cmd import shape_for

    args = argparse.Namespace(
        shape=shape, experts=Path(experts) if experts is not None else None, trace=label
    )
    return shape_for(args, tr)


def sweep(
    trace: PathLike,
    *,
    output: PathLike,
    policies: Sequence[str] = ("lru",),
    cache_slots: Sequence[int] = (64,),
    predictors: Sequence[str] = ("none",),
    scopes: Sequence[str] = ("global",),
    hardware: Sequence[str] = ("nvme-desktop",),
    mode: str = "model",
    shape: str | None = None,
    jobs: int | None = None,
    backend: str = "local",
    scheduler: str | None = None,
    progress: bool = False,
    phase: str = "all",
    **replay_options: Any,
) -> pd.DataFrame:
    """`mer sweep`: this grid's result rows (one per configuration), as in `-o`.

    Results are written to `output` after each configuration; calling again with
    the same grid resumes. The trace is a path: worker processes read it.
    """
    from mer.core import ReplayConfig
    from mer.core.replay import check_cache_fits_keys
    from mer.sim.sweep import SweepSpec, default_jobs, run_sweep
    from mer.summary import trace_digest
    from mer.traces.format import Trace

    if isinstance(trace, Trace):
        raise BadInput(
            "sweep reads the trace in worker processes: pass its path (write_trace first)."
        )
    tr = read_trace(trace)
    base = _replay_config("lru", 64, "global", "none", phase, replay_options)
    for name in predictors:
        _replay_config("lru", 64, "global", name, phase, {})
    for name in policies:
        _replay_config(name, 64, "global", "none", phase, {})
    for slots in cache_slots:
        check_cache_fits_keys(ReplayConfig(cache_slots=int(slots)), tr.n_layers, tr.n_experts)
    for hw in hardware:
        hardware_profile(hw)
    spec = SweepSpec(
        trace=str(trace),
        policies=list(policies),
        cache_slots=[int(c) for c in cache_slots],
        predictors=list(predictors),
        scopes=list(scopes),
        hardware=[str(h) for h in hardware],
        mode=mode,
        shape=shape,
        base=base.to_dict(),
    )
    outcome = run_sweep(
        spec,
        Path(output),
        trace_digest=trace_digest(tr),
        jobs=jobs or default_jobs(),
        backend=backend,
        scheduler=scheduler,
        progress=progress,
    )
    if outcome.failed:
        from mer.errors import RuntimeFailure

        h, msg = outcome.failed[0]
        raise RuntimeFailure(f"{len(outcome.failed)} configuration(s) failed, e.g. {h}: {msg}")
    return outcome.grid()


# -- the real engine -------------------------------------------------------------------


def synth_experts(output: PathLike, shape: str = "mixtral-small", *, seed: int = 0) -> Path:
    """`mer experts synth`: a GGUF of seeded q4_0 expert weights of `shape` (Mixtral's
    tensor names and layout) for `run` to read."""
    _cli(["experts", "synth", "--shape", shape, "-o", str(output), "--seed", str(seed)])
    return Path(output)


def run(
    trace: Trace | PathLike,
    experts: PathLike,
    *,
    policy: str = "lru",
    cache_slots: int = 64,
    scope: str = "global",
    predictor: str = "none",
    phase: str = "all",
    io: str = "auto",
    threads: int | None = None,
    mode: str = "model",
    ffn: str = "auto",
    buffered: bool = False,
    seed: int = 0,
    progress: bool = False,
    **replay_options: Any,
) -> RunResult:
    """`mer run`: replay on real expert weights; `.summary` (kind "measured") and `.tokens`."""
    import warnings

    from mer.engine.executor import EngineConfig, Executor
    from mer.engine.store import ExpertStore
    from mer.summary import trace_digest

    tr = _trace(trace)
    config = _replay_config(policy, cache_slots, scope, predictor, phase, replay_options)
    from mer.core.replay import check_cache_fits_keys

    check_cache_fits_keys(config, tr.n_layers, tr.n_experts)
    store = ExpertStore.open(experts)
    ecfg = EngineConfig(
        io=io,
        threads=threads or os.cpu_count() or 1,
        mode=mode,
        ffn=ffn,
        direct=not buffered,
        seed=seed,
        progress=progress,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        ex = Executor(
            tr,
            store,
            config,
            ecfg,
            trace_name=Path(_trace_label(trace)).name,
            trace_digest=trace_digest(tr),
            store_path=str(experts),
        )
        return ex.run()


def probe(
    directory: PathLike | None = None,
    *,
    quick: bool = False,
    shape: str | None = None,
    experts: PathLike | None = None,
    output: PathLike | None = None,
) -> HardwareProfile:
    """`mer probe`: measure this machine's SSD, FFN and memory into a hardware profile."""
    argv = ["probe"]
    if directory is not None:
        argv += ["--dir", str(directory)]
    if quick:
        argv.append("--quick")
    if shape:
        argv += ["--shape", shape]
    if experts is not None:
        argv += ["--experts", str(experts)]
    with tempfile.TemporaryDirectory(prefix="mer-probe-") as tmp:
        dest = Path(output) if output is not None else Path(tmp) / "profile.json"
        _cli([*argv, "-o", str(dest)])
        return hardware_profile(dest)


# -- analysis --------------------------------------------------------------------------


def load_summary(path: PathLike) -> RunSummary:
    """A run summary from its JSON (`--summary`, `--json`) or a per-token parquet (`-o`)."""
    from mer.cli.analysis_cmd import load_summary as _load

    return _load(Path(path))


def _summary(x: Any) -> RunSummary:
    from mer.summary import RunSummary

    if isinstance(x, RunSummary):
        return x
    if hasattr(x, "summary") and isinstance(x.summary, RunSummary):
        return x.summary  # a SimResult or a RunResult
    return load_summary(x)


def compare(sim: Any, run: Any) -> Comparison:
    """`mer compare`: predicted against measured; refuses runs of different experiments.
    Each side is a `RunSummary`, a simulate/run result, or a summary file."""
    from mer.analysis.compare import compare as _compare

    return _compare(_summary(sim), _summary(run))


def calibrate(
    run: Any, hardware: PathLike | HardwareProfile, trace: Trace | PathLike | None = None
) -> Calibration:
    """`mer calibrate [--trace]`: the profile refitted to a measured run (`.profile`,
    `.moved`); with the run's trace, the SSD bandwidth is fitted by simulation."""
    from mer.analysis.calibrate import calibrate as _calibrate
    from mer.sim.hardware import HardwareProfile

    hw = hardware if isinstance(hardware, HardwareProfile) else hardware_profile(hardware)
    tr = None if trace is None else _trace(trace)
    return _calibrate(_summary(run), hw, trace=tr)


def plot(kind: str, data: Any, output: PathLike, **options: Any) -> list[Path]:
    """`mer plot KIND`: the same figure (the PNG, SVG and PDF it writes); returns the files.

    `data` is what the command reads: a trace (or its path) for `popularity`,
    `repetition` and `layer-hits`, a frame or parquet of `mrc` / `sweep` results for
    `mrc`, `sweep` and `io-share`, and (sim, run) pairs for `predicted-vs-measured`.
    `options` are the command's flags (`title="..."`, `policies=["lru", "opt"]`).
    """
    with tempfile.TemporaryDirectory(prefix="mer-plot-") as tmp:
        argv = ["plot", kind]
        if kind == "predicted-vs-measured":
            for i, (s, r) in enumerate(data):
                argv += [
                    "--pair",
                    _as_file(s, Path(tmp), f"sim{i}"),
                    _as_file(r, Path(tmp), f"run{i}"),
                ]
        else:
            argv.append(_as_file(data, Path(tmp), "data"))
        argv += ["-o", str(output), *_flags(options)]
        out = _cli(argv)
    return [Path(line) for line in out.splitlines() if line.strip()]


def _as_file(x: Any, tmp: Path, stem: str) -> str:
    """A path for what a plot command reads: files as they are, objects written to tmp."""
    import pandas as pd

    from mer.summary import RunSummary
    from mer.traces.format import Trace

    if isinstance(x, str | os.PathLike):
        return str(x)
    if isinstance(x, Trace):
        return str(write_trace(x, tmp / f"{stem}.parquet"))
    if isinstance(x, pd.DataFrame):
        path = tmp / f"{stem}.parquet"
        x.to_parquet(path, index=False)
        return str(path)
    if hasattr(x, "summary") and hasattr(x, "tokens"):  # a simulate / run result
        from mer.summary import write_token_table

        path = tmp / f"{stem}.parquet"
        write_token_table(x.tokens, path, x.summary)
        return str(path)
    if isinstance(x, RunSummary):
        path = tmp / f"{stem}.json"
        x.save(path)
        return str(path)
    raise BadInput(f"plot: cannot use a {type(x).__name__} as input; give a path, trace or frame.")


def report(
    output: PathLike,
    *,
    trace: PathLike,
    sweep: PathLike | None = None,
    mrc: PathLike | None = None,
    sim: PathLike | None = None,
    run: PathLike | None = None,
    hardware: str | None = None,
) -> dict[str, Any]:
    """`mer report run`: a Markdown + HTML report in `output`; returns the files written."""
    from mer.analysis.run_report import write_run_report

    return write_run_report(
        Path(output),
        trace=Path(trace),
        sweep=None if sweep is None else Path(sweep),
        mrc=None if mrc is None else Path(mrc),
        sim=None if sim is None else Path(sim),
        run=None if run is None else Path(run),
        hardware=hardware,
    )


def _cli(argv: list[str]) -> str:
    """Run one `mer` command in this process; its stdout, or its error raised."""
    from mer.cli import build_parser
    from mer.guard import check_args, protecting

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        raise BadInput(f"invalid options for `mer {' '.join(argv[:2])}` (see its --help).") from exc
    buf = io.StringIO()
    inputs = check_args(args)
    with protecting(inputs), contextlib.redirect_stdout(buf):
        rc = args.func(args)
    if rc:
        from mer.errors import RuntimeFailure

        raise RuntimeFailure(f"`mer {' '.join(argv[:2])}` exited with {rc}.")
    return buf.getvalue()
