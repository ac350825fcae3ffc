"""Rich progress on stderr: one bar over prompts, one over the current prompt's tokens.

Kept apart from the recording logic so that the library API stays silent and
tests need no terminal.
"""

from __future__ import annotations

from typing import Any


class RecordProgress:
    """Receives start/prompt/token/prompt_done/stop calls from `record_run`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._prompts: Any = None
        self._tokens: Any = None
        self._index = 0

    def start(self, n_prompts: int, already_done: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        desc = "prompts" + (f" ({already_done} resumed)" if already_done else "")
        self._prompts = self._progress.add_task(desc, total=n_prompts, completed=already_done)
        self._tokens = self._progress.add_task("tokens", total=1)

    def prompt(self, index: int, max_new_tokens: int) -> None:
        if self._progress is None:
            return
        self._index = index
        self._progress.reset(
            self._tokens, total=1 + max_new_tokens, description=f"prompt {index}: prefill"
        )

    def token(self, phase: str) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._tokens)
        self._progress.update(self._tokens, description=f"prompt {self._index}: {phase}")

    def prompt_done(self) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._prompts)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
