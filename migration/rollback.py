"""Replays the journal back: every value the tool migrated gets its original token again.

Batch by batch, with the mirror compare-and-swap (``WHERE col = :migrated_value``), each
batch committing its restores, the journal status changes and its checkpoint together.
No KMS call and no Fernet key is needed: the journal holds the exact original bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sqlalchemy import Connection, Engine, func, select

from checkpoints import store
from checkpoints.lock import RunLock
from checkpoints.rollback_journal import newest_rekey_layer, pending
from checkpoints.store import FailureRow, Run
from checkpoints.tables import journal

from . import __version__
from .batches import ColumnSummary
from .config import Settings, Target
from .errors import ConfigError, ResumeMismatchError
from .finalize import finalized_refusal
from .guard import Guard, close_guards, guards_for
from .logs import get_logger
from .pipeline import ColumnJob, Hooks, rollback_column
from .reader import BoundTarget, bind_target, primary_key_of
from .runs import RunEnd, lifecycle, lock_held
from .steer import Steered, steered, steering_for

__all__ = ["RollbackResult", "journal_left", "rollback"]


@dataclass
class RollbackResult:
    run_id: int | None = None
    resumed: bool = False
    undoes: int | None = None  # the rekey run it restored (None: the migrate runs)
    columns: list[ColumnSummary] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    seconds: float = 0.0
    steered: Steered = field(default_factory=Steered)  # pauses, holds, changes

    @property
    def restored(self) -> int:
        return sum(c.migrated for c in self.columns)

    @property
    def conflicts(self) -> int:
        return sum(c.conflicts for c in self.columns)


def _pending_targets(engine: Engine, undoes: int | None) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(journal.c.table_name, journal.c.column_name)
            .where(pending(undoes)).distinct()
            .order_by(journal.c.table_name, journal.c.column_name)
        ).all()
    return [(t, c) for t, c in rows]


def rollback(
    engine: Engine,
    *,
    batch_size: int = 500,
    hooks: Hooks | None = None,
    before_first_write: Callable[[], None] | None = None,
    settings: Settings | None = None,
) -> RollbackResult:
    """Restore the original token of every migrated value not yet rolled back; resumable.

    `before_first_write` (e.g. the SQLite backup) runs once the lock is ours. `settings`:
    the steering options (--batch-time, the guards), when the command has them."""
    started = time.monotonic()
    result = RollbackResult()
    check_can_roll_back(engine)
    # A rollback reads only the journal: its columns' jobs need no more settings than these.
    settings = replace(settings or Settings(db_url=""), batch_size=batch_size)
    guards = guards_for(settings, engine)  # before the lock: a refusal writes nothing
    try:
        store.ensure_schema(engine)
        with lock_held(engine, "rollback") as run_lock:
            if before_first_write is not None:
                before_first_write()  # the lock is ours: e.g. the SQLite backup
            return _rollback(engine, settings, result, run_lock, (started, guards),
                             hooks or Hooks())
    finally:
        close_guards(guards)


def check_can_roll_back(engine: Engine) -> None:
    """Refuse (ConfigError) when there is no journal, or it was finalized."""
    with engine.connect() as conn:
        present = store.schema_present(conn)
    if not present:
        raise ConfigError(
            "nothing to roll back: this database has no kms-migrate journal (no migrate run "
            "has written to it); check --db"
        )
    with engine.connect() as conn:
        finalized = finalized_refusal(conn)
    if finalized is not None:
        raise ConfigError(finalized)


def start_rollback_run(engine: Engine, batch_size: int, run_lock: RunLock,
                       ranged: bool = False) -> tuple[Run, bool]:
    """Resume the unfinished rollback run, or start one over every column the journal
    still has values of to restore, one layer at a time: the newest rekey run's if any
    (back to the ciphertexts under its source key), else the migrate runs' (back to the
    Fernet tokens). Abandon an unfinished migrate or rekey run (its checkpoint would skip
    the rows restored now: a later run starts afresh).

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
        for kind in ("migrate", "rekey"):
            left = store.unfinished_run(conn, kind)
            if left is not None:
                store.set_state(conn, left.id, "abandoned", note=(
                    f"abandoned by a rollback; the next {kind} starts a new run"))
        undoes = newest_rekey_layer(conn) if run is None else None
    if run is None:
        pairs = _pending_targets(engine, undoes)
        with engine.begin() as conn:
            run = store.create_run(conn, store.NewRun(
                "rollback", batch_size, targets=pairs,
                targets_json=json.dumps([{"table": t, "columns": [c]} for t, c in pairs]),
                tool_version=__version__, undoes_run_id=undoes))
    with engine.begin() as conn:
        run_lock.bind_run(conn, run.id)
    return run, resumed


def _rollback(engine: Engine, settings: Settings, result: RollbackResult, run_lock: RunLock,
              start: tuple[float, list[Guard]], hooks: Hooks) -> RollbackResult:
    started, guards = start
    run, result.resumed = start_rollback_run(engine, settings.batch_size, run_lock)
    result.run_id, result.undoes = run.id, run.undoes_run_id
    log = get_logger(run_id=run.id, kind="rollback")
    log.info("run_started", resumed=result.resumed)
    with engine.connect() as conn:
        positions = store.load_checkpoints(conn, run.id)

    bound: dict[str, BoundTarget] = {}
    progress = hooks.progress
    end = RunEnd()
    steering = steering_for(engine, run.id, settings, kms=None, guards=guards,
                            progress=progress)
    try:
        with lifecycle(engine, run.id, end), steered(steering, run_lock):
            hooks = hooks.steered_by(steering, settings)
            for (table, column), ck in sorted(positions.items()):
                summary = ColumnSummary(table, column, ck.counts)
                result.columns.append(summary)
                if ck.done:
                    continue
                bt = _bound_column(engine, bound, table, column)
                after = int(ck.last_pk) if ck.last_pk is not None else 0
                progress.start(table, column,
                               _journal_left(engine, table, column, after, run.undoes_run_id))
                job = ColumnJob(engine, bt, column, settings, run_id=run.id,
                                fence=run_lock.fence, after=after, log=log,
                                undoes=run.undoes_run_id)
                rollback_column(job, summary, hooks)
    finally:
        progress.finish()
        result.steered = Steered.of(engine, steering)
        result.seconds = time.monotonic() - started
        log.info("run_finished", state=end.state, seconds=round(result.seconds, 3))
    with engine.connect() as conn:
        result.failures = store.failures_of(conn, run.id)
    return result


def _bound_column(engine: Engine, bound: dict[str, BoundTarget], table: str,
                  column: str) -> BoundTarget:
    """The journalled table bound once (its primary key from the schema), narrowed to
    `column`."""
    if table not in bound:
        pk_name = primary_key_of(engine, table)
        with engine.connect() as conn:
            bound[table] = bind_target(conn, Target(table, pk_name, (column,)))
    bt = bound[table]
    if bt.target.columns != (column,):
        bt = BoundTarget(Target(table, bt.target.primary_key, (column,)), bt.table,
                         bt.pk_is_int)
    return bt


def journal_left(conn: Connection, undoes: int | None) -> int:
    """How many journal entries of a layer (`pending`) are still to restore."""
    return int(conn.execute(
        select(func.count()).select_from(journal).where(pending(undoes))).scalar_one())


def _journal_left(engine: Engine, table: str, column: str, after: int,
                  undoes: int | None) -> int:
    j = journal.c
    q = select(func.count()).select_from(journal).where(
        j.table_name == table, j.column_name == column, pending(undoes), j.id > after)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())
