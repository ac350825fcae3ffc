"""Importers: foreign routing files -> trace format v1.

A registry maps each format name (as typed after `mer trace import`) to an
`Importer`; adding a format is one module with a `load(src, options)` function
and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mer.errors import BadInput
from mer.traces.importers import (
    bigrig,
    libcachesim,
    mixtral_offloading,
    nunspark,
    seed_jsonl,
    speculative_moe,
    tidy_csv,
)
from mer.traces.importers.common import ImportOptions, ImportResult


@dataclass(frozen=True)
class Importer:
    name: str
    summary: str
    load: Callable[[Path, ImportOptions], ImportResult]


IMPORTERS: dict[str, Importer] = {
    m.NAME: Importer(m.NAME, m.SUMMARY, m.load)
    for m in (mixtral_offloading, speculative_moe, seed_jsonl, tidy_csv, nunspark, bigrig)
}
IMPORTERS[libcachesim.TXT] = Importer(
    libcachesim.TXT, libcachesim.TXT_SUMMARY, libcachesim.load_txt
)
IMPORTERS[libcachesim.CSV] = Importer(
    libcachesim.CSV, libcachesim.CSV_SUMMARY, libcachesim.load_csv
)
#: Formats `mer trace export` writes: name -> writer(trace, path, **options) -> info.
EXPORTERS = dict(libcachesim.EXPORTERS)


def get_importer(name: str) -> Importer:
    try:
        return IMPORTERS[name]
    except KeyError:
        raise BadInput(
            f"unknown trace format {name!r}; choose one of {', '.join(IMPORTERS)}."
        ) from None


def import_trace(fmt: str, src: str | Path, options: ImportOptions | None = None) -> ImportResult:
    """Import `src` in format `fmt`; the result's trace is validated, not yet written."""
    return get_importer(fmt).load(Path(src), options or ImportOptions())


__all__ = [
    "EXPORTERS",
    "IMPORTERS",
    "ImportOptions",
    "ImportResult",
    "Importer",
    "get_importer",
    "import_trace",
]
