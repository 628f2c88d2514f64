"""Deletes the rollback journal once `verify` passes: the end of a migration.

The journal holds the original Fernet token of every value the tool rewrote, and the old
ENCRYPTION_KEY still opens those tokens: while it exists, a database dump plus a stolen
`.env` still decrypt every migrated secret, the very exposure the migration removes.
Finalizing deletes it, batch by batch (one transaction each, fenced by the run lock), so
an interrupted finalize is finished by running it again. It cannot be undone: afterwards
`rollback` refuses, and only a backup taken before the migration has the Fernet tokens.

Nothing here reads a token: the deletes go by journal id, and no message carries a value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, func, select

from checkpoints import store
from checkpoints.lock import RunLock
from checkpoints.rollback_journal import delete_batch as _delete_batch  # tests wrap it
from checkpoints.store import Run
from checkpoints.tables import journal, runs

from . import __version__
from .config import Settings, Target
from .errors import ConfigError
from .kms import KMS
from .logs import get_logger
from .refusals import HOW_TO_FINISH
from .runs import RunEnd, lifecycle, lock_held
from .verify import VerifyResult, verify

__all__ = ["FinalizeResult", "finalize", "finalized_note", "finalized_refusal"]

# Runs that write target values or the journal: none may be unfinished when finalizing.
WRITER_KINDS = ("migrate", "retry", "rekey", "rollback")
DEFAULT_FINALIZE_BATCH = 5000


@dataclass
class FinalizeResult:
    run_id: int | None = None
    resumed: bool = False  # finished a finalize run that had been interrupted
    deleted: int = 0  # journal rows deleted by this invocation
    batches: int = 0
    verify: VerifyResult = field(default_factory=VerifyResult)
    seconds: float = 0.0
    # Journalled columns outside the given targets, verified too ("table.column").
    extra: list[str] = field(default_factory=list)


def finalize(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    batch_size: int = DEFAULT_FINALIZE_BATCH,
    should_stop: Callable[[], bool] | None = None,
) -> FinalizeResult:
    """Verify the targets and every column the journal holds, then delete the journal
    rows of what was verified; resumable.

    Refuses (ConfigError, nothing deleted) when the database has no kms-migrate bookkeeping,
    when a migrate, retry or rollback run is unfinished, when the journal holds a column
    whose target no run recorded, or when verify does not pass.
    """
    if batch_size < 1:
        raise ConfigError("the finalize batch size must be at least 1")
    started = time.monotonic()
    with engine.connect() as conn:
        if not store.schema_present(conn):
            raise ConfigError(
                "nothing to finalize: this database has no kms-migrate bookkeeping (no "
                "migrate run has written to it); check --db"
            )
        _refuse_unfinished_writers(conn)
        writers_seen = _latest_writer_id(conn)
        targets, extra = journal_targets(conn, settings.targets)
    result = FinalizeResult(extra=extra)
    result.verify = verify(replace(settings, targets=targets), engine=engine, kms=kms)
    if not result.verify.ok:
        left = sum(c.fernet_left for c in result.verify.columns)
        bad = sum(c.undecryptable for c in result.verify.columns)
        other = sum(c.other_key for c in result.verify.columns)
        failing = [f"{c.table}.{c.column}" for c in result.verify.columns
                   if c.fernet_left or c.undecryptable or c.other_key]
        also = (f" (also verified, as the journal holds them: {', '.join(extra)})"
                if extra else "")
        raise ConfigError(
            f"verify did not pass ({left} Fernet value(s) left, {bad} undecryptable "
            f"value(s), {other} under another KMS key, in {', '.join(failing) or 'the targets'})"
            f"{also}{_after_rekey(other)}: the rollback journal "
            "is still needed; run `kms-migrate verify` with the same options (and --config "
            "naming those columns) for the list, migrate or fix them, then finalize again; "
            "nothing was deleted"
        )
    pairs = [(t.table, c) for t in targets for c in t.columns]
    store.ensure_schema(engine)  # an older bookkeeping schema may lack the lock table
    with lock_held(engine, "finalize") as run_lock:
        return _finalize(_Journal(engine, run_lock, pairs, batch_size), result, writers_seen,
                         started, should_stop)


def _after_rekey(other: int) -> str:
    """What to say when values are under another key: after a rekey, finalize verifies
    under the destination."""
    if not other:
        return ""
    return ("; after a rekey, run finalize with --key-id the rekey's destination key (and "
            "--encryption-context if the values now carry it)")


def journal_targets(
    conn: Connection, given: Sequence[Target]
) -> tuple[tuple[Target, ...], list[str]]:
    """The given targets plus every (table, column) the journal still holds migrated values
    of, with the primary key the run that wrote them recorded; and those added, by name.

    Raises ConfigError naming the journalled columns no run recorded a target for.
    """
    rows = conn.execute(
        select(journal.c.run_id, journal.c.table_name, journal.c.column_name)
        .where(journal.c.status == "migrated").distinct()
        .order_by(journal.c.table_name, journal.c.column_name, journal.c.run_id)
    ).all()
    merged: dict[str, tuple[str, list[str]]] = {
        t.table: (t.primary_key, list(t.columns)) for t in given}
    extra: list[str] = []
    unknown: list[str] = []
    recorded: dict[int, list[dict[str, object]]] = {}
    for run_id, table, column in rows:
        if table in merged and column in merged[table][1]:
            continue
        if run_id not in recorded:
            run = store.get_run(conn, int(run_id))
            try:
                recorded[run_id] = run.targets if run is not None else []
            except ValueError:
                recorded[run_id] = []
        pk = next((str(t["primary_key"]) for t in recorded[run_id]
                   if t.get("table") == table and t.get("primary_key")
                   and isinstance(t.get("columns"), list)
                   and column in t["columns"]), None)  # type: ignore[operator]
        if pk is None:
            unknown.append(f"{table}.{column}")
            continue
        if table in merged:
            merged[table][1].append(column)
        else:
            merged[table] = (pk, [column])
        extra.append(f"{table}.{column}")
    # A column another run of the journal did record is known after all.
    unknown = [u for u in unknown if u not in extra]
    if unknown:
        names = ", ".join(sorted(set(unknown)))
        raise ConfigError(
            f"the rollback journal holds values of {names}, and no run recorded their "
            "target (primary key): finalize cannot verify them; restore the runs table or "
            "roll them back first; nothing was deleted"
        )
    targets = tuple(Target(t, pk, tuple(cols)) for t, (pk, cols) in merged.items())
    return targets, sorted(set(extra))


@dataclass(frozen=True)
class _Journal:
    """The journal rows finalize deletes: those of the verified (table, column) pairs, a
    batch at a time, each batch behind the fence of finalize's lock."""

    engine: Engine
    run_lock: RunLock
    pairs: Sequence[tuple[str, str]]
    batch_size: int

    def delete_batch(self, conn: Connection) -> int:
        self.run_lock.fence(conn)
        return _delete_batch(conn, self.batch_size, self.pairs)


def _finalize(journal: _Journal, result: FinalizeResult, writers_seen: int, started: float,
              should_stop: Callable[[], bool] | None) -> FinalizeResult:
    engine, run_lock, batch_size = journal.engine, journal.run_lock, journal.batch_size
    # Under the lock, and in the transaction of the first delete: nothing may have started
    # writing since the checks above, and a finalize run exists only once it deletes.
    with engine.begin() as conn:
        run_lock.fence(conn)
        _refuse_unfinished_writers(conn)
        latest = _latest_writer_id(conn)
        if latest != writers_seen:
            raise ConfigError(
                f"run {latest} started while finalize was verifying: run finalize again "
                "once it has finished; nothing was deleted"
            )
        run = store.unfinished_run(conn, "finalize")
        if run is not None:
            store.set_state(conn, run.id, "running")
            result.resumed = True
        else:
            run = store.create_run(conn, store.NewRun(
                "finalize", batch_size, tool_version=__version__))
        run_lock.bind_run(conn, run.id)
        deleted = journal.delete_batch(conn)
    result.run_id = run.id
    log = get_logger(run_id=run.id, kind="finalize")
    log.info("run_started", resumed=result.resumed, batch_size=batch_size)
    end = RunEnd()
    try:
        with lifecycle(engine, run.id, end):
            try:
                while True:
                    result.deleted += deleted
                    result.batches += 1
                    log.info("batch_committed", batch=result.batches, deleted=deleted)
                    if deleted < batch_size:
                        break
                    if should_stop is not None and should_stop():
                        raise KeyboardInterrupt  # asked to stop: this batch is committed
                    with engine.begin() as conn:
                        deleted = journal.delete_batch(conn)
                        store.touch_run(conn, run.id)
            finally:
                end.note = f"deleted {result.deleted} rollback journal row(s)" + (
                    " (resumed)" if result.resumed else "")
    finally:
        result.seconds = time.monotonic() - started
        log.info("run_finished", state=end.state, deleted=result.deleted,
                 seconds=round(result.seconds, 3))
    return result


def _refuse_unfinished_writers(conn: Connection) -> None:
    for kind in WRITER_KINDS:
        run = store.unfinished_run(conn, kind)
        if run is not None:
            raise ConfigError(
                f"{kind} run {run.id} is unfinished ({run.state}): finish it first "
                f"(`{HOW_TO_FINISH[kind]}`), then verify and finalize; nothing was deleted"
            )


def _latest_writer_id(conn: Connection) -> int:
    return int(conn.execute(
        select(func.coalesce(func.max(runs.c.id), 0)).where(runs.c.kind.in_(WRITER_KINDS))
    ).scalar_one())


def _utc(ts: datetime) -> str:
    ts = ts.astimezone(UTC) if ts.tzinfo else ts  # naive (SQLite): stored in UTC
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def finalized_refusal(conn: Connection) -> str | None:
    """Why `rollback` cannot run because of a finalize, or None when it can.

    Decided by what finalize did, not by the order of run ids: an unfinished finalize has
    deleted part of the journal, so any rollback would be partial (and migrate refuses to
    start until it is finished); a completed finalize with no journal row left to replay
    means the original tokens are gone. A completed finalize followed by a migrate leaves
    that migrate's journal, which rollback replays (`finalized_note` says what stays).
    """
    unfinished = store.unfinished_run(conn, "finalize")
    if unfinished is not None:
        return (
            f"finalize run {unfinished.id} (started {_utc(unfinished.started_at)}) has not "
            "finished deleting the rollback journal: part of the original Fernet tokens are "
            "gone, so a rollback would be partial; run `kms-migrate finalize` again to finish "
            "it, or restore the backup taken before the migration; nothing was written"
        )
    fin = _latest_completed_finalize(conn)
    if fin is None:
        return None
    pending = conn.execute(
        select(func.count()).select_from(journal).where(journal.c.status == "migrated")
    ).scalar_one()
    if pending:
        return None
    when = _utc(fin.finished_at or fin.updated_at)
    return (
        f"the rollback journal was deleted by finalize (run {fin.id}, {when}): the "
        "original Fernet tokens are gone, so kms-migrate cannot roll back; restore the "
        "backup taken before the migration if you must; nothing was written"
    )


def finalized_note(conn: Connection) -> str | None:
    """For a rollback after a completed finalize: the values it finalized stay KMS."""
    fin = _latest_completed_finalize(conn)
    if fin is None:
        return None
    return (f"note: values finalized by run {fin.id} ({_utc(fin.finished_at or fin.updated_at)})"
            " have no journal left and stay in KMS format; only values migrated since were "
            "restored")


def _latest_completed_finalize(conn: Connection) -> Run | None:
    row = conn.execute(
        select(runs.c.id).where(runs.c.kind == "finalize", runs.c.state == "completed")
        .order_by(runs.c.id.desc()).limit(1)
    ).first()
    return store.get_run(conn, int(row.id)) if row else None
