"""The errors of the bookkeeping layer: one tree, so a caller can tell them apart from the
rest (the command layer maps them to its exit codes and one-line messages).

None of them carries a plaintext, a key or a token: they name runs, ranges and columns.
"""

from __future__ import annotations

__all__ = ["BookkeepingError", "CheckpointLost", "LeaseLost", "LockHeld", "LockLost"]


class BookkeepingError(Exception):
    """The bookkeeping tables refused a step: nothing of that step was written."""


class LockHeld(BookkeepingError):
    """Another live process holds the lock; the message names it."""


class LockLost(BookkeepingError):
    """This process's lock was taken over; it must not write again."""


class LeaseLost(BookkeepingError):
    """The range's lease went to another worker (this one was presumed dead)."""


class CheckpointLost(BookkeepingError):
    """A batch's checkpoint update did not move exactly one row: committing the batch
    would let a resume redo it (or lose its position), so its transaction is refused."""
