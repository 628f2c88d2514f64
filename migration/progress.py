"""Progress for the operator: a rich bar per target on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) each target column gets a bar with values/s and ETA.
Elsewhere (a CI log, `nohup`, a pipe) one status line is printed at growing intervals:
after 5 s, 10 s, 20 s, then every 30 s, as gh-ost does ("often at first, then less").
Progress goes to stderr so stdout stays the summary a script can read.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

__all__ = ["LineProgress", "NullProgress", "Progress", "RichProgress", "make_progress"]


class Progress(Protocol):
    def start(self, table: str, column: str, total: int | None) -> None: ...
    def advance(self, table: str, column: str, rows: int) -> None: ...
    def note(self, state: str | None) -> None: ...
    def finish(self) -> None: ...


def _name(table: str, column: str) -> str:
    return f"{table}.{column}" if column else table


class NullProgress:
    def start(self, table: str, column: str, total: int | None) -> None:
        pass

    def advance(self, table: str, column: str, rows: int) -> None:
        pass

    def note(self, state: str | None) -> None:
        pass

    def finish(self) -> None:
        pass


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LineProgress:
    """Plain status lines at growing intervals: 5 s, 10 s, 20 s, then every 30 s."""

    SCHEDULE = (5.0, 10.0, 20.0)
    EVERY = 30.0

    def __init__(self, label: str, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.out, self.clock = label, out or sys.stderr, clock
        self.started = clock()
        self.next_at = self.started + self.SCHEDULE[0]
        self.printed = 0
        self.current: tuple[str, str] | None = None
        self.done = 0
        self.total: int | None = None
        self.col_started = self.started
        self.state: str | None = None  # "paused by ... at ...", "held: ..." (steering)

    def start(self, table: str, column: str, total: int | None) -> None:
        self.current, self.done, self.total = (table, column), 0, total
        self.col_started = self.clock()

    def advance(self, table: str, column: str, rows: int) -> None:
        self.done += rows
        now = self.clock()
        if now >= self.next_at:
            self.line(now)
            self.printed += 1
            step = (self.SCHEDULE[self.printed] - self.SCHEDULE[self.printed - 1]
                    if self.printed < len(self.SCHEDULE) else self.EVERY)
            self.next_at = now + step

    def note(self, state: str | None) -> None:
        """The run's steering state changed: say so at once, and on every line after."""
        if state == self.state:
            return
        self.state = state
        print(f"{self.label}: {state or 'running again'}", file=self.out, flush=True)

    def line(self, now: float) -> None:
        assert self.current is not None
        table, column = self.current
        rate = self.done / max(now - self.col_started, 1e-9)
        if self.total:
            pct = 100.0 * self.done / self.total
            left = max(self.total - self.done, 0)
            eta = _eta(left / rate) if rate > 0 else "?"
            msg = (f"{self.label} {_name(table, column)}: {self.done}/{self.total} rows "
                   f"({pct:.1f}%), {rate:.0f} rows/s, ETA {eta}")
        else:
            msg = f"{self.label} {_name(table, column)}: {self.done} rows, {rate:.0f} rows/s"
        if self.state:
            msg += f" [{self.state}]"
        print(msg, file=self.out, flush=True)

    def finish(self) -> None:
        pass


class RichProgress:
    """One rich bar per target column, with rows/s and time remaining."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskID,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self._label = label
        self._tasks: dict[tuple[str, str], TaskID] = {}
        self._starts: dict[tuple[str, str], float] = {}
        self._done: dict[tuple[str, str], int] = {}
        self._state: str | None = None
        self._bar.start()

    def start(self, table: str, column: str, total: int | None) -> None:
        key = (table, column)
        self._tasks[key] = self._bar.add_task(f"{self._label} {_name(table, column)}",
                                              total=total, rate="")
        self._starts[key], self._done[key] = time.monotonic(), 0

    def advance(self, table: str, column: str, rows: int) -> None:
        key = (table, column)
        self._done[key] += rows
        rate = self._done[key] / max(time.monotonic() - self._starts[key], 1e-9)
        self._bar.update(self._tasks[key], advance=rows, rate=f"{rate:>6.0f} rows/s")

    def note(self, state: str | None) -> None:
        """The run's steering state changed: a line above the bars."""
        if state != self._state:
            self._state = state
            self._bar.console.print(f"{self._label}: {state or 'running again'}")

    def finish(self) -> None:
        self._bar.stop()


def make_progress(label: str, enabled: bool = True, stream: Any = None) -> Progress:
    """A rich bar on a terminal, plain lines elsewhere, nothing when disabled."""
    if not enabled:
        return NullProgress()
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return RichProgress(label)
    return LineProgress(label, stream)
