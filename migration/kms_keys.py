"""The KMS keys of a run: what DescribeKey must say of a key before a run uses it, and
which of a ReEncrypt's two keys a fatal answer is about."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from .errors import FatalKMSError
from .kms_codes import Wording, fatal_message

__all__ = ["KeyInfo", "blamed", "checked_key"]


@dataclass(frozen=True)
class KeyInfo:
    """A key a run uses: as the operator named it and as KMS resolved it."""

    key_id: str
    arn: str


def checked_key(meta: Mapping[str, Any], key: str, region: str, wording: Wording) -> KeyInfo:
    """The key DescribeKey described (`meta`), refused (FatalKMSError naming `key`) unless
    it is an Enabled, symmetric ENCRYPT_DECRYPT key in `region`."""
    state = meta.get("KeyState") or ("Enabled" if meta.get("Enabled") else "Disabled")
    code = None
    if state == "Disabled":
        code = "DisabledException"
    elif state in {"PendingDeletion", "PendingReplicaDeletion"}:
        code = "KMSInvalidStateException"
    elif state != "Enabled":
        raise FatalKMSError(
            f"KMS key {key} is in state {state}, not Enabled: make it Enabled "
            "(aws kms describe-key shows why) and re-run; nothing was written"
        )
    elif meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT" or meta.get(
        "KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT")
    ) != "SYMMETRIC_DEFAULT":
        code = "InvalidKeyUsageException"
    if code is not None:
        raise FatalKMSError(fatal_message(code, "DescribeKey", key, region, wording), code)
    arn = str(meta["Arn"])
    arn_region = arn.split(":")[3] if arn.count(":") >= 5 else region
    if arn_region != region:
        raise FatalKMSError(
            f"KMS key {key} lives in region {arn_region}, not {region}: "
            f"re-run with --region {arn_region}; nothing was written"
        )
    return KeyInfo(key_id=key, arn=arn)


def blamed(op: str, params: Mapping[str, Any], exc: botocore.exceptions.ClientError,
           key_id: str) -> tuple[str, str]:
    """(operation, key) to name in a fatal message. DescribeKey names the key it described
    (a rekey describes its destination too). A ReEncrypt involves two keys: KMS's
    own message (read here, never shown) says which one refused, by the permission
    (kms:ReEncryptTo is the destination's) or the key's ARN; the source otherwise."""
    if op == "DescribeKey":  # the key as named: the run's, or a rekey's destination
        return op, str(params.get("KeyId") or key_id)
    if op != "ReEncrypt":
        return op, key_id
    message = str(exc.response.get("Error", {}).get("Message", ""))
    dest = str(params.get("DestinationKeyId", ""))
    source = str(params.get("SourceKeyId", ""))
    if dest == source:
        # The check of a new ciphertext (destination to destination), or a rekey that only
        # changes the context: the call needs both permissions, kms:ReEncrypt* grants them.
        return "ReEncrypt*", dest
    if "ReEncryptTo" in message or (dest and dest in message):
        return "ReEncryptTo", dest
    return "ReEncryptFrom", key_id
