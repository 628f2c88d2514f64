"""verify decrypts every KMS value and reports leftovers and undecryptable values."""

from __future__ import annotations

import base64

from sqlalchemy import create_engine, update

from migration.db import make_engine
from migration.migrator import migrate
from migration.sample import coinflip_metadata
from migration.verify import verify
from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, make_kms, settings_for, snapshot


def test_verify_before_and_after_migration(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    truth = make_db(db_url, 40, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy)
    pre = verify(settings, engine=make_engine(db_url, read_only=True),
                 kms=make_kms(kms.client, settings))
    assert not pre.ok
    assert sum(c.fernet_left for c in pre.columns) == len(truth.plaintexts) + len(truth.bad)
    assert sum(c.kms_ok for c in pre.columns) == 0

    migrate(settings, engine=make_engine(db_url), kms=make_kms(kms.client, settings))
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
    migrate(settings, engine=make_engine(db_url), kms=make_kms(kms.client, settings))
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
    migrate(settings, engine=make_engine(sqlite_url), kms=make_kms(kms.client, settings))
    other = kms.client.create_key()["KeyMetadata"]["Arn"]
    s2 = settings_for(sqlite_url, keys.current, key_id=other)
    res = verify(s2, engine=make_engine(sqlite_url, read_only=True), kms=make_kms(kms.client, s2))
    assert res.ok
    assert sum(c.other_key for c in res.columns) == sum(c.kms_ok for c in res.columns) > 0
