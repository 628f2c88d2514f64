"""Replays the journal back: every value the tool migrated gets its original token again.

Batch by batch, with the mirror compare-and-swap (``WHERE col = :migrated_value``), each
batch committing its restores, the journal status changes and its checkpoint together.
No KMS call and no Fernet key is needed: the journal holds the exact original bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from checkpoints import store
from checkpoints.leases import Lease
from checkpoints.lock import RunLock
from checkpoints.store import FailureRow, Run
from checkpoints.tables import journal

from . import __version__
from .applier import apply_rollback_batch
from .config import Target
from .errors import ConfigError, ResumeMismatchError
from .logs import get_logger
from .migrator import ColumnSummary, lock_held
from .progress import NullProgress, Progress
from .reader import BoundTarget, bind_target

__all__ = ["RollbackResult", "rollback"]


@dataclass
class RollbackResult:
    run_id: int | None = None
    resumed: bool = False
    columns: list[ColumnSummary] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def restored(self) -> int:
        return sum(c.migrated for c in self.columns)

    @property
    def conflicts(self) -> int:
        return sum(c.conflicts for c in self.columns)


def _pending_targets(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(journal.c.table_name, journal.c.column_name)
            .where(journal.c.status == "migrated").distinct()
            .order_by(journal.c.table_name, journal.c.column_name)
        ).all()
    return [(t, c) for t, c in rows]


def rollback(
    engine: Engine,
    *,
    batch_size: int = 500,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_first_write: Callable[[], None] | None = None,
) -> RollbackResult:
    """Restore the original token of every migrated value not yet rolled back; resumable."""
    started = time.monotonic()
    result = RollbackResult()
    check_can_roll_back(engine)
    store.ensure_schema(engine)
    with lock_held(engine, "rollback") as run_lock:
        if before_first_write is not None:
            before_first_write()  # the lock is ours: e.g. the SQLite backup
        return _rollback(engine, batch_size, result, run_lock, started,
                         progress or NullProgress(), should_stop)


def check_can_roll_back(engine: Engine) -> None:
    """Refuse (ConfigError) when there is no journal, or it was finalized."""
    with engine.connect() as conn:
        present = store.schema_present(conn)
    if not present:
        raise ConfigError(
            "nothing to roll back: this database has no kms-migrate journal (no migrate run "
            "has written to it); check --db"
        )
    from .finalize import finalized_refusal  # local: finalize imports this module

    with engine.connect() as conn:
        finalized = finalized_refusal(conn)
    if finalized is not None:
        raise ConfigError(finalized)


def start_rollback_run(engine: Engine, batch_size: int, run_lock: RunLock,
                       ranged: bool = False) -> tuple[Run, bool]:
    """Resume the unfinished rollback run, or start one over every column the journal
    still has migrated values of; abandon an unfinished migrate run (its checkpoint would
    skip the rows restored now: a later migrate starts afresh).

    A run started with --workers is resumed only with --workers: its ranges hold its
    positions and counts, which a single process would neither move nor report."""
    resumed = False
    with engine.begin() as conn:
        run = store.unfinished_run(conn, "rollback")
        if run is not None and run.ranged and not ranged:
            raise ResumeMismatchError(
                f"unfinished rollback run {run.id} was started with --workers: resume it "
                "with --workers (any number; 1 on SQLite); nothing was written"
            )
        if run is not None:
            store.set_state(conn, run.id, "running")
            resumed = True
        pending_mig = store.unfinished_run(conn, "migrate")
        if pending_mig is not None:
            store.set_state(conn, pending_mig.id, "abandoned",
                            note="abandoned by a rollback; the next migrate starts a new run")
    if run is None:
        pairs = _pending_targets(engine)
        with engine.begin() as conn:
            run = store.create_run(
                conn, kind="rollback", targets=pairs,
                targets_json=json.dumps([{"table": t, "columns": [c]} for t, c in pairs]),
                fingerprint="journal", batch_size=batch_size, tool_version=__version__,
            )
    with engine.begin() as conn:
        run_lock.bind_run(conn, run.id)
    return run, resumed


def _rollback(
    engine: Engine,
    batch_size: int,
    result: RollbackResult,
    run_lock: RunLock,
    started: float,
    progress: Progress,
    should_stop: Callable[[], bool] | None,
) -> RollbackResult:
    run, result.resumed = start_rollback_run(engine, batch_size, run_lock)
    result.run_id = run.id
    log = get_logger(run_id=run.id, kind="rollback")
    log.info("run_started", resumed=result.resumed)
    with engine.connect() as conn:
        positions = store.load_checkpoints(conn, run.id)

    bound: dict[str, BoundTarget] = {}
    state = "stopped"
    try:
        for (table, column), ck in sorted(positions.items()):
            summary = ColumnSummary(table, column, migrated=ck.migrated, conflicts=ck.conflicts)
            result.columns.append(summary)
            if ck.done:
                continue
            if table not in bound:
                pk_name = _pk_name(engine, table)
                with engine.connect() as conn:
                    bound[table] = bind_target(conn, Target(table, pk_name, (column,)))
            bt = bound[table]
            if bt.target.columns != (column,):
                bt = BoundTarget(Target(table, bt.target.primary_key, (column,)), bt.table,
                                 bt.pk_is_int)
            after = int(ck.last_pk) if ck.last_pk is not None else 0
            progress.start(table, column, _journal_left(engine, table, column, after))
            _rollback_column(engine, bt, column, after, batch_size, run.id, run_lock.fence,
                             summary, log, progress, should_stop)
        state = "completed"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    finally:
        progress.finish()
        result.seconds = time.monotonic() - started
        try:
            with engine.begin() as conn:
                store.set_state(conn, run.id, state)
        except Exception:  # best effort; the run stays resumable
            log.warning("run_state_not_recorded", state=state)
        log.info("run_finished", state=state, seconds=round(result.seconds, 3))
    with engine.connect() as conn:
        result.failures = store.failures_of(conn, run.id)
    return result


def _journal_page(
    engine: Engine, table: str, column: str, after: int, limit: int, upto: int | None = None
) -> list[tuple[int, str, str, str]]:
    """The next journal entries still to roll back for one column, in journal order
    (up to journal id `upto`, the end of a range, when given)."""
    j = journal.c
    q = (
        select(j.id, j.pk, j.original, j.migrated)
        .where(j.table_name == table, j.column_name == column, j.status == "migrated",
               j.id > after)
        .order_by(j.id).limit(limit)
    )
    if upto is not None:
        q = q.where(j.id <= upto)
    with engine.connect() as conn:
        return [(int(r.id), r.pk, r.original, r.migrated) for r in conn.execute(q)]


def _journal_left(engine: Engine, table: str, column: str, after: int) -> int:
    j = journal.c
    q = select(func.count()).select_from(journal).where(
        j.table_name == table, j.column_name == column, j.status == "migrated", j.id > after)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def _rollback_column(
    engine: Engine, bt: BoundTarget, column: str, after: int, batch_size: int, run_id: int,
    fence: Callable[[Connection], None], summary: ColumnSummary, log: Any, progress: Progress,
    should_stop: Callable[[], bool] | None, *, upto: int | None = None,
    lease: Lease | None = None,
) -> int:
    """Replay one column's journal from id `after` (to id `upto`, the end of a range of a
    ranged run, whose checkpoint `lease` then moves); the number of batches."""
    batch_no = 0
    while True:
        entries = _journal_page(engine, bt.name, column, after, batch_size, upto)
        # The end of the column, or the range's last id: done, without an empty batch.
        done = len(entries) < batch_size or (upto is not None and entries[-1][0] == upto)
        counts = apply_rollback_batch(engine, bt, column, run_id, entries, done=done,
                                      fence=fence, lease=lease)
        summary.add(counts)
        batch_no += 1
        log.info("batch_committed", table=bt.name, column=column, batch=batch_no,
                 restored=counts.migrated, conflicts=counts.conflicts)
        progress.advance(bt.name, column, len(entries))
        if done:
            return batch_no
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt  # asked to stop: this batch is committed, stop here
        after = entries[-1][0]


def _pk_name(engine: Engine, table: str) -> str:
    from sqlalchemy import inspect

    with engine.connect() as conn:
        insp = inspect(conn)
        if not insp.has_table(table):
            raise ConfigError(
                f"the journal names table {table}, which no longer exists: restore it or "
                "check --db; nothing was written"
            )
        cols = insp.get_pk_constraint(table).get("constrained_columns") or []
    if len(cols) != 1:
        raise ConfigError(f"table {table} no longer has a single-column primary key")
    return str(cols[0])
