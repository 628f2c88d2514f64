"""migrate --encryption-context: each ciphertext bound to its table, column and key."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, update

from migration import SecretDecryptError, decrypt_secret, encryption_context
from migration.db import make_engine
from migration.errors import ResumeMismatchError
from migration.runtime import reset_cache
from migration.sample import coinflip_metadata
from migration.verify import verify
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    interrupted_migrate,
    make_db,
    make_kms,
    run_migrate,
    settings_for,
    snapshot,
)


def test_context_binds_each_value_to_its_row_and_verify_reports_a_moved_one(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = make_db(db_url, 20, keys.current, keys.legacy, bad_values=False)
    s = settings_for(db_url, keys.current, keys.legacy, encryption_context=True)
    run_migrate(s, kms.client)
    after = snapshot(db_url)
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    reset_cache()
    a, b = sorted((c for c in truth.plaintexts if c[0] == "users"
                   and c[2] == "encrypted_secret"), key=lambda c: int(c[1]))[:2]
    # Read with the row's own context: the plaintext; without any: refused.
    assert decrypt_secret(after[a], context=encryption_context(*_where(a))) == truth.plaintexts[a]
    with pytest.raises(SecretDecryptError):
        decrypt_secret(after[a])
    ok = verify(s, engine=make_engine(db_url, read_only=True), kms=make_kms(kms.client, s))
    assert ok.ok and sum(c.kms_ok for c in ok.columns) == len(truth.plaintexts)
    # Verify without the context cannot open what was written with it.
    plain = settings_for(db_url, keys.current, keys.legacy)
    no_ctx = verify(plain, engine=make_engine(db_url, read_only=True),
                    kms=make_kms(kms.client, plain))
    assert sum(c.undecryptable for c in no_ctx.columns) == len(truth.plaintexts)

    # An attacker copies a's ciphertext into b's row: it no longer decrypts there.
    _, users, _ = coinflip_metadata()
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(update(users).where(users.c.user_id == int(b[1]))
                     .values(encrypted_secret=after[a]))
    eng.dispose()
    with pytest.raises(SecretDecryptError) as err:
        decrypt_secret(after[a], context=encryption_context(*_where(b)))
    assert after[a] not in str(err.value)
    moved = verify(s, engine=make_engine(db_url, read_only=True), kms=make_kms(kms.client, s))
    assert not moved.ok
    assert [(t, pk, c) for t, c, pk, _ in moved.problems] == [b]
    assert "encryption context" in moved.problems[0][3]


def _where(cell: tuple[str, str, str]) -> tuple[str, str, str]:
    table, pk, column = cell
    return table, column, pk


def test_a_run_is_not_resumed_with_another_context_setting(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 30, keys.current, bad_values=False)
    s = settings_for(sqlite_url, keys.current, batch_size=5)

    interrupted_migrate(sqlite_url, s, kms.client)
    s2 = settings_for(sqlite_url, keys.current, batch_size=5, encryption_context=True)
    with pytest.raises(ResumeMismatchError, match="encryption context"):
        run_migrate(s2, kms.client)
