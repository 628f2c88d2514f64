"""The worker processes of ranged runs: register, heartbeat, finish, and tell the live
ones from the lost.

As in `store`, every function here takes an open connection and never commits;
the caller owns the transaction. Liveness is judged by the heartbeat on the database's
clock (`hosts.clock`), and on this very host and boot by the pid as well.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, insert, select, update

from .hosts import boot_id, clock, on_this_host, pid_alive
from .tables import workers

__all__ = [
    "WorkerRow",
    "finish_worker",
    "heartbeat",
    "list_workers",
    "live_workers",
    "mark_dead_here",
    "mark_lost",
    "mark_silent_lost",
    "register_worker",
]


@dataclass(frozen=True)
class WorkerRow:
    id: str
    host: str
    pid: int
    state: str
    range_id: int | None
    rate: float | None
    kms_requests: int
    retries: int
    throttles: int
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    note: str | None


def register_worker(conn: Connection, run_id: int) -> str:
    worker_id = secrets.token_hex(8)
    ts = clock(conn)
    conn.execute(insert(workers).values(
        id=worker_id, run_id=run_id, host=socket.gethostname(), pid=os.getpid(),
        boot_id=boot_id(), state="running", kms_requests=0, retries=0, throttles=0, started_at=ts,
        heartbeat_at=ts))
    return worker_id


def heartbeat(conn: Connection, worker_id: str, **values: Any) -> None:
    conn.execute(update(workers).where(workers.c.id == worker_id)
                 .values(heartbeat_at=clock(conn), **values))


def finish_worker(conn: Connection, worker_id: str, state: str, note: str | None = None,
                  **values: Any) -> None:
    ts = clock(conn)
    conn.execute(update(workers).where(workers.c.id == worker_id).values(
        state=state, heartbeat_at=ts, finished_at=ts, range_id=None, note=note, **values))


def live_workers(conn: Connection, run_id: int, stale_after: timedelta) -> list[WorkerRow]:
    """Workers of a run still running: a fresh heartbeat, and on this host a live pid."""
    w = workers.c
    rows = conn.execute(select(workers).where(
        w.run_id == run_id, w.state == "running",
        and_(w.heartbeat_at > clock(conn) - stale_after)))
    out = []
    for row in rows:
        if on_this_host(row.host, row.boot_id) and not pid_alive(row.pid):
            continue
        out.append(WorkerRow(**{f: getattr(row, f) for f in WorkerRow.__dataclass_fields__}))
    return out


def list_workers(conn: Connection, run_id: int) -> list[WorkerRow]:
    rows = conn.execute(select(workers).where(workers.c.run_id == run_id)
                        .order_by(workers.c.started_at))
    return [WorkerRow(**{f: getattr(row, f) for f in WorkerRow.__dataclass_fields__})
            for row in rows]


def mark_lost(conn: Connection, run_id: int, *, before: datetime | None = None) -> None:
    """Workers a new holder of the run's lock found still marked running are gone; with
    `before`, only those registered before it took the lock (not its joiners')."""
    w = workers.c
    ts = clock(conn)
    cond = [w.run_id == run_id, w.state == "running"]
    if before is not None:
        cond.append(w.started_at < before)
    conn.execute(update(workers).where(*cond).values(state="lost", finished_at=ts,
                                                     range_id=None))


def mark_silent_lost(conn: Connection, run_id: int, stale_after: timedelta) -> None:
    """Workers of a run still marked running whose heartbeat is older than `stale_after`
    (on any host): lost."""
    w = workers.c
    conn.execute(update(workers).where(
        w.run_id == run_id, w.state == "running", w.heartbeat_at < clock(conn) - stale_after,
    ).values(state="lost", finished_at=clock(conn), range_id=None))


def mark_dead_here(conn: Connection, run_id: int) -> int:
    """Workers of this host still marked running whose process is gone: lost."""
    w = workers.c
    here = boot_id()
    if here is None:
        return 0
    dead = [row.id for row in conn.execute(select(w.id, w.pid).where(
        w.run_id == run_id, w.state == "running", w.host == socket.gethostname(),
        w.boot_id == here)) if not pid_alive(row.pid)]
    if dead:
        conn.execute(update(workers).where(w.id.in_(dead)).values(
            state="lost", finished_at=clock(conn), range_id=None))
    return len(dead)
