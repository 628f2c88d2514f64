"""Writes to the rollback journal after its rows were recorded (`store.record_batch`):
a rollback marks the entries it replayed, finalize deletes the ones no longer needed.

Each function takes the caller's open connection and never commits: a rollback batch's
marks commit with the values it put back, a finalize batch's deletes with its run's
heartbeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    update,
)

from .tables import journal, runs

__all__ = ["delete_batch", "mark_replayed", "newest_rekey_layer", "pending"]


def pending(undoes_run_id: int | None) -> ColumnElement[bool]:
    """The journal entries a rollback replays, layer by layer: those of the rekey run
    `undoes_run_id` still to restore, or (None) those of the migrate and retry runs.

    A rekey's journal holds the KMS ciphertexts it replaced, and sits on top of the
    migrate journal of the same cells: a rollback restores one layer, newest first
    (`newest_rekey_layer`), so that each entry's compare-and-swap finds the value it wrote."""
    j = journal.c
    if undoes_run_id is not None:
        return and_(j.status == "migrated", j.run_id == undoes_run_id)
    migrate_runs = select(runs.c.id).where(runs.c.kind.in_(("migrate", "retry")))
    return and_(j.status == "migrated", j.run_id.in_(migrate_runs))


def newest_rekey_layer(conn: Connection) -> int | None:
    """The newest rekey run with journal entries still to restore, or None."""
    q = (select(func.max(journal.c.run_id))
         .select_from(journal.join(runs, runs.c.id == journal.c.run_id))
         .where(runs.c.kind == "rekey", journal.c.status == "migrated"))
    found = conn.execute(q).scalar()
    return None if found is None else int(found)


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
