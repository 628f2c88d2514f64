"""The key census: what `verify` counted, by format and key, kept for `status`.

Verify reads the targets on a read-only session; its census is the one thing it writes,
here, after the fact: one short transaction on an engine of its own, into
`kms_migrate_census` only, and only when that table already exists (verify never creates
the bookkeeping schema). A census is one `taken` number shared by its rows: the id of its
first row, so two verifies recording at once never share one, with no lock and on both
databases. Counts, formats, key labels and key ARNs only: never a value, never a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, func, insert, inspect, select, update

from .base import aware, now
from .tables import census, runs

__all__ = ["Census", "CensusRow", "census_ready", "known_key_arns", "latest_census",
           "record_census"]


@dataclass(frozen=True)
class CensusRow:
    """How many values of one column are in one format under one key (see tables.census)."""

    table_name: str
    column_name: str
    format: str
    key: str
    count: int


@dataclass(frozen=True)
class Census:
    taken: int
    taken_at: datetime
    rows: list[CensusRow]


def census_ready(conn: Connection) -> bool:
    """Whether this database has the census table (bookkeeping at revision 0006 or later)."""
    return inspect(conn).has_table(census.name)


def known_key_arns(conn: Connection) -> list[str]:
    """Every KMS key ARN a run recorded here (a run's key, a rekey's destination), sorted:
    the keys a census names even when no value is under them. Empty before the census
    table exists (older bookkeeping has no destination column)."""
    if not census_ready(conn):
        return []
    r = runs.c
    found: set[str] = set()
    for col in (r.key_arn, r.to_key_arn):
        found.update(str(arn) for arn in conn.execute(select(col).distinct()).scalars() if arn)
    return sorted(found)


def record_census(engine: Engine, rows: Sequence[CensusRow]) -> int | None:
    """Record one census in a transaction of its own (commits); its `taken` number, or None
    when there is nothing to record or no census table to record it in (nothing written)."""
    if not rows:
        return None
    with engine.begin() as conn:
        if not census_ready(conn):
            return None
        at = now()
        first, *rest = rows
        key = conn.execute(insert(census).values(taken=0, taken_at=at, **_values(first))
                           ).inserted_primary_key
        assert key is not None
        taken = int(key[0])
        conn.execute(update(census).where(census.c.id == taken).values(taken=taken))
        if rest:
            conn.execute(insert(census),
                         [{"taken": taken, "taken_at": at, **_values(r)} for r in rest])
    return taken


def latest_census(conn: Connection) -> Census | None:
    """The newest census, its rows in the order they were recorded; None when verify never
    recorded one here (or the bookkeeping predates the census)."""
    if not census_ready(conn):
        return None
    c = census.c
    taken = conn.execute(select(func.max(c.taken))).scalar()
    if taken is None:
        return None
    found = conn.execute(select(c.taken_at, c.table_name, c.column_name, c.format, c.key,
                                c.count.label("n")).where(c.taken == taken).order_by(c.id)
                         ).all()
    if not found:
        return None
    at = aware(found[0].taken_at)
    assert at is not None
    return Census(int(taken), at, [
        CensusRow(r.table_name, r.column_name, r.format, r.key, int(r.n)) for r in found])


def _values(row: CensusRow) -> dict[str, object]:
    return {"table_name": row.table_name, "column_name": row.column_name,
            "format": row.format, "key": row.key, "count": row.count}
