"""A progress bar for model passes: documents done, tokens per second."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from curator.cli.common import err_console


class PassBar:
    """Implements curator.model.document_pass.PassProgress on a rich progress bar (on stderr)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
            TextColumn("{task.fields[rate]:,.0f} tokens/s"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console, transient=False)
        self.task = None
        self.started = time.perf_counter()
        self.tokens = 0

    def __enter__(self) -> "PassBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def stage(self, description: str, total_docs: int) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(description, total=total_docs, rate=0.0)
        self.started = time.perf_counter()
        self.tokens = 0

    def advance(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=docs, rate=rate)
