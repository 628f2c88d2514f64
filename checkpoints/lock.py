"""The run lock: refuse a second migrate or rollback while one is writing.

Taking it is an INSERT of the single row (exclusive by primary key). A row left by a
process that died is taken over with a compare-and-swap on its random token when the
holder is provably gone: same host and boot (boot id) and its pid no longer exists, or no
heartbeat for STALE_AFTER (another host, or a container of the same name on another
machine, cannot be asked). Every batch transaction re-checks the token
(`fence`), so even a holder that was wrongly declared dead cannot commit another batch.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import hosts
from .base import aware
from .errors import LockHeld, LockLost
from .hosts import clock, db_now, pid_alive
from .registry import live_workers
from .tables import lock, runs

__all__ = ["STALE_AFTER", "LockHeld", "LockLost", "RunLock"]

NAME = "run"
STALE_AFTER = timedelta(minutes=2)
SAME_HOST_STALE_AFTER = timedelta(minutes=15)


def _workers_alive(conn: Connection, run_id: int) -> bool:
    return bool(live_workers(conn, run_id, STALE_AFTER))


@dataclass
class RunLock:
    """A held lock; `token` proves it in every batch transaction."""

    token: str
    kind: str

    @classmethod
    def acquire(cls, engine: Engine, kind: str) -> RunLock:
        """Take the lock, or take it over from a dead holder; raise LockHeld otherwise."""
        token = secrets.token_hex(16)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": hosts.boot_id()}
        for _ in range(3):
            try:
                with engine.begin() as conn:
                    conn.execute(insert(lock).values(
                        name=NAME, token=token, kind=kind, acquired_at=clock(conn),
                        heartbeat_at=clock(conn), **me))
                return cls(token, kind)
            except IntegrityError:
                pass
            with engine.begin() as conn:
                row = conn.execute(select(lock).where(lock.c.name == NAME)).first()
                if row is None:
                    continue  # released in between: try the INSERT again
                at = db_now(conn)  # the database's clock: hosts' clocks may disagree
                age = at - (aware(row.heartbeat_at) or at)
                # Same host name is not enough (containers on other machines share
                # it): only on this boot can the holder's pid be asked of this kernel.
                same_host = hosts.on_this_host(row.host, row.boot_id)
                dead = (
                    (same_host and (row.pid == me["pid"] or not pid_alive(row.pid)
                                    or age > SAME_HOST_STALE_AFTER))
                    or (not same_host and age > STALE_AFTER)
                )
                if dead and row.run_id is not None and _workers_alive(conn, row.run_id):
                    dead = False  # a ranged run's workers keep it alive, whoever took it
                if not dead:
                    what = f"{row.kind} run {row.run_id}" if row.run_id else f"a {row.kind}"
                    paused = row.run_id and conn.execute(select(runs.c.paused_by).where(
                        runs.c.id == row.run_id)).scalar()
                    if paused:
                        what += (f" (paused by {paused}: `kms-migrate resume` lets it go on, "
                                 "Ctrl-C in its terminal stops it)")
                    raise LockHeld(
                        f"{what} is already running against this database (host {row.host}, "
                        f"pid {row.pid}, last heartbeat {int(age.total_seconds())} s ago): "
                        "wait for it to finish or stop it (a lock left by a dead process is "
                        "taken over automatically; from another host after "
                        f"{int(STALE_AFTER.total_seconds())} s without heartbeat); "
                        "nothing was written"
                    )
                took = conn.execute(
                    update(lock).where(lock.c.name == NAME, lock.c.token == row.token).values(
                        token=token, kind=kind, run_id=None, acquired_at=clock(conn),
                        heartbeat_at=clock(conn), **me)
                ).rowcount
                if took == 1:
                    return cls(token, kind)
        raise LockHeld("another process is taking the run lock at the same moment: re-run in "
                       "a moment; nothing was written")

    def bind_run(self, conn: Connection, run_id: int) -> None:
        self.fence(conn, run_id=run_id)

    def fence(self, conn: Connection, *, run_id: int | None = None) -> None:
        """Heartbeat inside the caller's transaction; raise LockLost if no longer ours."""
        values: dict[str, object] = {"heartbeat_at": clock(conn)}
        if run_id is not None:
            values["run_id"] = run_id
        moved = conn.execute(
            update(lock).where(lock.c.name == NAME, lock.c.token == self.token).values(**values)
        ).rowcount
        if moved != 1:
            raise LockLost(
                "this run's lock was taken over by another process (it was presumed dead): "
                "stopping without writing this batch; check `kms-migrate status`"
            )

    def shared_fence(self, conn: Connection) -> None:
        """The fence of a worker of a ranged run, inside its batch transaction.

        `FOR SHARE`: the workers of one run do not wait on each other, while a takeover
        (an UPDATE of the row) waits for every batch in flight and then fences them all
        out. SQLite, with one writer at a time, needs no row lock.
        """
        held = conn.execute(
            select(lock.c.token).where(lock.c.name == NAME, lock.c.token == self.token)
            .with_for_update(read=True)
        ).first()
        if held is None:
            raise LockLost(
                "this run's lock was taken over by another process (its workers were "
                "presumed dead): stopping without writing this batch; check `kms-migrate "
                "status`"
            )

    def touch(self, engine: Engine, every: timedelta) -> None:
        """Heartbeat for a ranged run, from any of its workers, at most once per `every`
        (a row most of them only read)."""
        with engine.begin() as conn:
            ts = clock(conn)
            conn.execute(update(lock).where(
                lock.c.name == NAME, lock.c.token == self.token,
                lock.c.heartbeat_at < ts - every,
            ).values(heartbeat_at=ts, host=socket.gethostname(), pid=os.getpid(),
                     boot_id=hosts.boot_id()))

    def acquired_at(self, conn: Connection) -> datetime | None:
        """When this lock was taken (by the database's clock on PostgreSQL)."""
        return aware(conn.execute(select(lock.c.acquired_at).where(
            lock.c.name == NAME, lock.c.token == self.token)).scalar())

    @classmethod
    def held_by(cls, engine: Engine) -> tuple[RunLock, int | None] | None:
        """The lock as it is now (to join a ranged run); None when nobody holds it."""
        with engine.connect() as conn:
            row = conn.execute(select(lock).where(lock.c.name == NAME)).first()
        return None if row is None else (cls(row.token, row.kind), row.run_id)

    def release(self, engine: Engine) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(delete(lock).where(lock.c.name == NAME, lock.c.token == self.token))
        except Exception:  # best effort: a dead holder's row is taken over anyway
            pass
