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
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .codec import KMS_MAX_CIPHERTEXT, KMS_MAX_PLAINTEXT
from .errors import FatalKMSError, KMSValueError, TransientKMSError
from .kms_client import aws_settings_problem, make_client, validate_region
from .kms_codes import (
    CONNECTION_ERRORS,
    RUN,
    THROTTLE_CODES,
    UNDECRYPTABLE_CODES,
    VALUE_CODES,
    Wording,
    boto_failure,
    error_code,
    fatal_message,
    gave_up,
    is_transient,
    no_credentials,
)
from .kms_pool import CallPool, Pending
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
class KeyInfo:
    """The key a run uses: as the operator named it and as KMS resolved it."""

    key_id: str
    arn: str


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


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry one transient KMS error before the run stops; `sleep` waits
    between attempts (tests pass their own)."""

    max_attempts: int = 10
    max_wait: float = 20.0
    multiplier: float = 0.05
    sleep: Callable[[float], None] = time.sleep


class KMS(CallPool):
    """Encrypt, decrypt and verify with one key, concurrently (`CallPool`: `map`, `submit`,
    `close`, a context manager), under the retry policy."""

    def __init__(
        self,
        client: Any,
        key_id: str,
        region: str,
        *,
        concurrency: int = 16,
        policy: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.key_id = key_id
        self.region = region
        super().__init__(concurrency)
        self.policy = policy or RetryPolicy()
        self._lock = threading.Lock()
        self.retries = 0
        self.requests = 0
        self.key: KeyInfo | None = None
        self._decrypt_allowed: bool | None = None  # see _can_decrypt
        self.wording: Wording = RUN  # how fatal messages end (preflight sets its own)
        self._retrying = Retrying(  # the one retry policy, built once, shared by threads
            retry=retry_if_exception_type(TransientKMSError),
            stop=stop_after_attempt(self.policy.max_attempts),
            wait=wait_random_exponential(
                multiplier=self.policy.multiplier, max=self.policy.max_wait
            ),
            sleep=self.policy.sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )

    # -- single calls ------------------------------------------------------------------

    def key_metadata(self) -> dict[str, Any]:
        """DescribeKey of the key as named: its KeyMetadata, unchecked (preflight's checks)."""
        meta: dict[str, Any] = self.call("DescribeKey", KeyId=self.key_id)["KeyMetadata"]
        return meta

    def describe(self) -> KeyInfo:
        """Resolve the key and refuse one that cannot encrypt (disabled, deleting, misused)."""
        meta = self.key_metadata()
        key = self.key_id
        state = meta.get("KeyState") or ("Enabled" if meta.get("Enabled") else "Disabled")
        if state == "Disabled":
            raise self._fatal("DisabledException", "DescribeKey")
        if state in {"PendingDeletion", "PendingReplicaDeletion"}:
            raise self._fatal("KMSInvalidStateException", "DescribeKey")
        if state not in {"Enabled"}:
            raise FatalKMSError(
                f"KMS key {key} is in state {state}, not Enabled: make it Enabled "
                "(aws kms describe-key shows why) and re-run; nothing was written"
            )
        if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT" or meta.get(
            "KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT")
        ) != "SYMMETRIC_DEFAULT":
            raise self._fatal("InvalidKeyUsageException", "DescribeKey")
        arn = str(meta["Arn"])
        arn_region = arn.split(":")[3] if arn.count(":") >= 5 else self.region
        if arn_region != self.region:
            raise FatalKMSError(
                f"KMS key {key} lives in region {arn_region}, not {self.region}: "
                f"re-run with --region {arn_region}; nothing was written"
            )
        self.key = KeyInfo(key_id=self.key_id, arn=arn)
        return self.key

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
        self, blob: bytes, context: Mapping[str, str] | None = None, *, pinned: bool = True
    ) -> tuple[bytes, str] | None:
        """KMS Decrypt returning the plaintext and the ARN of the key that opened it.

        Pinned (``KeyId`` = the run's key ARN) once the key is described, so that KMS opens
        only what that key encrypted. None when KMS says it cannot open this ciphertext
        (corrupt, another key, or another encryption context than the one given).
        """
        extra: dict[str, Any] = {"EncryptionContext": dict(context)} if context else {}
        if pinned and self.key is not None:
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

    # -- the retry loop ----------------------------------------------------------------

    def _count_retry(self, state: RetryCallState) -> None:
        with self._lock:
            self.retries += 1

    def _fatal(self, code: str, op: str) -> FatalKMSError:
        return FatalKMSError(fatal_message(code, op, self.key_id, self.region, self.wording),
                             code)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        """One KMS call (DescribeKey, Encrypt, Decrypt, ReEncrypt) under the retry policy and
        the rate limit. FatalKMSError when it fails for good; KMSValueError (its text the code) when
        KMS refused this one value's data."""
        method = getattr(self.client, _SNAKE[op])
        try:
            for attempt in self._retrying:
                with attempt:
                    if self.limiter is not None:
                        self.limiter.acquire()
                    with self._lock:
                        self.requests += 1
                    response: dict[str, Any] = self._classify(op, method, params)
                    return response
        except TransientKMSError as exc:
            raise FatalKMSError(gave_up(exc, op, self.key_id, self.region,
                                        self.policy.max_attempts, self.wording),
                                str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _classify(self, op: str, method: Callable[..., Any], params: dict[str, Any]) -> Any:
        """The one transient-versus-fatal-versus-per-value classification of KMS errors."""
        try:
            return method(**params)
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if is_transient(exc):
                if code in THROTTLE_CODES and self.limiter is not None:
                    self.limiter.on_throttle()
                raise TransientKMSError(code) from None
            if op in {"Decrypt", "ReEncrypt"} and code in UNDECRYPTABLE_CODES:
                raise _Undecryptable(code) from None
            # A ValidationException can be about the request as a whole (a malformed key id),
            # but the key is DescribeKey'd before any Encrypt or Decrypt (self.key is set by
            # `describe`, or handed down by the process that described it): from then on the
            # key id is known good, and a ValidationException is about this value's data.
            if (op in {"Encrypt", "Decrypt", "ReEncrypt"} and code in VALUE_CODES
                    and self.key is not None):
                raise _PerValue(code) from None
            named_op, key = _blamed(op, params, exc, self.key_id)
            message = fatal_message(code, named_op, key, self.region, self.wording)
            if code == "AccessDeniedException":
                raise _AccessDenied(message, code) from None
            raise FatalKMSError(message, code) from None
        except CONNECTION_ERRORS as exc:
            raise TransientKMSError(type(exc).__name__, connection=True) from None
        except botocore.exceptions.NoCredentialsError:
            raise FatalKMSError(no_credentials(self.wording), "NoCredentials") from None
        except botocore.exceptions.BotoCoreError as exc:
            name = type(exc).__name__
            raise FatalKMSError(boto_failure(name, op, self.key_id, self.region, self.wording),
                                name) from None


class _AccessDenied(FatalKMSError):
    """KMS denied the call: fatal, unless `KMS.open_stored` shows it is about one value."""


class _PerValue(KMSValueError):
    """KMS refused this one value's data (a per-value outcome, never a run-level stop)."""


class _Undecryptable(_PerValue):
    """Decrypt answered that this ciphertext cannot be opened (a per-value outcome)."""


_SNAKE = {"DescribeKey": "describe_key", "Encrypt": "encrypt", "Decrypt": "decrypt",
          "ReEncrypt": "re_encrypt"}


def _blamed(op: str, params: Mapping[str, Any], exc: botocore.exceptions.ClientError,
            key_id: str) -> tuple[str, str]:
    """(operation, key) to name in a fatal message. A ReEncrypt involves two keys: KMS's
    own message (read here, never shown) says which one refused, by the permission
    (kms:ReEncryptTo is the destination's) or the key's ARN; the source otherwise."""
    if op != "ReEncrypt":
        return op, key_id
    message = str(exc.response.get("Error", {}).get("Message", ""))
    dest = str(params.get("DestinationKeyId", ""))
    source = str(params.get("SourceKeyId", ""))
    if dest == source:  # the check of a new ciphertext (destination to destination)
        return op, dest
    if "ReEncryptTo" in message or (dest and dest in message):
        return "ReEncryptTo", dest
    return "ReEncryptFrom", key_id
