"""Section: the held-out validation of `mer validate` (its directory as input `validation`).

Reads the validation's tidy table and summary (`validation.parquet`,
`summary.json`) and draws its figure into the report's figures; the section's
text and tables are `mer.analysis.validation_report.validation_section`, the
same that `mer validate` writes to its own `validation.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mer.analysis.sections import Section, Study, section
from mer.errors import BadInput


def load_validation(path: Path) -> tuple[pd.DataFrame, dict]:  # type: ignore[type-arg]
    """(table, summary) of a validation directory (or of its summary.json)."""
    d = path if path.is_dir() else path.parent
    table, summ = d / "validation.parquet", d / "summary.json"
    if not table.exists() or not summ.exists():
        raise BadInput(
            f"{d}: not a `mer validate` directory (no validation.parquet and summary.json); "
            "give the -o directory of a finished `mer validate`."
        )
    try:
        return pd.read_parquet(table), json.loads(summ.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{d}: the validation's files cannot be read ({exc}).") from None


@section(order=65, key="validation")
def validation(study: Study) -> Section | None:
    path = study.inputs.extra.get("validation")
    if path is None:
        return None
    from mer.analysis.validation_report import validation_section

    table, summary = load_validation(Path(path))
    return validation_section(table, summary, study.fig_dir)
