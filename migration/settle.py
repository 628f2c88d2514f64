"""Settling a run's failures once it is through its columns: exit 0 then means nothing is
left, and exit 1 names only values that exist (see `settle_column`). A single-process run
settles at its end (`migrator.migrate`), a ranged run in the command that completes it
(`supervisor._conclude`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from checkpoints import store
from checkpoints.store import BatchCounts, FailureRow

from .applier import CONFLICT_REASONS
from .batches import REASON_BEHIND, ColumnSummary
from .codec import FERNET_PREFIX, ValueKind, classify
from .logs import get_logger
from .reader import BoundTarget

__all__ = ["Settle", "settle_column", "settle_failures", "settle_run"]


@dataclass(frozen=True)
class Settle:
    """How a run of one kind settles its failures once it is through (`settle_column`).

    `behind`: record the values written behind the run's cursor that it must answer for
    (a migrate run: Fernet tokens; found by their shape alone). `holds`: whether a row's
    value still is one a recorded failure may be about; a failure whose row no longer holds
    one is dropped. A retry answers for its recorded failures only; a rekey run cannot tell
    a value's key by its shape, so it records nothing behind it (verify's census finds
    values under the old key) and drops the failures of rows deleted or emptied since."""

    behind: bool = True
    holds: Callable[[object], bool] = lambda v: classify(v) is ValueKind.FERNET
    narrow: str | None = f"{FERNET_PREFIX}%"  # a LIKE that finds the values `behind` wants

    @staticmethod
    def of(kind: str) -> Settle:
        if kind == "rekey":
            return Settle(behind=False, holds=lambda v: classify(v) is not ValueKind.EMPTY,
                          narrow=None)
        return Settle(behind=kind != "retry")


def settle_run(engine: Engine, bound: Sequence[BoundTarget], run_id: int | None,
               columns: Sequence[ColumnSummary], fence: Callable[[Connection], None] | None,
               how: Settle) -> None:
    """`settle_failures` for every column of a run, in one fenced transaction, counted
    into the run's column summaries."""
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        change = settle_failures(conn, bound, run_id, how)
    for summary in columns:
        summary.add(change[(summary.table, summary.column)])


def settle_failures(conn: Connection, bound: Sequence[BoundTarget], run_id: int | None,
                    how: Settle) -> dict[tuple[str, str], BatchCounts]:
    """`settle_column` for every column of the targets; the change of each one's counts."""
    return {(bt.name, column): settle_column(conn, bt, column, run_id, how)
            for bt in bound for column in bt.target.columns}


def settle_column(conn: Connection, bt: BoundTarget, column: str, run_id: int | None,
                  how: Settle) -> BatchCounts:
    """Once a run has been through a column, make its failures the values the column
    still holds that the run must answer for and did not rewrite, in the caller's
    transaction; the change of its counts. Exit 0 then means nothing is left, and exit 1
    names only values that exist.

    - (`how.behind`) A Fernet token the run neither migrated nor recorded is recorded
      (REASON_BEHIND): it was written behind the run's cursor (by the application, or
      before a resume). Not for a retry, which answers for the recorded failures only (and
      reads only their rows), nor a rekey (see `Settle`).
    - A recorded failure or conflict whose row is gone or no longer holds such a value
      (deleted, or rewritten by the application since, e.g. between an interrupted pass
      and its resume) is dropped, and taken off the count it was in: no value of it is
      left."""
    assert run_id is not None
    recorded = store.failures_in(conn, run_id, bt.name, column)
    known = {pk for _, pk, _ in recorded}
    holding = _holding_keys(conn, bt, column, how, None if how.behind else known)
    gone = [(i, reason) for i, pk, reason in recorded if pk not in holding]
    conflicts = sum(reason in CONFLICT_REASONS for _, reason in gone)
    dropped = BatchCounts(failed=len(gone) - conflicts, conflicts=conflicts)
    store.forget_failures(conn, run_id, bt.name, column, [i for i, _ in gone], dropped)
    log = get_logger(run_id=run_id)
    if gone:
        log.warning("failed_values_gone", table=bt.name, column=column, count=len(gone))
    left = [FailureRow(bt.name, column, pk, REASON_BEHIND)
            for pk in sorted(holding - known)] if how.behind else []
    if left:
        ck = store.load_checkpoints(conn, run_id)[(bt.name, column)]
        store.record_batch(conn, run_id, bt.name, column,
                           store.Batch(ck.last_pk, BatchCounts(failed=len(left)), done=True,
                                       failure_rows=left))
        log.warning("written_behind_the_run", table=bt.name, column=column, count=len(left))
    return BatchCounts(failed=len(left) - dropped.failed, conflicts=-conflicts)


def _holding_keys(conn: Connection, bt: BoundTarget, column: str, how: Settle,
                  only: set[str] | None) -> set[str]:
    """The keys (as text) of the rows whose value in `column` `how.holds`: every such row,
    or only those among the keys `only`."""
    col = bt.col(column)
    if only is None:
        where = [bt.pk.is_not(None)]
        if how.narrow is not None:
            # LIKE narrows the read on the server (case-insensitive on some databases:
            # `holds` decides); the prefix holds neither '%' nor '_'.
            where.append(col.like(how.narrow))
        pages = [select(bt.pk, col).where(*where)]
    else:
        keys = sorted(bt.pk_value(pk) for pk in only)
        pages = [select(bt.pk, col).where(bt.pk.in_(keys[i:i + 500]))
                 for i in range(0, len(keys), 500)]
    return {bt.pk_text(pk) for q in pages for pk, value in conn.execute(q)
            if how.holds(value)}
