"""The small pieces every bookkeeping module shares: the clock and a batch's counts.

It imports nothing of the package, so that the modules above it (store, leases, lock, ...)
depend on it and never on each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["BatchCounts", "aware", "now"]


def now() -> datetime:
    """This process's clock, in UTC (the database's own is `hosts.clock`)."""
    return datetime.now(UTC)


def aware(ts: datetime | None) -> datetime | None:
    """A timestamp read back from the database, as UTC (SQLite drops the zone)."""
    if ts is None:
        return None
    # PostgreSQL's driver answers in the session's TimeZone, which need not be UTC.
    return ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)


@dataclass(frozen=True)
class BatchCounts:
    """The five counts of a batch, a column, a range or a run; they add up with `+`."""

    migrated: int = 0
    skipped: int = 0
    already: int = 0
    failed: int = 0
    conflicts: int = 0

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(self.migrated + other.migrated, self.skipped + other.skipped,
                           self.already + other.already, self.failed + other.failed,
                           self.conflicts + other.conflicts)

    @property
    def total(self) -> int:
        """Values gone through, whatever their outcome."""
        return self.migrated + self.skipped + self.already + self.failed + self.conflicts
