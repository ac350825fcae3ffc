"""Synthetic trace generators, by name.

`GENERATORS` maps the `mer trace synth KIND` name to a generator class (see
`base.Generator`). Adding a generator is one class and one line here; the CLI
builds its subcommands from this dict.
"""

from __future__ import annotations

from mer.traces.synth.base import Generator
from mer.traces.synth.fitted import Fitted
from mer.traces.synth.seed_clustered import SeedClustered
from mer.traces.synth.seed_skewed import SeedSkewed

GENERATORS: dict[str, type[Generator]] = {
    SeedSkewed.name: SeedSkewed,
    SeedClustered.name: SeedClustered,
    Fitted.name: Fitted,
}


def get_generator(name: str) -> type[Generator]:
    """The generator class for `name` (KeyError lists the known names)."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise KeyError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}") from None


__all__ = ["GENERATORS", "Generator", "get_generator"]
