"""Progress of a job's blocks: a rich bar on a terminal, a few plain lines elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_STEPS = 10
"""Off a terminal, print a line about every tenth of the job."""


class BlockProgress:
    """Blocks done of total, samples/s and ETA; failures printed as they happen."""

    def __init__(self, console: Console, total: int, done: int = 0, enabled: bool = True) -> None:
        self.console = console
        self.total = total
        self.done = done
        self.enabled = enabled
        self.rows = 0
        self.products = 0
        self.start = time.perf_counter()
        self.live = enabled and console.is_terminal
        self._next_line = done + max(1, (total - done) // PLAIN_STEPS)
        self._progress = Progress(
            TextColumn("[bold]blocks"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            disable=not self.live,
        )
        self._task = self._progress.add_task("blocks", total=total, completed=done, rate="", note="")
        self._note = ""

    def __enter__(self) -> BlockProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def rate(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.rows / elapsed:,.0f} samples/s"

    def advance(self, rows: int, products: int) -> None:
        self.done += 1
        self.rows += rows
        self.products += products
        self._progress.update(self._task, advance=1, rate=self.rate())
        if self.enabled and not self.live and (self.done >= self._next_line or self.done == self.total):
            self._next_line = self.done + max(1, self.total // PLAIN_STEPS)
            self.console.print(f"blocks {self.done}/{self.total}  {self.rate()}", highlight=False)

    def fail(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[red]failed[/]: {escape(message)}", highlight=False, emoji=False)

    def note(self, text: str) -> None:
        """The cluster's state (queued batch jobs, workers being replaced): at the end of the bar
        on a terminal, a line of its own elsewhere. Safe from any thread."""
        if text == self._note:
            return
        self._note = text
        if self.live:
            self._progress.update(self._task, note=escape(text))
        elif self.enabled:
            self.console.print(escape(text), highlight=False, emoji=False)
