"""Two runs at once: the second refuses, naming the first; a dead holder's lock is taken
over; a process whose lock was taken can never commit another batch."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select, update

from checkpoints import store
from checkpoints.lock import LockLost, RunLock
from checkpoints.tables import journal, lock
from migration.db import make_engine
from migration.errors import RunLockedError
from migration.migrator import migrate
from migration.rollback import rollback
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, make_kms, settings_for, snapshot


def _hold_lock_as(url: str, pid: int, run_id: int | None = 7, host: str | None = None) -> None:
    """Make the lock row look as if process `pid` holds it."""
    eng = make_engine(url)
    store.ensure_schema(eng)
    held = RunLock.acquire(eng, "migrate")
    values: dict[str, object] = {"pid": pid, "run_id": run_id}
    if host:
        values["host"] = host
    with eng.begin() as conn:
        conn.execute(update(lock).where(lock.c.token == held.token).values(**values))


@pytest.fixture
def live_pid() -> object:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_second_migrate_refuses_naming_the_running_run(
    db_url: str, kms: KmsHandle, keys: Keys, live_pid: int
) -> None:
    make_db(db_url, 10, keys.current)
    before = snapshot(db_url)
    _hold_lock_as(db_url, live_pid, run_id=7)
    settings = settings_for(db_url, keys.current)
    with pytest.raises(RunLockedError, match=rf"migrate run 7 .*pid {live_pid}"):
        migrate(settings, engine=make_engine(db_url), kms=make_kms(kms.client, settings))
    with pytest.raises(RunLockedError, match="already running"):
        rollback(make_engine(db_url))
    assert snapshot(db_url) == before


def test_lock_of_a_dead_process_is_taken_over(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 10, keys.current, bad_values=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold_lock_as(db_url, dead.pid)
    settings = settings_for(db_url, keys.current)
    result = migrate(settings, engine=make_engine(db_url), kms=make_kms(kms.client, settings))
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        assert conn.execute(select(lock)).all() == []  # released at the end
    eng.dispose()


def test_lock_on_another_host_is_stale_only_without_heartbeat(
    sqlite_url: str, kms: KmsHandle, keys: Keys, live_pid: int
) -> None:
    make_db(sqlite_url, 5, keys.current, bad_values=False)
    _hold_lock_as(sqlite_url, live_pid, host="other-host")
    settings = settings_for(sqlite_url, keys.current)
    with pytest.raises(RunLockedError, match="host other-host"):
        migrate(settings, engine=make_engine(sqlite_url), kms=make_kms(kms.client, settings))
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(update(lock).values(heartbeat_at=store.now() - timedelta(minutes=3)))
    migrate(settings, engine=make_engine(sqlite_url), kms=make_kms(kms.client, settings))


def test_a_process_that_lost_its_lock_commits_nothing_more(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 40, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, batch_size=5)
    eng = make_engine(sqlite_url)
    calls = [0]

    def steal_after_two(table: str, column: str, counts: object) -> None:
        calls[0] += 1
        if calls[0] == 2:
            with eng.begin() as conn:  # another process declares us dead and takes over
                conn.execute(update(lock).values(token="stolen"))

    with pytest.raises(RunLockedError, match="taken over"):
        migrate(settings, engine=eng, kms=make_kms(kms.client, settings), on_batch=steal_after_two)
    with eng.connect() as conn:
        n = len(conn.execute(select(journal)).all())
    assert n == 10  # exactly the two batches committed before the lock was lost


def test_fence_refuses_a_foreign_token(sqlite_url: str, keys: Keys) -> None:
    make_db(sqlite_url, 1, keys.current)
    eng = make_engine(sqlite_url)
    store.ensure_schema(eng)
    mine = RunLock.acquire(eng, "migrate")
    with eng.begin() as conn:
        mine.fence(conn)
    with pytest.raises(LockLost), eng.begin() as conn:
        RunLock("not-the-token", "migrate").fence(conn)
