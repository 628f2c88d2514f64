"""The pipeline in-process, on SQLite and on the real PostgreSQL server, with moto's KMS."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError

from checkpoints.tables import checkpoints, journal, runs
from migration.codec import ValueKind, classify
from migration.db import make_engine
from migration.errors import ConfigError, FatalKMSError, ResumeMismatchError
from migration.kms import make_client
from migration.migrator import REASON_EMPTY, REASON_NO_KEY, REASON_OVERSIZE, Mode, migrate
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    VAULT_LENGTH,
    VAULT_SIZES,
    interrupted_migrate,
    make_db,
    make_kms,
    make_vault,
    run_main,
    run_migrate,
    settings_for,
    snapshot,
    vault_values,
)


def _alembic_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from checkpoints.store import _alembic_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(_alembic_dir()))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def _journal(url: str) -> list[Any]:
    eng = create_engine(url)
    with eng.connect() as conn:
        rows = conn.execute(select(journal)).all()
    eng.dispose()
    return rows


def test_migrate_rewrites_good_values_and_fails_bad_ones(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 60, keys.current, keys.legacy)
    before = snapshot(db_url)
    settings = settings_for(db_url, keys.current, keys.legacy)
    result = run_migrate(settings, kms.client)

    after = snapshot(db_url)
    for cell, plaintext in truth.plaintexts.items():
        assert classify(after[cell]) is ValueKind.KMS
        assert kms.decrypt_text(after[cell]) == plaintext
    for cell in truth.bad:
        assert after[cell] == before[cell]
    for cell in truth.empty:
        assert after[cell] == before[cell]
    reasons = {(f.table_name, f.pk, f.column_name): f.reason for f in result.failures}
    assert set(reasons) == set(truth.bad)
    assert reasons[("users", "3", "referral_payout_escrow_secret")] == REASON_OVERSIZE
    assert reasons[("users", "1", "encrypted_secret")] == REASON_NO_KEY
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert sum(c.skipped for c in result.columns) == len(truth.empty)
    # One Encrypt and one verifying Decrypt per migrated value, plus one DescribeKey.
    assert result.kms_requests == 2 * len(truth.plaintexts) + 1
    rows = _journal(db_url)
    assert len(rows) == len(truth.plaintexts)
    for r in rows:
        assert before[(r.table_name, r.pk, r.column_name)] == r.original
        assert after[(r.table_name, r.pk, r.column_name)] == r.migrated


def test_guides_own_decrypt_secret_reads_migrated_values(
    sqlite_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import guide_kms_encryption as guide

    truth = make_db(sqlite_url, 20, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, keys.legacy)
    run_migrate(settings, kms.client)
    monkeypatch.setenv("USE_AWS_KMS", "true")
    after = snapshot(sqlite_url)
    for cell, plaintext in truth.plaintexts.items():
        assert guide.decrypt_secret(after[cell]) == plaintext


def test_second_run_finds_everything_already_migrated(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 30, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy)
    run_migrate(settings, kms.client)
    first = snapshot(db_url)
    again = run_migrate(settings, kms.client)
    assert not again.resumed
    assert sum(c.migrated for c in again.columns) == 0
    assert sum(c.already for c in again.columns) == len(truth.plaintexts)
    assert snapshot(db_url) == first
    assert len(_journal(db_url)) == len(truth.plaintexts)


def test_resume_skips_committed_batches(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    truth = make_db(db_url, 80, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)
    interrupted_migrate(db_url, settings, kms.client, after_batches=4)
    committed = len(_journal(db_url))
    assert 0 < committed < len(truth.plaintexts)
    k = make_kms(kms.client, settings)
    result = migrate(settings, engine=make_engine(db_url), kms=k)
    assert result.resumed
    rows = _journal(db_url)
    per_cell = Counter((r.table_name, r.pk, r.column_name) for r in rows)
    assert max(per_cell.values()) == 1  # nothing re-encrypted twice
    assert len(rows) == len(truth.plaintexts)
    # The resumed run only paid KMS for what was left.
    assert k.requests == 2 * (len(truth.plaintexts) - committed) + 1
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        assert [r.state for r in conn.execute(select(runs))] == ["completed"]
    eng.dispose()


def test_resume_refuses_another_key_or_targets(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 40, keys.current, keys.legacy)
    settings = settings_for(sqlite_url, keys.current, keys.legacy, batch_size=10)

    interrupted_migrate(sqlite_url, settings, kms.client)
    other = kms.client.create_key()["KeyMetadata"]
    s2 = settings_for(sqlite_url, keys.current, keys.legacy, key_id=other["KeyId"])
    with pytest.raises(ResumeMismatchError, match="the KMS key"):
        run_migrate(s2, kms.client)
    s3 = settings_for(sqlite_url, keys.current, keys.legacy,
                      targets=settings.targets[:1])
    with pytest.raises(ResumeMismatchError, match="the targets"):
        run_migrate(s3, kms.client)
    # --new-run abandons the old run and starts over; values already migrated stay.
    result = migrate(s3, engine=make_engine(sqlite_url), kms=make_kms(kms.client, s3),
                     mode=Mode(new_run=True))
    assert not result.resumed
    eng = create_engine(sqlite_url)
    with eng.connect() as conn:
        states = [r.state for r in conn.execute(select(runs).order_by(runs.c.id))]
    assert states == ["abandoned", "completed"]


def test_dry_run_writes_nothing(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    truth = make_db(db_url, 40, keys.current, keys.legacy)
    before = snapshot(db_url)
    path = Path(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
    settings = settings_for(db_url, keys.current, keys.legacy)
    k = make_kms(kms.client, settings)
    result = migrate(settings, engine=make_engine(db_url, read_only=True), kms=k,
                     mode=Mode(dry_run=True))
    assert result.dry_run and result.run_id is None
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert len(result.failures) == len(truth.bad)
    assert k.requests == 2 * len(truth.plaintexts) + 1  # it really encrypted and verified
    assert snapshot(db_url) == before
    eng = create_engine(db_url)
    assert not [t for t in inspect(eng).get_table_names() if t.startswith("kms_migrate")]
    eng.dispose()
    if path:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_read_only_engine_refuses_writes(db_url: str, keys: Keys) -> None:
    make_db(db_url, 5, keys.current)
    eng = make_engine(db_url, read_only=True)
    _, users, _ = coinflip_metadata()
    with pytest.raises(DBAPIError, match=r"(?i)read.only|readonly"), eng.begin() as conn:
        conn.execute(update(users).values(username="x"))


class FailingKMS:
    """Wraps the real KMS and turns the n-th Encrypt into a fatal error (a key disabled
    mid-run), after which every call fails."""

    def __init__(self, inner: Any, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def round_trip(self, plaintext: bytes) -> Any:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise FatalKMSError("KMS key alias/coinflip-master-key is disabled")
        return self.inner.round_trip(plaintext)

    def submit(self, fn: Any, items: Any) -> Any:
        return self.inner.submit(self.round_trip if fn == self.inner.round_trip else fn, items)


def test_fatal_kms_error_stops_with_nothing_of_the_batch_written(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 60, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)
    before = snapshot(db_url)
    inner = make_kms(kms.client, settings)
    with pytest.raises(FatalKMSError):
        migrate(settings, engine=make_engine(db_url), kms=FailingKMS(inner, 25))  # type: ignore[arg-type]
    after = snapshot(db_url)
    changed = {c for c in before if before[c] != after[c]}
    rows = _journal(db_url)
    assert {(r.table_name, r.pk, r.column_name) for r in rows} == changed
    assert 0 < len(changed) < 25  # whole batches only: the failing one wrote nothing
    eng = create_engine(db_url)
    with eng.connect() as conn:
        run = conn.execute(select(runs)).one()
        ck = conn.execute(select(checkpoints).where(
            checkpoints.c.column_name == "encrypted_secret")).one()
    eng.dispose()
    assert run.state == "stopped" and "disabled" in run.note
    # The checkpoint sits exactly at the end of the last committed batch.
    committed_pks = sorted(int(r.pk) for r in rows if r.column_name == "encrypted_secret")
    assert int(ck.last_pk) >= committed_pks[-1]
    assert int(ck.last_pk) % 10 == 0
    # After the fix, re-running resumes and finishes.
    result = run_migrate(settings, kms.client)
    assert result.resumed
    assert len(_journal(db_url)) == len(truth.plaintexts)


class MeddlingKMS:
    """Real KMS, but while one value is being encrypted the application rewrites it."""

    def __init__(self, inner: Any, url: str, pk: int, new_token: str) -> None:
        self.inner, self.url, self.pk, self.new_token, self.done = inner, url, pk, new_token, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def submit(self, fn: Any, items: Any) -> Any:
        if not self.done:
            self.done = True
            _, users, _ = coinflip_metadata()
            eng = create_engine(self.url)
            with eng.begin() as conn:
                conn.execute(update(users).where(users.c.user_id == self.pk)
                             .values(encrypted_secret=self.new_token))
            eng.dispose()
        return self.inner.submit(fn, items)


def test_compare_and_swap_keeps_a_concurrent_application_write(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 30, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)
    before = snapshot(db_url)
    pk = min(int(c[1]) for c in before
             if c[0] == "users" and c[2] == "encrypted_secret" and before[c])
    app_token = Fernet(keys.current.encode()).encrypt(b"the app's new secret").decode()
    meddler = MeddlingKMS(make_kms(kms.client, settings), db_url, pk, app_token)
    result = migrate(settings, engine=make_engine(db_url), kms=meddler)  # type: ignore[arg-type]
    assert result.conflicts == 1
    after = snapshot(db_url)
    assert after[("users", str(pk), "encrypted_secret")] == app_token  # the app's write survived
    assert not any(r.pk == str(pk) and r.column_name == "encrypted_secret"
                   for r in _journal(db_url))
    again = run_migrate(settings, kms.client)
    assert sum(c.migrated for c in again.columns) == 1
    final = snapshot(db_url)
    assert kms.decrypt_text(final[("users", str(pk), "encrypted_secret")]) == "the app's new secret"


def test_text_and_integer_primary_keys_page_in_order(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 57, keys.current, bad_values=False, seed=3)
    settings = settings_for(db_url, keys.current, batch_size=4)
    run_migrate(settings, kms.client)
    after = snapshot(db_url)
    assert all(classify(after[c]) is ValueKind.KMS for c in truth.plaintexts)
    eng = create_engine(db_url)
    with eng.connect() as conn:
        cks = conn.execute(select(checkpoints)).all()
        top_wager = conn.execute(text("SELECT max(wager_id) FROM wagers")).scalar_one()
    eng.dispose()
    assert all(c.done for c in cks)
    assert {c.last_pk for c in cks if c.table_name == "users"} == {"57"}
    assert {c.last_pk for c in cks if c.table_name == "wagers"} == {top_wager}


def test_missing_table_or_column_refused_before_any_write(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    from migration.config import Target

    make_db(sqlite_url, 5, keys.current)
    for targets, msg in (
        ((Target("nope", "id", ("secret",)),), "table nope does not exist"),
        ((Target("users", "user_id", ("nope",)),), "column users.nope does not exist"),
        ((Target("users", "username", ("encrypted_secret",)),), "primary key is user_id"),
    ):
        s = settings_for(sqlite_url, keys.current, targets=targets)
        with pytest.raises(ConfigError, match=msg):
            run_migrate(s, kms.client)
    eng = create_engine(sqlite_url)
    assert not [t for t in inspect(eng).get_table_names() if t.startswith("kms_migrate")]


def test_table_without_primary_key_is_refused(sqlite_url: str, kms: KmsHandle, keys: Keys) -> None:
    from migration.config import Target

    make_db(sqlite_url, 3, keys.current)
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE loose (id INTEGER, secret TEXT)"))
    s = settings_for(sqlite_url, keys.current, targets=(Target("loose", "id", ("secret",)),))
    with pytest.raises(ConfigError, match="has no primary key"):
        run_migrate(s, kms.client)


def test_own_alembic_version_table_leaves_the_apps_alone(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(db_url, 5, keys.current)
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_rev_42')"))
    settings = settings_for(db_url, keys.current)
    run_migrate(settings, kms.client)
    with eng.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
            ("app_rev_42",)]
        assert conn.execute(text("SELECT version_num FROM kms_migrate_alembic_version")
                            ).scalar_one() == _alembic_head()
        n = conn.execute(select(func.count()).select_from(runs)).scalar_one()
    assert n == 1
    eng.dispose()


# -- per-value problems stay per-value (issue 11, defect 1) -----------------------------------

def _set_cell(url: str, cell: tuple[str, str, str], value: str) -> None:
    _, users, wagers = coinflip_metadata()
    table, pk, column = cell
    t, key = (users, users.c.user_id) if table == "users" else (wagers, wagers.c.wager_id)
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(update(t).where(key == (int(pk) if table == "users" else pk))
                     .values({column: value}))
    eng.dispose()


def test_an_empty_plaintext_fails_that_value_and_the_run_goes_on(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    truth = make_db(db_url, 30, env_keys.current, bad_values=False)
    cell = sorted(truth.plaintexts)[0]
    empty = Fernet(env_keys.current.encode()).encrypt(b"").decode()
    _set_cell(db_url, cell, empty)
    for _ in range(2):  # and again: a re-run must not turn it into a run-level stop
        code, out, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-backup",
                                  "--no-progress")
        assert code == 1, err
        table, pk, column = cell
        assert f"{table} pk={pk} {column}: {REASON_EMPTY}" in out
    after = snapshot(db_url)
    assert after[cell] == empty
    for other, plaintext in truth.plaintexts.items():
        if other != cell:
            assert kms.decrypt_text(after[other]) == plaintext


def test_kms_validation_exception_on_one_value_is_its_failure(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    from tests.test_kms import Injector, inject

    truth = make_db(sqlite_url, 10, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=1)
    client = make_client("us-east-1", 1)
    inject(client, Injector("ValidationException"), "Encrypt")
    result = run_migrate(settings, client)
    assert [f.reason for f in result.failures] == ["KMS refused this value (ValidationException)"]
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts) - 1
    failed = result.failures[0]
    cell = (failed.table_name, failed.pk, failed.column_name)
    assert classify(snapshot(sqlite_url)[cell]) is ValueKind.FERNET


# -- a VARCHAR(n) that fits the Fernet token but not the KMS text (issue 11, defect 11) --------

def test_a_kms_text_too_long_for_its_column_fails_that_value_not_the_batch(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    config = make_vault(db_url, env_keys.current, tmp_path)
    before = vault_values(db_url)
    assert all(len(v) <= VAULT_LENGTH for v in before.values())
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config, "--yes",
                              "--no-backup", "--no-progress")
    assert code == 1, err
    assert (f"vault pk=1 secret: its KMS ciphertext (276 characters) does not fit the column "
            f"(VARCHAR({VAULT_LENGTH}))") in out
    after = vault_values(db_url)
    assert after[1] == before[1]
    for i in (2, 3):
        assert classify(after[i]) is ValueKind.KMS and len(after[i]) <= VAULT_LENGTH
        assert len(kms.decrypt_text(after[i])) == VAULT_SIZES[i]


def test_dry_run_reports_the_values_that_will_not_fit_on_real_kms(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys, tmp_path: Path
) -> None:
    config = make_vault(db_url, env_keys.current, tmp_path)
    before = vault_values(db_url)
    code, out, err = run_main(capsys, "migrate", "--db", db_url, "--config", config,
                              "--dry-run", "--no-progress")
    assert code == 1, err
    assert (f"vault.secret is VARCHAR({VAULT_LENGTH}): 2 value(s) will not fit their KMS "
            "text") in out
    assert "vault pk=1 secret: " in out and "vault pk=2 secret: " in out
    assert "vault pk=3 secret: " not in out
    assert vault_values(db_url) == before
