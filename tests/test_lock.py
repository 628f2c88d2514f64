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
from migration.pipeline import Hooks
from migration.rollback import rollback
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, make_kms, run_migrate, settings_for, snapshot


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
        run_migrate(settings, kms.client)
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
    result = run_migrate(settings, kms.client)
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
        run_migrate(settings, kms.client)
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(update(lock).values(heartbeat_at=store.now() - timedelta(minutes=3)))
    run_migrate(settings, kms.client)


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
        migrate(settings, engine=eng, kms=make_kms(kms.client, settings),
                hooks=Hooks(on_batch=steal_after_two))
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


# -- issue 11, defect 14: a holder is on this host only on this very boot ----------------------

def _other_machine(tmp_path: object, monkeypatch: pytest.MonkeyPatch, boot: str) -> None:
    """From now on this process runs on a kernel whose boot id is `boot` (same hostname:
    a container of the same name on another machine)."""
    from pathlib import Path

    import checkpoints.hosts as leases_mod

    path = Path(str(tmp_path)) / f"boot_id-{boot}"
    path.write_text(boot + "\n")
    # raising=False: where the tool reads no boot id, the test must fail on its assertions.
    monkeypatch.setattr(leases_mod, "BOOT_ID_PATH", str(path), raising=False)


def test_a_lock_held_on_another_boot_of_the_same_hostname_is_not_taken_over(
    db_url: str, kms: KmsHandle, keys: Keys, tmp_path: object,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.helpers import run_main

    make_db(db_url, 10, keys.current, bad_values=False)
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    _other_machine(tmp_path, monkeypatch, "aaaaaaaa-0000-4000-8000-000000000001")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold_lock_as(db_url, dead.pid)  # a live migrate there; its pid means nothing here
    before = snapshot(db_url)
    _other_machine(tmp_path, monkeypatch, "bbbbbbbb-0000-4000-8000-000000000002")
    for cmd in ("migrate", "rollback"):
        code, out, err = run_main(capsys, cmd, "--db", db_url, "--yes", "--no-progress")
        assert code == 2 and "already running" in err, (cmd, out, err)
    assert snapshot(db_url) == before
    # Back on the holder's own boot, its pid is known dead: taken over at once.
    _other_machine(tmp_path, monkeypatch, "aaaaaaaa-0000-4000-8000-000000000001")
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-progress")
    assert code == 0, err


def test_a_lock_without_a_readable_boot_id_waits_for_the_heartbeat(
    sqlite_url: str, kms: KmsHandle, keys: Keys, tmp_path: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import checkpoints.hosts as leases_mod

    make_db(sqlite_url, 5, keys.current, bad_values=False)
    monkeypatch.setattr(leases_mod, "BOOT_ID_PATH", str(tmp_path) + "/absent", raising=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _hold_lock_as(sqlite_url, dead.pid)
    settings = settings_for(sqlite_url, keys.current)
    with pytest.raises(RunLockedError, match="already running"):
        run_migrate(settings, kms.client)
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(update(lock).values(heartbeat_at=store.now() - timedelta(minutes=3)))
    eng.dispose()
    run_migrate(settings, kms.client)


def test_a_worker_on_another_boot_of_the_same_hostname_keeps_its_range(
    db_url: str, keys: Keys, tmp_path: object, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from checkpoints import leases
    from checkpoints.tables import workers

    make_db(db_url, 1, keys.current)
    eng = make_engine(db_url)
    store.ensure_schema(eng)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _other_machine(tmp_path, monkeypatch, "aaaaaaaa-0000-4000-8000-000000000001")
    with eng.begin() as conn:
        run = store.create_run(conn, store.NewRun("migrate", 5, fingerprint="x"))
        leases.create_ranges(conn, run.id, "users", "encrypted_secret", None, ["10"])
        there = leases.register_worker(conn, run.id)
        assert leases.claim(conn, run.id, there, 600) is not None
        conn.execute(update(workers).where(workers.c.id == there).values(pid=dead.pid))
    _other_machine(tmp_path, monkeypatch, "bbbbbbbb-0000-4000-8000-000000000002")
    with eng.begin() as conn:
        here = leases.register_worker(conn, run.id)
        assert [w.id for w in leases.live_workers(conn, run.id, timedelta(minutes=2))] == [
            there, here]
        assert leases.mark_dead_here(conn, run.id) == 0
        second = leases.claim(conn, run.id, here, 600)  # the other, free range
        assert second is not None
        assert leases.claim(conn, run.id, here, 600) is None  # not the one held there
    # On the holder's own boot, its dead pid frees the range at once.
    _other_machine(tmp_path, monkeypatch, "aaaaaaaa-0000-4000-8000-000000000001")
    with eng.begin() as conn:
        live = [w.id for w in leases.live_workers(conn, run.id, timedelta(minutes=2))]
        assert live == [here]  # `here` registered on the other boot: presumed alive there
        assert leases.claim(conn, run.id, here, 600) is not None
