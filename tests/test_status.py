"""status reports runs, per-column progress with what remains, failures and the journal."""

from __future__ import annotations

from migration.db import make_engine
from migration.status import collect_status
from tests.conftest import Keys, KmsHandle
from tests.helpers import interrupted_migrate, make_db, run_migrate, settings_for


def test_status_of_a_fresh_database_is_none(sqlite_url: str, keys: Keys) -> None:
    make_db(sqlite_url, 3, keys.current)
    assert collect_status(make_engine(sqlite_url, read_only=True)) is None


def test_status_shows_progress_remaining_and_failures(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 30, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)
    interrupted_migrate(db_url, settings, kms.client, after_batches=2)
    mid = collect_status(make_engine(db_url, read_only=True))
    assert mid is not None
    assert mid.runs[0]["state"] == "interrupted"
    first = next(p for p in mid.progress if (p.table, p.column) == ("users", "encrypted_secret"))
    assert first.last_pk == "20" and first.remaining == 10 and not first.done
    assert first.batches == 2

    run_migrate(settings, kms.client)
    done = collect_status(make_engine(db_url, read_only=True))
    assert done is not None
    assert done.runs[0]["state"] == "completed"
    assert all(p.done and p.remaining == 0 for p in done.progress)
    assert sum(p.migrated for p in done.progress) == len(truth.plaintexts)
    assert {(f["table_name"], f["pk"], f["column_name"]) for f in done.failures} == set(truth.bad)
    assert done.failures_total == len(truth.bad)
    assert sum(done.journal.values()) == len(truth.plaintexts)
