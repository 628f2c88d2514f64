"""The one retry layer and the one classification of KMS errors, under every KMS call of
the tool (`KMSCaller.call`); `kms.KMS` builds the operations on it (see kms.py for why
retries live here only)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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

from .errors import FatalKMSError, KMSValueError, TransientKMSError
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
from .kms_keys import KeyInfo, blamed
from .kms_pool import CallPool
from .logs import get_logger
from .ratelimit import RateLimiter

__all__ = ["AccessDenied", "KMSCaller", "PerValue", "RetryPolicy", "Undecryptable"]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry one transient KMS error before the run stops; `sleep` waits
    between attempts (tests pass their own)."""

    max_attempts: int = 10
    max_wait: float = 20.0
    multiplier: float = 0.05
    sleep: Callable[[float], None] = time.sleep


class KMSCaller(CallPool):
    """KMS calls under the retry policy and the rate limit, at bounded concurrency
    (`CallPool`), each error classified once: transient (retried), per-value, or fatal."""

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
        self.key: KeyInfo | None = None  # the run's key, once described
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

    def _count_retry(self, state: RetryCallState) -> None:
        with self._lock:
            self.retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        # The cause is KMS's error code or the transport error's class: never a value.
        get_logger().debug("kms_retry", cause=str(exc) if exc is not None else None,
                           attempt=state.attempt_number)

    def _fatal(self, code: str, op: str, key: str | None = None) -> FatalKMSError:
        return FatalKMSError(fatal_message(code, op, key or self.key_id, self.region,
                                           self.wording), code)

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        """One KMS call (DescribeKey, Encrypt, Decrypt, ReEncrypt) under the retry policy and
        the rate limit. FatalKMSError when it fails for good; KMSValueError (its text the
        code) when KMS refused this one value's data."""
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
                raise Undecryptable(code) from None
            # A ValidationException can be about the request as a whole (a malformed key id),
            # but the key is DescribeKey'd before any Encrypt or Decrypt (self.key is set by
            # `describe`, or handed down by the process that described it): from then on the
            # key id is known good, and a ValidationException is about this value's data.
            if (op in {"Encrypt", "Decrypt", "ReEncrypt"} and code in VALUE_CODES
                    and self.key is not None):
                raise PerValue(code) from None
            named_op, key = blamed(op, params, exc, self.key_id)
            message = fatal_message(code, named_op, key, self.region, self.wording)
            if code == "AccessDeniedException":
                raise AccessDenied(message, code, key) from None
            raise FatalKMSError(message, code, key) from None
        except CONNECTION_ERRORS as exc:
            raise TransientKMSError(type(exc).__name__, connection=True) from None
        except botocore.exceptions.NoCredentialsError:
            raise FatalKMSError(no_credentials(self.wording), "NoCredentials") from None
        except botocore.exceptions.BotoCoreError as exc:
            name = type(exc).__name__
            raise FatalKMSError(boto_failure(name, op, self.key_id, self.region, self.wording),
                                name) from None


class AccessDenied(FatalKMSError):
    """KMS denied the call: fatal, unless `KMS.open_stored` shows it is about one value."""


class PerValue(KMSValueError):
    """KMS refused this one value's data (a per-value outcome, never a run-level stop)."""


class Undecryptable(PerValue):
    """Decrypt answered that this ciphertext cannot be opened (a per-value outcome)."""


_SNAKE = {"DescribeKey": "describe_key", "Encrypt": "encrypt", "Decrypt": "decrypt",
          "ReEncrypt": "re_encrypt"}

