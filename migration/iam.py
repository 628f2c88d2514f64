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

A third policy is for `kms-migrate rekey`, which moves KMS values from one key (the source)
to another (the destination) with ReEncrypt: ``kms:ReEncryptFrom`` on the source,
``kms:ReEncryptTo`` and ``kms:ReEncryptFrom`` on the destination (each new ciphertext is
checked by a ReEncrypt from the destination to itself), ``kms:DescribeKey`` on both, and
with ``--verify-decrypt`` ``kms:Decrypt`` on both (`rekey_policy`).
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
    "REKEY_ACTIONS",
    "application_policy",
    "is_key_arn",
    "migration_policy",
    "policies",
    "rekey_policy",
    "resolve_key_arn",
]

VERSION = "2012-10-17"
MIGRATION_ACTIONS = ("kms:Encrypt", "kms:Decrypt", "kms:DescribeKey")
APPLICATION_ACTIONS = ("kms:Decrypt", "kms:Encrypt")  # Encrypt only when the app writes
REKEY_ACTIONS = ("kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:DescribeKey")  # + kms:Decrypt
CONTEXT_KEYS = ("table", "column", "pk")  # codec.encryption_context(table, column, pk)

_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")
WHICH = ("migration", "application", "both")


def is_key_arn(key_id: str) -> bool:
    """True for a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), not an alias ARN or id."""
    return bool(_KEY_ARN.match(key_id))


def resolve_key_arn(
    key_id: str, region: str, client: Any = None, *, flag: str = "--key-id"
) -> tuple[str, str | None]:
    """The key ARN behind `key_id` (DescribeKey), and a note when it could not be checked.

    When DescribeKey fails (no credentials, access denied, ...) a key ARN given as
    `key_id` is used as it is, with a note; anything else raises ConfigError saying to
    pass the key ARN. `flag` is the option that named the key, as the lines say it.
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
        return key_id, (f"note: DescribeKey failed ({reason}); using {flag} {key_id} as the "
                        "key ARN without checking it")
    raise ConfigError(
        f"cannot resolve {key_id} to a key ARN in {region} with DescribeKey ({reason}): pass "
        f"the key ARN, {flag} arn:aws:kms:{region}:ACCOUNT_ID:key/KEY_ID (aws kms "
        f"describe-key --key-id {key_id} --region {region} --query KeyMetadata.Arn prints it)"
    )


def _context_condition(required: bool = True) -> dict[str, Any]:
    """The context keys table, column and pk and no other; with `required`, each of them
    present too (ForAllValues alone is also satisfied by a request with no context)."""
    cond: dict[str, Any] = {
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": list(CONTEXT_KEYS)}}
    if required:
        cond["Null"] = {f"kms:EncryptionContext:{k}": "false" for k in CONTEXT_KEYS}
    return cond


def _statement(
    sid: str, actions: list[str], arn: str | list[str], condition: bool, *,
    required: bool = True,
) -> dict[str, Any]:
    st: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": arn}
    if condition:
        st["Condition"] = _context_condition(required)
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


# -- rekey ------------------------------------------------------------------------------------
# Which encryption context do the condition keys of a ReEncrypt request see? The AWS KMS
# Developer Guide ("AWS KMS condition keys", conditions-kms.html) lists ReEncrypt among the
# operations of both kms:EncryptionContext:context-key and kms:EncryptionContextKeys, and the
# API reference (API_ReEncrypt.html) says a ReEncrypt is authorized twice: as
# kms:ReEncryptFrom on the source key and as kms:ReEncryptTo on the destination key. Neither
# says whether, in each of the two authorizations, the condition keys are read from the
# SourceEncryptionContext, the DestinationEncryptionContext or both together (we found no
# AWS page that does). So the conditions below hold whichever it is:
#
# - a request whose two contexts are alike (both the three keys, or both none) gets the
#   condition of that setting: `Null` requires the keys, `ForAllValues` forbids others;
# - a request whose contexts differ (a rekey that adds a context, or removes one) gets
#   `ForAllValues` alone on the statements it passes through. A `Null` condition requiring
#   the keys would deny a kms:ReEncryptFrom evaluated against a source with no context; a
#   condition requiring no context would deny one evaluated against both contexts
#   together. `ForAllValues` is satisfied by no context, by the three keys, and by both
#   contexts' keys at once, and still forbids any other key.
#
# The check of each new ciphertext (destination to destination, the destination's context
# on both sides) and the Decrypts of --verify-decrypt carry one setting, so they keep the
# exact condition.
_EXACT, _KEYS_ONLY = "exact", "keys-only"
_SID_SUFFIX = {None: "", _EXACT: "InContext", _KEYS_ONLY: "ContextKeys"}


def _request_context(a: bool, b: bool) -> str | None:
    """The condition for a request whose two encryption contexts are set as `a` and `b`."""
    if a and b:
        return _EXACT
    return _KEYS_ONLY if a or b else None


def rekey_policy(
    source_arn: str, dest_arn: str, *, from_context: bool = False, to_context: bool = False,
    verify_decrypt: bool = False,
) -> dict[str, Any]:
    """The rekey's policy: kms:ReEncryptFrom on the source key; kms:ReEncryptTo and
    kms:ReEncryptFrom on the destination (the check of each new ciphertext, and of a value
    already moved, re-encrypts from it); kms:DescribeKey on both; with `verify_decrypt`,
    kms:Decrypt on both. `from_context` / `to_context`: the values carry the encryption
    context (table, column, pk) under the source / are to carry it under the destination."""
    moved = _request_context(from_context, to_context)  # ReEncrypt source -> destination
    checked = _request_context(to_context, to_context)  # ReEncrypt destination -> destination
    grants: list[tuple[str, str, str | None]] = [  # (which key, action, condition)
        ("Source", "kms:ReEncryptFrom", moved),
        ("Source", "kms:Decrypt", _request_context(from_context, from_context)),
        ("Destination", "kms:ReEncryptTo", moved),
        ("Destination", "kms:ReEncryptFrom", checked),
        ("Destination", "kms:Decrypt", checked),
    ]
    if not verify_decrypt:
        grants = [g for g in grants if g[1] != "kms:Decrypt"]
    grouped: dict[tuple[str, str | None], list[str]] = {}
    for which, action, condition in grants:  # one statement per key and condition, in order
        grouped.setdefault((which, condition), []).append(action)
    arns = {"Source": source_arn, "Destination": dest_arn}
    statements = [
        _statement(f"KmsRekey{which}{_SID_SUFFIX[condition]}", actions, arns[which],
                   condition is not None, required=condition == _EXACT)
        for (which, condition), actions in grouped.items()
    ]
    both = list(dict.fromkeys((source_arn, dest_arn)))
    statements.append(_statement("KmsRekeyDescribeKeys", ["kms:DescribeKey"],
                                 both[0] if len(both) == 1 else both, False))
    return {"Version": VERSION, "Statement": statements}
