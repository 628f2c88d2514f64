"""The only code that writes target tables: one batch, one transaction.

A batch's compare-and-swap rewrites, their journal rows, its failures and its checkpoint
commit together, so a crash at any instant leaves either all of the batch or none of it.
Every rewrite is ``UPDATE t SET col = :new WHERE pk = :pk AND col = :old``: a value the
application changed after we read it matches nothing, is left as the application wrote it,
and is counted as a conflict for the next run to pick up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from sqlalchemy import Connection, Engine, Table, Update, bindparam, case, select, update

from checkpoints import rollback_journal, store
from checkpoints.leases import Lease
from checkpoints.store import Batch, BatchCounts, FailureRow, JournalRow

from .db import max_bind_params
from .reader import BoundTarget

__all__ = [
    "CONFLICT_REASONS", "REASON_CONFLICT", "REASON_CONFLICT_REKEY", "Rewrite", "Writer",
    "apply_migrate_batch", "apply_rollback_batch",
]

REASON_CONFLICT = (
    "changed by the application while being migrated; left as the application wrote it "
    "(migrate --retry-failed picks it up)"
)
# A rekey run's: it has no --retry-failed, and a retry reads only migrate's failures.
REASON_CONFLICT_REKEY = (
    "changed by the application while being rekeyed; left as the application wrote it "
    "(kms-migrate rekey, run again, picks it up)"
)
CONFLICT_REASONS = (REASON_CONFLICT, REASON_CONFLICT_REKEY)


@dataclass(frozen=True)
class Rewrite:
    """One compare-and-swap: set the column to `new` where it still holds `old`."""

    pk: object
    old: str
    new: str


CAS_CHUNK = 500  # rows per UPDATE statement at most
CAS_PARAMS_PER_ROW = 5  # placeholders one row binds in the CAS statement
IN_CHUNK = 900  # keys per IN list when reading back, at most


def _rounds(rewrites: Sequence[Rewrite], chunk: int = CAS_CHUNK) -> list[list[int]]:
    """Split rewrites into statements of at most `chunk` with no primary key twice
    (a rollback may hold two journal entries for one cell)."""
    rounds: list[tuple[set[object], list[int]]] = []
    for i, rw in enumerate(rewrites):
        for keys, idxs in rounds:
            if rw.pk not in keys and len(idxs) < chunk:
                keys.add(rw.pk)
                idxs.append(i)
                break
        else:
            rounds.append(({rw.pk}, [i]))
    return [idxs for _, idxs in rounds]


_CAS_STATEMENTS: dict[tuple[int, str, int], tuple[Table, Update]] = {}


def _cas_statement(bt: BoundTarget, column: str, n: int) -> Update:
    """The n-row compare-and-swap UPDATE for one column, built once and reused.

    Reusing the statement object lets SQLAlchemy's compiled cache serve it; building a
    500-way CASE per batch cost CPU the KMS threads needed. Cached by the table object's
    id together with the object itself (so an id is never reused while cached).
    """
    key = (id(bt.table), column, n)
    hit = _CAS_STATEMENTS.get(key)
    if hit is not None and hit[0] is bt.table:
        return hit[1]
    if len(_CAS_STATEMENTS) > 256:
        _CAS_STATEMENTS.clear()
    col = bt.col(column)
    ks = [bindparam(f"k{i}", type_=bt.pk.type) for i in range(n)]
    olds = [bindparam(f"o{i}", type_=col.type) for i in range(n)]
    news = [bindparam(f"n{i}", type_=col.type) for i in range(n)]
    stmt = (
        update(bt.table)
        .where(bt.pk.in_(ks), col == case(*zip(ks, olds, strict=True), value=bt.pk))
        .values({column: case(*zip(ks, news, strict=True), value=bt.pk)})
    )
    _CAS_STATEMENTS[key] = (bt.table, stmt)
    return stmt


def cas_many(
    conn: Connection, bt: BoundTarget, column: str, rewrites: Sequence[Rewrite]
) -> list[bool]:
    """Apply many compare-and-swaps as one statement per chunk; say which of them took.

        UPDATE t SET col = CASE pk WHEN :k1 THEN :new1 ... END
        WHERE pk IN (:k1, ...) AND col = CASE pk WHEN :k1 THEN :old1 ... END

    One statement, not an executemany: the KMS threads keep the GIL busy, and SQLite's
    driver gives the GIL up around every row of an executemany, so 500 single-row
    statements queued behind them for seconds where one statement takes milliseconds.
    A single statement's rowcount is exact on every driver: when it says every row took,
    they did; otherwise which ones did is read back in the same transaction (a row now
    holding exactly the `new` value we wrote: a fresh KMS ciphertext, or the journal's
    original on rollback, which nobody else can write while we hold the row).
    """
    took = [False] * len(rewrites)
    col = bt.col(column)
    # Each statement within the connection's parameter limit: SQLite before 3.32 allows
    # 999, so a 500-row CAS would fail every full batch. A row binds 5 placeholders: its
    # key three times (IN list and both CASEs; SQLite's `?` are one variable each), its
    # old and its new value once.
    limit = max_bind_params(conn)
    in_chunk = min(IN_CHUNK, limit)
    for idxs in _rounds(rewrites, max(1, min(CAS_CHUNK, limit // CAS_PARAMS_PER_ROW))):
        chunk = [rewrites[i] for i in idxs]
        keys = [rw.pk for rw in chunk]
        params: dict[str, object] = {}
        for n, rw in enumerate(chunk):
            params[f"k{n}"], params[f"o{n}"], params[f"n{n}"] = rw.pk, rw.old, rw.new
        if conn.execute(_cas_statement(bt, column, len(chunk)), params).rowcount == len(chunk):
            for i in idxs:
                took[i] = True
            continue
        now_holds: dict[object, object] = {}
        for j in range(0, len(keys), in_chunk):
            q = select(bt.pk, col).where(bt.pk.in_(keys[j:j + in_chunk]))
            now_holds.update((pk, value) for pk, value in conn.execute(q))
        for i, rw in zip(idxs, chunk, strict=True):
            took[i] = now_holds.get(rw.pk) == rw.new
    return took


@dataclass(frozen=True)
class Writer:
    """Where one column's batches commit: the engine and target column, the run (and the
    range of a ranged run, with its lease), and the fence that proves the lock is ours."""

    engine: Engine
    target: BoundTarget
    column: str
    run_id: int
    fence: Callable[[Connection], None] | None = None
    lease: Lease | None = None
    conflict_reason: str = REASON_CONFLICT  # a rekey run's: REASON_CONFLICT_REKEY

    def record(self, conn: Connection, batch: Batch) -> None:
        store.record_batch(conn, self.run_id, self.target.name, self.column, batch,
                           self.lease)


def apply_migrate_batch(w: Writer, rewrites: Sequence[Rewrite], failures: Sequence[FailureRow],
                        counts: BatchCounts, last_pk: object, done: bool) -> BatchCounts:
    """Commit one migrate batch; return its counts with the conflicts the CAS found."""
    bt, column = w.target, w.column
    journal_rows: list[JournalRow] = []
    conflicted: list[FailureRow] = []
    with w.engine.begin() as conn:
        if w.fence is not None:
            w.fence(conn)  # first: holds the lock row until commit, raises if the lock was lost
        for rw, took in zip(rewrites, cas_many(conn, bt, column, rewrites), strict=True):
            if took:
                journal_rows.append(JournalRow(bt.pk_text(rw.pk), original=rw.old, migrated=rw.new))
            else:
                # Recorded with the failures, so that it is named, counts as left (exit 1)
                # and `migrate --retry-failed` finds it.
                conflicted.append(FailureRow(bt.name, column, bt.pk_text(rw.pk),
                                             w.conflict_reason))
        final = replace(counts, migrated=len(journal_rows), conflicts=len(conflicted))
        w.record(conn, Batch(None if last_pk is None else bt.pk_text(last_pk), final, done,
                             journal_rows, [*failures, *conflicted]))
    return final


def apply_rollback_batch(w: Writer, entries: Sequence[tuple[int, str, str, str]],
                         done: bool) -> BatchCounts:
    """Commit one rollback batch of journal entries (id, pk, original, migrated).

    The CAS is the mirror of migrate's: put the original back only where the column still
    holds exactly the value the tool wrote.
    """
    bt, column = w.target, w.column
    failures: list[FailureRow] = []
    ts = store.now()
    with w.engine.begin() as conn:
        if w.fence is not None:
            w.fence(conn)
        took = cas_many(conn, bt, column, [
            Rewrite(bt.pk_value(pk_text), old=migrated, new=original)
            for _, pk_text, original, migrated in entries
        ])
        outcomes: list[tuple[int, bool]] = []
        for (jid, pk_text, _, _), ok in zip(entries, took, strict=True):
            if not ok:
                failures.append(FailureRow(
                    bt.name, column, pk_text,
                    "value changed since kms-migrate wrote it; left as it is",
                ))
            outcomes.append((jid, ok))
        rollback_journal.mark_replayed(conn, w.run_id, outcomes, ts)
        counts = BatchCounts(migrated=sum(took), conflicts=len(failures))
        w.record(conn, Batch(str(entries[-1][0]) if entries else None, counts, done,
                             failure_rows=failures))
    return counts
