"""The one retry layer and the one classification of KMS errors: every KMS call of the
commands that touch secrets (migrate and its workers, verify, finalize, preflight) goes
through `KMS`, on a shared boto3 client, under one retry policy, at bounded concurrency.
Two calls do not, on purpose: `iam-policy`'s single best-effort DescribeKey (`iam.py`,
which falls back to the ARN given) and the demo's own check of a value against moto.

Retries live in one layer only. botocore's own retries are switched off
(``total_max_attempts=1``, `migration.kms_client`) and every single KMS call is wrapped
in one tenacity policy, built once per `KMS`, that retries transient errors (throttling,
KMS internal errors, dependency timeouts, dropped connections) with full-jitter exponential
backoff, a bounded number of times. Had both layers retried, botocore's 3 attempts times
ours would multiply silently. (The application helper, `migration.runtime`, is not the
tool: it leaves retries to botocore's standard mode.)

Fatal errors (access denied, key not found, disabled, pending deletion, wrong key usage,
bad credentials) are raised as :class:`FatalKMSError` with one line naming the key and
the likely fix (`migration.kms_codes`, worded for the caller by `KMS.wording`); callers
stop the run before the batch in flight writes anything.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .codec import KMS_MAX_CIPHERTEXT, KMS_MAX_PLAINTEXT
from .errors import FatalKMSError
from .kms_call import AccessDenied as _AccessDenied
from .kms_call import KMSCaller, RetryPolicy
from .kms_call import PerValue as _PerValue
from .kms_call import Undecryptable as _Undecryptable
from .kms_client import aws_settings_problem, make_client, validate_region
from .kms_keys import KeyInfo, checked_key
from .kms_pool import Pending
from .ratelimit import RateLimiter

__all__ = [
    "KMS",
    "REASON_EMPTY",
    "KeyInfo",
    "Opening",
    "Pending",
    "RateLimiter",
    "RetryPolicy",
    "aws_settings_problem",
    "make_client",
    "validate_region",
]

REASON_EMPTY = f"plaintext is empty (KMS Encrypt takes 1 to {KMS_MAX_PLAINTEXT} bytes)"

@dataclass(frozen=True)
class Opening:
    """What KMS said about one stored ciphertext (verify); never holds the plaintext.

    ok: the run's key opened it. other_key: it is under another KMS key, whose ARN this is
    ("" when this caller may not use that key, so KMS did not name it). problem: why KMS
    did not open it ("" for the caller's own words: it cannot decrypt it).
    """

    ok: bool = False
    other_key: str | None = None
    problem: str | None = None


class KMS(KMSCaller):
    """Encrypt, decrypt and verify with one key, concurrently (`CallPool`: `map`, `submit`,
    `close`, a context manager), under the retry policy."""

    dest: KeyInfo | None = None  # a rekey run's destination key, once described
    _decrypt_allowed: bool | None = None  # see _can_decrypt

    # -- single calls ------------------------------------------------------------------

    def key_metadata(self, key_id: str | None = None) -> dict[str, Any]:
        """DescribeKey of the key as named (the run's, or `key_id`): its KeyMetadata,
        unchecked (preflight's checks)."""
        meta: dict[str, Any] = self.call("DescribeKey", KeyId=key_id or self.key_id)[
            "KeyMetadata"]
        return meta

    def describe(self) -> KeyInfo:
        """Resolve the run's key and refuse one that cannot be used (disabled, deleting,
        misused, in another region)."""
        self.key = self.check_key(self.key_id)
        return self.key

    def describe_dest(self, key_id: str) -> KeyInfo:
        """Resolve a rekey run's destination key, checked as the run's own key is."""
        self.dest = self.check_key(key_id)
        return self.dest

    def check_key(self, key: str) -> KeyInfo:
        """DescribeKey of `key`, refused (FatalKMSError naming it) unless it is an Enabled,
        symmetric ENCRYPT_DECRYPT key in the region."""
        return checked_key(self.key_metadata(key), key, self.region, self.wording)

    def encrypt(self, plaintext: bytes, context: Mapping[str, str] | None = None) -> bytes:
        """KMS Encrypt under the run's key (its resolved ARN once described)."""
        key = self.key.arn if self.key else self.key_id
        extra = {"EncryptionContext": dict(context)} if context else {}
        blob: bytes = self.call("Encrypt", KeyId=key, Plaintext=plaintext, **extra)[
            "CiphertextBlob"]
        return blob

    def decrypt(self, blob: bytes, context: Mapping[str, str] | None = None) -> bytes | None:
        """KMS Decrypt with the run's key (pinned once described); None when KMS says this
        ciphertext is not one it can open (corrupt, under another key, another context, or
        refused as invalid)."""
        opened = self.decrypt_with_key(blob, context)
        if opened is None:
            return None
        if self.key is not None and opened[1] and opened[1] != self.key.arn:
            return None  # a KMS that ignored the pinned KeyId: not the run's key either way
        return opened[0]

    def decrypt_with_key(
        self, blob: bytes, context: Mapping[str, str] | None = None, *, pinned: bool = True,
        key: str | None = None,
    ) -> tuple[bytes, str] | None:
        """KMS Decrypt returning the plaintext and the ARN of the key that opened it.

        Pinned (``KeyId`` = the run's key ARN) once the key is described, so that KMS opens
        only what that key encrypted. None when KMS says it cannot open this ciphertext
        (corrupt, another key, or another encryption context than the one given).
        """
        extra: dict[str, Any] = {"EncryptionContext": dict(context)} if context else {}
        if key is not None:
            extra["KeyId"] = key
        elif pinned and self.key is not None:
            extra["KeyId"] = self.key.arn
        try:
            resp = self.call("Decrypt", CiphertextBlob=blob, **extra)
        except _PerValue:
            return None
        return resp["Plaintext"], str(resp.get("KeyId", ""))

    def decrypt_in_context(
        self, item: tuple[bytes, Mapping[str, str] | None]
    ) -> tuple[bytes, str] | None:
        """`decrypt_with_key` of a (blob, context) pair, for `submit`/`map`."""
        return self.decrypt_with_key(item[0], item[1])

    def open_stored(self, item: tuple[bytes, Mapping[str, str] | None]) -> Opening:
        """Whether the run's key opens a stored ciphertext (verify); the plaintext is
        dropped at once. For `submit`/`map` over (blob, encryption context) pairs.

        The Decrypt is pinned to the run's key, so a value under another key is never
        counted as good. Per-value answers (too long, invalid, another key, a key this caller
        cannot use) are an Opening with the reason; key, credential, network and quota
        problems raise FatalKMSError as every other call does.
        """
        blob, context = item
        if len(blob) > KMS_MAX_CIPHERTEXT:  # KMS refuses it unseen (ValidationException)
            return Opening(problem=f"too long to be a KMS ciphertext ({len(blob)} bytes; KMS "
                                   f"takes at most {KMS_MAX_CIPHERTEXT})")
        if self.key is None:
            raise AssertionError("open_stored needs the run's key described first")
        arn = self.key.arn
        extra: dict[str, Any] = {"EncryptionContext": dict(context)} if context else {}
        try:
            opened_by = str(self.call("Decrypt", CiphertextBlob=blob, KeyId=arn,
                                       **extra).get("KeyId") or arn)
        except _Undecryptable as exc:
            if str(exc) == "IncorrectKeyException":  # KMS says: another key encrypted it
                return self._other_key(blob, extra, denied=None)
            return Opening(problem="")  # the caller's own words (context or not)
        except _PerValue as exc:
            return Opening(problem=f"KMS refused it as invalid ({exc})")
        except _AccessDenied as exc:
            # Either this caller may not decrypt with the run's key at all (run-level), or
            # the value is under a key it may not use (per-value; moto answers a pinned
            # Decrypt of another key's ciphertext so too): `_other_key` tells them apart.
            return self._other_key(blob, extra, denied=exc)
        if opened_by != arn:  # a KMS that ignored the pinned KeyId
            return Opening(other_key=opened_by)
        return Opening(ok=True)

    def _other_key(
        self, blob: bytes, extra: dict[str, Any], denied: FatalKMSError | None
    ) -> Opening:
        """Name the key a ciphertext is under with one unpinned Decrypt (its plaintext is
        discarded at once). `denied`: the pinned Decrypt was refused with this error, which
        is raised again when the run's key itself turns out to be the one refused."""
        assert self.key is not None
        try:
            opened_by = str(self.call("Decrypt", CiphertextBlob=blob, **extra).get("KeyId")
                            or "")
        except _AccessDenied:
            if denied is None or self._can_decrypt(extra.get("EncryptionContext")):
                return Opening(other_key="")
            raise denied from None
        except _PerValue:
            return Opening(problem="")
        if opened_by and opened_by != self.key.arn:
            return Opening(other_key=opened_by)
        if denied is not None:  # the run's key opens it, but not when pinned: a policy matter
            raise denied from None
        return Opening(problem="")

    def _can_decrypt(self, context: Mapping[str, str] | None) -> bool:
        """Whether this caller may Decrypt with the run's key: one Encrypt and pinned Decrypt
        of a random test value (never shown), in the value's own encryption context (a key
        policy may require one), asked once per run and only when a denied Decrypt is
        otherwise ambiguous."""
        with self._lock:
            known = self._decrypt_allowed
        if known is None:
            probe = secrets.token_bytes(32)
            try:
                known = isinstance(self.round_trip(probe, context), bytes)
            except _AccessDenied:
                known = False
            with self._lock:
                self._decrypt_allowed = known
        return known

    def reencrypt(self, blob: bytes, dest: str, source_context: Mapping[str, str] | None,
                  dest_context: Mapping[str, str] | None, *, source: str | None = None,
                  ) -> tuple[bytes, str, str] | None:
        """KMS ReEncrypt of a ciphertext from the run's key (`SourceKeyId` pinned to its
        ARN, or to `source`) to the key `dest` (an ARN); the plaintext stays inside KMS.

        (new blob, the SourceKeyId and KeyId KMS answered), or None when KMS says this
        ciphertext does not open under that key and context (another key, another context,
        corrupt, refused as invalid). Errors of the keys themselves raise FatalKMSError
        naming the key at fault."""
        pinned = source or (self.key.arn if self.key else self.key_id)
        extra: dict[str, Any] = {}
        if source_context:
            extra["SourceEncryptionContext"] = dict(source_context)
        if dest_context:
            extra["DestinationEncryptionContext"] = dict(dest_context)
        try:
            resp = self.call("ReEncrypt", CiphertextBlob=blob, SourceKeyId=pinned,
                             DestinationKeyId=dest, **extra)
        except _PerValue:
            return None
        return (resp["CiphertextBlob"], str(resp.get("SourceKeyId") or ""),
                str(resp.get("KeyId") or ""))

    def round_trip_in_context(self, item: tuple[bytes, Mapping[str, str]]) -> bytes | str:
        """`round_trip` of a (plaintext, encryption context) pair, for `submit`/`map`."""
        return self.round_trip(item[0], item[1])

    def round_trip(self, plaintext: bytes, context: Mapping[str, str] | None = None) -> bytes | str:
        """Encrypt, then decrypt the new ciphertext and compare in constant time.

        Returns the blob, or a failure reason (never carrying the value) when the
        round trip does not give the plaintext back or KMS refuses this value's data.
        """
        if not plaintext:
            return REASON_EMPTY  # KMS would answer ValidationException: decided here
        if len(plaintext) > KMS_MAX_PLAINTEXT:
            return f"plaintext is over KMS's {KMS_MAX_PLAINTEXT}-byte Encrypt limit"
        try:
            blob = self.encrypt(plaintext, context)
        except _PerValue as exc:
            return f"KMS refused this value ({exc})"
        back = self.decrypt(blob, context)
        if back is None:
            return "KMS could not decrypt the ciphertext it had just produced"
        if not hmac.compare_digest(back, plaintext):
            return "KMS round trip returned a different plaintext"
        return blob

