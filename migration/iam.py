"""Least-privilege IAM policies for the KMS key: one for the migration, one for the application.

The guide's Step 1.2 policy grants Encrypt, Decrypt and DescribeKey on ``key/*``, every
key of the account, to the application. These name the one key by its **key ARN** (an
alias ARN in ``Resource`` does not grant use of the key it points to), and give each
principal only what it calls:

- the migration (``kms-migrate migrate`` and ``verify``): ``kms:Encrypt``,
  ``kms:Decrypt``, ``kms:DescribeKey``;
- the application: ``kms:Decrypt``, and ``kms:Encrypt`` once it writes with KMS
  (``USE_AWS_KMS=true``).

With the encryption context option, Encrypt and Decrypt are allowed only when the request
carries the context keys ``table``, ``column`` and ``pk`` and no other key
(``kms:EncryptionContextKeys`` with ``ForAllValues`` alone would also allow a request with
no context at all, so each key is also required with a ``Null`` condition). DescribeKey
takes no encryption context, so it stays in a statement of its own without the condition.
"""

from __future__ import annotations

import re
from typing import Any

import botocore.exceptions

from .errors import ConfigError
from .kms import make_client

__all__ = [
    "APPLICATION_ACTIONS",
    "CONTEXT_KEYS",
    "MIGRATION_ACTIONS",
    "application_policy",
    "is_key_arn",
    "migration_policy",
    "policies",
    "resolve_key_arn",
]

VERSION = "2012-10-17"
MIGRATION_ACTIONS = ("kms:Encrypt", "kms:Decrypt", "kms:DescribeKey")
APPLICATION_ACTIONS = ("kms:Decrypt", "kms:Encrypt")  # Encrypt only when the app writes
CONTEXT_KEYS = ("table", "column", "pk")  # codec.encryption_context(table, column, pk)

_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")
WHICH = ("migration", "application", "both")


def is_key_arn(key_id: str) -> bool:
    """True for a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), not an alias ARN or id."""
    return bool(_KEY_ARN.match(key_id))


def resolve_key_arn(key_id: str, region: str, client: Any = None) -> tuple[str, str | None]:
    """The key ARN behind `key_id` (DescribeKey), and a note when it could not be checked.

    When DescribeKey fails (no credentials, access denied, ...) a key ARN given as
    `key_id` is used as it is, with a note; anything else raises ConfigError saying to
    pass the key ARN.
    """
    try:
        if client is None:
            client = make_client(region, 1)
        arn = str(client.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"])
    except botocore.exceptions.ClientError as exc:
        reason = str(exc.response.get("Error", {}).get("Code", "Unknown"))
    except botocore.exceptions.BotoCoreError as exc:
        reason = ("no AWS credentials" if isinstance(exc, botocore.exceptions.NoCredentialsError)
                  else type(exc).__name__)
    else:
        return arn, None
    if is_key_arn(key_id):
        return key_id, (f"note: DescribeKey failed ({reason}); using --key-id {key_id} as the "
                        "key ARN without checking it")
    raise ConfigError(
        f"cannot resolve {key_id} to a key ARN in {region} with DescribeKey ({reason}): pass "
        f"the key ARN, --key-id arn:aws:kms:{region}:ACCOUNT_ID:key/KEY_ID (aws kms "
        f"describe-key --key-id {key_id} --region {region} --query KeyMetadata.Arn prints it)"
    )


def _context_condition() -> dict[str, Any]:
    return {
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": list(CONTEXT_KEYS)},
        "Null": {f"kms:EncryptionContext:{k}": "false" for k in CONTEXT_KEYS},
    }


def _statement(sid: str, actions: list[str], arn: str, condition: bool) -> dict[str, Any]:
    st: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": arn}
    if condition:
        st["Condition"] = _context_condition()
    return st


def migration_policy(arn: str, *, encryption_context: bool = False) -> dict[str, Any]:
    """kms:Encrypt, kms:Decrypt and kms:DescribeKey on the key, for the migration's principal."""
    if not encryption_context:
        statements = [_statement("KmsMigrateReEncrypt", list(MIGRATION_ACTIONS), arn, False)]
    else:
        statements = [
            _statement("KmsMigrateReEncrypt", ["kms:Encrypt", "kms:Decrypt"], arn, True),
            _statement("KmsMigrateDescribeKey", ["kms:DescribeKey"], arn, False),
        ]
    return {"Version": VERSION, "Statement": statements}


def application_policy(
    arn: str, *, writes: bool = True, encryption_context: bool = False
) -> dict[str, Any]:
    """kms:Decrypt (and kms:Encrypt when the application writes) on the key."""
    actions = ["kms:Decrypt", "kms:Encrypt"] if writes else ["kms:Decrypt"]
    sid = "AppReadWriteSecrets" if writes else "AppReadSecrets"
    return {"Version": VERSION,
            "Statement": [_statement(sid, actions, arn, encryption_context)]}


def policies(
    arn: str, which: str = "both", *, app_writes: bool = True,
    encryption_context: bool = False,
) -> dict[str, Any]:
    """One policy document (`which` = migration or application), or both by name."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, not {which!r}")
    docs = {
        "migration": migration_policy(arn, encryption_context=encryption_context),
        "application": application_policy(arn, writes=app_writes,
                                          encryption_context=encryption_context),
    }
    if which == "both":
        return docs
    return docs[which]
