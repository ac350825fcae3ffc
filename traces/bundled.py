"""The bundled real trace: Mixtral 8x7B decode routing from mixtral-offloading (MIT).

It ships as package data so that the demo and the tests run anywhere, without
../shared. `traces/data/README.md` gives its provenance; the licence notice is
`traces/data/LICENSE-mixtral-offloading`. It is reproduced exactly (apart from
the creation time) by

    mer trace import mixtral-offloading active_experts.txt -o traces/data/mixtral-offloading-h39s.parquet
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mer.errors import RuntimeFailure
from mer.traces.format import Trace, read_trace

BUNDLED_NAME = "mixtral-offloading-h39s.parquet"


def bundled_trace_path() -> Path:
    """Filesystem path of the bundled parquet (the package is installed unzipped)."""
    res = resources.files("mer.traces").joinpath("data", BUNDLED_NAME)
    path = Path(str(res))
    if not path.is_file():
        raise RuntimeFailure(
            f"bundled trace {path} is missing; reinstall mer (`make install`) so that its "
            "package data is present."
        )
    return path


def load_bundled() -> Trace:
    """The bundled trace, read and validated."""
    return read_trace(bundled_trace_path())
