"""The store API: start or resume a run, move its state, record a batch, read progress.

Every function defined here takes the caller's open SQLAlchemy connection first and never
commits: the caller owns the transaction, so a batch's rewrites, journal rows, failures
and checkpoint go in together or not at all (the way Alembic commits a step with its
version-table update). Two things of this layer do commit, each in a short transaction
of its own on an engine: `ensure_schema` (re-exported here from `schema`) and the
`RunLock` methods that take an engine (`lock`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from .base import BatchCounts, now
from .errors import CheckpointLost
from .leases import Lease, record_on_range
from .schema import alembic_dir as _alembic_dir  # noqa: F401  (tests read the revisions)
from .schema import ensure_schema, schema_present
from .tables import checkpoints, failures, journal, lock, runs

__all__ = [
    "Batch",
    "BatchCounts",
    "Checkpoint",
    "FailureRow",
    "JournalRow",
    "NewRun",
    "Run",
    "complete_ranged",
    "create_run",
    "ensure_schema",
    "failures_in",
    "failures_of",
    "forget_failures",
    "interrupt_running",
    "list_runs",
    "load_checkpoints",
    "mark_ranged",
    "now",
    "record_batch",
    "schema_present",
    "set_run_rate",
    "set_state",
    "stop_running",
    "touch_run",
    "unfinished_run",
]

# A run in one of these states is resumed by the next command of its kind.
UNFINISHED = ("running", "interrupted", "stopped")


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    state: str
    key_id: str | None
    key_arn: str | None
    region: str | None
    targets_json: str
    targets_fingerprint: str
    batch_size: int
    host: str | None
    pid: int | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    note: str | None
    ranged: bool = False
    max_kms_rps: float | None = None
    fernet_key_ids: str | None = None
    to_key_id: str | None = None
    to_key_arn: str | None = None
    undoes_run_id: int | None = None

    @property
    def targets(self) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = json.loads(self.targets_json)
        return value


@dataclass(frozen=True)
class Checkpoint:
    run_id: int
    table_name: str
    column_name: str
    last_pk: str | None
    done: bool
    batches: int
    migrated: int
    skipped: int
    already: int
    failed: int
    conflicts: int

    @property
    def counts(self) -> BatchCounts:
        return BatchCounts(self.migrated, self.skipped, self.already, self.failed,
                           self.conflicts)


@dataclass(frozen=True)
class JournalRow:
    pk: str
    original: str
    migrated: str


@dataclass(frozen=True)
class FailureRow:
    table_name: str
    column_name: str
    pk: str
    reason: str


def _run(row: Any) -> Run:
    return Run(**{f: getattr(row, f) for f in Run.__dataclass_fields__})


def unfinished_run(conn: Connection, kind: str) -> Run | None:
    """The newest run of this kind that did not finish (killed, interrupted, stopped)."""
    row = conn.execute(
        select(runs).where(runs.c.kind == kind, runs.c.state.in_(UNFINISHED))
        .order_by(runs.c.id.desc()).limit(1)
    ).first()
    return _run(row) if row else None


def get_run(conn: Connection, run_id: int) -> Run | None:
    row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
    return _run(row) if row else None


def list_runs(conn: Connection, limit: int = 20) -> list[Run]:
    rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
    return [_run(r) for r in rows]


@dataclass(frozen=True)
class NewRun:
    """What a new run records about itself. A journal-driven run (rollback, finalize) has
    no key and the fingerprint "journal"."""

    kind: str
    batch_size: int
    targets: Sequence[tuple[str, str]] = ()
    targets_json: str = "[]"
    fingerprint: str = "journal"
    key_id: str | None = None
    key_arn: str | None = None
    region: str | None = None
    tool_version: str = ""
    ranged: bool = False
    fernet_key_ids: str | None = None
    to_key_id: str | None = None  # a rekey run's destination key
    to_key_arn: str | None = None
    undoes_run_id: int | None = None  # the rekey run a rollback restores


def create_run(conn: Connection, new: NewRun) -> Run:
    """Insert a run in state `running` and a zeroed checkpoint per (table, column).

    `ranged`: a run spread over workers, joinable from the moment it exists (joiners
    wait for its ranges)."""
    ts = now()
    inserted = conn.execute(
        insert(runs).values(
            kind=new.kind, state="running", key_id=new.key_id, key_arn=new.key_arn,
            region=new.region, targets_json=new.targets_json,
            targets_fingerprint=new.fingerprint, batch_size=new.batch_size,
            host=socket.gethostname(), pid=os.getpid(), tool_version=new.tool_version,
            started_at=ts, updated_at=ts, ranged=new.ranged, fernet_key_ids=new.fernet_key_ids,
            to_key_id=new.to_key_id, to_key_arn=new.to_key_arn,
            undoes_run_id=new.undoes_run_id,
        )
    ).inserted_primary_key
    assert inserted is not None
    run_id = int(inserted[0])
    if new.targets:
        conn.execute(insert(checkpoints), [
            dict(run_id=run_id, table_name=t, column_name=c, last_pk=None, done=False,
                 batches=0, migrated=0, skipped=0, already=0, failed=0, conflicts=0,
                 updated_at=ts)
            for t, c in new.targets
        ])
    run = get_run(conn, run_id)
    assert run is not None
    return run


def set_state(conn: Connection, run_id: int, state: str, *, note: str | None = None) -> None:
    """Move a run to a new state; a final state also stamps finished_at."""
    values: dict[str, Any] = {"state": state, "updated_at": now()}
    if state not in UNFINISHED:
        values["finished_at"] = now()
    if state == "running":
        values["pid"] = os.getpid()
        values["host"] = socket.gethostname()
    if note is not None:
        values["note"] = note
    conn.execute(update(runs).where(runs.c.id == run_id).values(**values))


def touch_run(conn: Connection, run_id: int, at: datetime | None = None) -> None:
    """Stamp the run's updated_at (a batch committed): `status` tells a live run by it."""
    conn.execute(update(runs).where(runs.c.id == run_id).values(updated_at=at or now()))


def mark_ranged(conn: Connection, run_id: int) -> None:
    """The run is now spread over workers (its ranges are planned): joinable."""
    conn.execute(update(runs).where(runs.c.id == run_id).values(ranged=True))


def set_run_rate(conn: Connection, run_id: int, max_kms_rps: float | None) -> None:
    """A ranged run's --max-kms-rps, shared by every worker that joins it."""
    conn.execute(update(runs).where(runs.c.id == run_id).values(max_kms_rps=max_kms_rps))


def stop_running(conn: Connection, run_id: int, note: str, *, lock_token: str) -> None:
    """A running run -> stopped with `note` (a worker's fatal error), only while the run
    lock is still the one `lock_token` proves: a worker fenced out by another command
    says nothing about that command's run."""
    held = select(lock.c.token).where(lock.c.token == lock_token).exists()
    conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state == "running", held)
                 .values(state="stopped", note=note, updated_at=now()))


def interrupt_running(conn: Connection, run_id: int) -> None:
    """A running run -> interrupted (stopped between batches; a `stopped` run keeps its
    state and its note)."""
    conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state == "running")
                 .values(state="interrupted", updated_at=now()))


def complete_ranged(conn: Connection, run_id: int) -> bool:
    """Every range of the run is done: mark its checkpoints done and the run completed.

    Whether this call completed it (the run was still unfinished): of the commands that
    see the last range done, exactly one gets True, so only it records what follows."""
    conn.execute(update(checkpoints).where(checkpoints.c.run_id == run_id)
                 .values(done=True, updated_at=now()))
    completed = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state.in_(
        UNFINISHED)).values(state="completed", finished_at=now(),
                            updated_at=now())).rowcount
    return completed == 1


def load_checkpoints(conn: Connection, run_id: int) -> dict[tuple[str, str], Checkpoint]:
    rows = conn.execute(select(checkpoints).where(checkpoints.c.run_id == run_id)).all()
    return {
        (r.table_name, r.column_name): Checkpoint(
            **{f: getattr(r, f) for f in Checkpoint.__dataclass_fields__}
        )
        for r in rows
    }


@dataclass(frozen=True)
class Batch:
    """What one committed batch records: where its column's checkpoint moves to, its
    counts, and its journal and failure rows."""

    last_pk: str | None
    counts: BatchCounts
    done: bool = False
    journal_rows: Sequence[JournalRow] = ()
    failure_rows: Sequence[FailureRow] = ()


def record_batch(conn: Connection, run_id: int, table_name: str, column_name: str,
                 batch: Batch, lease: Lease | None = None) -> None:
    """Write a batch's journal rows, failures and checkpoint in the caller's transaction.

    Refuses (raises CheckpointLost) unless exactly one checkpoint row moved, as Alembic checks its
    version-table update: a lost checkpoint update would let a resume redo a batch.
    With a `lease` (a worker of a ranged run), the checkpoint is the range's, moved by a
    compare-and-swap on the lease token (LeaseLost otherwise); the run row is not touched,
    so the workers of one run never wait on each other's batches.
    """
    ts = now()
    where = dict(run_id=run_id, table_name=table_name, column_name=column_name)
    if batch.journal_rows:
        conn.execute(insert(journal), [
            dict(where, pk=j.pk, original=j.original, migrated=j.migrated, status="migrated",
                 migrated_at=ts) for j in batch.journal_rows])
    if batch.failure_rows:
        conn.execute(insert(failures), [
            dict(run_id=run_id, table_name=f.table_name, column_name=f.column_name, pk=f.pk,
                 reason=f.reason, created_at=ts) for f in batch.failure_rows])
    if lease is not None:
        record_on_range(conn, lease, last_pk=batch.last_pk, counts=batch.counts,
                        done=batch.done)
        return
    c, counts = checkpoints.c, batch.counts
    values: dict[str, Any] = dict(
        batches=c.batches + 1, migrated=c.migrated + counts.migrated,
        skipped=c.skipped + counts.skipped, already=c.already + counts.already,
        failed=c.failed + counts.failed, conflicts=c.conflicts + counts.conflicts,
        done=batch.done, updated_at=ts,
    )
    if batch.last_pk is not None:
        values["last_pk"] = batch.last_pk
    _move_checkpoint(conn, run_id, table_name, column_name, values)
    touch_run(conn, run_id, ts)


def _move_checkpoint(conn: Connection, run_id: int, table_name: str, column_name: str,
                     values: dict[str, Any]) -> None:
    """Update one column checkpoint of the run; CheckpointLost unless exactly one row moved."""
    c = checkpoints.c
    moved = conn.execute(
        update(checkpoints)
        .where(c.run_id == run_id, c.table_name == table_name, c.column_name == column_name)
        .values(**values)
    ).rowcount
    if moved != 1:
        raise CheckpointLost(
            f"checkpoint of run {run_id} for {table_name}.{column_name} matched {moved} rows"
        )


def failures_of(conn: Connection, run_id: int, limit: int | None = None) -> list[FailureRow]:
    q = (
        select(failures.c.table_name, failures.c.column_name, failures.c.pk, failures.c.reason)
        .where(failures.c.run_id == run_id)
        .order_by(failures.c.id)
    )
    if limit is not None:
        q = q.limit(limit)
    return [FailureRow(*r) for r in conn.execute(q).all()]


def failures_in(conn: Connection, run_id: int, table_name: str,
                column_name: str) -> list[tuple[int, str, str]]:
    """(id, pk, reason) of every failure the run recorded in one column."""
    f = failures.c
    return [(int(i), pk, reason) for i, pk, reason in conn.execute(
        select(f.id, f.pk, f.reason).where(f.run_id == run_id, f.table_name == table_name,
                                           f.column_name == column_name))]


def forget_failures(conn: Connection, run_id: int, table_name: str, column_name: str,
                    ids: Sequence[int], counts: BatchCounts) -> None:
    """Drop these recorded failures (`failures_in`'s ids) of one column of the run, and
    take `counts` (the `failed` and `conflicts` they were counted in) off its checkpoint,
    in the caller's transaction.

    For failures whose value no longer exists (row deleted, or rewritten by the
    application): once the run is through, only values still left may be counted. On a
    ranged run the failures were counted on its ranges: the checkpoint then holds the
    correction, and every reader sums the two."""
    if not ids:
        return
    f = failures.c
    for i in range(0, len(ids), 500):
        conn.execute(delete(failures).where(f.run_id == run_id, f.id.in_(ids[i:i + 500])))
    c = checkpoints.c
    _move_checkpoint(conn, run_id, table_name, column_name, dict(
        failed=c.failed - counts.failed, conflicts=c.conflicts - counts.conflicts,
        updated_at=now()))


def count_failures(conn: Connection, run_id: int) -> int:
    return int(conn.execute(
        select(func.count()).select_from(failures).where(failures.c.run_id == run_id)
    ).scalar_one())


def journal_counts(conn: Connection) -> dict[tuple[str, str, str], int]:
    """How many journal rows per (table, column, status)."""
    rows = conn.execute(
        select(journal.c.table_name, journal.c.column_name, journal.c.status, func.count())
        .group_by(journal.c.table_name, journal.c.column_name, journal.c.status)
    ).all()
    return {(t, c, s): int(n) for t, c, s, n in rows}
