"""Preflight's AWS checks: the KMS key (DescribeKey, state, usage, region), an
Encrypt+Decrypt round trip of a random test value, and the caller (STS).

KMS is called through `migration.kms.KMS`, as every command calls it: the same
transient-versus-fatal classification, the same message table (worded for preflight), the
same retry policy, with fewer attempts. STS errors are reported by their code only.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from .codec import encryption_context
from .config import Settings
from .errors import ConfigError, FatalKMSError, KMSValueError
from .kms import KMS, RetryPolicy
from .kms_client import aws_settings_problem, make_client
from .kms_codes import CREDENTIAL_CODES, PREFLIGHT, error_code
from .preflight_lines import AGAIN, Check, skip

__all__ = [
    "ATTEMPTS", "MIGRATE_KEY", "KeyCheck", "KeyRole", "check_caller", "check_key", "check_kms",
    "kms_client", "preflight_kms",
]

ATTEMPTS = 3  # tries of one KMS call when KMS answers a transient error
ROUND_TRIP_BYTES = 32
POLICY = RetryPolicy(max_attempts=ATTEMPTS, max_wait=1.0, multiplier=0.25)


def preflight_kms(
    client: Any, key: str, region: str, sleep: Callable[[float], None] = time.sleep
) -> KMS:
    """A KMS for preflight's calls on `key`: one call at a time, a few attempts, and
    messages that end in re-running preflight."""
    kms = KMS(client, key, region, concurrency=1, policy=replace(POLICY, sleep=sleep))
    kms.wording = PREFLIGHT
    return kms


def _arn_region(arn: str) -> str | None:
    parts = arn.split(":")
    return parts[3] if len(parts) >= 6 and parts[0] == "arn" and parts[3] else None


@dataclass(frozen=True)
class KeyRole:
    """How preflight's lines name one key, and the option that names it."""

    line: str  # the DescribeKey line: "KMS key", "source key", "destination key"
    prefix: str  # the state, usage and region lines: "key enabled", "source key enabled"
    flag: str  # "--key-id", "--from-key", "--to-key"


MIGRATE_KEY = KeyRole("KMS key", "key", "--key-id")


@dataclass(frozen=True)
class KeyCheck:
    """What the key checks found: the key's ARN when described, and why a call with the key
    would only fail again (None: go ahead)."""

    key: str  # as given
    arn: str | None
    blocked: str | None

    @property
    def use(self) -> str:
        """The key to call KMS with: its ARN when resolved, else as given."""
        return self.arn or self.key


def kms_client(client: Any, region: str) -> Any:
    """`client`, or preflight's own (one attempt per call: `KMS` retries)."""
    if client is not None:
        return client
    try:
        return make_client(region, 1)
    except ConfigError as exc:  # a broken AWS profile or endpoint setting
        raise FatalKMSError(f"{exc}, {AGAIN}", "AwsSettings") from None


def check_key(
    client: Any, key: str, region: str, role: KeyRole, checks: list[Check],
    sleep: Callable[[float], None],
) -> tuple[KeyCheck, Any]:
    """DescribeKey, key state, usage and region of one key, a line each; the client (made
    here when None and possible)."""
    meta: dict[str, Any] | None = None
    problem: FatalKMSError | None = None
    try:
        client = kms_client(client, region)
        meta = preflight_kms(client, key, region, sleep).key_metadata()
    except FatalKMSError as exc:
        problem = exc
        checks.append(Check(role.line, False, str(exc)))
    arn = str(meta["Arn"]) if meta is not None else None
    if meta is not None:
        checks.append(Check(role.line, True, f"{key} is {arn}" if key != arn else f"{arn}"))

    usable = True
    names = (f"{role.prefix} enabled", f"{role.prefix} usage")
    if meta is None:
        for name in names:
            checks.append(skip(name, "DescribeKey failed"))
        usable = False
    else:
        for check in (_state_check(meta, arn or key, region, role),
                      _usage_check(meta, role)):
            checks.append(check)
            usable = usable and bool(check.ok)

    region_check = _region_check(key, arn, region, role)
    checks.append(region_check)
    usable = usable and region_check.ok is not False

    # Go ahead with the key described and fit, or when only DescribeKey was denied (a
    # policy may allow the calls a run makes without DescribeKey): anything else would
    # fail again.
    blocked: str | None = None
    if meta is None and (problem is None or problem.code != "AccessDeniedException"):
        blocked = f"the {role.line} check failed"
    elif meta is not None and not usable:
        blocked = f"the {role.prefix} checks above failed"
    elif meta is None and region_check.ok is False:
        blocked = f"the {role.prefix} region check failed"
    return KeyCheck(key, arn, blocked), client


def check_kms(
    settings: Settings, client: Any, checks: list[Check], sleep: Callable[[float], None]
) -> str | None:
    """DescribeKey, key state, usage, region and the round trip; the key ARN if resolved."""
    found, client = check_key(client, settings.key_id, settings.region, MIGRATE_KEY, checks,
                              sleep)
    name = "Encrypt+Decrypt round trip"
    if found.blocked:
        checks.append(skip(name, found.blocked))
    else:
        checks.append(_round_trip(client, found.use, settings.region, settings, sleep))
    return found.arn


def _state_check(meta: Mapping[str, Any], key: str, region: str, role: KeyRole) -> Check:
    name = f"{role.prefix} enabled"
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


def _usage_check(meta: Mapping[str, Any], role: KeyRole) -> Check:
    name = f"{role.prefix} usage"
    usage = str(meta.get("KeyUsage", "ENCRYPT_DECRYPT"))
    spec = str(meta.get("KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT")))
    if usage == "ENCRYPT_DECRYPT" and spec == "SYMMETRIC_DEFAULT":
        return Check(name, True, "ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT")
    return Check(name, False, f"KeyUsage {usage}, KeySpec {spec}: kms-migrate needs a "
                 "symmetric encryption key (aws kms create-key --key-usage ENCRYPT_DECRYPT "
                 f"--key-spec SYMMETRIC_DEFAULT); point {role.flag} at one, {AGAIN}")


def _region_check(key: str, arn: str | None, region: str, role: KeyRole) -> Check:
    name = f"{role.prefix} region"
    if arn is not None:
        actual = _arn_region(arn) or region
        if actual == region:
            return Check(name, True, region)
        return Check(name, False, f"the key lives in {actual}, not in --region {region}: "
                     f"re-run with --region {actual} (a KMS key is used in its own region)")
    named = _arn_region(key) if key.startswith("arn:") else None
    if named is not None and named != region:
        return Check(name, False, f"{role.flag} is an ARN in {named}, but --region is {region}: "
                     f"re-run with --region {named} (a KMS key is used in its own region)")
    return skip(name, "DescribeKey failed")


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
    kms = preflight_kms(client, key, region, sleep)
    try:
        blob = kms.encrypt(test_value, extra.get("EncryptionContext"))
        back = kms.call("Decrypt", CiphertextBlob=blob, **extra)
    except KMSValueError as exc:  # Decrypt: this ciphertext is not one KMS opens
        return Check(name, False, f"KMS could not decrypt the ciphertext it had just produced "
                     f"with {key} ({exc}): check that --key-id and --region name one key, "
                     f"{AGAIN}")
    except FatalKMSError as exc:
        return Check(name, False, str(exc))
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


def check_caller(
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
        code = error_code(exc)
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
