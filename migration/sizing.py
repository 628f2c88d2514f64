"""The size of the next batch: fixed (`--batch-size`), or following a target batch time
(`--batch-time`), as pt-online-schema-change's `--chunk-time` sizes its chunks.

A batch's time is measured commit to commit: its KMS work (which overlaps the previous
batch's write) and its write transaction, the time a pause, a Ctrl-C or a crash waits on
or loses. After each batch the seconds per row it took are smoothed (an exponential
average, so that one slow batch does not halve the next), and the next size is the target
over that, changed by at most a factor of 2 per batch and kept within bounds.

Seconds per row, not rows per second: a batch's time is its size times its seconds per
row, so it is their average that predicts it. An average of rates overestimates the rate
(the mean of 100 and 300 rows/s is 200, while 2 x 150 rows take 1.5 + 0.5 = 2 s: 150
rows/s): the batches ran longer than the target under a varying rate, and after a
slowdown the fast past kept them too long for a batch or two more.
"""

from __future__ import annotations

import math
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
        self._per_row: float | None = None  # smoothed seconds per row
        self.chosen: list[int] = []  # the sizes chosen, in order (for logs and benchmarks)

    def __call__(self) -> int:
        with self._lock:
            return self._size

    def fix(self, size: int) -> None:
        """A fixed size from now on (adaptation off)."""
        with self._lock:
            self._size, self.target, self._per_row = max(1, size), None, None

    def follow(self, target: float | None) -> None:
        """Follow a target batch time in seconds from now on (None or 0: keep the size)."""
        with self._lock:
            self.target = target if target else None
            self._per_row = None

    def observe(self, rows: int, seconds: float) -> int:
        """A batch of `rows` took `seconds`: the size of the next one."""
        with self._lock:
            if self.target is None or rows <= 0 or seconds <= 0:
                return self._size
            per_row = seconds / rows
            self._per_row = per_row if self._per_row is None else (
                SMOOTHING * per_row + (1 - SMOOTHING) * self._per_row)
            want = self.target / self._per_row if self._per_row > 0 else math.inf
            # At most MAX_STEP either way, rounded inwards (21 rows never go to 10).
            want = min(max(want, math.ceil(self._size / MAX_STEP)), int(self._size * MAX_STEP))
            self._size = min(max(round(want), self.lo), max(self.hi, self.lo))
            self.chosen.append(self._size)
            return self._size
