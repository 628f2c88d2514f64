"""verify decrypts every KMS value and reports leftovers and undecryptable values."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, update

from checkpoints.tables import journal
from migration.db import make_engine
from migration.errors import FatalKMSError
from migration.kms import make_client
from migration.sample import coinflip_metadata
from migration.verify import verify
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, make_kms, run_main, run_migrate, settings_for, snapshot


def test_verify_before_and_after_migration(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    truth = make_db(db_url, 40, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy)
    pre = verify(settings, engine=make_engine(db_url, read_only=True),
                 kms=make_kms(kms.client, settings))
    assert not pre.ok
    assert sum(c.fernet_left for c in pre.columns) == len(truth.plaintexts) + len(truth.bad)
    assert sum(c.kms_ok for c in pre.columns) == 0

    run_migrate(settings, kms.client)
    post = verify(settings, engine=make_engine(db_url, read_only=True),
                  kms=make_kms(kms.client, settings))
    assert sum(c.kms_ok for c in post.columns) == len(truth.plaintexts)
    assert sum(c.empty for c in post.columns) == len(truth.empty)
    assert {(t, pk, c) for t, c, pk, _ in post.problems} == set(truth.bad)
    assert not post.ok  # the bad values are still Fernet tokens


def test_verify_flags_tampered_and_foreign_values(
    db_url: str, kms: KmsHandle, keys: Keys
) -> None:
    truth = make_db(db_url, 20, keys.current, bad_values=False)
    settings = settings_for(db_url, keys.current)
    run_migrate(settings, kms.client)
    ok = verify(settings, engine=make_engine(db_url, read_only=True),
                kms=make_kms(kms.client, settings))
    assert ok.ok and sum(c.kms_ok for c in ok.columns) == len(truth.plaintexts)

    cells = sorted(c for c in truth.plaintexts if c[0] == "users"
                   and c[2] == "encrypted_secret")
    _, users, _ = coinflip_metadata()
    stored = snapshot(db_url)
    blob = bytearray(base64.b64decode(stored[cells[0]]))
    blob[-1] ^= 0xFF
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(update(users).where(users.c.user_id == int(cells[0][1]))
                     .values(encrypted_secret=base64.b64encode(bytes(blob)).decode()))
        conn.execute(update(users).where(users.c.user_id == int(cells[1][1]))
                     .values(encrypted_secret="not base64 at all!"))
    eng.dispose()
    bad = verify(settings, engine=make_engine(db_url, read_only=True),
                 kms=make_kms(kms.client, settings))
    assert not bad.ok
    flagged = {(t, pk, c): why for t, c, pk, why in bad.problems}
    assert set(flagged) == {cells[0], cells[1]}
    assert flagged[cells[0]] == "KMS cannot decrypt it"
    assert sum(c.undecryptable for c in bad.columns) == 2


def test_verify_counts_values_under_another_key(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    make_db(sqlite_url, 10, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current)
    run_migrate(settings, kms.client)
    other = kms.client.create_key()["KeyMetadata"]["Arn"]
    s2 = settings_for(sqlite_url, keys.current, key_id=other)
    res = verify(s2, engine=make_engine(sqlite_url, read_only=True), kms=make_kms(kms.client, s2))
    # Issue 11, defect 5: a value the configured key cannot decrypt is a problem, not a note.
    assert not res.ok
    assert sum(c.kms_ok for c in res.columns) == 0
    assert sum(c.other_key for c in res.columns) == len(res.problems) > 0
    assert {arn for c in res.columns for arn in c.other_keys} == {kms.arn}


# -- values under another KMS key (issue 11, defect 5) -----------------------------------------

def _put(url: str, cells: dict[tuple[str, str, str], str]) -> None:
    """Overwrite users cells (table, pk, column) with the given stored texts."""
    _, users, _ = coinflip_metadata()
    eng = create_engine(url)
    with eng.begin() as conn:
        for (_, pk, column), value in cells.items():
            conn.execute(update(users).where(users.c.user_id == int(pk)).values({column: value}))
    eng.dispose()


def _journal_rows(url: str) -> int:
    eng = create_engine(url)
    with eng.connect() as conn:
        n = int(conn.execute(select(func.count()).select_from(journal)).scalar_one())
    eng.dispose()
    return n


def test_verify_fails_values_under_another_key_and_finalize_refuses(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    truth = make_db(db_url, 20, env_keys.current, bad_values=False)
    code, _, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-backup",
                            "--no-progress")
    assert code == 0, err
    other = kms.client.create_key()["KeyMetadata"]["Arn"]
    cells = sorted(c for c in truth.plaintexts if c[0] == "users")[:2]
    _put(db_url, {c: base64.b64encode(kms.client.encrypt(
        KeyId=other, Plaintext=truth.plaintexts[c].encode())["CiphertextBlob"]).decode()
        for c in cells})

    code, out, err = run_main(capsys, "verify", "--db", db_url)
    assert code == 1, err
    assert "verify: FAILED" in out
    for table, pk, column in cells:
        assert f"{table} pk={pk} {column}: under another KMS key ({other})" in out
    assert f"2 value(s) under KMS key {other}" in out
    for plaintext in truth.plaintexts.values():
        assert plaintext not in out + err

    rows = _journal_rows(db_url)
    code, out, err = run_main(capsys, "finalize", "--db", db_url, "--yes")
    assert code == 2
    assert "2 under another KMS key" in err and "nothing was deleted" in err
    assert _journal_rows(db_url) == rows


def test_a_value_under_a_key_this_caller_cannot_use_is_a_problem_not_a_stop(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    from tests.test_kms import Injector, inject

    truth = make_db(sqlite_url, 10, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=1)
    run_migrate(settings, kms.client)
    client = make_client("us-east-1", 1)
    # Real KMS: the pinned Decrypt says another key encrypted it; the naming call, unpinned,
    # is denied (that key's policy does not let this caller use it).
    inject(client, Injector("IncorrectKeyException", "AccessDeniedException"), "Decrypt")
    res = verify(settings, engine=make_engine(sqlite_url, read_only=True),
                 kms=make_kms(client, settings))
    assert not res.ok
    assert [why for *_, why in res.problems] == ["under a KMS key this caller cannot use"]
    assert sum(c.kms_ok for c in res.columns) == len(truth.plaintexts) - 1
    assert sum(c.other_key for c in res.columns) == 1


def test_access_denied_on_every_decrypt_still_stops_verify(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    from tests.test_kms import Injector, inject

    make_db(sqlite_url, 5, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=1)
    run_migrate(settings, kms.client)
    client = make_client("us-east-1", 1)
    inject(client, Injector(forever="AccessDeniedException"), "Decrypt")
    with pytest.raises(FatalKMSError, match="grant the caller kms:Decrypt"):
        verify(settings, engine=make_engine(sqlite_url, read_only=True),
               kms=make_kms(client, settings))


# -- per-value KMS answers in verify (issue 11, defect 1) --------------------------------------

def test_verify_names_a_stored_value_too_long_to_be_a_kms_ciphertext(
    capsys: Any, db_url: str, kms: KmsHandle, env_keys: Keys
) -> None:
    truth = make_db(db_url, 10, env_keys.current, bad_values=False)
    code, _, err = run_main(capsys, "migrate", "--db", db_url, "--yes", "--no-backup",
                            "--no-progress")
    assert code == 0, err
    cell = sorted(c for c in truth.plaintexts if c[0] == "users")[0]
    # Decided without calling KMS: real KMS refuses a CiphertextBlob over 6144 bytes, and
    # moto answers this one AccessDeniedException, which would stop the run (exit 2).
    _put(db_url, {cell: base64.b64encode(b"\x01" * 6145).decode()})
    code, out, err = run_main(capsys, "verify", "--db", db_url)
    assert code == 1, err
    table, pk, column = cell
    assert (f"{table} pk={pk} {column}: too long to be a KMS ciphertext (6145 bytes; KMS "
            "takes at most 6144)") in out


def test_validation_exception_on_a_verify_decrypt_is_that_values_problem(
    sqlite_url: str, kms: KmsHandle, keys: Keys
) -> None:
    from tests.test_kms import Injector, inject

    truth = make_db(sqlite_url, 10, keys.current, bad_values=False)
    settings = settings_for(sqlite_url, keys.current, concurrency=1)
    run_migrate(settings, kms.client)
    client = make_client("us-east-1", 1)
    inject(client, Injector("ValidationException"), "Decrypt")
    res = verify(settings, engine=make_engine(sqlite_url, read_only=True),
                 kms=make_kms(client, settings))
    assert [why for *_, why in res.problems] == ["KMS refused it as invalid (ValidationException)"]
    assert sum(c.kms_ok for c in res.columns) == len(truth.plaintexts) - 1
    assert sum(c.undecryptable for c in res.columns) == 1
