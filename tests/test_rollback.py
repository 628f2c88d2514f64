"""Rollback restores the exact original bytes, with the mirror compare-and-swap."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, select, update

from checkpoints.tables import journal, runs
from checkpoints.tables import lock as lock_table
from migration.db import make_engine
from migration.errors import ConfigError
from migration.migrator import migrate
from migration.rollback import rollback
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    interrupted_migrate,
    make_db,
    make_kms,
    migrate_db,
    settings_for,
    snapshot,
)


def test_rollback_restores_exact_bytes(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    make_db(db_url, 70, keys.current, keys.legacy)
    before = snapshot(db_url)
    migrate_db(db_url, keys, kms)
    assert snapshot(db_url) != before
    result = rollback(make_engine(db_url), batch_size=7)
    assert snapshot(db_url) == before
    assert result.conflicts == 0 and not result.failures
    eng = create_engine(db_url)
    with eng.connect() as conn:
        statuses = {r.status for r in conn.execute(select(journal))}
    assert statuses == {"rolled_back"}
    # A second rollback has nothing left to do and changes nothing.
    again = rollback(make_engine(db_url))
    assert again.restored == 0
    assert snapshot(db_url) == before


def test_rollback_is_resumable_after_an_interruption(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import migration.pipeline as rb  # the column loop calls the applier

    make_db(db_url, 50, keys.current, keys.legacy)
    before = snapshot(db_url)
    migrate_db(db_url, keys, kms)
    real = rb.apply_rollback_batch
    calls = []

    def crash_on_third(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rb, "apply_rollback_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        rollback(make_engine(db_url), batch_size=5)
    monkeypatch.setattr(rb, "apply_rollback_batch", real)
    mid = snapshot(db_url)
    assert mid != before
    restored = sum(1 for c in before if before[c] == mid[c] and before[c])
    assert restored > 0
    result = rollback(make_engine(db_url), batch_size=5)
    assert result.resumed
    assert snapshot(db_url) == before
    eng = create_engine(db_url)
    with eng.connect() as conn:
        kinds = [(r.kind, r.state) for r in conn.execute(select(runs).order_by(runs.c.id))]
    assert kinds == [("migrate", "completed"), ("rollback", "completed")]


def test_rollback_leaves_a_value_the_application_changed(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 20, keys.current, keys.legacy, bad_values=False)
    migrate_db(db_url, keys, kms)
    _, users, _ = coinflip_metadata()
    app_token = Fernet(keys.current.encode()).encrypt(b"rotated by the app").decode()
    eng = create_engine(db_url)
    with eng.begin() as conn:
        pk = conn.execute(select(journal.c.pk).where(
            journal.c.table_name == "users", journal.c.column_name == "encrypted_secret")
            .limit(1)).scalar_one()
        conn.execute(update(users).where(users.c.user_id == int(pk))
                     .values(encrypted_secret=app_token))
    result = rollback(make_engine(db_url))
    assert result.conflicts == 1
    assert [(f.table_name, f.pk, f.column_name) for f in result.failures] == [
        ("users", pk, "encrypted_secret")]
    assert snapshot(db_url)[("users", pk, "encrypted_secret")] == app_token
    with eng.connect() as conn:
        status = conn.execute(select(journal.c.status).where(
            journal.c.pk == pk, journal.c.column_name == "encrypted_secret")).scalar_one()
    assert status == "conflict"


def test_rollback_abandons_an_unfinished_migrate_run(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(sqlite_url, 40, keys.current, keys.legacy)
    before = snapshot(sqlite_url)
    settings = settings_for(sqlite_url, keys.current, keys.legacy, batch_size=5)

    interrupted_migrate(sqlite_url, settings, kms.client)
    rollback(make_engine(sqlite_url))
    assert snapshot(sqlite_url) == before
    # The next migrate starts a new run from the first row, not from the old checkpoint.
    result = migrate(settings, engine=make_engine(sqlite_url),
                     kms=make_kms(kms.client, settings))
    assert not result.resumed
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)


def test_rollback_without_a_journal_says_so(sqlite_url: str, keys: Keys) -> None:
    make_db(sqlite_url, 3, keys.current)
    with pytest.raises(ConfigError, match="nothing to roll back"):
        rollback(make_engine(sqlite_url))


def test_a_rollback_whose_lock_was_taken_over_leaves_the_run_to_the_new_holder(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # runs.lifecycle: when the lock is lost mid-run (another command took it over), the
    # fenced-out command stops with one line and writes nothing more, not even its run's
    # state: the run is the new holder's now. Before, rollback marked it `stopped`.
    import migration.pipeline as pl
    from migration.errors import RunLockedError

    make_db(db_url, 30, keys.current, keys.legacy)
    migrate_db(db_url, keys, kms)
    real = pl.apply_rollback_batch
    calls = []

    def taken_over_on_second(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # another command takes the lock over, as after a crash
            eng = create_engine(db_url)
            with eng.begin() as conn:
                conn.execute(update(lock_table).values(token="the-new-holder"))
            eng.dispose()
        return real(*a, **kw)

    monkeypatch.setattr(pl, "apply_rollback_batch", taken_over_on_second)
    with pytest.raises(RunLockedError):
        rollback(make_engine(db_url), batch_size=5)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        states = [(r.kind, r.state) for r in conn.execute(select(runs).order_by(runs.c.id))]
    eng.dispose()
    assert states[-1] == ("rollback", "running"), states
