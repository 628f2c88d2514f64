"""Writes to the rollback journal after its rows were recorded (`store.record_batch`):
a rollback marks the entries it replayed, finalize deletes the ones no longer needed.

Each function takes the caller's open connection and never commits: a rollback batch's
marks commit with the values it put back, a finalize batch's deletes with its run's
heartbeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, and_, bindparam, delete, or_, select, text, update

from .tables import journal

__all__ = ["delete_batch", "mark_replayed"]


def mark_replayed(
    conn: Connection, rollback_run_id: int, outcomes: Sequence[tuple[int, bool]], at: datetime,
) -> None:
    """Mark journal entries (id, restored) of a rollback batch: `rolled_back` where the
    original was put back, `conflict` where the value had changed since."""
    marks = [{"jid": jid, "st": "rolled_back" if ok else "conflict"} for jid, ok in outcomes]
    if marks:
        conn.execute(
            update(journal).where(journal.c.id == bindparam("jid"))
            .values(status=bindparam("st"), rollback_run_id=rollback_run_id, rolled_back_at=at),
            marks,
        )


def delete_batch(conn: Connection, batch_size: int, pairs: Sequence[tuple[str, str]]) -> int:
    """Delete the next `batch_size` journal rows of the verified (table, column) pairs (any
    status), and rows no rollback would replay (rolled back, conflict), by id; how many."""
    if conn.dialect.name == "sqlite":
        # Zero the freed space, so the tokens are not left readable in the database file.
        conn.execute(text("PRAGMA secure_delete = ON"))
    j = journal.c
    verified: list[ColumnElement[bool]] = [
        and_(j.table_name == t, j.column_name == c) for t, c in pairs]
    ids = (select(j.id).where(or_(j.status != "migrated", *verified))
           .order_by(j.id).limit(batch_size).scalar_subquery())
    return int(conn.execute(delete(journal).where(journal.c.id.in_(ids))).rowcount)
