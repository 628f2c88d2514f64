"""The application-side helper (migration.runtime) against moto's KMS and real databases.

It must read both formats whatever USE_AWS_KMS says (mid-migration tables hold both), agree
with the migration tool in both directions, agree with the guide's own helper, bind KMS
values to their row when given an encryption context, never put a value in an error, and
make one boto3 client per process however many threads call it.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, insert, select, update

import migration
from migration import (
    KMSEncryption,
    SecretDecryptError,
    decrypt_secret,
    encrypt_secret,
    encryption_context,
    runtime,
)
from migration.codec import ValueKind, classify, encode_kms
from migration.db import make_engine
from migration.migrator import migrate
from migration.sample import coinflip_metadata, create_coinflip_schema
from tests import guide_kms_encryption as guide
from tests.conftest import ALIAS, Keys, KmsHandle
from tests.helpers import (
    interrupted_migrate,
    make_db,
    make_kms,
    run_migrate,
    settings_for,
    snapshot,
)

SECRET = "5KQwrPbwdL6PhXujxW37FSSQZ1JiwsST4cqQzDeyXtP79zkvFD3"  # looks like a wallet key


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> Iterator[None]:
    """Each test starts with no cached client or keys and the application's Fernet keys."""
    runtime.reset_cache()
    monkeypatch.delenv("USE_AWS_KMS", raising=False)
    monkeypatch.delenv("AWS_KMS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_KMS_KEY_ID_PREVIOUS", raising=False)
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    yield
    runtime.reset_cache()


def _users(engine: Engine, values: dict[int, str | None]) -> None:
    _, users, _ = coinflip_metadata()
    create_coinflip_schema(engine)
    with engine.begin() as conn:
        conn.execute(insert(users), [
            {"user_id": pk, "username": f"u{pk}", "encrypted_secret": v,
             "referral_payout_escrow_secret": None}
            for pk, v in values.items()
        ])


def _column(engine: Engine, column: str = "encrypted_secret") -> dict[int, Any]:
    _, users, _ = coinflip_metadata()
    with engine.connect() as conn:
        return {pk: v for pk, v in conn.execute(select(users.c.user_id, users.c[column]))}


def _assert_no_value(exc: BaseException, value: str) -> None:
    """The error says nothing of the value: not in its text, args, or a chained error."""
    assert isinstance(exc, SecretDecryptError)
    assert isinstance(exc, ValueError)  # code written for the guide's ValueError catches it
    if value:
        assert value not in str(exc)
        assert value not in repr(exc)
        assert all(value not in str(a) for a in exc.args)
    assert exc.__cause__ is None
    assert exc.__context__ is None


# -- mid-migration: both formats in one table -------------------------------------------

def test_helper_reads_both_formats_in_a_half_migrated_table(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = make_db(db_url, 40, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=10)
    interrupted_migrate(db_url, settings, kms.client, after_batches=2)
    mid = snapshot(db_url)
    column = {c: v for c, v in mid.items() if c[0] == "users" and c[2] == "encrypted_secret"}
    kinds = {classify(v) for c, v in column.items() if c in truth.plaintexts}
    assert kinds == {ValueKind.FERNET, ValueKind.KMS}  # the same column holds both

    for flag in (None, "false", "true"):
        if flag is None:
            monkeypatch.delenv("USE_AWS_KMS", raising=False)
        else:
            monkeypatch.setenv("USE_AWS_KMS", flag)
        for cell, plaintext in truth.plaintexts.items():
            assert decrypt_secret(mid[cell]) == plaintext
            assert KMSEncryption().decrypt_secret(mid[cell]) == plaintext

    # The guide's helper reads with one branch only, so one format always breaks mid-way.
    fernet_cell = next(c for c in truth.plaintexts if classify(mid[c]) is ValueKind.FERNET)
    kms_cell = next(c for c in truth.plaintexts if classify(mid[c]) is ValueKind.KMS)
    monkeypatch.setenv("USE_AWS_KMS", "true")
    with pytest.raises(Exception):  # noqa: B017 - base64 or KMS error, whichever comes first
        guide.decrypt_secret(mid[fernet_cell])
    monkeypatch.delenv("USE_AWS_KMS")
    with pytest.raises(Exception):  # noqa: B017 - Fernet's InvalidToken
        guide.decrypt_secret(mid[kms_cell])


# -- values written by the helper, then the migration -----------------------------------

def test_migrate_migrates_helper_fernet_values_and_skips_helper_kms_values(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    plaintexts = {pk: f"{SECRET}-{pk}" for pk in range(1, 31)}
    stored: dict[int, str | None] = {}
    for pk, p in plaintexts.items():
        if pk % 3 == 0:
            monkeypatch.setenv("USE_AWS_KMS", "true")  # the app already writes KMS
        else:
            monkeypatch.delenv("USE_AWS_KMS", raising=False)  # the app still writes Fernet
        stored[pk] = encrypt_secret(p)
    stored[31], stored[32] = None, ""
    fernet = {pk for pk, v in stored.items() if v and classify(v) is ValueKind.FERNET}
    helper_kms = {pk for pk, v in stored.items() if v and classify(v) is ValueKind.KMS}
    assert len(fernet) == 20 and len(helper_kms) == 10

    _users(create_engine(db_url), stored)
    engine = make_engine(db_url)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=7)
    result = migrate(settings, engine=engine, kms=make_kms(kms.client, settings))

    col = next(c for c in result.columns if (c.table, c.column) == ("users", "encrypted_secret"))
    assert (col.migrated, col.already, col.skipped, col.failed) == (20, 10, 2, 0)
    after = _column(engine)
    for pk in helper_kms:
        assert after[pk] == stored[pk]  # the helper's KMS values are left byte-identical
    for pk in fernet:
        assert classify(after[pk]) is ValueKind.KMS
    assert after[31] is None and after[32] == ""
    monkeypatch.setenv("USE_AWS_KMS", "true")
    for pk, p in plaintexts.items():
        assert decrypt_secret(after[pk]) == p
        assert guide.decrypt_secret(after[pk]) == p
    engine.dispose()


# -- values written by the tool, read by the helper and by the guide --------------------

def test_values_the_tool_migrated_are_read_by_the_helper_and_the_guide(
    db_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = make_db(db_url, 25, keys.current, keys.legacy, bad_values=False)
    settings = settings_for(db_url, keys.current, keys.legacy)
    run_migrate(settings, kms.client)
    after = snapshot(db_url)
    for cell, plaintext in truth.plaintexts.items():
        assert classify(after[cell]) is ValueKind.KMS
        assert decrypt_secret(after[cell]) == plaintext  # USE_AWS_KMS unset: still reads
    monkeypatch.setenv("USE_AWS_KMS", "true")
    for cell, plaintext in truth.plaintexts.items():
        assert decrypt_secret(after[cell]) == plaintext
        assert guide.decrypt_secret(after[cell]) == plaintext
        assert guide.KMSEncryption().decrypt_secret(after[cell]) == plaintext


def test_guide_and_helper_read_each_others_values(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("USE_AWS_KMS", raising=False)
    guide_fernet, ours_fernet = guide.encrypt_secret(SECRET), encrypt_secret(SECRET)
    assert guide.decrypt_secret(ours_fernet) == SECRET
    monkeypatch.setenv("USE_AWS_KMS", "true")
    guide_kms, ours_kms = guide.encrypt_secret(SECRET), encrypt_secret(SECRET)
    assert classify(ours_kms) is ValueKind.KMS
    assert guide.decrypt_secret(ours_kms) == SECRET
    assert kms.decrypt_text(ours_kms) == SECRET
    for flag in ("true", "false"):
        monkeypatch.setenv("USE_AWS_KMS", flag)
        for value in (guide_fernet, ours_fernet, guide_kms, ours_kms):
            assert decrypt_secret(value) == SECRET


# -- encryption context -----------------------------------------------------------------

def test_context_bound_ciphertext_copied_to_another_row_does_not_decrypt(
    sqlite_url: str, kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(sqlite_url, keys.current, keys.legacy)
    tool = make_kms(kms.client, settings)

    def ctx(pk: int) -> dict[str, str]:
        return encryption_context("users", "encrypted_secret", pk)

    # Row 1 as `migrate --encryption-context` writes it; row 2 as the helper writes it.
    row1 = encode_kms(tool.client.encrypt(
        KeyId=settings.key_id, Plaintext=b"secret of user 1", EncryptionContext=ctx(1),
    )["CiphertextBlob"])
    monkeypatch.setenv("USE_AWS_KMS", "true")
    row2 = encrypt_secret("secret of user 2", context=ctx(2))
    engine = create_engine(sqlite_url)
    _users(engine, {1: row1, 2: row2, 3: None})
    _, users, _ = coinflip_metadata()

    values = _column(engine)
    assert decrypt_secret(values[1], context=ctx(1)) == "secret of user 1"
    assert decrypt_secret(values[2], context=ctx(2)) == "secret of user 2"
    assert KMSEncryption().decrypt_secret(values[2], ctx(2)) == "secret of user 2"

    # An attacker with write access copies user 1's ciphertext into rows 2 and 3.
    with engine.begin() as conn:
        conn.execute(update(users).where(users.c.user_id.in_([2, 3]))
                     .values(encrypted_secret=row1))
    moved = _column(engine)
    for pk in (2, 3):
        with pytest.raises(SecretDecryptError) as err:
            decrypt_secret(moved[pk], context=ctx(pk))
        _assert_no_value(err.value, moved[pk])
        assert "encryption context" in str(err.value)
    # Read without the context, or with another column's, it does not open either.
    for wrong in (None, encryption_context("users", "referral_payout_escrow_secret", 1)):
        with pytest.raises(SecretDecryptError):
            decrypt_secret(moved[1], context=wrong)
    # The trade-off: the guide's helper passes no context, so it cannot read bound values.
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidCiphertextException"):
        guide.decrypt_secret(moved[1])
    engine.dispose()


def test_without_context_a_copied_ciphertext_still_decrypts(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (the guide's format): nothing binds a value to its row."""
    monkeypatch.setenv("USE_AWS_KMS", "true")
    value = encrypt_secret(SECRET)
    assert decrypt_secret(value) == SECRET  # whichever row it was copied into


def test_context_is_ignored_for_fernet_values(monkeypatch: pytest.MonkeyPatch) -> None:
    token = encrypt_secret(SECRET, context=encryption_context("users", "encrypted_secret", 1))
    assert classify(token) is ValueKind.FERNET
    assert decrypt_secret(token, context=encryption_context("users", "x", 2)) == SECRET


def test_context_must_map_str_to_str(kms: KmsHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_AWS_KMS", "true")
    with pytest.raises(TypeError, match="encryption_context"):
        encrypt_secret(SECRET, context={"pk": 1})  # type: ignore[dict-item]


# -- errors never carry the value -------------------------------------------------------

def _neither_format_values(keys: Keys) -> list[str]:
    stranger = Fernet(Fernet.generate_key())
    good = Fernet(keys.current.encode()).encrypt(SECRET.encode()).decode()
    return [
        SECRET,  # a plaintext stored by mistake: not base64 at all
        "hello world, not a secret at all",
        "gAAAAABnot-really-a-fernet-token",  # Fernet-shaped, nothing opens it
        good[:-12] + "AAAAAAAAAAA=",  # a corrupt Fernet token
        stranger.encrypt(SECRET.encode()).decode(),  # a Fernet token under an unknown key
        "c2VjcmV0LXdhbGxldC1rZXktNUtRd3JQYndkTDZQaFh1",  # base64, but no KMS ciphertext
        "€uro-not-ascii",
    ]


@pytest.mark.parametrize("flag", [None, "true"])
def test_values_neither_format_or_opening_raise_one_error_without_the_value(
    kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch, flag: str | None
) -> None:
    monkeypatch.setenv("USE_AWS_KMS", "true")
    truncated = encrypt_secret(SECRET)[:-8]  # a KMS ciphertext cut short
    if flag is None:
        monkeypatch.delenv("USE_AWS_KMS")
    for value in [*_neither_format_values(keys), truncated, ""]:
        with pytest.raises(SecretDecryptError) as err:
            decrypt_secret(value)
        _assert_no_value(err.value, value)
        with pytest.raises(SecretDecryptError) as err:
            KMSEncryption().decrypt_secret(value)
        _assert_no_value(err.value, value)


def test_none_and_bytes_values(kms: KmsHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SecretDecryptError, match="empty"):
        decrypt_secret(None)  # type: ignore[arg-type]
    token = encrypt_secret(SECRET)
    assert decrypt_secret(token.encode()) == SECRET  # type: ignore[arg-type]
    with pytest.raises(SecretDecryptError):
        decrypt_secret(b"\xff\xfe binary")  # type: ignore[arg-type]


def test_kms_plaintext_that_is_not_utf8_raises_without_the_bytes(kms: KmsHandle) -> None:
    raw = b"\xffsecret\xfe bytes"
    value = encode_kms(kms.client.encrypt(KeyId=kms.key_id, Plaintext=raw)["CiphertextBlob"])
    with pytest.raises(SecretDecryptError, match="not UTF-8") as err:
        decrypt_secret(value)
    _assert_no_value(err.value, value)
    assert "secret" not in str(err.value).replace("decrypted secret", "")


@pytest.mark.parametrize("code", ["AccessDeniedException", "DisabledException",
                                  "ThrottlingException", "KMSInternalException"])
def test_service_errors_propagate_as_botocore_errors(kms: KmsHandle, code: str) -> None:
    """An outage, a denied or disabled key is not a bad value: not SecretDecryptError."""
    value = KMSEncryption().encrypt_secret(SECRET)
    client = boto3.client("kms", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_client_error("decrypt", service_error_code=code)
        stub.add_client_error("encrypt", service_error_code=code)
        enc = KMSEncryption(client=client)
        with pytest.raises(botocore.exceptions.ClientError, match=code) as err:
            enc.decrypt_secret(value)
        assert not isinstance(err.value, SecretDecryptError)
        assert value not in str(err.value)
        with pytest.raises(botocore.exceptions.ClientError, match=code):
            enc.encrypt_secret(SECRET)


def test_oversize_plaintext_is_refused_before_kms(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USE_AWS_KMS", "true")
    big = "k" * 4097
    with pytest.raises(ValueError, match="4096-byte") as err:
        encrypt_secret(big)
    assert big not in str(err.value)


def test_missing_or_malformed_fernet_key_is_a_valueerror_naming_the_variable(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = encrypt_secret(SECRET)
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.delenv("ENCRYPTION_KEY_LEGACY")
    with pytest.raises(ValueError, match="ENCRYPTION_KEY not set"):
        encrypt_secret(SECRET)
    with pytest.raises(ValueError, match="ENCRYPTION_KEY not set"):
        decrypt_secret(token)
    monkeypatch.setenv("ENCRYPTION_KEY", "not-a-fernet-key-but-a-secret")
    with pytest.raises(ValueError, match="not a valid Fernet key") as err:
        encrypt_secret(SECRET)
    assert "not-a-fernet-key-but-a-secret" not in str(err.value)


# -- configuration read at call time ----------------------------------------------------

def test_environment_is_read_at_call_time_and_key_changes_invalidate_the_cache(
    kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert classify(encrypt_secret(SECRET)) is ValueKind.FERNET
    monkeypatch.setenv("USE_AWS_KMS", "TRUE")  # the guide lower-cases it too
    assert classify(encrypt_secret(SECRET)) is ValueKind.KMS
    monkeypatch.setenv("USE_AWS_KMS", "1")  # the guide only honours "true"; so do we
    assert classify(encrypt_secret(SECRET)) is ValueKind.FERNET

    old_token = encrypt_secret(SECRET)
    new_key = Fernet.generate_key().decode()
    monkeypatch.setenv("ENCRYPTION_KEY", new_key)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    new_token = encrypt_secret(SECRET)
    assert Fernet(new_key.encode()).decrypt(new_token.encode()).decode() == SECRET
    with pytest.raises(SecretDecryptError):
        decrypt_secret(old_token)  # the old current key is in neither variable now
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", f"{keys.legacy},{keys.current}")
    assert decrypt_secret(old_token) == SECRET


def test_after_the_migration_legacy_key_alone_still_reads_old_tokens(
    kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guide Step 6: ENCRYPTION_KEY removed, kept as ENCRYPTION_KEY_LEGACY, KMS writes."""
    token = encrypt_secret(SECRET)
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.current)
    monkeypatch.setenv("USE_AWS_KMS", "true")
    assert decrypt_secret(token) == SECRET
    written = encrypt_secret(SECRET)
    assert classify(written) is ValueKind.KMS
    assert decrypt_secret(written) == SECRET


def test_encryption_key_argument_overrides_the_current_key_as_in_the_guide(
    keys: Keys,
) -> None:
    other = Fernet.generate_key().decode()
    token = encrypt_secret(SECRET, other)
    assert Fernet(other.encode()).decrypt(token.encode()).decode() == SECRET
    assert decrypt_secret(token, other) == SECRET
    assert guide.decrypt_secret(token, other) == SECRET
    with pytest.raises(SecretDecryptError):
        decrypt_secret(token)


def test_kmsencryption_takes_the_guides_arguments(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = KMSEncryption(region="us-east-1")
    assert (enc.region, enc.key_id) == ("us-east-1", "alias/coinflip-master-key")
    monkeypatch.setenv("AWS_KMS_KEY_ID", kms.key_id)
    enc = KMSEncryption()
    assert enc.key_id == kms.key_id
    value = enc.encrypt_secret(SECRET)
    assert kms.client.decrypt(CiphertextBlob=base64.b64decode(value))["KeyId"] == kms.arn
    assert KMSEncryption(client=kms.client).decrypt_secret(value) == SECRET
    assert runtime.get_kms_encryption() is None
    monkeypatch.setenv("USE_AWS_KMS", "true")
    assert isinstance(runtime.get_kms_encryption(), KMSEncryption)
    assert migration.__version__


# -- one client per process -------------------------------------------------------------

@pytest.fixture
def client_creations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every boto3 client made from now on (its keyword arguments), by any session."""
    made: list[dict[str, Any]] = []
    real = boto3.session.Session.client

    def counting(self: boto3.session.Session, *args: Any, **kwargs: Any) -> Any:
        made.append({"service": args[0] if args else kwargs.get("service_name"), **kwargs})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", counting)
    return made


def test_one_client_for_many_calls_and_threads(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch, client_creations: list[dict[str, Any]]
) -> None:
    monkeypatch.setenv("USE_AWS_KMS", "true")
    threads, calls = 8, 50
    start = threading.Barrier(threads)  # all threads hit the lazy creation at once
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(calls):
                secret = f"{SECRET}-{n}-{i}"
                stored = encrypt_secret(secret) if i % 2 else KMSEncryption().encrypt_secret(
                    secret)
                assert decrypt_secret(stored) == secret
        except BaseException as exc:  # collected: an assert in a thread would be lost
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors, errors[:3]
    assert len(client_creations) == 1
    made = client_creations[0]
    assert made["service"] == "kms" and made["region_name"] == "us-east-1"
    # Credentials come from boto3's default chain, never from arguments as in the guide.
    assert not {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"} & set(made)
    assert made["config"].retries == {"mode": "standard", "total_max_attempts": 3}


def test_the_guides_helper_makes_a_client_per_call(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch, client_creations: list[dict[str, Any]]
) -> None:
    """What the cache saves (the figures are in benchmarks/bench_runtime.py)."""
    monkeypatch.setenv("USE_AWS_KMS", "true")
    value = encrypt_secret(SECRET)
    for _ in range(5):
        guide.decrypt_secret(value)
        decrypt_secret(value)
    assert len(client_creations) == 1 + 5  # ours once, the guide's five times


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_makes_its_own_client(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USE_AWS_KMS", "true")
    decrypt_secret(encrypt_secret(SECRET))
    assert runtime._clients
    pid = os.fork()
    if pid == 0:  # the child: exit at once with the answer
        os._exit(0 if not runtime._clients else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert runtime._clients  # the parent keeps its own


# -- only the configured KMS keys (issue 16, item 2) ------------------------------------

def _value_under(client: Any, key_id: str, plaintext: bytes = b"planted secret") -> str:
    return encode_kms(client.encrypt(KeyId=key_id, Plaintext=plaintext)["CiphertextBlob"])


def _new_key(client: Any, alias: str | None = None) -> dict[str, str]:
    meta: dict[str, str] = client.create_key(Description="another key")["KeyMetadata"]
    if alias:
        client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
    return meta


def _kms_calls(client: Any) -> list[str]:
    """The KMS operations `client` makes from now on."""
    calls: list[str] = []
    client.meta.events.register(
        "before-call.kms.*", lambda model, **_: calls.append(model.name))
    return calls


def test_a_ciphertext_under_another_kms_key_is_refused(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value planted under someone else's key (the guide's policy allows `key/*`) opens
    with KMS, but the helper refuses it, however the application's key is configured."""
    foreign = _new_key(kms.client)
    planted = _value_under(kms.client, foreign["KeyId"])
    assert kms.decrypt_text(planted) == "planted secret"  # KMS itself opens it
    monkeypatch.setenv("USE_AWS_KMS", "true")
    assert guide.decrypt_secret(planted) == "planted secret"  # the guide's helper opens it

    alias_arn = kms.arn.split(":key/")[0] + ":" + ALIAS
    for configured in (None, kms.key_id, kms.arn, ALIAS, alias_arn):
        runtime.reset_cache()
        if configured is None:
            monkeypatch.delenv("AWS_KMS_KEY_ID", raising=False)  # the default alias
        else:
            monkeypatch.setenv("AWS_KMS_KEY_ID", configured)
        own = _value_under(kms.client, kms.key_id, SECRET.encode())
        for _ in range(2):  # before and after the key's ARN is known
            assert decrypt_secret(own) == SECRET
            for call in (decrypt_secret, KMSEncryption().decrypt_secret,
                         KMSEncryption(client=kms.client).decrypt_secret):
                with pytest.raises(SecretDecryptError, match="AWS_KMS_KEY_ID") as err:
                    call(planted)
                _assert_no_value(err.value, planted)
                assert "planted secret" not in repr(err.value)
        assert decrypt_secret(encrypt_secret(SECRET)) == SECRET


def test_previous_keys_are_accepted_only_when_configured(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation: the new key is AWS_KMS_KEY_ID, the old one AWS_KMS_KEY_ID_PREVIOUS."""
    new = _new_key(kms.client, "alias/coinflip-master-key-2")
    third = _new_key(kms.client)
    old_value = _value_under(kms.client, kms.key_id, b"old")  # under the old key (ALIAS)
    third_value = _value_under(kms.client, third["KeyId"], b"third")
    monkeypatch.setenv("USE_AWS_KMS", "true")
    monkeypatch.setenv("AWS_KMS_KEY_ID", "alias/coinflip-master-key-2")
    new_value = encrypt_secret("new")
    assert kms.client.decrypt(CiphertextBlob=base64.b64decode(new_value))["KeyId"] == new["Arn"]

    assert decrypt_secret(new_value) == "new"
    for value in (old_value, third_value):
        with pytest.raises(SecretDecryptError, match="AWS_KMS_KEY_ID_PREVIOUS"):
            decrypt_secret(value)
    for previous in (ALIAS, f" {kms.arn} ", f"{third['Arn']}, {ALIAS}", f"{kms.key_id},"):
        runtime.reset_cache()
        monkeypatch.setenv("AWS_KMS_KEY_ID_PREVIOUS", previous)
        assert decrypt_secret(old_value) == "old"
        assert KMSEncryption().decrypt_secret(old_value) == "old"
        assert decrypt_secret(new_value) == "new"
        if third["Arn"] in previous:
            assert decrypt_secret(third_value) == "third"
        else:
            with pytest.raises(SecretDecryptError):
                decrypt_secret(third_value)
        # Writing still uses the current key only.
        written = encrypt_secret("again")
        assert kms.client.decrypt(
            CiphertextBlob=base64.b64decode(written))["KeyId"] == new["Arn"]
    # The constructor takes them too.
    monkeypatch.delenv("AWS_KMS_KEY_ID_PREVIOUS")
    enc = KMSEncryption(key_id=new["Arn"], previous_key_ids=[kms.key_id])
    assert enc.decrypt_secret(old_value) == "old"
    with pytest.raises(SecretDecryptError):
        KMSEncryption(key_id=new["Arn"]).decrypt_secret(old_value)


def test_an_alias_is_resolved_once_then_one_call_a_value(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [_value_under(kms.client, kms.key_id, f"s{i}".encode()) for i in range(5)]
    calls = _kms_calls(runtime.kms_client())
    assert [decrypt_secret(v) for v in values] == [f"s{i}" for i in range(5)]
    assert len(calls) <= len(values) + 1 and calls.count("Decrypt") >= len(values)
    del calls[:]
    assert [decrypt_secret(v) for v in values] == [f"s{i}" for i in range(5)]
    assert calls == ["Decrypt"] * len(values)


def test_kms_incorrect_key_answer_is_a_secret_decrypt_error() -> None:
    """Real KMS answers a Decrypt pinned to another key with IncorrectKeyException (moto
    answers AccessDeniedException): either way the value is refused, not the service."""
    client = boto3.client("kms", region_name="us-east-1")
    foreign_arn = "arn:aws:kms:us-east-1:999999999999:key/11111111-2222-3333-4444-555555555555"
    value = encode_kms(b"\x01" + b"x" * 60)
    with Stubber(client) as stub:
        stub.add_response("decrypt", {"KeyId": foreign_arn, "Plaintext": b"planted"})
        stub.add_client_error("decrypt", service_error_code="IncorrectKeyException")
        with pytest.raises(SecretDecryptError, match="AWS_KMS_KEY_ID") as err:
            KMSEncryption(key_id=ALIAS, client=client).decrypt_secret(value)
        _assert_no_value(err.value, value)
        stub.assert_no_pending_responses()
    with Stubber(client) as stub:  # a key ARN needs no call to compare
        stub.add_response("decrypt", {"KeyId": foreign_arn, "Plaintext": b"planted"})
        with pytest.raises(SecretDecryptError):
            KMSEncryption(key_id=foreign_arn.replace("9999", "1234"),
                          client=client).decrypt_secret(value)
        stub.add_response("decrypt", {"KeyId": foreign_arn, "Plaintext": b"ok"})
        assert KMSEncryption(key_id=foreign_arn, client=client).decrypt_secret(value) == "ok"


# -- no error carries the secret (issue 16, item 7) -------------------------------------

MARK = "Qz7MARKxK9"  # in every secret below: any copy of it, in any form, shows this


def _exception_texts(exc: BaseException) -> list[str]:
    """Every text an exception chain exposes: str, repr, args, attributes (a
    UnicodeError's .object), following __cause__ and __context__."""
    texts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), type(e).__name__]
        texts += [repr(a) for a in e.args] + [str(a) for a in e.args]
        for name in ("object", "reason", "doc", "msg", "response"):
            if hasattr(e, name):
                texts.append(repr(getattr(e, name)))
        texts += [repr(v) for v in vars(e).values()] if hasattr(e, "__dict__") else []
        todo += [e.__cause__, e.__context__]
    return texts


def _assert_chain_clean(exc: BaseException, *needles: str) -> None:
    for text in _exception_texts(exc):
        for needle in needles:
            assert needle not in text, (type(exc).__name__, text[:200])


def test_a_lone_surrogate_in_the_secret_raises_a_valueerror_without_it(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"{MARK}-wallet-\ud800-key"
    for flag in (None, "true"):
        if flag:
            monkeypatch.setenv("USE_AWS_KMS", flag)
        for call in (encrypt_secret, KMSEncryption().encrypt_secret):
            with pytest.raises(ValueError, match="UTF-8") as err:
                call(secret)
            assert not isinstance(err.value, UnicodeError)
            assert err.value.__context__ is None and err.value.__cause__ is None
            _assert_chain_clean(err.value, MARK)


# Any character, lone surrogates (category Cs, which st.characters() leaves out) included.
_char_st = st.one_of(
    st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
_secret_st = st.builds(
    lambda pre, mid, post: f"{pre}{MARK}{mid}{post}",
    st.sampled_from(["", "gAAAAA", " ", "AQICAH", "\n"]),
    st.lists(_char_st, max_size=12).map("".join),  # (st.text drops the surrogates)
    st.lists(_char_st, max_size=4).map("".join),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=_secret_st, big=st.booleans())
def test_no_error_of_the_helper_carries_the_secret(
    kms: KmsHandle, keys: Keys, monkeypatch: pytest.MonkeyPatch, secret: str, big: bool
) -> None:
    """Every call, on both paths, with the secret as plaintext, as stored value, as
    Fernet key and as context: whatever it raises, no error in the chain holds it."""
    if big:
        secret = secret * (4200 // len(secret) + 1)  # over KMS's 4096 bytes
    calls: list[tuple[str | None, Any]] = [
        (None, lambda: encrypt_secret(secret)),
        ("true", lambda: encrypt_secret(secret)),
        (None, lambda: KMSEncryption().encrypt_secret(secret)),
        (None, lambda: encrypt_secret("x", secret)),  # the secret as the Fernet key
        (None, lambda: decrypt_secret(secret)),  # a plaintext stored by mistake
        ("true", lambda: decrypt_secret(secret)),
        (None, lambda: decrypt_secret(secret.encode("utf-8", "surrogatepass"))),  # type: ignore[arg-type]
        (None, lambda: KMSEncryption().decrypt_secret(secret)),
        (None, lambda: decrypt_secret(Fernet(keys.current.encode()).encrypt(b"x").decode(),
                                      secret)),
        ("true", lambda: encrypt_secret("x", context={"k": secret})),
        (None, lambda: decrypt_secret(encode_kms(b"\x01" * 40), context={"k": secret})),
    ]
    for flag, call in calls:
        if flag:
            monkeypatch.setenv("USE_AWS_KMS", flag)
        else:
            monkeypatch.delenv("USE_AWS_KMS", raising=False)
        try:
            out = call()
        except Exception as exc:  # whatever it is, it must be clean
            _assert_chain_clean(exc, MARK)
        else:
            assert MARK not in out
    # Round trip when it can: what is encrypted comes back.
    if secret.isprintable() and "\ud800" not in secret and not big:
        try:
            secret.encode("utf-8")
        except UnicodeEncodeError:
            return
        assert decrypt_secret(encrypt_secret(secret)) == secret


# -- what the guide's helper reads (issue 16, item 11) ----------------------------------

@pytest.mark.parametrize("pad", [(" ", ""), ("", "\n"), ("\t", "\r\n"), ("\n", " \n")])
def test_values_the_guides_helper_reads_with_whitespace(
    kms: KmsHandle, monkeypatch: pytest.MonkeyPatch, pad: tuple[str, str]
) -> None:
    before, after = pad
    token = encrypt_secret(SECRET)
    monkeypatch.setenv("USE_AWS_KMS", "true")
    kms_value = encrypt_secret(SECRET)
    assert guide.decrypt_secret(f"{before}{kms_value}{after}") == SECRET
    assert decrypt_secret(f"{before}{kms_value}{after}") == SECRET
    assert KMSEncryption().decrypt_secret(f"{before}{kms_value}{after}") == SECRET
    assert decrypt_secret(f"{before}{token}{after}") == SECRET
    monkeypatch.delenv("USE_AWS_KMS")
    assert guide.decrypt_secret(f"{before}{token}{after}") == SECRET
    assert decrypt_secret(f"{before}{token}{after}") == SECRET
    assert decrypt_secret(f"{before}{kms_value}{after}".encode()) == SECRET  # type: ignore[arg-type]


def test_a_malformed_legacy_key_does_not_break_fernet_encryption(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = "not-a-fernet-key-but-a-secret"
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", f"{keys.legacy},{bad}")
    token = encrypt_secret(SECRET)  # needs only ENCRYPTION_KEY
    assert Fernet(keys.current.encode()).decrypt(token.encode()).decode() == SECRET
    assert guide.encrypt_secret(SECRET)  # as the guide's helper, which ignores LEGACY
    other = Fernet.generate_key().decode()
    assert Fernet(other.encode()).decrypt(encrypt_secret(SECRET, other).encode())
    # Reading tries every key, so it says which one is malformed: by position, not value.
    with pytest.raises(ValueError, match="ENCRYPTION_KEY_LEGACY key #2") as err:
        decrypt_secret(token)
    _assert_chain_clean(err.value, bad, keys.current, keys.legacy)
    # A malformed current key still stops encryption, naming it.
    monkeypatch.setenv("ENCRYPTION_KEY", bad)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    with pytest.raises(ValueError, match="ENCRYPTION_KEY is not a valid") as err:
        encrypt_secret(SECRET)
    _assert_chain_clean(err.value, bad)
