"""What every synthetic generator looks like to the registry and the CLI.

A generator is one class: it declares its options (`add_arguments`), builds
itself from parsed options (`from_args`) and produces a validated `Trace`
(`generate`). The CLI (`mer trace synth KIND`) is built from the registry in
`traces.synth`, so adding a generator is this class plus one registry line.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar, Protocol

from mer.errors import BadInput
from mer.traces.format import Trace

#: Lookups a generator writes at most (2**28: about 6 GiB while building the frame).
MAX_ROWS = 1 << 28
#: Bytes of memory per lookup while a trace is generated and written (measured order).
BYTES_PER_ROW = 40


def check_size(tokens: int, n_layers: int, top_k: int, flag: str = "--tokens") -> None:
    """Refuse a trace too large to build, before generating it (BadInput naming the flag)."""
    from mer.validate import check_memory

    rows = tokens * n_layers * top_k
    if rows > MAX_ROWS:
        raise BadInput(
            f"{flag} {tokens:,} makes {rows:,} lookups ({n_layers} layers x top-{top_k}), more "
            f"than a generated trace may hold ({MAX_ROWS:,}); give fewer."
        )
    check_memory(rows * BYTES_PER_ROW, f"{flag} {tokens:,} ({rows:,} lookups)")


class Generator(Protocol):
    """The registry's contract for a synthetic trace generator."""

    name: ClassVar[str]
    help: ClassVar[str]

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """Add this generator's options to its `mer trace synth KIND` parser."""
        ...

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Generator:
        """Build the generator from parsed CLI options (raise BadInput on bad values)."""
        ...

    def parameters(self) -> dict[str, Any]:
        """JSON-able parameters, stored in the trace's metadata.source."""
        ...

    def generate(self) -> Trace:
        """Produce the trace (deterministic for given parameters)."""
        ...
