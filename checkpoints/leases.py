"""The ranges of a ranged run: plan them, claim one under a lease, record its batches,
release it.

As in `store`, every function here takes an open connection and never commits;
the caller owns the transaction. Correctness never depends on clocks: a lease is taken
and proven by its random token (every batch of a range is recorded with a compare-and-
swap on it), and the clocks only decide when a silent worker is presumed dead.

The worker registry (`registry`) and the liveness checks (`hosts`) live beside it; their
names are re-exported here, so `leases.<name>` keeps reaching all of them.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, FromClause, func, insert, or_, select, update

from .base import BatchCounts, aware, now
from .errors import LeaseLost
from .hosts import boot_id, clock, db_now, on_this_host, pid_alive
from .registry import (
    WorkerRow,
    finish_worker,
    heartbeat,
    list_workers,
    live_workers,
    mark_dead_here,
    mark_lost,
    mark_silent_lost,
    register_worker,
)
from .tables import ranges, workers

__all__ = [
    "MAX_RANGES",
    "Lease",
    "LeaseLost",
    "RangeRow",
    "Sizing",
    "WorkerRow",
    "aware",
    "boot_id",
    "boundaries",
    "claim",
    "clock",
    "create_ranges",
    "db_now",
    "finish_worker",
    "heartbeat",
    "list_ranges",
    "list_workers",
    "live_workers",
    "mark_dead_here",
    "mark_lost",
    "mark_silent_lost",
    "now",
    "on_this_host",
    "pid_alive",
    "planned",
    "range_totals",
    "record_on_range",
    "register_worker",
    "release",
    "release_all",
    "renew",
    "undone",
]

MAX_RANGES = 4096  # per column: plenty for a few hundred workers, cheap to list


@dataclass(frozen=True)
class Lease:
    """A claimed range: `token` proves it in every batch transaction."""

    range_id: int
    token: str
    seconds: float
    table_name: str
    column_name: str
    lo: str | None
    hi: str | None
    last_pk: str | None


@dataclass(frozen=True)
class RangeRow:
    id: int
    table_name: str
    column_name: str
    lo: str | None
    hi: str | None
    last_pk: str | None
    done: bool
    worker_id: str | None
    lease_until: datetime | None
    claims: int
    batches: int
    migrated: int
    skipped: int
    already: int
    failed: int
    conflicts: int


@dataclass(frozen=True)
class Sizing:
    """How finely `boundaries` splits: about `rows_per_range` rows a range, and at least
    `min_ranges` ranges (so that every worker gets some, and the last ones end together) as
    long as each keeps `min_rows` rows (a batch: a smaller range is not worth a claim)."""

    rows_per_range: int
    min_ranges: int = 1
    min_rows: int = 1


def boundaries(conn: Connection, source: FromClause, key: ColumnElement[Any],
               where: Sequence[ColumnElement[bool]], sizing: Sizing) -> list[Any]:
    """Upper bounds splitting the rows matching `where` into ranges as `sizing` says, in
    the database's own key order (one index scan). The last range is left open (no bound),
    so rows inserted after the plan are covered.
    """
    n = int(conn.execute(
        select(func.count()).select_from(source).where(*where)).scalar_one())
    k = max(math.ceil(n / max(1, sizing.rows_per_range)),
            min(sizing.min_ranges, math.ceil(n / max(1, sizing.min_rows))))
    k = min(MAX_RANGES, k)
    if k <= 1:
        return []
    tiles = select(key.label("k"), func.ntile(k).over(order_by=key).label("t")).where(
        *where).subquery()
    q = select(func.max(tiles.c.k)).group_by(tiles.c.t).order_by(func.max(tiles.c.k))
    return [b for (b,) in conn.execute(q)][:-1]


def create_ranges(
    conn: Connection, run_id: int, table_name: str, column_name: str, start: str | None,
    bounds: Sequence[str],
) -> int:
    """Insert the ranges (start, b1], (b1, b2], ..., (bn, end) of one column."""
    los: list[str | None] = [start, *bounds]
    his: list[str | None] = [*bounds, None]
    ts = now()
    conn.execute(insert(ranges), [
        dict(run_id=run_id, table_name=table_name, column_name=column_name, lo=lo, hi=hi,
             last_pk=None, done=False, claims=0, batches=0, migrated=0, skipped=0,
             already=0, failed=0, conflicts=0, updated_at=ts)
        for lo, hi in zip(los, his, strict=True)
    ])
    return len(los)


def _lease(row: Any, token: str, seconds: float) -> Lease:
    return Lease(row.id, token, seconds, row.table_name, row.column_name, row.lo, row.hi,
                 row.last_pk)


def claim(conn: Connection, run_id: int, worker_id: str, seconds: float) -> Lease | None:
    """Take one range nobody holds (or whose lease expired); None when there is none.

    `FOR UPDATE SKIP LOCKED`: two workers claiming at once each get a different range
    without waiting on each other (SQLite, with its single writer, ignores the clause).
    """
    r = ranges.c
    ts = clock(conn)
    q = (
        select(ranges).where(
            r.run_id == run_id, r.done.is_(False),
            or_(r.lease_token.is_(None), r.lease_until < ts),
        ).order_by(r.id).limit(1).with_for_update(skip_locked=True)
    )
    row = conn.execute(q).first()
    if row is None:
        row = _orphan_on_this_host(conn, run_id)
        if row is None:
            return None
    token = secrets.token_hex(16)
    took = conn.execute(
        update(ranges).where(r.id == row.id, _same_token(row.lease_token)).values(
            lease_token=token, lease_until=ts + timedelta(seconds=seconds),
            worker_id=worker_id, claims=r.claims + 1, updated_at=ts)
    ).rowcount
    if took != 1:
        return None  # someone else took it in between: the caller asks again
    conn.execute(update(workers).where(workers.c.id == worker_id).values(range_id=row.id))
    # Read it again now that the row is ours: a batch its dead holder had already sent
    # COMMIT for may have moved its checkpoint after the first read.
    return _lease(conn.execute(select(ranges).where(r.id == row.id)).one(), token, seconds)


def _same_token(token: str | None) -> ColumnElement[bool]:
    r = ranges.c
    return r.lease_token.is_(None) if token is None else r.lease_token == token


def _orphan_on_this_host(conn: Connection, run_id: int) -> Any:
    """A range still leased to a worker of this host whose process is gone (SIGKILL,
    OOM): no need to wait for its lease to expire, since this host can ask its kernel."""
    r, w = ranges.c, workers.c
    here = boot_id()
    if here is None:
        return None
    q = (
        select(ranges, w.pid).select_from(ranges.join(workers, w.id == r.worker_id))
        .where(r.run_id == run_id, r.done.is_(False), r.lease_token.is_not(None),
               w.host == socket.gethostname(), w.boot_id == here, w.pid != os.getpid())
        .order_by(r.id)
    )
    for row in conn.execute(q):
        if not pid_alive(row.pid):
            return row
    return None


def renew(conn: Connection, lease: Lease) -> bool:
    """Push the lease's expiry out; False if it is no longer ours."""
    r = ranges.c
    return conn.execute(
        update(ranges).where(r.id == lease.range_id, r.lease_token == lease.token)
        .values(lease_until=clock(conn) + timedelta(seconds=lease.seconds))
    ).rowcount == 1


def release(conn: Connection, lease: Lease) -> None:
    r = ranges.c
    conn.execute(update(ranges).where(r.id == lease.range_id, r.lease_token == lease.token)
                 .values(lease_token=None, lease_until=None))


def record_on_range(
    conn: Connection, lease: Lease, *, last_pk: str | None, counts: BatchCounts, done: bool,
) -> None:
    """A batch's checkpoint on its range, in the batch's transaction: a compare-and-swap
    on the lease token, so a worker that lost its lease cannot commit the batch."""
    r = ranges.c
    ts = clock(conn)
    values: dict[str, Any] = dict(
        batches=r.batches + 1, migrated=r.migrated + counts.migrated,
        skipped=r.skipped + counts.skipped, already=r.already + counts.already,
        failed=r.failed + counts.failed, conflicts=r.conflicts + counts.conflicts,
        done=done, updated_at=ts, lease_until=ts + timedelta(seconds=lease.seconds),
    )
    if last_pk is not None:
        values["last_pk"] = last_pk
    if done:
        values["lease_token"] = None
    moved = conn.execute(
        update(ranges).where(r.id == lease.range_id, r.lease_token == lease.token)
        .values(**values)
    ).rowcount
    if moved != 1:
        raise LeaseLost(
            f"range {lease.range_id} was taken over by another worker (this one was presumed "
            "dead): its batch was not written"
        )


def release_all(conn: Connection, run_id: int, *, before: datetime | None = None) -> None:
    """Void every lease of a run (its lock was just taken: no holder can commit); with
    `before`, only those of workers registered before then (a worker that joined the new
    holder since keeps its range)."""
    r, w = ranges.c, workers.c
    cond = [r.run_id == run_id, r.done.is_(False)]
    if before is not None:
        joined = select(w.id).where(w.run_id == run_id, w.started_at >= before)
        cond.append(or_(r.worker_id.is_(None), r.worker_id.not_in(joined)))
    conn.execute(update(ranges).where(*cond).values(lease_token=None, lease_until=None))


def planned(conn: Connection, run_id: int) -> bool:
    """Whether the run's ranges exist (they are created in one transaction)."""
    r = ranges.c
    return conn.execute(select(r.id).where(r.run_id == run_id).limit(1)).first() is not None


def undone(conn: Connection, run_id: int) -> int:
    r = ranges.c
    return int(conn.execute(select(func.count()).select_from(ranges).where(
        r.run_id == run_id, r.done.is_(False))).scalar_one())


def list_ranges(conn: Connection, run_id: int) -> list[RangeRow]:
    rows = conn.execute(select(ranges).where(ranges.c.run_id == run_id)
                        .order_by(ranges.c.table_name, ranges.c.column_name, ranges.c.id))
    return [RangeRow(**{f: getattr(row, f) for f in RangeRow.__dataclass_fields__})
            for row in rows]


def range_totals(conn: Connection, run_id: int) -> dict[tuple[str, str], BatchCounts]:
    r = ranges.c
    q = select(r.table_name, r.column_name, func.sum(r.migrated), func.sum(r.skipped),
               func.sum(r.already), func.sum(r.failed), func.sum(r.conflicts)).where(
        r.run_id == run_id).group_by(r.table_name, r.column_name)
    return {(t, c): BatchCounts(*(int(v or 0) for v in vals))
            for t, c, *vals in conn.execute(q)}
