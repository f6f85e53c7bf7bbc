"""Progress of long work: a rich bar on a terminal, timestamped lines everywhere else.

A log file, a pipe or a CI job gets a line when the work starts, then one every few
seconds (or every few items) and one at the end, so nothing runs silently for minutes;
a terminal gets a transient rich bar with elapsed time and ETA. Every long command and
the demo report through this one helper.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape

__all__ = ["ProgressReport"]

DEFAULT_EVERY_S = 5.0


class ProgressReport:
    """Report `done` of `total` items of one job; use as a context manager.

    `update(done, total)` (also callable as `report(done, total)`, the `(done, total)`
    callback many functions here take) moves the bar or, when `console` is not a
    terminal, prints a line if `every_s` seconds or `every` items passed since the last
    one, the job finished, or its label changed. `detail` adds a short note (rejected
    pairs, queue depth, loss) to the bar or line.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        console: Console | None = None,
        every_s: float = DEFAULT_EVERY_S,
        every: int = 0,
        transient: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.every_s, self.every, self.transient = every_s, every, transient
        self.done, self.detail = 0, ""
        self._clock = clock
        self._started = self._last_line_at = 0.0
        self._last_line_done = 0
        self._printed: tuple[Any, ...] | None = None
        self._bar: Any = None
        self._task: Any = None

    @property
    def terminal(self) -> bool:
        """Whether a live bar is drawn (else plain lines are printed)."""
        return bool(self.console.is_terminal)

    def __enter__(self) -> ProgressReport:
        self._started = self._last_line_at = self._clock()
        if self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.fields[label]}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=self.transient,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.label, total=self.total, label=escape(self.label), note=self._note()
            )
        else:
            self._line()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
        elif self._printed != self._state():
            self._line()

    def __call__(self, done: int, total: int | None = None) -> None:
        self.update(done, total)

    def update(
        self,
        done: int,
        total: int | None = None,
        *,
        detail: str | None = None,
        label: str | None = None,
    ) -> None:
        """`done` items finished (of `total`, if it changed); `label`: a new phase."""
        relabel = label is not None and label != self.label
        self.done = int(done)
        if total is not None:
            self.total = int(total)
        if detail is not None:
            self.detail = detail
        if label is not None:
            self.label = label
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=self.done,
                total=self.total,
                label=escape(self.label),
                note=self._note(),
            )
            return
        now = self._clock()
        total = self.total
        finished = total is not None and self.done >= total > self._last_line_done
        due = now - self._last_line_at >= self.every_s or (
            self.every > 0 and self.done - self._last_line_done >= self.every
        )
        if (relabel or finished or due) and self._printed != self._state():
            self._line()

    def advance(self, n: int = 1, *, detail: str | None = None) -> None:
        """`n` more items finished."""
        self.update(self.done + n, detail=detail)

    def _state(self) -> tuple[Any, ...]:
        return (self.label, self.done, self.total, self.detail)

    def _note(self) -> str:
        parts = [p for p in (self.unit, self.detail) if p]
        return escape(", ".join(parts))

    def _line(self) -> None:
        now = self._clock()
        elapsed = now - self._started
        if self.total is None and self.done == 0:
            text = f"{self.label}: started"
        else:
            count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
            text = f"{self.label}: {count}"
            if self.unit:
                text += f" {self.unit}"
        if self.detail:
            text += f", {self.detail}"
        timing = f"{elapsed:.0f} s"
        if self.total and 0 < self.done < self.total:
            timing += f", ETA {elapsed / self.done * (self.total - self.done):.0f} s"
        stamp = datetime.now().strftime("%H:%M:%S")
        self.console.print(f"{stamp} {text} ({timing})", markup=False, highlight=False)
        self._last_line_at, self._last_line_done = now, self.done
        self._printed = self._state()
