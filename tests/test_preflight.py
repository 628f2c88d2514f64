"""`kms-migrate preflight`: every check, passing and failing, and the CLI's contract.

Most tests call `migration.preflight.preflight` in-process against moto's in-process KMS
and STS (the `kms` fixture), injecting KMS's real error responses with a botocore
``before-send`` handler (tests/test_kms.py's Injector). The CLI runs in-process through
``cli.main`` and, for the exit-code contract, as the installed ``kms-migrate`` in a
subprocess against moto's server mode (and behind tests/kms_proxy.py for access denied).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, inspect, text

from benchmarks.fake_kms import RawBody
from checkpoints import store
from checkpoints.lock import RunLock
from migration.config import Settings, Target
from migration.db import safe_url
from migration.preflight import Check, format_check, preflight, summary
from migration.sample import create_coinflip_schema
from tests.conftest import ALIAS as ALIAS_NAME
from tests.conftest import Keys, KmsHandle, MotoServer, _make_key, kms_migrate_bin
from tests.helpers import (
    VAULT_LENGTH,
    assert_clean,
    assert_refused,
    interrupted_migrate,
    make_db,
    make_vault,
    migrate_db,
    run_main,
    settings_for,
    snapshot,
)
from tests.kms_proxy import Rule, kms_proxy
from tests.test_kms import Injector, inject

ORDER_PREFIX = [
    "database", "table users", "table wagers", "Fernet keys",
    "Fernet sample users.encrypted_secret", "Fernet sample users.referral_payout_escrow_secret",
    "Fernet sample wagers.creator_escrow_secret", "Fernet sample wagers.acceptor_escrow_secret",
    "KMS key", "key enabled", "key usage", "key region", "Encrypt+Decrypt round trip",
    "caller identity", "bookkeeping",
]
SAMPLED = re.compile(r"opened (\d+) of (\d+) sampled")


# -- helpers ----------------------------------------------------------------------------------

def sts_error(code: str, status: int = 403) -> Any:
    """A before-send handler answering STS's query-protocol (XML) error for `code`."""
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        f"<Type>Sender</Type><Code>{code}</Code><Message>User: arn:aws:iam::123456789012:"
        "user/migrator is not authorized to perform: sts:GetCallerIdentity</Message></Error>"
        "<RequestId>6f1c3c5e-0000-4000-8000-000000000000</RequestId></ErrorResponse>"
    ).encode()

    def handler(request: Any, **_: Any) -> AWSResponse:
        headers = {"Content-Type": "text/xml", "Content-Length": str(len(body))}
        return AWSResponse(request.url, status, headers, RawBody(body))

    return handler


def kms_client(region: str = "us-east-1") -> Any:
    """A client as preflight makes it (botocore retries off), inside moto's mock."""
    from migration.kms import make_client

    return make_client(region, 1)


def run(settings: Settings, keys: Keys | None = None, **kw: Any) -> dict[str, Check]:
    """preflight() -> {name: check}; also checks no secret shows in any line."""
    kw.setdefault("sleep", lambda s: None)
    checks = preflight(settings, **kw)
    lines = "\n".join(format_check(c) for c in checks) + summary(checks)
    assert_clean(lines, keys=keys)
    out: dict[str, Check] = {}
    for c in checks:
        if c.name in out:  # a name appears twice only for bookkeeping lines
            out[f"{c.name} #2"] = c
        else:
            out[c.name] = c
    return out


def failed(checks: dict[str, Check]) -> set[str]:
    return {n for n, c in checks.items() if c.ok is False}


def skipped(checks: dict[str, Check]) -> set[str]:
    return {n for n, c in checks.items() if c.ok is None and c.skipped}


def file_digest(url: str) -> str:
    path = url.removeprefix("sqlite:///")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


KEY_CHECKS = {"KMS key", "key enabled", "key usage", "key region", "Encrypt+Decrypt round trip"}


# -- everything passes ------------------------------------------------------------------------

def test_every_check_passes_on_a_good_setup(db_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(db_url, 40, keys.current, keys.legacy, bad_values=False)
    checks = preflight(settings_for(db_url, keys.current, keys.legacy), sleep=lambda s: None)
    names = [c.name for c in checks]
    assert names[:len(ORDER_PREFIX)] == ORDER_PREFIX  # one line per check, in order
    assert names[-1] == "bookkeeping"
    assert all(c.ok is not False and not c.skipped for c in checks), checks
    by = {c.name: c for c in checks}
    assert by["database"].detail.startswith(f"reachable: {safe_url(db_url)}")
    assert "primary key user_id (integer)" in by["table users"].detail
    assert "primary key wager_id (text)" in by["table wagers"].detail
    for name in ORDER_PREFIX[4:8]:
        m = SAMPLED.search(by[name].detail)
        assert m is not None and m.group(1) == m.group(2) and int(m.group(2)) > 0, by[name]
    assert kms.arn in by["KMS key"].detail and "alias/coinflip-master-key" in by["KMS key"].detail
    assert by["key enabled"].detail == "KeyState Enabled"
    assert by["key usage"].detail == "ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT"
    assert by["key region"].detail == "us-east-1"
    assert "intact" in by["Encrypt+Decrypt round trip"].detail
    assert by["caller identity"].ok is True
    assert "arn:aws:sts::123456789012:user/moto" in by["caller identity"].detail
    assert "account 123456789012" in by["caller identity"].detail
    assert by["bookkeeping"].ok is None and "no kms-migrate tables yet" in by["bookkeeping"].detail
    text_ = "\n".join(format_check(c) for c in checks)
    assert_clean(text_, keys=keys)
    assert summary(checks).startswith("preflight OK")


def test_preflight_writes_nothing(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(sqlite_url, 20, keys.current, keys.legacy)
    before = file_digest(sqlite_url)
    run(settings_for(sqlite_url, keys.current, keys.legacy), keys)
    assert file_digest(sqlite_url) == before
    eng = create_engine(sqlite_url)
    assert not [t for t in inspect(eng).get_table_names() if t.startswith("kms_migrate")]
    eng.dispose()


def test_format_and_summary() -> None:
    assert format_check(Check("a", True, "x")) == "ok    a: x"
    assert format_check(Check("a", False, "x")) == "FAIL  a: x"
    assert format_check(Check("a", None, "x")) == "info  a: x"
    assert format_check(Check("a", None, "x", skipped=True)) == "skip  a: x"
    assert summary([Check("a", True, ""), Check("b", None, "")]) == (
        "preflight OK: 1 ok, 0 failed, 1 info, 0 skipped")
    assert summary([Check("a", False, "")]).startswith("preflight FAILED: 0 ok, 1 failed")


# -- database and targets ---------------------------------------------------------------------

def test_unreachable_database_skips_targets_but_checks_kms(keys: Keys, kms: KmsHandle) -> None:
    url = "postgresql+psycopg://migrator:pg-password-never-shown@127.0.0.1:1/coinflip"
    checks = run(settings_for(url, keys.current, keys.legacy), keys)
    db = checks["database"]
    assert db.ok is False
    assert "127.0.0.1" in db.detail and "***" in db.detail and "DATABASE_URL" in db.detail
    assert "pg-password-never-shown" not in db.detail
    assert failed(checks) == {"database"}
    assert {"table users", "table wagers", "Fernet sample users", "Fernet sample wagers",
            "bookkeeping"} <= skipped(checks)
    # A database failure does not stop the key and KMS checks.
    assert checks["Fernet keys"].ok is True
    assert all(checks[n].ok is True for n in KEY_CHECKS)
    assert checks["caller identity"].ok is True


def test_missing_sqlite_file_fails_the_database_check(tmp_path: Path, keys: Keys,
                                                      kms: KmsHandle) -> None:
    url = f"sqlite:///{tmp_path / 'nope.db'}"
    checks = run(settings_for(url, keys.current), keys)
    assert checks["database"].ok is False and "does not exist" in checks["database"].detail
    assert not (tmp_path / "nope.db").exists()  # not created by the check


def test_missing_table(db_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(db_url, 10, keys.current, keys.legacy)
    targets = (Target("users", "user_id", ("encrypted_secret",)),
               Target("wallets", "wallet_id", ("secret",)))
    checks = run(settings_for(db_url, keys.current, keys.legacy, targets=targets), keys)
    assert checks["table users"].ok is True
    assert checks["table wallets"].ok is False
    assert "wallets does not exist" in checks["table wallets"].detail
    assert "--config" in checks["table wallets"].detail
    assert failed(checks) == {"table wallets"}
    assert "Fernet sample wallets" in skipped(checks)
    assert checks["Fernet sample users.encrypted_secret"].ok is True


def test_missing_column(db_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(db_url, 10, keys.current, keys.legacy)
    targets = (Target("users", "user_id", ("encrypted_secret", "escrow_secret")),)
    checks = run(settings_for(db_url, keys.current, keys.legacy, targets=targets), keys)
    assert checks["table users"].ok is False
    assert "column users.escrow_secret does not exist" in checks["table users"].detail
    assert failed(checks) == {"table users"}


def test_table_without_primary_key(db_url: str, keys: Keys, kms: KmsHandle) -> None:
    eng = create_engine(db_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE vault (vault_id INTEGER, secret TEXT)"))
    eng.dispose()
    targets = (Target("vault", "vault_id", ("secret",)),)
    checks = run(settings_for(db_url, keys.current, targets=targets), keys)
    assert checks["table vault"].ok is False
    assert "has no primary key" in checks["table vault"].detail
    assert failed(checks) == {"table vault"}


# -- Fernet keys ------------------------------------------------------------------------------

def test_malformed_encryption_key(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy)
    bad = "my-super-secret-key-12345"  # the guide's example value
    checks = run(settings_for(sqlite_url, bad), keys)
    fk = checks["Fernet keys"]
    assert fk.ok is False and "ENCRYPTION_KEY is not a valid Fernet key" in fk.detail
    assert bad not in "\n".join(format_check(c) for c in checks.values())
    assert failed(checks) == {"Fernet keys"}
    assert {n for n in skipped(checks) if n.startswith("Fernet sample")} == {
        n for n in ORDER_PREFIX if n.startswith("Fernet sample")}
    assert checks["KMS key"].ok is True  # the KMS checks still ran


def test_malformed_legacy_key_is_named(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy)
    checks = run(settings_for(sqlite_url, keys.current, "not-a-key"), keys)
    assert checks["Fernet keys"].ok is False
    assert "ENCRYPTION_KEY_LEGACY key #1" in checks["Fernet keys"].detail


def test_missing_encryption_key(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy)
    checks = run(Settings(db_url=sqlite_url, fernet_keys=()), keys, env={})
    assert checks["Fernet keys"].ok is False
    assert "ENCRYPTION_KEY is not set" in checks["Fernet keys"].detail
    # Only a legacy key in the environment: still ENCRYPTION_KEY missing, not "valid".
    checks = run(Settings(db_url=sqlite_url, fernet_keys=(keys.legacy,)), keys,
                 env={"ENCRYPTION_KEY_LEGACY": keys.legacy})
    assert checks["Fernet keys"].ok is False
    assert "ENCRYPTION_KEY is not set" in checks["Fernet keys"].detail


def test_missing_encryption_key_is_a_fail_line_in_the_cli(
    sqlite_url: str, keys: Keys, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy)
    monkeypatch.delenv("ENCRYPTION_KEY", raising=False)
    monkeypatch.setenv("ENCRYPTION_KEY_LEGACY", keys.legacy)
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url)
    assert code == 2, (out, err)
    assert "FAIL  Fernet keys: ENCRYPTION_KEY is not set" in out
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and "Fernet keys" in err
    assert_clean(out + err, keys=keys)


def test_keys_that_open_none_of_the_sample(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    make_db(sqlite_url, 30, keys.current, keys.legacy)
    other = Fernet.generate_key().decode()
    checks = run(settings_for(sqlite_url, other), keys)
    samples = [n for n in ORDER_PREFIX if n.startswith("Fernet sample")]
    assert failed(checks) == set(samples)
    for n in samples:
        m = SAMPLED.search(checks[n].detail)
        assert m is not None and m.group(1) == "0" and int(m.group(2)) > 0
        assert "ENCRYPTION_KEY" in checks[n].detail
    assert other not in "\n".join(c.detail for c in checks.values())


def test_keys_that_open_part_of_the_sample_pass_with_a_note(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    make_db(sqlite_url, 30, keys.current, keys.legacy, bad_values=False)
    checks = run(settings_for(sqlite_url, keys.current), keys)  # the legacy key left out
    assert not failed(checks)
    partial = [c for n, c in checks.items() if n.startswith("Fernet sample")
               and (m := SAMPLED.search(c.detail)) and m.group(1) != m.group(2)]
    assert partial and all("ENCRYPTION_KEY_LEGACY" in c.detail for c in partial)


def test_nothing_to_sample_is_ok_with_a_note(sqlite_url: str, keys: Keys,
                                             kms: KmsHandle) -> None:
    eng = create_engine(sqlite_url)
    create_coinflip_schema(eng)
    eng.dispose()
    checks = run(settings_for(sqlite_url, keys.current), keys)
    assert not failed(checks)
    sample = checks["Fernet sample users.encrypted_secret"]
    assert sample.ok is True and "no Fernet tokens to sample" in sample.detail


# -- the KMS key ------------------------------------------------------------------------------

@pytest.fixture
def db(sqlite_url: str, keys: Keys) -> str:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    return sqlite_url


def test_alias_not_found(db: str, keys: Keys, kms: KmsHandle) -> None:
    checks = run(settings_for(db, keys.current, keys.legacy, key_id="alias/no-such-key"), keys)
    k = checks["KMS key"]
    assert k.ok is False
    for w in ("alias/no-such-key", "not found", "NotFoundException", "list-aliases",
              "list-keys", "--region"):
        assert w in k.detail, k.detail
    assert failed(checks) == {"KMS key"}
    assert KEY_CHECKS - {"KMS key"} <= skipped(checks)
    assert checks["caller identity"].ok is True  # STS still asked
    assert checks["database"].ok is True


def test_access_denied_on_describe_key(db: str, keys: Keys, kms: KmsHandle) -> None:
    client = kms_client()
    inject(client, Injector(forever="AccessDeniedException"), "DescribeKey")
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client)
    k = checks["KMS key"]
    assert k.ok is False
    for w in ("AccessDeniedException", "kms:DescribeKey", "get-caller-identity",
              "iam-policy", "alias/coinflip-master-key"):
        assert w in k.detail, k.detail
    assert failed(checks) == {"KMS key"}
    assert {"key enabled", "key usage", "key region"} <= skipped(checks)
    # Encrypt and Decrypt may still be allowed without DescribeKey: the round trip says.
    assert checks["Encrypt+Decrypt round trip"].ok is True


def test_access_denied_on_describe_key_through_the_proxy_cli(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy, bad_values=False)
    with kms_proxy(moto_server.url) as (url, state):
        state.rules.append(Rule("AccessDeniedException", target="DescribeKey"))
        env = {**cli_env, "AWS_ENDPOINT_URL_KMS": url, "AWS_ENDPOINT_URL_STS": moto_server.url}
        res = subprocess.run([kms_migrate_bin(), "preflight", "--db", sqlite_url], env=env,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert re.search(r"^FAIL  KMS key: KMS denied DescribeKey .*AccessDeniedException",
                     res.stdout, re.M), res.stdout
    assert "ok    Encrypt+Decrypt round trip" in res.stdout
    assert_clean(res.stdout + res.stderr, keys=keys)


def test_disabled_key(db: str, keys: Keys, kms: KmsHandle) -> None:
    kms.client.disable_key(KeyId=kms.key_id)
    checks = run(settings_for(db, keys.current, keys.legacy), keys)
    e = checks["key enabled"]
    assert e.ok is False and "KeyState Disabled" in e.detail and "enable-key" in e.detail
    assert kms.arn in e.detail
    assert failed(checks) == {"key enabled"}
    assert checks["KMS key"].ok is True and checks["key usage"].ok is True
    assert "Encrypt+Decrypt round trip" in skipped(checks)


def test_pending_deletion(db: str, keys: Keys, kms: KmsHandle) -> None:
    kms.client.schedule_key_deletion(KeyId=kms.key_id, PendingWindowInDays=7)
    checks = run(settings_for(db, keys.current, keys.legacy), keys)
    e = checks["key enabled"]
    assert e.ok is False
    for w in ("PendingDeletion", "deletion scheduled for", "cancel-key-deletion", "enable-key"):
        assert w in e.detail, e.detail
    assert failed(checks) == {"key enabled"}
    assert "Encrypt+Decrypt round trip" in skipped(checks)


def test_wrong_key_usage(db: str, keys: Keys, kms: KmsHandle) -> None:
    meta = kms.client.create_key(KeyUsage="SIGN_VERIFY", KeySpec="RSA_2048")["KeyMetadata"]
    checks = run(settings_for(db, keys.current, keys.legacy, key_id=meta["KeyId"]), keys)
    u = checks["key usage"]
    assert u.ok is False
    for w in ("SIGN_VERIFY", "RSA_2048", "ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT"):
        assert w in u.detail, u.detail
    assert failed(checks) == {"key usage"}
    assert "Encrypt+Decrypt round trip" in skipped(checks)


def test_key_arn_in_another_region(db: str, keys: Keys, kms: KmsHandle) -> None:
    eu = boto3.client("kms", region_name="eu-west-1")
    arn = eu.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    # Asked in us-east-1, KMS (and moto) do not find a key of eu-west-1.
    checks = run(settings_for(db, keys.current, keys.legacy, key_id=arn), keys)
    assert checks["KMS key"].ok is False and "NotFoundException" in checks["KMS key"].detail
    r = checks["key region"]
    assert r.ok is False and "eu-west-1" in r.detail and "--region eu-west-1" in r.detail
    assert failed(checks) == {"KMS key", "key region"}
    assert "Encrypt+Decrypt round trip" in skipped(checks)
    # With the right region, everything passes.
    checks = run(settings_for(db, keys.current, keys.legacy, key_id=arn, region="eu-west-1"),
                 keys)
    assert not failed(checks)
    assert checks["key region"].detail == "eu-west-1"


def test_described_key_of_another_region_fails_the_region_check(
    db: str, keys: Keys, kms: KmsHandle,
) -> None:
    # An endpoint of another region (AWS_ENDPOINT_URL_KMS, a replica) answers DescribeKey.
    eu_client = kms_client("eu-west-1")
    arn = eu_client.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    checks = run(settings_for(db, keys.current, keys.legacy, key_id=arn), keys,
                 kms_client=eu_client)
    r = checks["key region"]
    assert r.ok is False and "lives in eu-west-1, not in --region us-east-1" in r.detail
    assert failed(checks) == {"key region"}
    assert "Encrypt+Decrypt round trip" in skipped(checks)


def test_a_throttled_describe_key_is_retried(db: str, keys: Keys, kms: KmsHandle) -> None:
    client = kms_client()
    inj = inject(client, Injector("ThrottlingException"), "DescribeKey")
    waits: list[float] = []
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client,
                 sleep=waits.append)
    assert checks["KMS key"].ok is True and inj.calls == 2 and len(waits) == 1
    inject(client, Injector(forever="ThrottlingException"), "DescribeKey")
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client)
    assert checks["KMS key"].ok is False
    assert "ThrottlingException" in checks["KMS key"].detail
    assert "3 attempts" in checks["KMS key"].detail


def test_no_aws_credentials(db: str, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    checks = run(settings_for(db, keys.current, keys.legacy), keys)
    assert checks["KMS key"].ok is False
    assert "no AWS credentials found" in checks["KMS key"].detail
    assert checks["caller identity"].ok is False
    assert "no AWS credentials found" in checks["caller identity"].detail
    assert checks["database"].ok is True and checks["Fernet keys"].ok is True


# -- the round trip ---------------------------------------------------------------------------

def test_round_trip_fails_when_encrypt_is_denied(db: str, keys: Keys, kms: KmsHandle) -> None:
    client = kms_client()
    inject(client, Injector(forever="AccessDeniedException"), "Encrypt")
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client)
    rt = checks["Encrypt+Decrypt round trip"]
    assert rt.ok is False
    assert "KMS denied Encrypt" in rt.detail and "kms:Encrypt" in rt.detail
    assert failed(checks) == {"Encrypt+Decrypt round trip"}


def test_round_trip_fails_when_decrypt_cannot_open_it(db: str, keys: Keys,
                                                      kms: KmsHandle) -> None:
    client = kms_client()
    inject(client, Injector(forever="InvalidCiphertextException"), "Decrypt")
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client)
    rt = checks["Encrypt+Decrypt round trip"]
    assert rt.ok is False and "InvalidCiphertextException" in rt.detail


def test_round_trip_fails_when_decrypt_returns_another_value(
    db: str, keys: Keys, kms: KmsHandle,
) -> None:
    client = kms_client()
    body = json.dumps({"KeyId": kms.arn, "Plaintext": base64.b64encode(b"\0" * 32).decode(),
                       "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).encode()

    def wrong(request: Any, **_: Any) -> AWSResponse:
        headers = {"Content-Type": "application/x-amz-json-1.1",
                   "Content-Length": str(len(body))}
        return AWSResponse(request.url, 200, headers, RawBody(body))

    client.meta.events.register_first("before-send.kms.Decrypt", wrong)
    checks = run(settings_for(db, keys.current, keys.legacy), keys, kms_client=client)
    rt = checks["Encrypt+Decrypt round trip"]
    assert rt.ok is False and "another value" in rt.detail


def test_round_trip_with_an_encryption_context(db: str, keys: Keys, kms: KmsHandle) -> None:
    client = kms_client()
    sent: list[bytes] = []

    def spy(request: Any, **_: Any) -> None:
        sent.append(request.body if isinstance(request.body, bytes) else b"")

    client.meta.events.register_first("before-send.kms.Encrypt", spy)
    checks = run(settings_for(db, keys.current, keys.legacy, encryption_context=True), keys,
                 kms_client=client)
    rt = checks["Encrypt+Decrypt round trip"]
    assert rt.ok is True and "with an encryption context" in rt.detail
    ctx = json.loads(sent[0])["EncryptionContext"]
    assert set(ctx) == {"table", "column", "pk"}


# -- STS --------------------------------------------------------------------------------------

def test_caller_identity_allowed(db: str, keys: Keys, kms: KmsHandle) -> None:
    checks = run(settings_for(db, keys.current, keys.legacy), keys)
    c = checks["caller identity"]
    assert c.ok is True
    assert c.detail == "arn:aws:sts::123456789012:user/moto (account 123456789012)"


def test_caller_identity_denied_is_informational(db: str, keys: Keys, kms: KmsHandle) -> None:
    sts = boto3.client("sts", region_name="us-east-1")
    sts.meta.events.register_first("before-send.sts.GetCallerIdentity", sts_error("AccessDenied"))
    checks = run(settings_for(db, keys.current, keys.legacy), keys, sts_client=sts)
    c = checks["caller identity"]
    assert c.ok is None and not c.skipped
    assert "not allowed" in c.detail and "AccessDenied" in c.detail
    assert not failed(checks)


def test_caller_identity_with_rejected_credentials_fails(db: str, keys: Keys,
                                                         kms: KmsHandle) -> None:
    sts = boto3.client("sts", region_name="us-east-1")
    sts.meta.events.register_first("before-send.sts.GetCallerIdentity",
                                   sts_error("InvalidClientTokenId"))
    checks = run(settings_for(db, keys.current, keys.legacy), keys, sts_client=sts)
    c = checks["caller identity"]
    assert c.ok is False and "InvalidClientTokenId" in c.detail
    assert "credential chain" in c.detail


# -- bookkeeping (informational) --------------------------------------------------------------

def test_bookkeeping_shows_an_unfinished_run_and_the_lock(sqlite_url: str, keys: Keys,
                                                          kms: KmsHandle) -> None:
    make_db(sqlite_url, 10, keys.current, keys.legacy)
    settings = settings_for(sqlite_url, keys.current, keys.legacy)
    eng = create_engine(sqlite_url)
    store.ensure_schema(eng)
    checks = run(settings, keys)
    assert checks["bookkeeping"].detail == "no unfinished run: migrate starts a new one"
    assert checks["run lock"].ok is None and checks["run lock"].detail == "free"
    from migration.config import targets_fingerprint

    with eng.begin() as conn:
        run_ = store.create_run(
            conn, store.NewRun(
                "migrate", 25, targets=[("users", "encrypted_secret")],
                fingerprint=targets_fingerprint(settings.targets),
            key_id=settings.key_id, key_arn=kms.arn, region="us-east-1"))
    held = RunLock.acquire(eng, "migrate")
    before = file_digest(sqlite_url)
    try:
        checks = run(settings, keys)
        assert file_digest(sqlite_url) == before  # read only, bookkeeping included
    finally:
        held.release(eng)
    b = checks["bookkeeping"]
    assert b.ok is None and f"unfinished migrate run {run_.id} (running" in b.detail
    assert "migrate resumes it" in b.detail and "refuses" not in b.detail
    lk = checks["run lock"]
    assert lk.ok is None and "held by a migrate" in lk.detail and "(this process)" in lk.detail
    assert not failed(checks)
    # Another key: migrate would refuse to resume that run.
    other = kms.client.create_key()["KeyMetadata"]["Arn"]
    checks = run(settings_for(sqlite_url, keys.current, keys.legacy, key_id=other), keys)
    assert "refuses to resume it" in checks["bookkeeping"].detail
    assert "another KMS key" in checks["bookkeeping"].detail
    eng.dispose()


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_prints_one_line_per_check_and_exits_0(
    sqlite_url: str, keys: Keys, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 20, keys.current, keys.legacy, bad_values=False)
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url)
    assert code == 0, (out, err)
    lines = out.strip().splitlines()
    assert all(re.match(r"^(ok|FAIL|info|skip) +\S", ln) for ln in lines[:-1]), out
    assert lines[0].startswith("ok    database: reachable: sqlite:///")
    assert lines[-1].startswith("preflight OK")
    assert err == ""
    assert_clean(out + err, keys=keys)


def test_cli_fails_with_exit_2_on_a_disabled_key(
    sqlite_url: str, keys: Keys, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_db(sqlite_url, 20, keys.current, keys.legacy, bad_values=False)
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    kms.client.disable_key(KeyId=kms.key_id)
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url)
    assert code == 2
    assert "FAIL  key enabled: KeyState Disabled" in out
    assert out.strip().splitlines()[-1].startswith("preflight FAILED: ")
    assert err.startswith("kms-migrate: preflight: 1 check(s) failed (key enabled)")
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_region_is_refused_before_any_check(
    capsys: pytest.CaptureFixture[str], sqlite_url: str,
) -> None:
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url, "--region", "mars")
    assert code == 2 and out == "" and "not an AWS region name" in err


def test_cli_help_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "preflight", "--help")
    assert code == 0
    out = " ".join(out.split())  # click wraps to the terminal's width
    for w in ("Check that a migration can start", "DescribeKey", "round trip",
              "GetCallerIdentity", "Exit 0", "--db", "--config", "--key-id", "--region",
              "--encryption-context", "--log-level", "--to-key", "--from-key",
              "--from-encryption-context", "--to-encryption-context", "--verify-decrypt",
              "no Fernet key is needed"):
        assert w in out, w
    code, out, _ = run_main(capsys, "--help")
    assert "preflight" in out and "iam-policy" in out


@pytest.mark.e2e
def test_real_cli_subprocess_fails_on_a_disabled_key(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    make_db(sqlite_url, 20, keys.current, keys.legacy, bad_values=False)
    env = {**cli_env, "AWS_ENDPOINT_URL_STS": moto_server.url}
    argv = [kms_migrate_bin(), "preflight", "--db", sqlite_url, "--log-level", "debug"]
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    assert "ok    caller identity: arn:aws:sts::123456789012:user/moto" in ok.stdout
    server_kms.client.disable_key(KeyId=server_kms.key_id)
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    fail = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL  key enabled: KeyState Disabled")
    assert "enable-key" in fail[0]
    assert "skip  Encrypt+Decrypt round trip" in res.stdout
    refusal = [ln for ln in res.stderr.splitlines() if ln.startswith("kms-migrate:")]
    assert len(refusal) == 1 and "key enabled" in refusal[0]
    assert "Traceback" not in res.stderr
    for out in (ok.stdout, ok.stderr, res.stdout, res.stderr):
        assert_clean(out, keys=keys)


def test_preflight_reports_a_column_too_short_for_real_kms_ciphertexts(
    capsys: pytest.CaptureFixture[str], db_url: str, env_keys: Keys, kms: KmsHandle,
    tmp_path: Path,
) -> None:
    config = make_vault(db_url, env_keys.current, tmp_path)
    code, out, err = run_main(capsys, "preflight", "--db", db_url, "--config", config)
    assert code == 2, (out, err)
    assert (f"FAIL  column fit vault.secret: VARCHAR({VAULT_LENGTH}) cannot hold the AWS KMS "
            "text of 2 value(s)") in out
    assert_clean(out + err, keys=env_keys)


# -- rekey (preflight --to-key) ---------------------------------------------------------------

NEXT_ALIAS = "alias/coinflip-next-key"
REKEY_ORDER = [
    "database", "table users", "table wagers", "Fernet keys",
    "source key", "source key enabled", "source key usage", "source key region",
    "destination key", "destination key enabled", "destination key usage",
    "destination key region", "ReEncrypt round trip",
]


def rekey_db(url: str, keys: Keys, kms: KmsHandle, *, context: bool = False) -> KmsHandle:
    """The coinflip database migrated to KMS under the `kms` key (with the encryption
    context when `context`), and a second key, alias/coinflip-next-key, to rekey to."""
    make_db(url, 30, keys.current, keys.legacy, bad_values=False)
    migrate_db(url, keys, kms, encryption_context=context)
    return _make_key(kms.client, NEXT_ALIAS)


def rekey_settings(url: str, **kw: Any) -> Settings:
    """A rekey's settings: no Fernet key at all."""
    kw.setdefault("to_key_id", NEXT_ALIAS)
    return Settings(db_url=url, **kw)


def reencrypt_calls(client: Any) -> list[dict[str, Any]]:
    """The parameters of every ReEncrypt the client sends (ciphertexts left out)."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append({k: v for k, v in params.items() if k != "CiphertextBlob"})

    client.meta.events.register("provide-client-params.kms.ReEncrypt", record)
    return calls


def test_rekey_preflight_passes_with_two_keys_and_no_fernet_key(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    dest = rekey_db(sqlite_url, keys, kms)
    before, digest = snapshot(sqlite_url), file_digest(sqlite_url)
    client = kms_client()
    calls = reencrypt_calls(client)
    # env={}: ENCRYPTION_KEY is unset, and a rekey does not need it.
    checks = preflight(rekey_settings(sqlite_url), kms_client=client, env={},
                       sleep=lambda s: None)
    names = [c.name for c in checks]
    assert names[:len(REKEY_ORDER)] == REKEY_ORDER
    assert not any(n.startswith(("Fernet sample", "column fit", "KMS key", "Encrypt+"))
                   for n in names)
    assert all(c.ok is not False and not c.skipped for c in checks), checks
    by = {c.name: c for c in checks}
    assert by["Fernet keys"].ok is None and "not needed" in by["Fernet keys"].detail
    assert by["source key"].detail == f"alias/coinflip-master-key is {kms.arn}"
    assert by["destination key"].detail == f"{NEXT_ALIAS} is {dest.arn}"
    for side in ("source", "destination"):
        assert by[f"{side} key enabled"].detail == "KeyState Enabled"
        assert by[f"{side} key usage"].detail == "ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT"
    trip = by["ReEncrypt round trip"].detail
    assert trip.startswith("a stored value (users.encrypted_secret, pk ")
    assert kms.arn in trip and dest.arn in trip and "thrown away" in trip
    assert "Decrypt check" not in by  # only with --verify-decrypt
    # Source -> destination pinned to the source, then destination -> destination; no
    # context asked for, none sent.
    assert calls == [
        {"SourceKeyId": kms.arn, "DestinationKeyId": dest.arn},
        {"SourceKeyId": dest.arn, "DestinationKeyId": dest.arn},
    ]
    assert by["bookkeeping"].detail == "no unfinished run: rekey starts a new one"
    assert snapshot(sqlite_url) == before and file_digest(sqlite_url) == digest  # read only
    assert_clean("\n".join(format_check(c) for c in checks), keys=keys)
    assert summary(checks).startswith("preflight OK")


def test_rekey_preflight_round_trip_with_contexts(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """Values migrated with the encryption context, moved keeping it: each ReEncrypt carries
    the value's own context (table, column, pk) on the sides that have one."""
    dest = rekey_db(sqlite_url, keys, kms, context=True)
    client = kms_client()
    calls = reencrypt_calls(client)
    checks = run(rekey_settings(sqlite_url, encryption_context=True,
                                to_encryption_context=True, verify_decrypt=True),
                 keys, kms_client=client, env={})
    assert failed(checks) == set() and not skipped(checks), checks
    trip = checks["ReEncrypt round trip"]
    assert trip.ok is True and "a stored value (users.encrypted_secret, pk " in trip.detail
    assert trip.detail.count("with the encryption context (table, column, pk)") == 2
    pk = re.search(r"pk (\w+)\)", trip.detail)
    assert pk is not None
    ctx = {"table": "users", "column": "encrypted_secret", "pk": pk.group(1)}
    assert calls == [
        {"SourceKeyId": kms.arn, "DestinationKeyId": dest.arn,
         "SourceEncryptionContext": ctx, "DestinationEncryptionContext": ctx},
        {"SourceKeyId": dest.arn, "DestinationKeyId": dest.arn,
         "SourceEncryptionContext": ctx, "DestinationEncryptionContext": ctx},
    ]
    decrypt = checks["Decrypt check"]
    assert decrypt.ok is True and "same bytes" in decrypt.detail


def test_rekey_preflight_adding_a_context(sqlite_url: str, keys: Keys, kms: KmsHandle) -> None:
    dest = rekey_db(sqlite_url, keys, kms)  # values without a context
    client = kms_client()
    calls = reencrypt_calls(client)
    checks = run(rekey_settings(sqlite_url, to_encryption_context=True), keys,
                 kms_client=client, env={})
    assert checks["ReEncrypt round trip"].ok is True, checks["ReEncrypt round trip"]
    assert "SourceEncryptionContext" not in calls[0]
    assert set(calls[0]["DestinationEncryptionContext"]) == {"table", "column", "pk"}
    assert calls[1]["SourceEncryptionContext"] == calls[1]["DestinationEncryptionContext"] \
        == calls[0]["DestinationEncryptionContext"]
    assert calls[1]["SourceKeyId"] == calls[1]["DestinationKeyId"] == dest.arn


def test_rekey_preflight_with_the_wrong_source_context_fails_as_the_run_would_refuse(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """The values carry the context, the options say they do not: no sampled value opens
    under the source, none under the destination either: the rekey would refuse to start
    (it would read every value and leave every one), so preflight fails, saying why."""
    rekey_db(sqlite_url, keys, kms, context=True)
    checks = run(rekey_settings(sqlite_url), keys, kms_client=kms_client(), env={})
    line = checks["rekey sample"]
    assert line.ok is False
    assert re.search(r"\d+ KMS value\(s\) in the sample of the target columns; none of the 6 "
                     rf"tried opens under {re.escape(kms.arn)} without a context", line.detail)
    assert "--from-encryption-context" in line.detail
    assert failed(checks) == {"rekey sample"}


def test_rekey_preflight_after_the_values_moved_falls_back_to_a_test_value(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """Every value under the destination already (a rekey done): the sample says so, and a
    random test value shows the keys work."""
    from migration.db import make_engine
    from migration.migrator import migrate
    from tests.helpers import make_kms

    rekey_db(sqlite_url, keys, kms)
    settings = rekey_settings(sqlite_url)
    engine = make_engine(sqlite_url)
    with make_kms(kms.client, settings) as k:
        migrate(settings, engine=engine, kms=k)
    engine.dispose()
    checks = run(settings, keys, kms_client=kms_client(), env={})
    info = checks["rekey sample"]
    assert info.ok is None and "under the destination already" in info.detail
    trip = checks["ReEncrypt round trip"]
    assert trip.ok is True and trip.detail.startswith("a random 32-byte test value")
    assert failed(checks) == set()


def test_rekey_preflight_without_kms_values_and_without_encrypt(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """Nothing migrated yet (Fernet tokens only): the sample says so; when this caller may
    not Encrypt with the source key (the rekey's own policy does not allow it), the round
    trip is skipped, saying why, not failed."""
    make_db(sqlite_url, 20, keys.current, keys.legacy, bad_values=False)
    _make_key(kms.client, NEXT_ALIAS)
    checks = run(rekey_settings(sqlite_url), keys, kms_client=kms_client(), env={})
    assert "holds no KMS value" in checks["rekey sample"].detail
    assert checks["ReEncrypt round trip"].ok is True  # moto allows Encrypt: the test value
    client = kms_client()
    inject(client, Injector(forever="AccessDeniedException"), "Encrypt")
    checks = run(rekey_settings(sqlite_url, verify_decrypt=True), keys, kms_client=client,
                 env={})
    trip = checks["ReEncrypt round trip"]
    assert trip.ok is None and trip.skipped and "may not kms:Encrypt" in trip.detail
    assert checks["Decrypt check"].skipped
    assert failed(checks) == set()


def test_rekey_preflight_disabled_destination_fails_naming_it(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    dest = rekey_db(sqlite_url, keys, kms)
    kms.client.disable_key(KeyId=dest.key_id)
    checks = run(rekey_settings(sqlite_url, verify_decrypt=True), keys,
                 kms_client=kms_client(), env={})
    assert failed(checks) == {"destination key enabled"}
    e = checks["destination key enabled"]
    assert e.detail.startswith("KeyState Disabled: enable it (aws kms enable-key --key-id "
                               f"{dest.arn} ")
    assert checks["source key enabled"].ok is True
    for name in ("ReEncrypt round trip", "Decrypt check"):
        assert checks[name].skipped and checks[name].detail == (
            "the destination key checks above failed")


def test_rekey_preflight_unknown_destination(sqlite_url: str, keys: Keys,
                                             kms: KmsHandle) -> None:
    rekey_db(sqlite_url, keys, kms)
    checks = run(rekey_settings(sqlite_url, to_key_id="alias/no-such-key"), keys,
                 kms_client=kms_client(), env={})
    assert failed(checks) == {"destination key"}
    assert "alias/no-such-key" in checks["destination key"].detail
    assert checks["ReEncrypt round trip"].detail == "the destination key check failed"


def test_rekey_preflight_denied_reencrypt_names_the_key(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    rekey_db(sqlite_url, keys, kms)
    client = kms_client()
    inject(client, Injector(forever="AccessDeniedException"), "ReEncrypt")
    checks = run(rekey_settings(sqlite_url), keys, kms_client=client, env={})
    trip = checks["ReEncrypt round trip"]
    assert trip.ok is False and "AccessDeniedException" in trip.detail
    assert "kms:ReEncryptFrom" in trip.detail and kms.arn in trip.detail


def test_rekey_preflight_cli(
    sqlite_url: str, keys: Keys, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    dest = rekey_db(sqlite_url, keys, kms)  # ENCRYPTION_KEY stays unset in the environment
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url, "--to-key", NEXT_ALIAS,
                              "--verify-decrypt")
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("preflight OK: ")
    assert "info  Fernet keys: not needed" in out
    assert f"ok    destination key: {NEXT_ALIAS} is {dest.arn}" in out
    assert "ok    ReEncrypt round trip: a stored value" in out
    assert "ok    Decrypt check: " in out
    assert err == ""
    assert_clean(out, err, keys=keys)
    kms.client.disable_key(KeyId=dest.key_id)
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url, "--to-key", NEXT_ALIAS)
    assert code == 2
    assert f"FAIL  destination key enabled: KeyState Disabled: enable it (aws kms enable-key " \
           f"--key-id {dest.arn}" in out
    assert err.startswith("kms-migrate: preflight: 1 check(s) failed (destination key enabled)")
    assert_clean(out, err, keys=keys)


@pytest.mark.parametrize(("args", "expected"), [
    (["--verify-decrypt"], "--verify-decrypt is for a rekey: pass --to-key KEY"),
    (["--from-key", ALIAS_NAME, "--to-encryption-context"],
     "--from-key, --to-encryption-context are for a rekey"),
    (["--to-key", "alias/next", "--encryption-context"], "--from-encryption-context"),
])
def test_rekey_options_without_a_rekey_are_refused(
    sqlite_url: str, args: list[str], expected: str, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(capsys, "preflight", "--db", sqlite_url, *args)
    assert_refused(code, out, err, expected)


def test_rekey_preflight_when_only_describe_key_is_denied(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """A policy may allow ReEncrypt without DescribeKey: both key lines fail, and the round
    trip still runs with the keys as given (the answers cannot be compared to an alias)."""
    rekey_db(sqlite_url, keys, kms)
    client = kms_client()
    inject(client, Injector(forever="AccessDeniedException"), "DescribeKey")
    checks = run(rekey_settings(sqlite_url), keys, kms_client=client, env={})
    assert failed(checks) == {"source key", "destination key"}
    assert ALIAS_NAME in checks["source key"].detail
    assert NEXT_ALIAS in checks["destination key"].detail
    assert {"source key enabled", "destination key usage"} <= skipped(checks)
    assert checks["ReEncrypt round trip"].ok is True


def test_rekey_preflight_bookkeeping_names_an_unfinished_migrate(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    make_db(sqlite_url, 60, keys.current, keys.legacy, bad_values=False)
    interrupted_migrate(sqlite_url, settings_for(sqlite_url, keys.current, keys.legacy),
                        kms.client)
    _make_key(kms.client, NEXT_ALIAS)
    checks = run(rekey_settings(sqlite_url), keys, kms_client=kms_client(), env={})
    line = checks["bookkeeping"].detail
    assert re.fullmatch(r"unfinished migrate run \d+ \(interrupted\): a rekey refuses to start "
                        r"until it finishes \(kms-migrate migrate resumes it\)", line), line
    assert checks["ReEncrypt round trip"].ok is True  # the values migrated so far


def test_rekey_preflight_passes_over_values_not_under_the_source(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """The first values sampled are KMS-shaped garbage and a value under a third key: each
    is tried and passed over (KMS names the third key, not the source: moto ignores the
    pinned SourceKeyId), and the round trip uses the next value, under the source."""
    rekey_db(sqlite_url, keys, kms)
    third = _make_key(kms.client, "alias/someone-else")
    foreign = base64.b64encode(kms.client.encrypt(KeyId=third.arn, Plaintext=b"x" * 16)[
        "CiphertextBlob"]).decode()
    garbage = base64.b64encode(b"\x01" * 80).decode()
    eng = create_engine(sqlite_url)
    with eng.begin() as conn:
        for pk, value in ((1, garbage), (2, foreign)):
            conn.execute(text("UPDATE users SET encrypted_secret = :v WHERE user_id = :pk"),
                         {"v": value, "pk": pk})
            conn.execute(text("UPDATE users SET referral_payout_escrow_secret = :v "
                              "WHERE user_id = :pk"), {"v": value, "pk": pk})
    eng.dispose()
    checks = run(rekey_settings(sqlite_url, targets=(
        Target("users", "user_id", ("encrypted_secret", "referral_payout_escrow_secret")),)),
        keys, kms_client=kms_client(), env={})
    trip = checks["ReEncrypt round trip"]
    assert trip.ok is True, trip
    assert trip.detail.startswith("a stored value (users.encrypted_secret, pk 3)"), trip.detail
