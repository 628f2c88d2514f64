"""Database guards: why a live run must hold between batches right now, or None to go on.

The steering polls each guard's `reason()` at every heartbeat (one caller at a time) and
holds between batches while any gives one; `check()`, at start, refuses a guard that could
never work. `reason()` never raises (a failed query or a silent replica is a reason to hold)
and names no password: replicas are host:port or application_name@address.

Replica lag is the primary's pg_stat_replication `replay_lag` (it moves only when the standby
replies, so it stalls when writes stop and lingers after a catch-up) or, with --replica, the
replica's own `now() - pg_last_xact_replay_timestamp()` (which counts an idle spell), both
bounded by the primary's WAL positions this guard notes at each poll: WAL that existed at t
and is not replayed means a lag of at least now - t; a replica that replayed all of it lags
at most now - t: the lag grows while a replica is stuck, writes or not, and drops at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .config import Settings
from .db import make_engine, safe_url
from .errors import ConfigError, KmsMigrateError

__all__ = [
    "ActiveSessions", "Guard", "PauseFile", "ReplicaLag", "close_guards", "guards_for",
]

CONNECT_TIMEOUT = 3  # seconds: a replica that does not answer by then is "unreachable"
STATEMENT_TIMEOUT = 5.0  # seconds a guard's query may run on a replica
HISTORY = 4096  # polls of the primary's WAL position kept: over an hour at one a second
NOTHING = "nothing was written"

PRIMARY_LSN = text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
# Physical standbys (no base backup, no logical consumer); `state` NULL: details hidden.
WAL_SENDERS = text("""
SELECT application_name, host(client_addr), state,
       pg_wal_lsn_diff(replay_lsn, '0/0')::bigint, extract(epoch FROM replay_lag)::float8
FROM pg_stat_replication WHERE state IS DISTINCT FROM 'backup' AND pid NOT IN (
  SELECT active_pid FROM pg_replication_slots WHERE slot_type = 'logical'
  AND active_pid IS NOT NULL)""")
REPLICA_STATE = text("""
SELECT pg_is_in_recovery(), pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint,
       (CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
             ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END)::float8,
       (SELECT system_identifier FROM pg_control_system())""")
SYSTEM_ID = text("SELECT system_identifier FROM pg_control_system()")
READS_ALL_STATS = text("SELECT current_user, pg_has_role('pg_read_all_stats', 'USAGE')")
ACTIVE_SESSIONS = text("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND "
                       "backend_type = 'client backend' AND pid <> pg_backend_pid()")
Reading = tuple[str, float | None, int | None]  # name, own lag estimate (s), replayed (bytes)


class Guard(Protocol):
    def reason(self) -> str | None: ...  # why the run must hold now, one short line; None: go
    def close(self) -> None: ...


def _require(engine: Engine, option: str, what: str = "", alternative: str = "") -> None:
    """Refuse SQLite and, to read `what`, a role that sees other sessions' details as NULL
    (pg_monitor, or pg_read_all_stats, lifts that)."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(f"{option} needs PostgreSQL: drop the option; {NOTHING}")
    if what:
        with engine.connect() as conn:
            user, allowed = conn.execute(READS_ALL_STATS).one()
        if not allowed:
            raise ConfigError(f"{option}: role {user} cannot read {what}: GRANT pg_monitor TO "
                              f"{user}{alternative}; {NOTHING}")


class PauseFile:
    """--pause-file PATH: hold while the file exists (gh-ost's throttle flag file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check(self) -> None:
        try:
            folder = self.path.parent.is_dir()
            self.path.exists()
        except OSError as exc:  # a folder it may not search: it would hold the run for good
            raise ConfigError(f"--pause-file {self.path}: cannot look in folder "
                              f"{self.path.parent} ({type(exc).__name__}), so the run would "
                              f"hold for good: choose a folder this user can search; "
                              f"{NOTHING}") from None
        if not folder:
            raise ConfigError(f"--pause-file {self.path}: no folder {self.path.parent}, so it "
                              f"could never pause the run: fix the path; {NOTHING}")

    def reason(self) -> str | None:
        try:
            return f"pause file {self.path} exists" if self.path.exists() else None
        except OSError as exc:
            return f"cannot look for pause file {self.path}: {type(exc).__name__}"

    def close(self) -> None:
        pass


class ActiveSessions:
    """--max-active-sessions N: hold while more than N client sessions of the server run a
    statement (pt-online-schema-change's --max-load on Threads_running)."""

    def __init__(self, engine: Engine, max_sessions: int) -> None:
        self.engine, self.max_sessions = engine, max_sessions

    def check(self) -> None:
        _require(self.engine, "--max-active-sessions", "other sessions' state in pg_stat_activity")

    def reason(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                n = int(conn.execute(ACTIVE_SESSIONS).scalar_one())
        except Exception as exc:  # a reason to hold, never an error out of the steering
            return f"cannot count active sessions: {type(exc).__name__}"
        return f"{n} active sessions > {self.max_sessions}" if n > self.max_sessions else None

    def close(self) -> None:
        pass  # the engine is the caller's


class _WalHistory:
    """The primary's WAL position at each poll, oldest first: (first seen, last seen, lsn)."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, float, int]] = deque(maxlen=HISTORY)

    def add(self, lsn: int, at: float) -> None:
        first = self._seen.pop()[0] if self._seen and self._seen[-1][2] == lsn else at
        self._seen.append((first, at, lsn))

    def lag(self, estimate: float | None, replayed: int | None, now: float) -> float:
        """`estimate`, raised to what the replica surely lags and lowered to at most that."""
        lag = estimate or 0.0
        if replayed is None:
            return lag
        floor, ceiling = 0.0, None
        for first, last, lsn in self._seen:
            if lsn > replayed:
                floor = now - first
                break
            ceiling = now - last
        return max(floor, lag if ceiling is None else min(lag, ceiling))


def _replica_name(url: str) -> str:
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return safe_url(url)
    return f"{u.host}:{u.port or 5432}" if u.host else safe_url(u)


def _sender_name(app: str | None, addr: str | None) -> str:
    return f"{app}@{addr}" if app and addr else (app or addr or "a replica on a local socket")


class ReplicaLag:
    """--max-replica-lag SECONDS: hold while a replica replays more than SECONDS behind.
    Without `replica_urls`, pg_stat_replication (pg_monitor); one seen by `check()` that stops
    streaming holds the run. With them, each replica on one short connection per poll."""

    def __init__(self, primary: Engine, max_seconds: float,
                 replica_urls: Sequence[str] = ()) -> None:
        self.primary, self.max_seconds, self.replica_urls = primary, max_seconds, (*replica_urls,)
        self._engines: dict[str, Engine] = {}  # created once, disposed by close()
        self._expected: Counter[str] = Counter()  # the streaming replicas check() saw
        self._history = _WalHistory()

    def check(self) -> None:
        """Refuse (ConfigError) a guard that cannot work, before anything is written."""
        _require(self.primary, "--max-replica-lag", "" if self.replica_urls else "the replicas' "
                 "lag in pg_stat_replication", ", or name each replica with --replica URL")
        with self.primary.connect() as conn:
            rows = [] if self.replica_urls else conn.execute(WAL_SENDERS).all()
            system_id = conn.execute(SYSTEM_ID).scalar_one()
        if not rows and not self.replica_urls:
            raise ConfigError("--max-replica-lag: no replica streams from this database: name "
                              f"each replica with --replica URL, or drop the option; {NOTHING}")
        self._expected = Counter(_sender_name(row[0], row[1]) for row in rows)
        for url in self.replica_urls:
            self._check_replica(url, system_id)

    def _check_replica(self, url: str, system_id: int) -> None:
        shown = safe_url(url)
        try:
            with self._engine(url).connect() as conn:
                in_recovery, _, _, replica_id = conn.execute(REPLICA_STATE).one()
        except (KmsMigrateError, SQLAlchemyError) as exc:  # the first names the URL, masked
            why = exc if isinstance(exc, KmsMigrateError) else f"{shown}: {type(exc).__name__}"
            raise ConfigError(f"--replica: {why}: fix the URL or start the replica; "
                              f"{NOTHING}") from None
        if not in_recovery or replica_id != system_id:
            what = "another cluster's standby" if in_recovery else "not in recovery"
            raise ConfigError(f"--replica {shown} is {what}: name a standby of the database "
                              f"the run writes to; {NOTHING}")

    def _engine(self, url: str) -> Engine:
        if url not in self._engines:
            self._engines[url] = make_engine(url, read_only=True, connect_timeout=CONNECT_TIMEOUT,
                                             statement_timeout=STATEMENT_TIMEOUT)
        return self._engines[url]

    def reason(self) -> str | None:
        try:
            problems = self._problems()
        except Exception as exc:  # a reason to hold, never an error out of the steering
            return f"cannot read replica lag: {type(exc).__name__}"
        return "; ".join(problems) or None

    def _problems(self) -> list[str]:
        # The primary's position first: a replica that replayed it has lost no time since.
        with self.primary.connect() as conn:
            self._history.add(int(conn.execute(PRIMARY_LSN).scalar_one()), time.monotonic())
            found = [] if self.replica_urls else self._ask_primary(conn)
        found += [self._ask_replica(url) for url in self.replica_urls]
        now = time.monotonic()
        over = sorted(((self._history.lag(estimate, replayed, now), name)
                       for r in found if not isinstance(r, str)
                       for name, estimate, replayed in (r,)), reverse=True)
        return [p for p in found if isinstance(p, str)] + [
            f"replica lag {math.ceil(lag * 10) / 10:.1f} s > {self.max_seconds:g} s ({name})"
            for lag, name in over if lag > self.max_seconds]

    def _ask_primary(self, conn: Connection) -> list[Reading | str]:
        rows = conn.execute(WAL_SENDERS).all()
        if any(row[2] is None for row in rows):
            return ["cannot read replica lag: pg_stat_replication hidden (grant pg_monitor)"]
        readings: list[Reading] = [(_sender_name(app, addr), lag, replayed)
                                   for app, addr, _, replayed, lag in rows]
        missing = self._expected - Counter(name for name, _, _ in readings)
        return [f"replica {name} not streaming" for name in missing.elements()] + [*readings]

    def _ask_replica(self, url: str) -> Reading | str:
        name = _replica_name(url)
        try:
            conn = self._engine(url).connect()
        except Exception:  # refused, timed out, a bad URL: the lag is unknown
            return f"replica {name} unreachable"
        try:
            with conn:
                in_recovery, replayed, estimate, _ = conn.execute(REPLICA_STATE).one()
                conn.invalidate()  # a new connection next poll: never wait on a dead one
        except SQLAlchemyError as exc:
            return f"cannot read replica lag on {name}: {type(exc).__name__}"
        return (name, estimate, replayed) if in_recovery else (
            f"replica {name} is not in recovery (promoted?)")

    def close(self) -> None:  # the replicas' engines; the primary's is the caller's
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()


def guards_for(settings: Settings, engine: Engine) -> list[Guard]:
    """The guards a command's flags ask for, each checked to work (a refusal is one line,
    before anything is written)."""
    guards: list[ActiveSessions | PauseFile | ReplicaLag] = []
    if settings.pause_file:
        guards.append(PauseFile(Path(settings.pause_file)))
    if settings.max_replica_lag:
        guards.append(ReplicaLag(engine, settings.max_replica_lag, settings.replicas))
    if settings.max_active_sessions:
        guards.append(ActiveSessions(engine, settings.max_active_sessions))
    try:
        for g in guards:
            g.check()
    except BaseException:
        close_guards(guards)
        raise
    return list(guards)


def close_guards(guards: Sequence[Guard]) -> None:
    for g in guards:
        with contextlib.suppress(Exception):
            g.close()
