"""The only code that writes target tables: one batch, one transaction.

A batch's compare-and-swap rewrites, their journal rows, its failures and its checkpoint
commit together, so a crash at any instant leaves either all of the batch or none of it.
Every rewrite is ``UPDATE t SET col = :new WHERE pk = :pk AND col = :old``: a value the
application changed after we read it matches nothing, is left as the application wrote it,
and is counted as a conflict for the next run to pick up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, bindparam, select, update

from checkpoints import store
from checkpoints.store import BatchCounts, FailureRow, JournalRow
from checkpoints.tables import journal

from .reader import BoundTarget

__all__ = ["Rewrite", "apply_migrate_batch", "apply_rollback_batch"]


@dataclass(frozen=True)
class Rewrite:
    """One compare-and-swap: set the column to `new` where it still holds `old`."""

    pk: object
    old: str
    new: str


IN_CHUNK = 900  # keys per IN list: under every backend's bound-parameter limit


def cas_many(
    conn: Connection, bt: BoundTarget, column: str, rewrites: Sequence[Rewrite]
) -> list[bool]:
    """Apply compare-and-swaps in one executemany; say which of them took.

    Per-row rowcounts are not reported by every driver for an executemany, so which rows
    took is read back inside the same transaction: a row holding exactly the `new` value
    we wrote took (a fresh KMS ciphertext, or the journal's original on rollback, that
    nobody else could have written there while our transaction holds the row).
    """
    if not rewrites:
        return []
    col = bt.col(column)
    stmt = (
        update(bt.table)
        .where(bt.pk == bindparam("cas_pk"), col == bindparam("cas_old"))
        .values({column: bindparam("cas_new")})
    )
    conn.execute(stmt, [{"cas_pk": rw.pk, "cas_old": rw.old, "cas_new": rw.new}
                        for rw in rewrites])
    now_holds: dict[object, object] = {}
    keys = [rw.pk for rw in rewrites]
    for i in range(0, len(keys), IN_CHUNK):
        q = select(bt.pk, col).where(bt.pk.in_(keys[i:i + IN_CHUNK]))
        now_holds.update((pk, value) for pk, value in conn.execute(q))
    return [now_holds.get(rw.pk) == rw.new for rw in rewrites]


def apply_migrate_batch(
    engine: Engine,
    bt: BoundTarget,
    column: str,
    run_id: int,
    *,
    rewrites: Sequence[Rewrite],
    failures: Sequence[FailureRow],
    counts: BatchCounts,
    last_pk: object,
    done: bool,
    fence: Callable[[Connection], None] | None = None,
) -> BatchCounts:
    """Commit one migrate batch; return its counts with the conflicts the CAS found."""
    journal_rows: list[JournalRow] = []
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)  # first: holds the lock row until commit, raises if the lock was lost
        for rw, took in zip(rewrites, cas_many(conn, bt, column, rewrites), strict=True):
            if took:
                journal_rows.append(JournalRow(bt.pk_text(rw.pk), original=rw.old, migrated=rw.new))
        conflicts = len(rewrites) - len(journal_rows)
        final = BatchCounts(
            migrated=len(journal_rows),
            skipped=counts.skipped,
            already=counts.already,
            failed=counts.failed,
            conflicts=conflicts,
        )
        store.record_batch(
            conn, run_id, bt.name, column,
            last_pk=None if last_pk is None else bt.pk_text(last_pk),
            counts=final, done=done, journal_rows=journal_rows, failure_rows=failures,
        )
    return final


def apply_rollback_batch(
    engine: Engine,
    bt: BoundTarget,
    column: str,
    run_id: int,
    entries: Sequence[tuple[int, str, str, str]],
    *,
    done: bool,
    fence: Callable[[Connection], None] | None = None,
) -> BatchCounts:
    """Commit one rollback batch of journal entries (id, pk, original, migrated).

    The CAS is the mirror of migrate's: put the original back only where the column still
    holds exactly the value the tool wrote.
    """
    restored = 0
    failures: list[FailureRow] = []
    ts = store.now()
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        took = cas_many(conn, bt, column, [
            Rewrite(bt.pk_value(pk_text), old=migrated, new=original)
            for _, pk_text, original, migrated in entries
        ])
        marks: list[dict[str, object]] = []
        for (jid, pk_text, _, _), ok in zip(entries, took, strict=True):
            if ok:
                restored += 1
            else:
                failures.append(FailureRow(
                    bt.name, column, pk_text,
                    "value changed since kms-migrate wrote it; left as it is",
                ))
            marks.append({"jid": jid, "st": "rolled_back" if ok else "conflict"})
        if marks:
            conn.execute(
                update(journal).where(journal.c.id == bindparam("jid"))
                .values(status=bindparam("st"), rollback_run_id=run_id, rolled_back_at=ts),
                marks,
            )
        counts = BatchCounts(migrated=restored, conflicts=len(failures))
        store.record_batch(
            conn, run_id, bt.name, column,
            last_pk=str(entries[-1][0]) if entries else None,
            counts=counts, done=done, failure_rows=failures,
        )
    return counts
