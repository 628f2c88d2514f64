"""Database faults: a PostgreSQL connection killed mid-batch, a SQLite database locked by
another writer, and the application writing to the target columns while the tool runs."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, event, select, text, update

import migration.db
import migration.migrator
from checkpoints.tables import checkpoints
from migration.applier import REASON_CONFLICT
from migration.cli import main
from migration.codec import ValueKind, classify
from migration.db import make_engine
from migration.migrator import REASON_BEHIND, migrate
from migration.rollback import rollback
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    Cell,
    journal_cells,
    make_db,
    make_kms,
    run_migrate,
    settings_for,
    snapshot,
)


@pytest.mark.postgres
def test_postgres_connection_killed_mid_batch_rolls_the_batch_back(
    pg_url: str, pg_server: Any, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(pg_url, 40, keys.current, keys.legacy, bad_values=False)
    before = snapshot(pg_url)
    settings = settings_for(pg_url, keys.current, keys.legacy, batch_size=10)
    engine = make_engine(pg_url)
    updates = [0]
    admin = create_engine(pg_server.admin_url, isolation_level="AUTOCOMMIT")

    @event.listens_for(engine, "after_cursor_execute")
    def kill_after_the_second_batch_update(conn: Any, cursor: Any, statement: str,
                                           *a: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE USERS"):
            updates[0] += 1
            if updates[0] == 2:  # the second batch's rewrites are sent, not yet committed
                pid = cursor.connection.info.backend_pid
                with admin.connect() as c:
                    c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})

    with pytest.raises(Exception, match=r"terminat|closed|connection"):
        migrate(settings, engine=engine, kms=make_kms(kms.client, settings))
    admin.dispose()
    mid = snapshot(pg_url)
    changed = {c for c in before if before[c] != mid[c]}
    assert changed == set(journal_cells(pg_url))  # the killed batch left nothing behind
    first_batch = {c for c in truth.plaintexts
                   if c[0] == "users" and c[2] == "encrypted_secret" and int(c[1]) <= 10}
    assert changed == first_batch
    eng = create_engine(pg_url)
    with eng.connect() as conn:
        ck = conn.execute(select(checkpoints).where(
            checkpoints.c.column_name == "encrypted_secret")).one()
    eng.dispose()
    assert ck.last_pk == "10"
    result = run_migrate(settings, kms.client)
    assert result.resumed
    assert set(journal_cells(pg_url)) == set(truth.plaintexts)
    after = snapshot(pg_url)
    assert all(kms.decrypt_text(after[c]) == p for c, p in truth.plaintexts.items())


def test_sqlite_locked_by_another_writer_waits_then_says_so(
    sqlite_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    before = snapshot(sqlite_url)
    monkeypatch.setattr(migration.db, "SQLITE_BUSY_TIMEOUT", 1.0)
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    other.execute("UPDATE users SET username = 'busy' WHERE user_id = 1")
    t0 = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["migrate", "--db", sqlite_url, "--yes"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and "locked by another writer" in err[0] and "Traceback" not in err[0]
    assert elapsed < 10  # bounded: about the busy timeout, not forever
    assert snapshot(sqlite_url) == before


class AppWriter(threading.Thread):
    """The application: keeps rewriting random secrets with new Fernet tokens."""

    def __init__(self, url: str, key: str, cells: list[Cell]) -> None:
        super().__init__(daemon=True)
        self.url, self.fernet, self.cells = url, Fernet(key.encode()), cells
        self.stop = threading.Event()
        self.writes: dict[Cell, tuple[str, str]] = {}  # cell -> (plaintext, token), latest
        self.count = 0
        self.rng = random.Random(99)

    def run(self) -> None:
        _, users, wagers = coinflip_metadata()
        eng = create_engine(self.url, connect_args={"timeout": 30}
                            if self.url.startswith("sqlite") else {})
        while not self.stop.is_set():
            cell = self.rng.choice(self.cells)
            plaintext = f"app-write-{self.count}-{self.rng.getrandbits(32):08x}"
            token = self.fernet.encrypt(plaintext.encode()).decode()
            table = users if cell[0] == "users" else wagers
            pk = int(cell[1]) if cell[0] == "users" else cell[1]
            with eng.begin() as conn:
                conn.execute(update(table).where(table.c[table.primary_key.columns.keys()[0]]
                                                 == pk).values({cell[2]: token}))
            self.writes[cell] = (plaintext, token)
            self.count += 1
            time.sleep(0.002)
        eng.dispose()


def test_concurrent_application_writes_during_migrate_are_never_lost(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = make_db(db_url, 80, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=5)
    writer = AppWriter(db_url, keys.current, sorted(truth.plaintexts))
    check = migration.migrator.settle_run

    def quiet_then_check(*args: Any, **kw: Any) -> None:
        # The application stops writing once the run has been through every row, so
        # that what is left when the run looks for leftovers is what it must name.
        writer.stop.set()
        writer.join()
        check(*args, **kw)

    monkeypatch.setattr(migration.migrator, "settle_run", quiet_then_check)
    writer.start()
    while writer.count < 3:  # the application is really writing before the tool starts
        time.sleep(0.005)
    try:
        first = run_migrate(settings, kms.client)
    finally:
        writer.stop.set()
        writer.join()
    assert writer.count > 5
    # Exit 0 means nothing is left: every token the application wrote behind the first run's
    # cursor is named as left (a failure, exit 1), never passed over.
    left = {(t, pk, c) for (t, pk, c), v in snapshot(db_url).items()
            if classify(v) is ValueKind.FERNET}
    assert {(f.table_name, f.pk, f.column_name) for f in first.failures} == left
    assert first.failed + first.conflicts == len(first.failures) == len(left)
    assert all(f.reason in (REASON_BEHIND, REASON_CONFLICT) for f in first.failures)
    second = run_migrate(settings, kms.client)
    final = snapshot(db_url)
    for cell, plaintext in truth.plaintexts.items():
        expected = writer.writes.get(cell, (plaintext, ""))[0]
        assert classify(final[cell]) is ValueKind.KMS, cell  # the next run migrated it
        assert kms.decrypt_text(final[cell]) == expected, cell  # the app's last write won
    assert second.failed == 0


def test_concurrent_application_writes_during_rollback_are_never_lost(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 80, keys.current, keys.legacy, bad_values=False)
    before = snapshot(db_url)
    settings = settings_for(db_url, keys.current, keys.legacy)
    run_migrate(settings, kms.client)
    writer = AppWriter(db_url, keys.current, sorted(truth.plaintexts))
    writer.start()
    while writer.count < 3:  # the application is really writing before the tool starts
        time.sleep(0.005)
    try:
        result = rollback(make_engine(db_url), batch_size=2)
    finally:
        writer.stop.set()
        writer.join()
    assert writer.count > 5
    final = snapshot(db_url)
    for cell in truth.plaintexts:
        if cell in writer.writes:
            assert final[cell] == writer.writes[cell][1], cell  # the app's token, untouched
        else:
            assert final[cell] == before[cell], cell  # restored byte for byte
    assert result.conflicts == len({f.pk + f.column_name for f in result.failures})
