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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, delete, func, select, text, update

from checkpoints import store
from checkpoints.lock import RunLock
from checkpoints.store import Run
from checkpoints.tables import journal, runs

from . import __version__
from .config import Settings
from .errors import ConfigError
from .kms import KMS
from .logs import get_logger
from .migrator import lock_held
from .verify import VerifyResult, verify

__all__ = ["FinalizeResult", "finalize", "finalized_refusal"]

# Runs that write target values or the journal: none may be unfinished when finalizing.
WRITER_KINDS = ("migrate", "retry", "rollback")
_HOW_TO_FINISH = {
    "migrate": "kms-migrate migrate",
    "retry": "kms-migrate migrate --retry-failed",
    "rollback": "kms-migrate rollback",
}
DEFAULT_FINALIZE_BATCH = 5000


@dataclass
class FinalizeResult:
    run_id: int | None = None
    resumed: bool = False  # finished a finalize run that had been interrupted
    deleted: int = 0  # journal rows deleted by this invocation
    batches: int = 0
    verify: VerifyResult = field(default_factory=VerifyResult)
    seconds: float = 0.0


def finalize(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    batch_size: int = DEFAULT_FINALIZE_BATCH,
    should_stop: Callable[[], bool] | None = None,
) -> FinalizeResult:
    """Verify the targets, then delete every rollback journal row; resumable.

    Refuses (ConfigError, nothing deleted) when the database has no kms-migrate bookkeeping,
    when a migrate, retry or rollback run is unfinished, or when verify does not pass.
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
    result = FinalizeResult()
    result.verify = verify(settings, engine=engine, kms=kms)
    if not result.verify.ok:
        left = sum(c.fernet_left for c in result.verify.columns)
        bad = sum(c.undecryptable for c in result.verify.columns)
        other = sum(c.other_key for c in result.verify.columns)
        raise ConfigError(
            f"verify did not pass ({left} Fernet value(s) left, {bad} undecryptable "
            f"value(s), {other} under another KMS key): the rollback journal is still "
            "needed; run `kms-migrate verify` with "
            "the same options for the list, migrate or fix them, then finalize again; "
            "nothing was deleted"
        )
    store.ensure_schema(engine)  # an older bookkeeping schema may lack the lock table
    with lock_held(engine, "finalize") as run_lock:
        return _finalize(engine, batch_size, result, run_lock, writers_seen, started,
                         should_stop)


def _finalize(
    engine: Engine,
    batch_size: int,
    result: FinalizeResult,
    run_lock: RunLock,
    writers_seen: int,
    started: float,
    should_stop: Callable[[], bool] | None,
) -> FinalizeResult:
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
            run = store.create_run(conn, kind="finalize", targets=[], targets_json="[]",
                                   fingerprint="journal", batch_size=batch_size,
                                   tool_version=__version__)
        run_lock.bind_run(conn, run.id)
        deleted = _delete_batch(conn, batch_size)
    result.run_id = run.id
    log = get_logger(run_id=run.id, kind="finalize")
    log.info("run_started", resumed=result.resumed, batch_size=batch_size)
    state = "stopped"
    try:
        while True:
            result.deleted += deleted
            result.batches += 1
            log.info("batch_committed", batch=result.batches, deleted=deleted)
            if deleted < batch_size:
                break
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt  # asked to stop: this batch is committed, stop here
            with engine.begin() as conn:
                run_lock.fence(conn)
                deleted = _delete_batch(conn, batch_size)
                conn.execute(update(runs).where(runs.c.id == run.id)
                             .values(updated_at=store.now()))
        state = "completed"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    finally:
        result.seconds = time.monotonic() - started
        note = f"deleted {result.deleted} rollback journal row(s)" + (
            " (resumed)" if result.resumed else "")
        try:
            with engine.begin() as conn:
                store.set_state(conn, run.id, state, note=note)
        except Exception:  # best effort; the run stays resumable
            log.warning("run_state_not_recorded", state=state)
        log.info("run_finished", state=state, deleted=result.deleted,
                 seconds=round(result.seconds, 3))
    return result


def _delete_batch(conn: Connection, batch_size: int) -> int:
    """Delete the next `batch_size` journal rows (any status), by id; return how many."""
    if conn.dialect.name == "sqlite":
        # Zero the freed space, so the tokens are not left readable in the database file.
        conn.execute(text("PRAGMA secure_delete = ON"))
    ids = select(journal.c.id).order_by(journal.c.id).limit(batch_size).scalar_subquery()
    return int(conn.execute(delete(journal).where(journal.c.id.in_(ids))).rowcount)


def _refuse_unfinished_writers(conn: Connection) -> None:
    for kind in WRITER_KINDS:
        run = store.unfinished_run(conn, kind)
        if run is not None:
            raise ConfigError(
                f"{kind} run {run.id} is unfinished ({run.state}): finish it first "
                f"(`{_HOW_TO_FINISH[kind]}`), then verify and finalize; nothing was deleted"
            )


def _latest_writer_id(conn: Connection) -> int:
    return int(conn.execute(
        select(func.coalesce(func.max(runs.c.id), 0)).where(runs.c.kind.in_(WRITER_KINDS))
    ).scalar_one())


def _latest(conn: Connection, kind: str) -> Run | None:
    row = conn.execute(
        select(runs.c.id).where(runs.c.kind == kind).order_by(runs.c.id.desc()).limit(1)
    ).first()
    return store.get_run(conn, int(row.id)) if row else None


def _utc(ts: datetime) -> str:
    ts = ts.astimezone(UTC) if ts.tzinfo else ts  # naive (SQLite): stored in UTC
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def finalized_refusal(conn: Connection) -> str | None:
    """Why `rollback` cannot run because of a finalize, or None when it can.

    A completed finalize newer than the latest migrate run, with no journal row left to
    roll back: the original tokens are gone. An unfinished finalize newer than it: part of
    them are gone, and a rollback would be partial.
    """
    fin = _latest(conn, "finalize")
    if fin is None:
        return None
    mig = _latest(conn, "migrate")
    if mig is not None and mig.id > fin.id:
        return None
    if fin.state in store.UNFINISHED:
        return (
            f"finalize run {fin.id} (started {_utc(fin.started_at)}) has not finished "
            "deleting the rollback journal: part of the original Fernet tokens are gone, so a "
            "rollback would be partial; run `kms-migrate finalize` again to finish it, or "
            "restore the backup taken before the migration; nothing was written"
        )
    if fin.state != "completed":
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
