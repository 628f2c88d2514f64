"""The application's encrypt_secret / decrypt_secret: a drop-in for the guide's Step 3 helper.

The guide's helper picks KMS or Fernet by ``USE_AWS_KMS`` for reading too, so while a
column holds both formats (during the migration) one of its two branches always breaks.
This one reads by format instead: a value starting with ``gAAAAA`` is a Fernet token,
anything else must be base64 of a KMS ``CiphertextBlob`` (see ``codec``; surrounding
whitespace and line breaks are skipped, as the guide's non-strict decoding skips them). Only
writing follows ``USE_AWS_KMS``. The application can therefore switch before, during and
after the migration without downtime.

Configuration is the guide's environment, read at call time (an application that sets its
environment after importing this module works): ``USE_AWS_KMS``, ``AWS_KMS_KEY_ID``
(default ``alias/coinflip-master-key``), ``AWS_REGION`` (default ``us-east-1``),
``AWS_KMS_KEY_ID_PREVIOUS`` (comma-separated keys being rotated out, still accepted on
read), ``ENCRYPTION_KEY`` and ``ENCRYPTION_KEY_LEGACY`` (comma-separated, all tried on read;
writing needs only ``ENCRYPTION_KEY``). A KMS value opens only when Decrypt used
``AWS_KMS_KEY_ID`` or one of ``AWS_KMS_KEY_ID_PREVIOUS``: KMS itself would open one made
under any key the caller may use.
AWS credentials are never read here: boto3's default chain resolves them (IAM roles work).

One boto3 client per process and region is created lazily under a lock and shared by every
thread (boto3 clients are thread-safe; sessions are not, so each client gets its own
session). A forked child (gunicorn --preload, celery prefork) drops the parent's client and
makes its own. Fernet keys are parsed once per distinct set of keys.

Errors: a value that is neither format, that no Fernet key and not KMS opens, or that
was made under another KMS key, raises :class:`SecretDecryptError`, whose message never
carries the value and which is raised with no chained exception (a ``UnicodeDecodeError``
would hold the bytes). A secret that cannot be encoded as UTF-8 (a lone surrogate) raises
a ``ValueError`` without it, again with nothing chained (``UnicodeEncodeError`` holds the
whole string). Missing or malformed configuration raises ``ValueError`` naming the
variable and the key's position, never the key, as the guide does; KMS outages, throttling
beyond the retries, access denied or a disabled key propagate as botocore's own
exceptions, whose messages name the operation and key, never the data.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from cryptography.fernet import InvalidToken

from . import runtime_fernet
from .codec import (
    KMS_MAX_CIPHERTEXT,
    KMS_MAX_PLAINTEXT,
    ValueKind,
    classify,
    decode_kms,
    encode_kms,
    encryption_context,
)
from .config import DEFAULT_KEY_ID, DEFAULT_REGION, named_fernet_keys
from .errors import SecretDecryptError
from .runtime_fernet import cached_multi_fernet
from .runtime_values import (
    EMPTY_VALUE,
    NO_FERNET_KEY_OPENS,
    NOT_A_FORMAT,
    as_text,
    checked_context,
    decode_guide_base64,
    plain_bytes,
    utf8,
)

__all__ = [
    "CLIENT_CONFIG",
    "KMSEncryption",
    "SecretDecryptError",
    "decrypt_secret",
    "encrypt_secret",
    "encryption_context",
    "get_kms_encryption",
    "kms_client",
    "reset_cache",
    "use_aws_kms",
]

logger = logging.getLogger(__name__)

# botocore's standard retry mode is the only retry layer on the application side (there is
# no tenacity loop here, unlike the migration tool): 3 attempts in all, exponential backoff
# with jitter, for throttling, 5xx and dropped connections, under botocore's client-side
# retry quota so an outage does not turn into a retry storm. Short timeouts: a request
# handler would rather fail than hang.
CLIENT_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 3},
    connect_timeout=5,
    read_timeout=10,
    max_pool_connections=50,  # one pool shared by all threads; botocore's default is 10
)

# Decrypt's answers meaning "this value cannot be opened": corrupt, made under another key,
# or read with another encryption context than it was written with. Anything else (access
# denied, disabled key, throttling) is about the service, not the value, and propagates.
_UNOPENABLE = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})

_OTHER_KEY = (
    "the value was made under a KMS key that is neither AWS_KMS_KEY_ID nor one of "
    "AWS_KMS_KEY_ID_PREVIOUS: it was not written by this application (planted or restored "
    "from elsewhere); if it is from a key being rotated out, add that key to "
    "AWS_KMS_KEY_ID_PREVIOUS"
)
# Pinned Decrypt answers meaning "the ciphertext is not under this key": real KMS says
# IncorrectKeyException; moto (and a key policy that does not cover it) AccessDenied.
_NOT_THIS_KEY = frozenset({
    "IncorrectKeyException", "AccessDeniedException", "NotFoundException",
    "InvalidCiphertextException",
})

_client_lock = threading.Lock()
_clients: dict[str, Any] = {}
_arn_lock = threading.Lock()
# (region, key id as configured: an alias or a key id) -> the key ARNs KMS confirmed for it.
_confirmed_arns: dict[tuple[str, str], frozenset[str]] = {}


# -- configuration and caches -----------------------------------------------------------

def use_aws_kms() -> bool:
    """Whether new secrets go to KMS: ``USE_AWS_KMS=true``, read now, as the guide reads it."""
    return os.environ.get("USE_AWS_KMS", "").lower() == "true"


def kms_client(region: str | None = None) -> Any:
    """The process's shared boto3 KMS client for `region`, created on first use.

    No credentials are passed: boto3's default chain finds them (environment, profile, IAM
    role, refreshed as they expire), and ``AWS_ENDPOINT_URL_KMS`` is honoured.
    """
    region = region or os.environ.get("AWS_REGION") or DEFAULT_REGION
    client = _clients.get(region)
    if client is None:
        with _client_lock:
            client = _clients.get(region)
            if client is None:
                client = boto3.session.Session().client(
                    "kms", region_name=region, config=CLIENT_CONFIG
                )
                _clients[region] = client
                logger.debug("KMS client created for region %s", region)
    return client


def reset_cache() -> None:
    """Forget the cached KMS clients, key ARNs and Fernet keys (tests; after rotating keys
    in place)."""
    with _client_lock:
        _clients.clear()
    with _arn_lock:
        _confirmed_arns.clear()
    runtime_fernet.clear()


def previous_key_ids_env() -> tuple[str, ...]:
    """``AWS_KMS_KEY_ID_PREVIOUS``: the keys being rotated out, still accepted on read."""
    raw = os.environ.get("AWS_KMS_KEY_ID_PREVIOUS", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _is_key_arn(key_id: str) -> bool:
    return key_id.startswith("arn:") and ":key/" in key_id


def _is_alias(key_id: str) -> bool:
    return key_id.startswith("alias/") or (key_id.startswith("arn:") and ":alias/" in key_id)


def _names(key_id: str, arn: str, region: str) -> bool:
    """Whether the configured `key_id` is the key whose ARN is `arn`, without a call: a key
    ARN is compared, a bare key id matched against the ARN's, an alias only once KMS has
    confirmed which key it names (cached)."""
    if _is_key_arn(key_id):
        return arn == key_id
    if not _is_alias(key_id):
        return arn.endswith(f":key/{key_id}")
    return arn in _confirmed_arns.get((region, key_id), frozenset())


def _confirm(region: str, key_id: str, arn: str) -> None:
    with _arn_lock:
        known = _confirmed_arns.get((region, key_id), frozenset())
        _confirmed_arns[(region, key_id)] = known | {arn}


def _forget_after_fork() -> None:
    # A client's connection pool must not be shared across fork, and a lock held by another
    # thread at fork time would never be released in the child: start over with new ones.
    global _client_lock, _clients, _arn_lock
    _client_lock, _clients = threading.Lock(), {}
    _arn_lock = threading.Lock()  # the ARNs stay: what KMS confirmed is still true


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _fernet_keys(encryption_key: str | None) -> tuple[tuple[str, str], ...]:
    """(name, key): the current key (the argument, else ENCRYPTION_KEY) first, then the
    legacy keys, each named by where it comes from and its position (never its value)."""
    return named_fernet_keys(os.environ, encryption_key)


# -- shared pieces ----------------------------------------------------------------------

def _decrypt(
    value: object,
    encryption_key: str | None,
    context: Mapping[str, str] | None,
    kms: KMSEncryption | None,
) -> str:
    """Open a stored value by its format: Fernet with the keys, anything else with KMS."""
    # Surrounding whitespace (a trailing newline from a file or a form) is read, as the
    # guide's helper reads it: Fernet and its non-strict base64 both skip it.
    text = as_text(value).strip()
    kind = classify(text)
    if kind is ValueKind.EMPTY:
        raise SecretDecryptError(EMPTY_VALUE)
    if kind is ValueKind.FERNET:
        # Fernet has no encryption context: a Fernet value opens wherever it is copied,
        # which is one reason to migrate. `context` only binds KMS values.
        multi = cached_multi_fernet(_fernet_keys(encryption_key))
        opened: bytes | None
        try:
            opened = multi.decrypt(text.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            opened = None
        if opened is None:
            raise SecretDecryptError(NO_FERNET_KEY_OPENS)
        return utf8(opened)
    blob = decode_kms(text) if kind is ValueKind.KMS else decode_guide_base64(text)
    if blob is None or len(blob) > KMS_MAX_CIPHERTEXT:
        raise SecretDecryptError(NOT_A_FORMAT)
    return (kms or KMSEncryption())._decrypt_blob(blob, context)


# -- the guide's API --------------------------------------------------------------------

class KMSEncryption:
    """The guide's KMS manager, on the process's shared client, reading both formats.

    ``region`` defaults to ``AWS_REGION`` (else us-east-1), ``key_id`` to
    ``AWS_KMS_KEY_ID`` (else alias/coinflip-master-key) and ``previous_key_ids`` to
    ``AWS_KMS_KEY_ID_PREVIOUS`` (comma-separated), read when the object is made. Writing
    uses ``key_id``; reading accepts a KMS value only when it was made under ``key_id`` or
    one of ``previous_key_ids``. ``client`` is for tests and special set-ups; by default
    the shared client is used.
    """

    def __init__(
        self, region: str | None = None, key_id: str | None = None, client: Any = None,
        previous_key_ids: Sequence[str] | None = None,
    ) -> None:
        self.region = region or os.environ.get("AWS_REGION") or DEFAULT_REGION
        self.key_id = key_id or os.environ.get("AWS_KMS_KEY_ID") or DEFAULT_KEY_ID
        previous = previous_key_ids if previous_key_ids is not None else previous_key_ids_env()
        self.previous_key_ids = tuple(k for k in previous if k and k != self.key_id)
        self._client = client

    @property
    def kms(self) -> Any:
        """The boto3 KMS client (the guide's attribute name)."""
        return self._client if self._client is not None else kms_client(self.region)

    def encrypt_secret(self, plaintext: str, context: Mapping[str, str] | None = None) -> str:
        """KMS-encrypt a secret under the key; return standard base64 of the blob.

        With `context`, the ciphertext only decrypts with the very same context.
        """
        data = plain_bytes(plaintext)
        if len(data) > KMS_MAX_PLAINTEXT:
            raise ValueError(
                f"the secret is {len(data)} bytes, over KMS's {KMS_MAX_PLAINTEXT}-byte Encrypt "
                "limit: encrypt it with a data key (envelope encryption) instead"
            )
        params: dict[str, Any] = {"KeyId": self.key_id, "Plaintext": data}
        ctx = checked_context(context)
        if ctx:
            params["EncryptionContext"] = ctx
        response = self.kms.encrypt(**params)
        arn = response.get("KeyId")
        if isinstance(arn, str) and _is_alias(self.key_id):
            _confirm(self.region, self.key_id, arn)  # KMS just said which key it names
        blob: bytes = response["CiphertextBlob"]
        return encode_kms(blob)

    def decrypt_secret(self, ciphertext: str, context: Mapping[str, str] | None = None) -> str:
        """Decrypt a stored value, KMS ciphertext or Fernet token alike (Fernet keys from env).

        Raises SecretDecryptError when the value is neither format or nothing opens it.
        """
        return _decrypt(ciphertext, None, context, self)

    def _decrypt_blob(self, blob: bytes, context: Mapping[str, str] | None) -> str:
        params: dict[str, Any] = {"CiphertextBlob": blob}
        ctx = checked_context(context)
        if ctx:
            params["EncryptionContext"] = ctx
        code = ""
        try:
            response: dict[str, Any] | None = self.kms.decrypt(**params)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in _UNOPENABLE:
                raise  # the service, not the value: outage, access, key state
            response = None
        if response is None:
            raise SecretDecryptError(
                f"KMS could not decrypt the value ({code}): it is corrupt, was made under "
                "another key, or was written with another encryption context than the one "
                "given (a ciphertext bound to one row does not open in another)"
            )
        arn = str(response.get("KeyId") or "")
        if not self._accepts(arn, params):
            raise SecretDecryptError(_OTHER_KEY)
        plaintext: bytes = response["Plaintext"]
        return utf8(plaintext)

    def _accepts(self, arn: str, params: Mapping[str, Any]) -> bool:
        """Whether the key `arn` that Decrypt used is one this object was given.

        KMS's Decrypt opens a ciphertext under any key the caller may use, and the guide's
        policy allows every key of the account, so a value planted under another key would
        open. Key ARNs and key ids are compared with no call. An alias is resolved to its
        key once per process: by a Decrypt of this very value pinned to the alias (KMS
        refuses it unless the alias names the key), which needs no kms:DescribeKey, and
        cached (an Encrypt under the alias resolves it too).
        """
        allowed = (self.key_id, *self.previous_key_ids)
        if arn and any(_names(k, arn, self.region) for k in allowed):
            return True
        if not arn:
            return False
        for key_id in allowed:
            if not _is_alias(key_id):
                continue
            confirmed: dict[str, Any] | None
            try:
                confirmed = self.kms.decrypt(**params, KeyId=key_id)
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code not in _NOT_THIS_KEY:
                    raise  # the service, not the key: throttling, outage
                confirmed = None
            if confirmed is not None and confirmed.get("KeyId") == arn:
                _confirm(self.region, key_id, arn)
                return True
        return False


def get_kms_encryption() -> KMSEncryption | None:
    """The guide's accessor: a KMSEncryption when ``USE_AWS_KMS=true``, else None."""
    return KMSEncryption() if use_aws_kms() else None


def encrypt_secret(
    plaintext: str,
    encryption_key: str | None = None,
    *,
    context: Mapping[str, str] | None = None,
) -> str:
    """Encrypt a new secret: KMS when ``USE_AWS_KMS=true``, else Fernet (the guide's rule).

    `encryption_key` overrides ``ENCRYPTION_KEY`` for Fernet (ignored for KMS, as in the
    guide). `context` binds a KMS ciphertext to where it lives; Fernet ignores it.
    """
    if use_aws_kms():
        return KMSEncryption().encrypt_secret(plaintext, context=context)
    data = plain_bytes(plaintext)
    # Writing needs the current key only: a malformed legacy key (needed only to read old
    # tokens) does not stop the application from storing new secrets.
    current = named_fernet_keys({"ENCRYPTION_KEY": os.environ.get("ENCRYPTION_KEY", "")},
                                encryption_key)
    if not current:
        raise ValueError("ENCRYPTION_KEY not set: export the application's Fernet key")
    return cached_multi_fernet(current).encrypt(data).decode("ascii")


def decrypt_secret(
    ciphertext: str,
    encryption_key: str | None = None,
    *,
    context: Mapping[str, str] | None = None,
) -> str:
    """Decrypt a stored secret whatever ``USE_AWS_KMS`` says, telling the formats apart.

    Fernet tokens open with `encryption_key` (else ``ENCRYPTION_KEY``) or any
    ``ENCRYPTION_KEY_LEGACY`` key; everything else goes to KMS, with `context` if given.
    Raises SecretDecryptError when the value is neither format or nothing opens it.
    """
    return _decrypt(ciphertext, encryption_key, context, None)
