"""Preflight: check, without writing anything, that a migration can start.

The guide's Troubleshooting section, made executable: each check gives one line, ok or
the failure with its fix. Checks keep going after a failure wherever the later ones still
make sense (a KMS failure does not stop the database checks; an unreachable database
turns the target checks into "skipped").

Nothing here ever holds a secret it prints: Fernet keys are only said to be valid or not
(by name), the round trip uses a random 32-byte test value that is never shown, and KMS
and STS errors are reported by their code, never by their message or request.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from checkpoints import store
from checkpoints.tables import VERSION_TABLE, lock

from .codec import (
    FERNET_PREFIX,
    KMS_BLOB_OVERHEAD,
    KMS_MAX_PLAINTEXT,
    FernetCodec,
    column_length,
    encryption_context,
    fernet_token_length,
    kms_text_length,
    max_plaintext_fitting,
)
from .config import Settings, targets_fingerprint
from .db import make_engine, safe_url
from .errors import ConfigError, KmsMigrateError
from .kms_client import aws_settings_problem, make_client
from .kms_codes import CONNECTION_ERRORS, CREDENTIAL_CODES, TRANSIENT_CODES
from .migrator import fernet_sample
from .reader import BoundTarget, bind_target, refuse_null_keys

__all__ = ["Check", "format_check", "preflight", "summary"]

ATTEMPTS = 3  # tries of one KMS call when KMS answers a transient error
AGAIN = "then re-run kms-migrate preflight"
ROUND_TRIP_BYTES = 32


@dataclass(frozen=True)
class Check:
    """One line of the preflight: ok True (passed), False (failed), None (informational;
    `skipped` when it could not run because an earlier check failed)."""

    name: str
    ok: bool | None
    detail: str
    skipped: bool = False

    @property
    def label(self) -> str:
        if self.ok is True:
            return "ok"
        if self.ok is False:
            return "FAIL"
        return "skip" if self.skipped else "info"


def _skip(name: str, why: str) -> Check:
    return Check(name, None, why, skipped=True)


def format_check(check: Check) -> str:
    """`ok    name: detail`, `FAIL  name: detail`, `info  ...`, `skip  ...`."""
    return f"{check.label:<6}{check.name}: {check.detail}"


def summary(checks: Sequence[Check]) -> str:
    n = {label: sum(c.label == label for c in checks) for label in ("ok", "FAIL", "info", "skip")}
    tail = f"{n['ok']} ok, {n['FAIL']} failed, {n['info']} info, {n['skip']} skipped"
    if n["FAIL"]:
        return f"preflight FAILED: {tail}; fix each FAIL line as it says, then re-run"
    return f"preflight OK: {tail}"


# -- the whole preflight ----------------------------------------------------------------------

def preflight(
    settings: Settings,
    *,
    kms_client: Any = None,
    sts_client: Any = None,
    env: Mapping[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Check]:
    """Run every check that can run and return one Check per line, in order.

    `env`, when given (the CLI passes os.environ), is also checked for ENCRYPTION_KEY
    itself: keys from ENCRYPTION_KEY_LEGACY alone would otherwise look valid. Reads only:
    the database engine is read-only at the database level.
    """
    checks: list[Check] = []
    engine = _check_database(settings, checks)
    try:
        bound = _check_targets(engine, settings, checks)
        codec = _check_fernet_keys(settings, env, checks)
        _check_samples(engine, settings, bound, codec, checks)
        _check_fit(engine, settings, bound, codec, checks)
        arn = _check_kms(settings, kms_client, checks, sleep)
        _check_caller(settings, sts_client, arn, checks)
        _check_bookkeeping(engine, settings, arn, checks)
    finally:
        if engine is not None:
            engine.dispose()
    return checks


# -- database and targets ---------------------------------------------------------------------

def _check_database(settings: Settings, checks: list[Check]) -> Engine | None:
    shown = safe_url(settings.db_url)
    try:
        engine = make_engine(settings.db_url, read_only=True)
    except ConfigError as exc:
        checks.append(Check("database", False, str(exc)))
        return None
    except KmsMigrateError as exc:
        checks.append(Check("database", False, f"{exc}: check --db / DATABASE_URL, that the "
                            "server is up and that it accepts connections from this host"))
        return None
    except SQLAlchemyError as exc:
        checks.append(Check("database", False, f"cannot use {shown} ({type(exc).__name__}): "
                            "check --db / DATABASE_URL"))
        return None
    checks.append(Check("database", True, f"reachable: {shown} (read-only session)"))
    return engine


def _check_targets(
    engine: Engine | None, settings: Settings, checks: list[Check]
) -> dict[str, BoundTarget]:
    bound: dict[str, BoundTarget] = {}
    for target in settings.targets:
        name = f"table {target.table}"
        if engine is None:
            checks.append(_skip(name, "the database is unreachable"))
            continue
        try:
            with engine.connect() as conn:
                bt = bind_target(conn, target)
                refuse_null_keys(conn, bt)  # keyset paging cannot pass a NULL key
        except ConfigError as exc:
            checks.append(Check(name, False, str(exc)))
            continue
        except SQLAlchemyError as exc:
            checks.append(Check(name, False, f"cannot read its schema ({type(exc).__name__}): "
                                "check that the database user may read it"))
            continue
        bound[target.table] = bt
        kind = "integer" if bt.pk_is_int else "text"
        checks.append(Check(name, True, f"exists; primary key {target.primary_key} ({kind}); "
                            f"columns {', '.join(target.columns)} exist and are text"))
    return bound


# -- Fernet -----------------------------------------------------------------------------------

def _check_fernet_keys(
    settings: Settings, env: Mapping[str, str] | None, checks: list[Check]
) -> FernetCodec | None:
    name = "Fernet keys"
    if env is not None and not env.get("ENCRYPTION_KEY", "").strip():
        checks.append(Check(name, False, "ENCRYPTION_KEY is not set: export the Fernet key the "
                            "application uses (older keys go in ENCRYPTION_KEY_LEGACY, "
                            "comma-separated)"))
        return None
    try:
        codec = FernetCodec(settings.fernet_keys)
    except ConfigError as exc:  # names the key (ENCRYPTION_KEY, legacy #n), never its value
        checks.append(Check(name, False, str(exc)))
        return None
    legacy = len(settings.fernet_keys) - 1
    checks.append(Check(name, True, (
        f"ENCRYPTION_KEY and {legacy} ENCRYPTION_KEY_LEGACY key(s) are valid Fernet keys"
        if legacy else "ENCRYPTION_KEY is a valid Fernet key (no ENCRYPTION_KEY_LEGACY)")))
    return codec


def _check_samples(
    engine: Engine | None,
    settings: Settings,
    bound: Mapping[str, BoundTarget],
    codec: FernetCodec | None,
    checks: list[Check],
) -> None:
    for target in settings.targets:
        bt = bound.get(target.table)
        if bt is None:
            why = ("the database is unreachable" if engine is None
                   else f"table {target.table} failed its check")
            checks.append(_skip(f"Fernet sample {target.table}", why))
            continue
        for column in target.columns:
            name = f"Fernet sample {target.table}.{column}"
            if codec is None or engine is None:
                checks.append(_skip(name, "no valid Fernet keys to try"))
                continue
            checks.append(_sample_column(engine, bt, column, codec, name))


def _sample_column(
    engine: Engine, bt: BoundTarget, column: str, codec: FernetCodec, name: str
) -> Check:
    try:
        with engine.connect() as conn:
            # Spread over the key range, as migrate's own check samples: the oldest rows
            # alone may all be under a legacy or unknown key.
            values = [r.value for r in fernet_sample(conn, bt, column)]
    except SQLAlchemyError as exc:
        return Check(name, False, f"cannot read the column ({type(exc).__name__}): check "
                     "that the database user may read it")
    sampled = len(values)
    opened = sum(codec.decrypt(v) is not None for v in values)
    if sampled == 0:
        return Check(name, True, "no Fernet tokens to sample (NULL, empty or already "
                     "migrated): nothing to migrate here")
    if opened == 0:
        return Check(name, False, f"opened 0 of {sampled} sampled: set ENCRYPTION_KEY (and "
                     "ENCRYPTION_KEY_LEGACY) to the keys the application encrypted them with")
    if opened < sampled:
        return Check(name, True, f"opened {opened} of {sampled} sampled; no key given opens "
                     f"the other {sampled - opened} (corrupt, or made with another key: add "
                     "it to ENCRYPTION_KEY_LEGACY): migrate would fail them, left untouched")
    return Check(name, True, f"opened {opened} of {sampled} sampled")


def _check_fit(
    engine: Engine | None,
    settings: Settings,
    bound: Mapping[str, BoundTarget],
    codec: FernetCodec | None,
    checks: list[Check],
) -> None:
    """One line per target column with a declared length (VARCHAR(n)): can it hold the
    AWS KMS text of every value? Unbounded columns (TEXT) get no line."""
    if engine is None:
        return  # the database line already says why
    for target in settings.targets:
        bt = bound.get(target.table)
        if bt is None:
            continue  # its table line already says why
        for column in target.columns:
            length = column_length(bt.col(column))
            if length is None:
                continue
            name = f"column fit {target.table}.{column}"
            if codec is None:
                checks.append(_skip(name, "no valid Fernet keys to size the values with"))
                continue
            checks.append(_fit_column(engine, bt, column, length, codec, name))


def _fit_column(
    engine: Engine, bt: BoundTarget, column: str, length: int, codec: FernetCodec, name: str
) -> Check:
    """Count the values whose KMS text, sized for real AWS KMS (plaintext + KMS_BLOB_OVERHEAD
    bytes, base64), is longer than the column. Sized by the plaintext, never shown: only
    tokens long enough to hold a plaintext that does not fit are read and opened."""
    col = bt.col(column)
    kind = col.type
    fits = max_plaintext_fitting(length)
    shortest = fernet_token_length(max(fits + 1, 1))
    q = select(col).where(col.like(f"{FERNET_PREFIX}%"), func.length(col) >= shortest)
    unfit = need = 0
    try:
        with engine.connect() as conn:
            for (value,) in conn.execute(q):
                size = _plaintext_size(codec, value)
                # Empty, oversize or unopened values fail for their own reason.
                if 1 <= size <= KMS_MAX_PLAINTEXT and kms_text_length(size) > length:
                    unfit += 1
                    need = max(need, kms_text_length(size))
    except SQLAlchemyError as exc:
        return Check(name, False, f"cannot read the column ({type(exc).__name__}): check "
                     "that the database user may read it")
    if unfit:
        return Check(name, False, (
            f"{kind} cannot hold the AWS KMS text of {unfit} value(s) (up to {need} "
            f"characters: plaintext + {KMS_BLOB_OVERHEAD} bytes, base64): widen it to at least "
            f"{need} characters, {AGAIN}; migrate would fail those values, left untouched"))
    return Check(name, True, f"{kind} holds the AWS KMS text of every value (plaintexts "
                 f"up to {max(fits, 0)} bytes fit)")


def _plaintext_size(codec: FernetCodec, token: object) -> int:
    """The length of the plaintext a token holds (0 when no key opens it); the plaintext
    itself is dropped at once."""
    plaintext = codec.decrypt(token) if isinstance(token, str) else None
    return len(plaintext) if plaintext is not None else 0


# -- KMS --------------------------------------------------------------------------------------

class _KmsProblem(Exception):
    """A KMS call that failed for good; `detail` is one printable line with its fix."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _fix(code: str, op: str, key: str, region: str) -> str:
    """What KMS said about the key, and what to do about it (the guide's Troubleshooting)."""
    if code == "AccessDeniedException":
        return (f"KMS denied {op} on {key} in {region} (AccessDeniedException): grant the "
                f"caller kms:{op} on the key (kms-migrate iam-policy prints least-privilege "
                "policies; aws sts get-caller-identity shows the caller; "
                f"aws kms describe-key --key-id {key} --region {region} checks access), {AGAIN}")
    if code == "NotFoundException":
        return (f"KMS key {key} was not found in region {region} (NotFoundException): check "
                "--key-id / AWS_KMS_KEY_ID and --region / AWS_REGION (aws kms list-aliases "
                f"--region {region}; aws kms list-keys --region {region}), {AGAIN}")
    if code == "DisabledException":
        return (f"KMS key {key} is disabled (DisabledException): enable it (aws kms enable-key "
                f"--key-id {key} --region {region}), {AGAIN}")
    if code == "KMSInvalidStateException":
        return (f"KMS key {key} is pending deletion or otherwise unusable "
                f"(KMSInvalidStateException): cancel the deletion (aws kms cancel-key-deletion "
                f"--key-id {key} --region {region}) and enable it, {AGAIN}")
    if code == "InvalidKeyUsageException":
        return (f"KMS key {key} is not a symmetric ENCRYPT_DECRYPT key "
                f"(InvalidKeyUsageException): use a key created with --key-usage "
                f"ENCRYPT_DECRYPT, {AGAIN}")
    if code in CREDENTIAL_CODES:
        return (f"AWS rejected the credentials ({code}) calling KMS {op}: check the default "
                "credential chain (aws sts get-caller-identity), " + AGAIN)
    if code == "InvalidArnException":
        return (f"{key} is not a valid KMS key id, ARN or alias (InvalidArnException): fix "
                f"--key-id / AWS_KMS_KEY_ID, {AGAIN}")
    if code in {"InvalidCiphertextException", "IncorrectKeyException"}:
        return (f"KMS could not decrypt the ciphertext it had just produced with {key} "
                f"({code}): check that --key-id and --region name one key, {AGAIN}")
    if code in TRANSIENT_CODES:
        return (f"KMS kept answering {code} to {op} after {ATTEMPTS} attempts: wait and "
                f"{AGAIN.removeprefix('then ')} (if it persists, check the KMS request quotas)")
    return f"KMS refused {op} on {key} in {region} ({code}): fix the cause, {AGAIN}"


def _kms_call(
    client: Any, op: str, method: str, key: str, region: str,
    sleep: Callable[[float], None], **params: Any,
) -> dict[str, Any]:
    """One KMS call, retried a few times on transient errors; _KmsProblem otherwise."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response: dict[str, Any] = getattr(client, method)(**params)
            return response
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            transient = code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
            if not transient or attempt == ATTEMPTS:
                raise _KmsProblem(code, _fix(code, op, key, region)) from None
        except CONNECTION_ERRORS as exc:
            if attempt == ATTEMPTS:
                name = type(exc).__name__
                raise _KmsProblem(name, (
                    f"cannot reach KMS in {region} ({name}) after {ATTEMPTS} attempts: check "
                    f"the network, AWS_ENDPOINT_URL_KMS and --region, {AGAIN}")) from None
        except botocore.exceptions.NoCredentialsError:
            raise _KmsProblem("NoCredentials", (
                "no AWS credentials found: configure the default credential chain (an IAM "
                "role, AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the "
                f"environment), {AGAIN}")) from None
        except botocore.exceptions.BotoCoreError as exc:
            name = type(exc).__name__
            raise _KmsProblem(name, (
                f"KMS call {op} failed ({name}) for {key} in {region}: check the endpoint "
                f"and credentials, {AGAIN}")) from None
        sleep(0.25 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _arn_region(arn: str) -> str | None:
    parts = arn.split(":")
    return parts[3] if len(parts) >= 6 and parts[0] == "arn" and parts[3] else None


def _check_kms(
    settings: Settings, client: Any, checks: list[Check], sleep: Callable[[float], None]
) -> str | None:
    """DescribeKey, key state, usage, region and the round trip; the key ARN if resolved."""
    key, region = settings.key_id, settings.region
    meta: dict[str, Any] | None = None
    problem: _KmsProblem | None = None
    try:
        if client is None:
            try:
                client = make_client(region, 1)
            except ConfigError as exc:  # a broken AWS profile or endpoint setting
                raise _KmsProblem("AwsSettings", f"{exc}, {AGAIN}") from None
        meta = _kms_call(client, "DescribeKey", "describe_key", key, region, sleep,
                         KeyId=key)["KeyMetadata"]
    except _KmsProblem as exc:
        problem = exc
        checks.append(Check("KMS key", False, exc.detail))
    arn = str(meta["Arn"]) if meta is not None else None
    if meta is not None:
        checks.append(Check("KMS key", True, f"{key} is {arn}" if key != arn else f"{arn}"))

    usable = True
    names = ("key enabled", "key usage")
    if meta is None:
        for name in names:
            checks.append(_skip(name, "DescribeKey failed"))
        usable = False
    else:
        for check in (_state_check(meta, arn or key, region), _usage_check(meta)):
            checks.append(check)
            usable = usable and bool(check.ok)

    region_check = _region_check(key, arn, region)
    checks.append(region_check)
    usable = usable and region_check.ok is not False

    name = "Encrypt+Decrypt round trip"
    # With the key described and fit, or when only DescribeKey was denied (a policy may
    # allow Encrypt and Decrypt without DescribeKey): anything else would fail again.
    if meta is None and (problem is None or problem.code != "AccessDeniedException"):
        checks.append(_skip(name, "the KMS key check failed"))
    elif meta is not None and not usable:
        checks.append(_skip(name, "the key checks above failed"))
    elif meta is None and region_check.ok is False:
        checks.append(_skip(name, "the key region check failed"))
    else:
        checks.append(_round_trip(client, arn or key, region, settings, sleep))
    return arn


def _state_check(meta: Mapping[str, Any], key: str, region: str) -> Check:
    name = "key enabled"
    state = str(meta.get("KeyState") or ("Enabled" if meta.get("Enabled") else "Disabled"))
    if state == "Enabled":
        return Check(name, True, "KeyState Enabled")
    if state == "Disabled":
        return Check(name, False, f"KeyState Disabled: enable it (aws kms enable-key --key-id "
                     f"{key} --region {region}), {AGAIN}")
    if state in {"PendingDeletion", "PendingReplicaDeletion"}:
        when = meta.get("DeletionDate")
        scheduled = (f", deletion scheduled for {when:%Y-%m-%d}" if isinstance(when, datetime)
                     else "")
        return Check(name, False, f"KeyState {state}{scheduled}: cancel the deletion (aws kms "
                     f"cancel-key-deletion --key-id {key} --region {region}), enable it (aws "
                     f"kms enable-key --key-id {key} --region {region}), {AGAIN}")
    return Check(name, False, f"KeyState {state}, not Enabled: the key cannot encrypt until it "
                 f"is Enabled (aws kms describe-key --key-id {key} --region {region} shows "
                 f"why), {AGAIN}")


def _usage_check(meta: Mapping[str, Any]) -> Check:
    name = "key usage"
    usage = str(meta.get("KeyUsage", "ENCRYPT_DECRYPT"))
    spec = str(meta.get("KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT")))
    if usage == "ENCRYPT_DECRYPT" and spec == "SYMMETRIC_DEFAULT":
        return Check(name, True, "ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT")
    return Check(name, False, f"KeyUsage {usage}, KeySpec {spec}: kms-migrate needs a "
                 "symmetric encryption key (aws kms create-key --key-usage ENCRYPT_DECRYPT "
                 f"--key-spec SYMMETRIC_DEFAULT); point --key-id at one, {AGAIN}")


def _region_check(key: str, arn: str | None, region: str) -> Check:
    name = "key region"
    if arn is not None:
        actual = _arn_region(arn) or region
        if actual == region:
            return Check(name, True, region)
        return Check(name, False, f"the key lives in {actual}, not in --region {region}: "
                     f"re-run with --region {actual} (a KMS key is used in its own region)")
    named = _arn_region(key) if key.startswith("arn:") else None
    if named is not None and named != region:
        return Check(name, False, f"--key-id is an ARN in {named}, but --region is {region}: "
                     f"re-run with --region {named} (a KMS key is used in its own region)")
    return _skip(name, "DescribeKey failed")


def _round_trip(
    client: Any, key: str, region: str, settings: Settings, sleep: Callable[[float], None]
) -> Check:
    name = "Encrypt+Decrypt round trip"
    extra: dict[str, Any] = {}
    if settings.encryption_context:
        first = settings.targets[0]
        extra["EncryptionContext"] = encryption_context(first.table, first.columns[0],
                                                        "kms-migrate-preflight")
    test_value = secrets.token_bytes(ROUND_TRIP_BYTES)  # random, never shown
    try:
        blob = _kms_call(client, "Encrypt", "encrypt", key, region, sleep, KeyId=key,
                         Plaintext=test_value, **extra)["CiphertextBlob"]
        back = _kms_call(client, "Decrypt", "decrypt", key, region, sleep,
                         CiphertextBlob=blob, **extra)
    except _KmsProblem as exc:
        return Check(name, False, exc.detail)
    if not hmac.compare_digest(bytes(back.get("Plaintext", b"")), test_value):
        return Check(name, False, f"KMS Decrypt returned another value than the one {key} "
                     "encrypted: check the endpoint (AWS_ENDPOINT_URL_KMS) and the key, " + AGAIN)
    opened_by = str(back.get("KeyId") or "")
    if key.startswith("arn:") and ":key/" in key and opened_by and opened_by != key:
        return Check(name, False, f"the test value encrypted with {key} was decrypted by "
                     f"{opened_by}: check the endpoint (AWS_ENDPOINT_URL_KMS) and the key, "
                     + AGAIN)
    ctx = " with an encryption context" if extra else ""
    return Check(name, True, f"Encrypt and Decrypt{ctx} of a random {ROUND_TRIP_BYTES}-byte "
                 "test value gave it back intact")


# -- STS --------------------------------------------------------------------------------------

def _sts_client(region: str) -> Any:
    config = Config(region_name=region, retries={"total_max_attempts": 2, "mode": "standard"},
                    connect_timeout=5, read_timeout=10)
    return boto3.session.Session().client("sts", config=config)


def _check_caller(
    settings: Settings, client: Any, key_arn: str | None, checks: list[Check]
) -> None:
    name = "caller identity"
    try:
        if client is None:
            try:
                client = _sts_client(settings.region)
            except Exception as exc:  # a broken AWS profile or endpoint
                checks.append(Check(name, False, f"{aws_settings_problem(exc)}, {AGAIN}"))
                return
        who = client.get_caller_identity()
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        if code in {"AccessDenied", "AccessDeniedException"}:
            checks.append(Check(name, None, "not allowed to call sts:GetCallerIdentity "
                                f"({code}); the migration does not need it"))
        elif code in CREDENTIAL_CODES:
            checks.append(Check(name, False, f"AWS rejected the credentials ({code}): check "
                                "the default credential chain (AWS_PROFILE, IAM role, "
                                f"AWS_ACCESS_KEY_ID), {AGAIN}"))
        else:
            checks.append(Check(name, None, f"STS GetCallerIdentity failed ({code}); the "
                                "migration does not need it"))
        return
    except botocore.exceptions.NoCredentialsError:
        checks.append(Check(name, False, "no AWS credentials found: configure the default "
                            "credential chain (an IAM role, AWS_PROFILE, or AWS_ACCESS_KEY_ID/"
                            f"AWS_SECRET_ACCESS_KEY in the environment), {AGAIN}"))
        return
    except botocore.exceptions.BotoCoreError as exc:
        checks.append(Check(name, None, f"STS not reachable ({type(exc).__name__}): the caller "
                            "is unknown; the migration does not need STS"))
        return
    account = str(who.get("Account", "?"))
    detail = f"{who.get('Arn', '?')} (account {account})"
    key_account = key_arn.split(":")[4] if key_arn and key_arn.count(":") >= 5 else None
    if key_account and key_account != account:
        detail += (f"; the key belongs to account {key_account}: its key policy must allow "
                   "this caller (cross-account)")
    checks.append(Check(name, True, detail))


# -- bookkeeping (informational, read only) ----------------------------------------------------

def _check_bookkeeping(
    engine: Engine | None, settings: Settings, key_arn: str | None, checks: list[Check]
) -> None:
    if engine is None:
        checks.append(_skip("bookkeeping", "the database is unreachable"))
        return
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            if not insp.has_table(VERSION_TABLE):
                checks.append(Check("bookkeeping", None, "no kms-migrate tables yet: the first "
                                    "migrate creates them (kms_migrate_*)"))
                return
            migrate_run = store.unfinished_run(conn, "migrate")
            rollback_run = store.unfinished_run(conn, "rollback")
            holder = (conn.execute(select(lock)).first()
                      if insp.has_table(lock.name) else None)
    except SQLAlchemyError as exc:
        checks.append(Check("bookkeeping", None, f"cannot read the kms_migrate_* tables "
                            f"({type(exc).__name__})"))
        return
    if rollback_run is not None:
        checks.append(Check("bookkeeping", None, f"unfinished rollback run {rollback_run.id} "
                            f"({rollback_run.state}): migrate refuses to start until "
                            "kms-migrate rollback finishes it"))
    if migrate_run is not None:
        checks.append(Check("bookkeeping", None, _unfinished(migrate_run, settings, key_arn)))
    if rollback_run is None and migrate_run is None:
        checks.append(Check("bookkeeping", None, "no unfinished run: migrate starts a new one"))
    if holder is None:
        checks.append(Check("run lock", None, "free"))
    else:
        what = f"{holder.kind} run {holder.run_id}" if holder.run_id else f"a {holder.kind}"
        mine = holder.host == socket.gethostname() and holder.pid == os.getpid()
        checks.append(Check("run lock", None, (
            f"held by {what} (host {holder.host}, pid {holder.pid}, last heartbeat "
            f"{holder.heartbeat_at:%Y-%m-%d %H:%M:%S}){' (this process)' if mine else ''}: "
            "a second migrate or rollback waits for it to finish; a lock left by a dead "
            "process is taken over automatically")))


def _unfinished(run: store.Run, settings: Settings, key_arn: str | None) -> str:
    line = (f"unfinished migrate run {run.id} ({run.state}, started "
            f"{run.started_at:%Y-%m-%d %H:%M}): migrate resumes it (--new-run abandons it)")
    changed: list[str] = []
    if key_arn is not None and run.key_arn and run.key_arn != key_arn:
        changed.append(f"another KMS key ({run.key_arn})")
    elif key_arn is None and run.key_id and run.key_id != settings.key_id:
        changed.append(f"another KMS key id ({run.key_id})")
    if run.targets_fingerprint != targets_fingerprint(settings.targets,
                                                      settings.encryption_context):
        changed.append("other targets or another --encryption-context setting")
    if changed:
        line += (f"; it was started with {' and '.join(changed)}, so migrate with these "
                 "settings refuses to resume it")
    return line
