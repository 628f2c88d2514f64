"""The size of the next batch: fixed (`--batch-size`), or following a target batch time
(`--batch-time`), as pt-online-schema-change's `--chunk-time` sizes its chunks.

A batch's time is measured commit to commit: its KMS work (which overlaps the previous
batch's write) and its write transaction, the time a pause, a Ctrl-C or a crash waits on
or loses. After each batch the rows per second it achieved are smoothed (an exponential
average, so that one slow batch does not halve the next), and the next size is that rate
times the target, changed by at most a factor of 2 per batch and kept within bounds.
"""

from __future__ import annotations

import threading

__all__ = ["MAX_ADAPTIVE", "MIN_ADAPTIVE", "BatchSizer"]

MIN_ADAPTIVE = 10  # rows: below this a batch's fixed costs (a transaction) dominate
MAX_ADAPTIVE = 5000  # rows: a batch's statement and its journal rows stay modest
SMOOTHING = 0.5  # weight of the newest batch's rate
MAX_STEP = 2.0  # the size changes by at most this factor per batch


class BatchSizer:
    """The size of the next batch, fixed or adaptive. Shared by one process's loops and
    its steering thread (`set --batch-size` / `--batch-time` change it live)."""

    def __init__(self, size: int, target: float | None = None, *,
                 lo: int = MIN_ADAPTIVE, hi: int = MAX_ADAPTIVE) -> None:
        self._lock = threading.Lock()
        self.lo, self.hi = lo, hi
        self._size = max(1, size)
        self.target = target if target else None
        self._rate: float | None = None  # smoothed rows/s
        self.chosen: list[int] = []  # the sizes chosen, in order (for logs and benchmarks)

    def __call__(self) -> int:
        with self._lock:
            return self._size

    def fix(self, size: int) -> None:
        """A fixed size from now on (adaptation off)."""
        with self._lock:
            self._size, self.target, self._rate = max(1, size), None, None

    def follow(self, target: float | None) -> None:
        """Follow a target batch time in seconds from now on (None or 0: keep the size)."""
        with self._lock:
            self.target = target if target else None
            self._rate = None

    def observe(self, rows: int, seconds: float) -> int:
        """A batch of `rows` took `seconds`: the size of the next one."""
        with self._lock:
            if self.target is None or rows <= 0 or seconds <= 0:
                return self._size
            rate = rows / seconds
            self._rate = rate if self._rate is None else (
                SMOOTHING * rate + (1 - SMOOTHING) * self._rate)
            want = self._rate * self.target
            want = min(max(want, self._size / MAX_STEP), self._size * MAX_STEP)
            self._size = int(min(max(round(want), self.lo), max(self.hi, self.lo)))
            self.chosen.append(self._size)
            return self._size
