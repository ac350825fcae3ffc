"""Fixtures shared by several test modules."""

from corpus_kit import kit  # noqa: F401  (the malformed-input corpus's session fixtures)
