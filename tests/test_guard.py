"""The database guards (migration.guard) on a real primary and its real streaming replica.

Replay is paused on the replica (pg_wal_replay_pause) while a writer commits on the
primary: the replica-lag guard must name the lag within seconds, in both modes (the
primary's pg_stat_replication, and --replica asked itself), and clear once replay resumes.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import Engine, create_engine, text

from migration.errors import ConfigError
from migration.guard import (
    HISTORY,
    REPLICA_STATE,
    ActiveSessions,
    PauseFile,
    ReplicaLag,
    _WalHistory,
)
from tests.pgserver import Replica, free_port, running_pg_server, running_replica

T = TypeVar("T")
LAG = re.compile(r"replica lag (\d+\.\d) s > ([\d.]+) s \((.+?)\)")
SECRET = "s3cret"


def wait_for(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll `read` until `ok` holds of its value; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"still {value!r} after {timeout} s")
        time.sleep(0.1)


def streaming(primary: Engine) -> int:
    with primary.connect() as conn:
        return len(conn.execute(text("SELECT pid FROM pg_stat_replication")).all())


def role_exists(engine: Engine, role: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"),
                                 {"r": role}).all())


def replica_estimate(replica: Replica) -> float:
    """The replica's own lag estimate, as the guard asks it (REPLICA_STATE)."""
    engine = create_engine(replica.url)
    with engine.connect() as conn:
        estimate = float(conn.execute(REPLICA_STATE).one()[2])
    engine.dispose()
    return estimate


def lag_of(reason: str | None) -> float:
    m = LAG.search(reason or "")
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def primary(pg_replica: Replica) -> Iterator[Engine]:
    engine = create_engine(pg_replica.primary.admin_url, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@contextmanager
def writing(primary: Engine) -> Iterator[None]:
    """A writer on the primary: INSERTs and UPDATEs, each committed, every 20 ms."""
    with primary.connect() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS guard_writes (id serial PRIMARY KEY, "
                          "n int NOT NULL)"))
    stop = threading.Event()

    def write() -> None:
        with primary.connect() as conn:
            while not stop.is_set():
                conn.execute(text("INSERT INTO guard_writes (n) VALUES (0)"))
                conn.execute(text("UPDATE guard_writes SET n = n + 1 WHERE id = "
                                  "(SELECT max(id) FROM guard_writes)"))
                stop.wait(0.02)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def replay_paused(replica_url: str) -> Iterator[Callable[[], None]]:
    """Replay paused on the replica; the context's value resumes it (and so does leaving)."""
    engine = create_engine(replica_url, isolation_level="AUTOCOMMIT")

    def resume() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))

    with engine.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
    try:
        yield resume
    finally:
        resume()
        engine.dispose()


def lag_rises_then_clears(guard: ReplicaLag, replica: Replica, primary: Engine,
                          name: str) -> None:
    guard.check()
    assert wait_for(guard.reason, lambda r: r is None) is None  # caught up: go on
    with writing(primary), replay_paused(replica.url) as resume:
        first = wait_for(guard.reason, lambda r: r is not None)
        assert first is not None
        m = LAG.fullmatch(first)
        assert m, first
        assert float(m.group(1)) > 1.0 and m.group(2) == "1" and m.group(3) == name
        # it keeps growing while replay stays paused and writes go on
        later = wait_for(guard.reason, lambda r: lag_of(r) >= lag_of(first) + 1.0)
        assert LAG.fullmatch(later or ""), later
        resume()
        assert wait_for(guard.reason, lambda r: r is None, timeout=5.0) is None
        assert guard.reason() is None  # writes still going on, replica caught up
    guard.close()


@pytest.mark.postgres
def test_primary_side_lag_rises_while_replay_is_paused_and_clears_on_resume(
        pg_replica: Replica, primary: Engine) -> None:
    lag_rises_then_clears(ReplicaLag(primary, 1.0), pg_replica, primary,
                          "walreceiver@127.0.0.1")


@pytest.mark.postgres
def test_replica_side_lag_rises_while_replay_is_paused_and_clears_on_resume(
        pg_replica: Replica, primary: Engine) -> None:
    guard = ReplicaLag(primary, 1.0, [pg_replica.url])
    lag_rises_then_clears(guard, pg_replica, primary, f"127.0.0.1:{pg_replica.port}")


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["primary", "replica"])
def test_lag_grows_after_the_writes_stop_and_clears_at_once_on_resume(
        pg_replica: Replica, primary: Engine, mode: str) -> None:
    """pg_stat_replication's replay_lag stalls when writes stop (the standby replies every
    10 s) and lingers after a catch-up; the guard's own WAL positions bound it both ways."""
    guard = ReplicaLag(primary, 1.5, [pg_replica.url] if mode == "replica" else ())
    guard.check()
    if mode == "replica":
        # An idle spell: a replica's own estimate (now() - the last replayed commit) counts
        # it as lag as soon as new WAL arrives; the guard's positions keep it to the truth.
        with primary.connect() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS guard_idle (n int)"))
            conn.execute(text("INSERT INTO guard_idle VALUES (1)"))
        time.sleep(2.0)
    wait_for(guard.reason, lambda r: r is None)
    caught_up = time.monotonic()  # the guard's last poll that found the replica caught up
    with replay_paused(pg_replica.url) as resume:
        with writing(primary):
            time.sleep(0.3)
        if mode == "replica":
            assert replica_estimate(pg_replica) > 2.0  # the idle spell, counted as lag
        assert guard.reason() is None  # ... but not by the guard
        held = wait_for(guard.reason, lambda r: r is not None, timeout=6.0)  # well under 10 s
        assert 1.5 < lag_of(held) < time.monotonic() - caught_up + 0.5, held
        resume()
        wait_for(guard.reason, lambda r: r is None, timeout=3.0)
    guard.close()


@pytest.mark.postgres
def test_a_role_without_pg_monitor_is_refused_in_one_line(
        pg_replica: Replica, primary: Engine) -> None:
    role = f"guard_{uuid.uuid4().hex[:8]}"
    with primary.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    url = pg_replica.primary.admin_url.replace("postgres@", f"{role}@", 1)
    plain = create_engine(url)
    for guard, option in ((ReplicaLag(plain, 5.0), "--max-replica-lag"),
                          (ActiveSessions(plain, 10), "--max-active-sessions")):
        with pytest.raises(ConfigError) as caught:
            guard.check()
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{option}: role {role} cannot read")
        assert f"GRANT pg_monitor TO {role}" in message and "nothing was written" in message
    with pytest.raises(ConfigError, match="or name each replica with --replica URL"):
        ReplicaLag(plain, 5.0).check()
    # unchecked, it holds rather than read the hidden rows as "no lag"
    assert ReplicaLag(plain, 5.0).reason() == (
        "cannot read replica lag: pg_stat_replication hidden (grant pg_monitor)")
    # asking the replica itself needs no more than a login (once the role got there)
    replica = create_engine(pg_replica.url)
    wait_for(lambda: role_exists(replica, role), bool)
    replica.dispose()
    replica_lag = ReplicaLag(plain, 5.0, [pg_replica.url.replace("postgres@", f"{role}@", 1)])
    replica_lag.check()
    assert wait_for(replica_lag.reason, lambda r: r is None) is None
    replica_lag.close()
    with primary.connect() as conn:
        conn.execute(text(f"GRANT pg_monitor TO {role}"))
    ReplicaLag(plain, 5.0).check()
    ActiveSessions(plain, 10).check()
    plain.dispose()


@pytest.mark.postgres
def test_a_replica_that_cannot_be_reached_is_refused_then_held_for(
        pg_replica: Replica, primary: Engine) -> None:
    nobody = f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(ConfigError) as caught:
        ReplicaLag(primary, 5.0, [nobody]).check()
    message = str(caught.value)
    assert SECRET not in message and "postgres:***@127.0.0.1" in message, message
    assert "\n" not in message and message.startswith("--replica: cannot connect to ")
    assert message.endswith("nothing was written")
    reasons: list[str | None] = []
    with running_replica(pg_replica.primary) as second:
        # trust authentication ignores the password; the guard must not show it anyway
        url = second.url.replace("postgres@", f"postgres:{SECRET}@", 1)
        by_url, by_primary = ReplicaLag(primary, 1.0, [url]), ReplicaLag(primary, 1.0)
        wait_for(lambda: streaming(primary), lambda n: n == 2)
        by_url.check()
        by_primary.check()
        with writing(primary), replay_paused(second.url):
            reasons.append(wait_for(by_url.reason, lambda r: r is not None))
        assert f"(127.0.0.1:{second.port})" in (reasons[-1] or "")
        wait_for(by_url.reason, lambda r: r is None)
    # the replica is gone: its lag is unknown, so both hold
    reasons.append(by_url.reason())
    assert reasons[-1] == f"replica 127.0.0.1:{second.port} unreachable"
    reasons.append(wait_for(by_primary.reason, lambda r: r is not None))
    assert reasons[-1] == "replica walreceiver@127.0.0.1 not streaming"
    assert all(SECRET not in (r or "") for r in reasons)
    by_url.close()


@pytest.mark.postgres
def test_a_replica_url_that_is_no_standby_of_the_primary_is_refused(
        pg_replica: Replica, primary: Engine) -> None:
    with pytest.raises(ConfigError, match=r"^--replica .+ is not in recovery: name a standby"):
        ReplicaLag(primary, 5.0, [pg_replica.primary.admin_url]).check()
    with running_pg_server() as other:
        lone = create_engine(other.admin_url)
        with pytest.raises(ConfigError, match="no replica streams from this database"):
            ReplicaLag(lone, 5.0).check()
        lone.dispose()
        with running_replica(other) as foreign, pytest.raises(
                ConfigError, match="is another cluster's standby"):
            ReplicaLag(primary, 5.0, [foreign.url]).check()


def test_a_failing_query_is_a_reason_to_hold_never_an_exception() -> None:
    dead = create_engine(f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:{free_port()}/x")
    assert ReplicaLag(dead, 5.0).reason() == "cannot read replica lag: OperationalError"
    assert ActiveSessions(dead, 5).reason() == "cannot count active sessions: OperationalError"
    dead.dispose()


def test_the_guards_need_postgresql(tmp_path: Path) -> None:
    sqlite = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with pytest.raises(ConfigError, match=r"^--max-replica-lag needs PostgreSQL"):
        ReplicaLag(sqlite, 5.0).check()
    with pytest.raises(ConfigError, match=r"^--max-active-sessions needs PostgreSQL"):
        ActiveSessions(sqlite, 5).check()
    sqlite.dispose()


def test_pause_file(tmp_path: Path) -> None:
    path = tmp_path / "pause"
    guard = PauseFile(path)
    guard.check()
    assert guard.reason() is None
    path.touch()
    assert guard.reason() == f"pause file {path} exists"
    path.unlink()
    assert guard.reason() is None
    with pytest.raises(ConfigError, match="could never pause the run"):
        PauseFile(tmp_path / "missing" / "pause").check()


@pytest.mark.postgres
def test_active_sessions(pg_replica: Replica, primary: Engine) -> None:
    guard = ActiveSessions(primary, 2)
    guard.check()
    assert wait_for(guard.reason, lambda r: r is None) is None
    sleepers = [threading.Thread(target=lambda: _sleep(primary, 3.0)) for _ in range(3)]
    for thread in sleepers:
        thread.start()
    held = wait_for(guard.reason, lambda r: r is not None, timeout=2.5)
    m = re.fullmatch(r"(\d+) active sessions > 2", held or "")
    assert m and int(m.group(1)) >= 3, held
    assert ActiveSessions(primary, 10).reason() is None
    for thread in sleepers:
        thread.join()
    assert wait_for(guard.reason, lambda r: r is None) is None


def _sleep(engine: Engine, seconds: float) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def test_wal_history_bounds_an_estimate_both_ways() -> None:
    history = _WalHistory()
    history.add(100, at=10.0)
    history.add(100, at=12.0)  # no new WAL: the same position, seen later
    history.add(200, at=13.0)
    history.add(300, at=15.0)
    # replayed up to 100: WAL at 200 existed at 13 s, all that existed at 12 s is replayed
    assert history.lag(None, 100, now=20.0) == 7.0
    assert history.lag(30.0, 100, now=20.0) == 8.0
    assert history.lag(7.5, 100, now=20.0) == 7.5
    assert history.lag(9.0, 300, now=20.0) == 5.0  # everything replayed by 15 s
    assert history.lag(None, 50, now=20.0) == 10.0  # older than the oldest position noted
    assert history.lag(4.0, None, now=20.0) == 4.0  # no replay position: the estimate
    for i in range(HISTORY):
        history.add(400 + i, at=20.0 + i)
    # a bounded window: the oldest position kept is the first of these
    assert history.lag(None, 100, now=20.0 + HISTORY) == HISTORY

