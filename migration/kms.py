"""The one place that talks to KMS: a shared boto3 client, the retry policy, concurrency.

Retries live in one layer only. botocore's own retries are switched off
(``total_max_attempts=1``) and every single KMS call is wrapped in a tenacity policy that
retries transient errors (throttling, KMS internal errors, dependency timeouts, dropped
connections) with full-jitter exponential backoff, a bounded number of times. Had both
layers retried, botocore's 3 attempts times ours would multiply silently.

Fatal errors (access denied, key not found, disabled, pending deletion, wrong key usage,
bad credentials) are raised as :class:`FatalKMSError` with one line naming the key and
the likely fix; callers stop the run before the batch in flight writes anything.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from .codec import KMS_MAX_CIPHERTEXT, KMS_MAX_PLAINTEXT
from .config import Settings
from .errors import ConfigError, FatalKMSError, TransientKMSError

__all__ = [
    "KMS",
    "KeyInfo",
    "Opening",
    "Pending",
    "RateLimiter",
    "RetryPolicy",
    "make_client",
    "validate_region",
]

REASON_EMPTY = f"plaintext is empty (KMS Encrypt takes 1 to {KMS_MAX_PLAINTEXT} bytes)"

T = TypeVar("T")
R = TypeVar("R")

TRANSIENT_CODES = frozenset({
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "KMSInternalException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "DependencyTimeoutException",
    "KeyUnavailableException",
})
CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "ExpiredTokenException",
    "ExpiredToken",
    "AuthFailure",
})
# Per-value answers of Decrypt: the ciphertext is not one this key (or any) opens.
UNDECRYPTABLE_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
# Per-value answers of Encrypt or Decrypt once the key is described: the request's data (a
# plaintext, a ciphertext, an encryption context) broke a constraint. See `KMS._classify`.
VALUE_CODES = frozenset({"ValidationException"})
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)
_REGION_RE = re.compile(r"^[a-z]{2,4}(-[a-z]+)+-\d{1,2}$")  # eusc-de-east-1 has 4


def validate_region(region: str) -> str:
    """Refuse a region name that no AWS partition could have, before any call is made."""
    if not _REGION_RE.match(region):
        raise ConfigError(
            f"'{region}' is not an AWS region name (like us-east-1): "
            "fix --region or AWS_REGION to the region the KMS key lives in"
        )
    return region


def make_client(region: str, concurrency: int) -> Any:
    """One boto3 KMS client for the whole run, shared by every worker thread.

    Credentials and endpoint come from boto3's own resolution (environment, profile,
    IAM role; ``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL``): nothing is passed here.
    """
    config = Config(
        region_name=region,
        max_pool_connections=max(concurrency, 10),
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    try:
        client = boto3.session.Session().client("kms", config=config)
        _check_endpoint(str(client.meta.endpoint_url))
    except Exception as exc:  # boto3 raises plain ValueErrors here too
        raise ConfigError(aws_settings_problem(exc)) from None
    return client


def _check_endpoint(url: str) -> None:
    """Raise ValueError for an endpoint botocore accepted but no request can use (another
    scheme, no host, a port out of range), before the first call instead of at it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    _ = parts.port  # ValueError when out of range or not a number
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("the KMS endpoint URL is not http(s)://host[:port]")


def aws_settings_problem(exc: BaseException) -> str:
    """One line for an error boto3 raised while building a client from the environment:
    what is wrong and what to fix, without the exception's own text (an endpoint URL or a
    config line may hold a credential)."""
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return ("the AWS profile in AWS_PROFILE (or AWS_DEFAULT_PROFILE) is not in the AWS "
                "config files: fix or unset it, or set AWS_CONFIG_FILE; nothing was written")
    if isinstance(exc, ValueError):  # botocore: "Invalid endpoint: ...", urllib: "... URL"
        return ("the KMS endpoint (AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL or endpoint_url in "
                "the AWS config) is not a valid URL: fix or unset it")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return (f"the AWS settings cannot be used ({type(exc).__name__}): check AWS_PROFILE, "
                "AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE, AWS_ENDPOINT_URL_KMS and the "
                "AWS_* variables")
    return (f"cannot create the KMS client from the AWS settings ({type(exc).__name__}): check "
            "AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL_KMS and the AWS_* variables")


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
    """How hard to retry one transient KMS error before the run stops."""

    max_attempts: int = 10
    max_wait: float = 20.0
    multiplier: float = 0.05


class RateLimiter:
    """A token bucket over every KMS call of a run, adapting to throttling (AIMD).

    At most ``rate * t + burst`` calls start in any t seconds. When KMS throttles, the rate
    is halved (at most once per `cooldown`, since one burst of throttles is one signal) and
    then recovers additively, by `recovery` of the configured rate per second, so the run
    backs off fast from a live application's traffic and returns to it slowly.

    Callers that find no token reserve one (the bucket goes negative) and sleep outside
    the lock for exactly their deficit: fair, and no busy waiting.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        min_rate: float = 1.0,
        decrease: float = 0.5,
        recovery: float = 0.02,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.max_rate = rate
        self.burst = burst if burst is not None else max(1.0, min(rate, 32.0))
        self.min_rate = min(min_rate, rate)
        self.decrease, self.recovery, self.cooldown = decrease, recovery, cooldown
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        now = clock()
        self._tokens = self.burst
        self._stamp = now
        self._base = rate  # the rate right after the last decrease
        self._cut_at: float | None = None  # when it happened
        self.throttles = 0

    def rate_at(self, now: float) -> float:
        if self._cut_at is None:
            return self.max_rate
        grown = self._base + self.recovery * self.max_rate * (now - self._cut_at)
        return min(self.max_rate, grown)

    @property
    def rate(self) -> float:
        with self._lock:
            return self.rate_at(self._clock())

    def acquire(self) -> None:
        """Block until one call may start."""
        with self._lock:
            now = self._clock()
            rate = self.rate_at(now)
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= 1
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)

    def set_max_rate(self, rate: float) -> None:
        """Change the configured rate (a worker's share of a run's limit). Tokens earned so
        far are kept; a rate cut by throttling keeps its proportion of the new rate."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate_at(now))
            self._stamp = now
            self._base = self._base * rate / self.max_rate
            self.max_rate = rate
            self.min_rate = min(self.min_rate, rate)
            self._base = max(self.min_rate, self._base)
            self.burst = max(1.0, min(rate, 32.0))
            self._tokens = min(self._tokens, self.burst)

    def on_throttle(self) -> None:
        """KMS said slow down: cut the rate multiplicatively."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if self._cut_at is not None and now - self._cut_at < self.cooldown:
                return
            self._base = max(self.min_rate, self.rate_at(now) * self.decrease)
            self._cut_at = now


THROTTLE_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException",
                            "RequestLimitExceeded"})


class Pending(Generic[R]):
    """Work handed to the KMS pool: wait for it in order, or stop what has not started."""

    def __init__(self) -> None:
        self.futures: list[Future[list[R]]] = []
        self._stop = threading.Event()

    def run(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        out: list[R] = []
        for item in items:
            if self._stop.is_set():
                raise CancelledError
            out.append(fn(item))
        return out

    def result(self) -> list[R]:
        """The results in item order; the first exception stops the rest and is raised."""
        if not self.futures:
            return []
        done, _ = wait(self.futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if exc is not None:
                self.cancel()
                raise exc
        return [r for f in self.futures for r in f.result()]

    def cancel(self) -> None:
        """Stop what has not started (a call in flight finishes on its own)."""
        self._stop.set()
        for f in self.futures:
            f.cancel()


class KMS:
    """Encrypt, decrypt and verify with one key, concurrently, under the retry policy."""

    def __init__(
        self,
        client: Any,
        key_id: str,
        region: str,
        *,
        concurrency: int = 16,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.key_id = key_id
        self.region = region
        self.concurrency = concurrency
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.retries = 0
        self.requests = 0
        self.key: KeyInfo | None = None
        self._decrypt_allowed: bool | None = None  # see _can_decrypt

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> KMS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- single calls ------------------------------------------------------------------

    def describe(self) -> KeyInfo:
        """Resolve the key and refuse one that cannot encrypt (disabled, deleting, misused)."""
        meta = self._call("DescribeKey", KeyId=self.key_id)["KeyMetadata"]
        key = self.key_id
        state = meta.get("KeyState") or ("Enabled" if meta.get("Enabled") else "Disabled")
        if state == "Disabled":
            raise FatalKMSError(_message("DisabledException", "DescribeKey", key, self.region))
        if state in {"PendingDeletion", "PendingReplicaDeletion"}:
            raise FatalKMSError(
                _message("KMSInvalidStateException", "DescribeKey", key, self.region)
            )
        if state not in {"Enabled"}:
            raise FatalKMSError(
                f"KMS key {key} is in state {state}, not Enabled: make it Enabled "
                "(aws kms describe-key shows why) and re-run; nothing was written"
            )
        if meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT" or meta.get(
            "KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT")
        ) != "SYMMETRIC_DEFAULT":
            raise FatalKMSError(
                _message("InvalidKeyUsageException", "DescribeKey", key, self.region)
            )
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
        blob: bytes = self._call("Encrypt", KeyId=key, Plaintext=plaintext, **extra)[
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
            resp = self._call("Decrypt", CiphertextBlob=blob, **extra)
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
            opened_by = str(self._call("Decrypt", CiphertextBlob=blob, KeyId=arn,
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
            opened_by = str(self._call("Decrypt", CiphertextBlob=blob, **extra).get("KeyId")
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

    # -- concurrency -------------------------------------------------------------------

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Run fn over items with up to `concurrency` calls in flight, results in order.

        The first exception (a fatal KMS error) stops what has not started and is raised:
        the caller then writes nothing of this batch.
        """
        return self.submit(fn, items).result()

    def submit(self, fn: Callable[[T], R], items: Sequence[T]) -> Pending[R]:
        """Start fn over items on the shared pool and return at once.

        The items are cut into `concurrency` contiguous slices, one pool task each, run in
        order within the slice: a handful of tasks per batch instead of one per value (per
        value, handing work to the pool cost the main thread more than the database writes).
        The pool has `concurrency` threads, so however much work is queued, no more than
        `concurrency` KMS calls are ever in flight.
        """
        pending: Pending[R] = Pending()
        if not items:
            return pending
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kms")
        n = min(self.concurrency, len(items))
        size, extra = divmod(len(items), n)
        start = 0
        for k in range(n):
            end = start + size + (1 if k < extra else 0)
            pending.futures.append(self._pool.submit(pending.run, fn, items[start:end]))
            start = end
        return pending


    # -- the retry loop ----------------------------------------------------------------

    def _count_retry(self, state: RetryCallState) -> None:
        with self._lock:
            self.retries += 1

    def _call(self, op: str, **params: Any) -> dict[str, Any]:
        method = getattr(self.client, _SNAKE[op])
        retrying = Retrying(
            retry=retry_if_exception_type(TransientKMSError),
            stop=stop_after_attempt(self.policy.max_attempts),
            wait=wait_random_exponential(
                multiplier=self.policy.multiplier, max=self.policy.max_wait
            ),
            sleep=self._sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if self.limiter is not None:
                        self.limiter.acquire()
                    with self._lock:
                        self.requests += 1
                    response: dict[str, Any] = self._classify(op, method, params)
                    return response
        except TransientKMSError as exc:
            raise FatalKMSError(
                f"KMS kept failing with {exc} on key {self.key_id} after "
                f"{self.policy.max_attempts} attempts: lower --concurrency or wait, then re-run "
                "(the run resumes where it stopped; the batch in flight was not written)"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _classify(self, op: str, method: Callable[..., Any], params: dict[str, Any]) -> Any:
        try:
            return method(**params)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                if code in THROTTLE_CODES and self.limiter is not None:
                    self.limiter.on_throttle()
                raise TransientKMSError(code) from None
            if op == "Decrypt" and code in UNDECRYPTABLE_CODES:
                raise _Undecryptable(code) from None
            # A ValidationException can be about the request as a whole (a malformed key id),
            # but the key is DescribeKey'd before any Encrypt or Decrypt (self.key is set by
            # `describe`, or handed down by the process that described it): from then on the
            # key id is known good, and a ValidationException is about this value's data.
            if op in {"Encrypt", "Decrypt"} and code in VALUE_CODES and self.key is not None:
                raise _PerValue(code) from None
            if code == "AccessDeniedException":
                raise _AccessDenied(_message(code, op, self.key_id, self.region)) from None
            raise FatalKMSError(_message(code, op, self.key_id, self.region)) from None
        except CONNECTION_ERRORS as exc:
            raise TransientKMSError(type(exc).__name__) from None
        except botocore.exceptions.NoCredentialsError:
            raise FatalKMSError(
                "no AWS credentials found: configure the default credential chain "
                "(an IAM role, AWS_PROFILE, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the "
                "environment) and re-run; nothing was written"
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise FatalKMSError(
                f"KMS call {op} failed ({type(exc).__name__}) for key {self.key_id} in region "
                f"{self.region}: check the endpoint and credentials; nothing was written"
            ) from None


class _AccessDenied(FatalKMSError):
    """KMS denied the call: fatal, unless `KMS.open_stored` shows it is about one value."""


class _PerValue(Exception):
    """KMS refused this one value's data (a per-value outcome, never a run-level stop)."""


class _Undecryptable(_PerValue):
    """Decrypt answered that this ciphertext cannot be opened (a per-value outcome)."""


_SNAKE = {"DescribeKey": "describe_key", "Encrypt": "encrypt", "Decrypt": "decrypt"}


def _message(code: str, op: str, key: str, region: str) -> str:
    """One line: what KMS said about the key and what the operator should do about it."""
    tail = "re-run (the run resumes where it stopped; nothing of the batch in flight was written)"
    if code == "AccessDeniedException":
        return (
            f"KMS denied {op} on key {key} in {region} (AccessDeniedException): grant the caller "
            f"kms:{op} on this key (aws sts get-caller-identity shows the caller; "
            f"aws kms describe-key --key-id {key} checks access), then {tail}"
        )
    if code == "NotFoundException":
        return (
            f"KMS key {key} was not found in region {region} (NotFoundException): check "
            f"--key-id / AWS_KMS_KEY_ID and --region (aws kms list-aliases --region {region}), "
            f"then {tail}"
        )
    if code == "DisabledException":
        return (
            f"KMS key {key} is disabled (DisabledException): enable it "
            f"(aws kms enable-key --key-id {key} --region {region}), then {tail}"
        )
    if code == "KMSInvalidStateException":
        return (
            f"KMS key {key} is pending deletion or otherwise unusable (KMSInvalidStateException):"
            f" cancel the deletion (aws kms cancel-key-deletion --key-id {key}), enable it, "
            f"then {tail}"
        )
    if code == "InvalidKeyUsageException":
        return (
            f"KMS key {key} is not a symmetric ENCRYPT_DECRYPT key (InvalidKeyUsageException): "
            f"use a key created with --key-usage ENCRYPT_DECRYPT, then {tail}"
        )
    if code in CREDENTIAL_CODES:
        return (
            f"AWS rejected the credentials ({code}) calling {op} on key {key}: check the "
            f"default credential chain (aws sts get-caller-identity), then {tail}"
        )
    if code == "InvalidArnException":
        return (
            f"KMS key {key} is not a valid key id, ARN or alias (InvalidArnException): "
            f"fix --key-id / AWS_KMS_KEY_ID, then {tail}"
        )
    return f"KMS refused {op} on key {key} in {region} ({code}): fix the cause, then {tail}"


def make_kms(settings: Settings) -> KMS:
    """The run's KMS: one boto3 client, credentials and endpoint from boto3's own chain."""
    client = make_client(settings.region, settings.concurrency)
    limiter = RateLimiter(settings.max_kms_rps) if settings.max_kms_rps > 0 else None
    return KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency,
               limiter=limiter)
