"""What every synthetic generator looks like to the registry and the CLI.

A generator is one class: it declares its options (`add_arguments`), builds
itself from parsed options (`from_args`) and produces a validated `Trace`
(`generate`). The CLI (`mer trace synth KIND`) is built from the registry in
`traces.synth`, so adding a generator is this class plus one registry line.
"""

from __future__ import annotations

import argparse
from typing import Any, ClassVar, Protocol

from mer.traces.format import Trace


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
