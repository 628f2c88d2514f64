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
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


@dataclass(frozen=True)
class BatchCounts:
    migrated: int = 0
    skipped: int = 0
    already: int = 0
    failed: int = 0
    conflicts: int = 0
