"""Value classification, MultiFernet decryption and the stored KMS text format.

The stored KMS format is the guide's: standard base64 of the ``CiphertextBlob``, no
encryption context, so the application's own ``decrypt_secret`` reads it unchanged.

A Fernet token is urlsafe base64 of ``0x80 | 8-byte big-endian timestamp | ...``; every
token minted after 1970 and before the year 2500 or so therefore starts with ``gAAAAA``.
A KMS blob starts with another byte (real KMS: ``0x01``), so its base64 never does. That
prefix is how the tool and the application tell the two formats apart without a key.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import ConfigError

__all__ = [
    "FERNET_PREFIX",
    "KMS_BLOB_OVERHEAD",
    "KMS_MAX_CIPHERTEXT",
    "KMS_MAX_PLAINTEXT",
    "BadFernetKey",
    "FernetCodec",
    "ValueKind",
    "classify",
    "column_length",
    "decode_kms",
    "encode_kms",
    "encryption_context",
    "fernet_key_ids",
    "fernet_key_label",
    "fernet_token_length",
    "fernets",
    "kms_text_length",
    "max_plaintext_fitting",
    "multi_fernet",
]

FERNET_PREFIX = "gAAAAA"
KMS_MAX_PLAINTEXT = 4096
KMS_MAX_CIPHERTEXT = 6144  # KMS Decrypt refuses a longer CiphertextBlob
# What an AWS KMS CiphertextBlob (SYMMETRIC_DEFAULT key) adds to the plaintext: a header
# naming the key material, the nonce and the GCM tag. AWS does not document the format; the
# figure commonly reported is 152 bytes (GenerateDataKey's 32-byte AES-256 data key comes
# back as a 184-byte CiphertextBlob). Rounded up to 160, so that a column sized by it has
# room to spare. moto's blobs are shorter (plaintext + 64 bytes, moto 5), so sizing by what
# a rehearsal against moto produced would be too small.
KMS_BLOB_OVERHEAD = 160
FERNET_OVERHEAD = 57  # version, timestamp, IV and HMAC around the AES-CBC ciphertext


class ValueKind(enum.Enum):
    EMPTY = "empty"  # NULL or the empty string: nothing to migrate
    FERNET = "fernet"  # shaped like a Fernet token: to migrate
    KMS = "kms"  # the stored KMS format (strict base64 of a blob): verify asks KMS to open it
    OTHER = "other"  # anything else: neither format (migrate leaves it; verify reports it)


def classify(value: object) -> ValueKind:
    """Say what a stored value is by its shape alone (no key needed).

    The one place that decides it: a Fernet token by its prefix, a KMS value by decoding as
    the stored KMS format (`decode_kms`). Whether KMS really opens a KMS value is for KMS
    to say (verify); migrate counts KMS and OTHER alike as already migrated.
    """
    if value is None or value == "" or value == b"":
        return ValueKind.EMPTY
    if not isinstance(value, str):
        return ValueKind.OTHER
    if value.startswith(FERNET_PREFIX):
        return ValueKind.FERNET
    return ValueKind.KMS if decode_kms(value) is not None else ValueKind.OTHER


def kms_text_length(plaintext_len: int) -> int:
    """The stored length (characters) of the AWS KMS ciphertext of a plaintext this long,
    sized conservatively (KMS_BLOB_OVERHEAD), base64 with padding."""
    return 4 * -(-(plaintext_len + KMS_BLOB_OVERHEAD) // 3)


def max_plaintext_fitting(length: int) -> int:
    """The longest plaintext whose AWS KMS text fits `length` characters (negative: none)."""
    return 3 * (length // 4) - KMS_BLOB_OVERHEAD


def fernet_token_length(plaintext_len: int) -> int:
    """The length of a Fernet token of a plaintext this long (AES-CBC pads to 16 bytes)."""
    raw = FERNET_OVERHEAD + 16 * (plaintext_len // 16 + 1)
    return 4 * -(-raw // 3)


def column_length(column: object) -> int | None:
    """The declared length of a text column (VARCHAR(n), CHAR(n)), None when unbounded."""
    length = getattr(getattr(column, "type", None), "length", None)
    return length if isinstance(length, int) and length > 0 else None


def encode_kms(blob: bytes) -> str:
    """Stored text of a KMS CiphertextBlob: standard base64, as the guide writes it."""
    return base64.b64encode(blob).decode("ascii")


def decode_kms(text: str) -> bytes | None:
    """The CiphertextBlob behind stored text, or None when the text is not strict base64."""
    try:
        blob = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    return blob or None


def encryption_context(table: str, column: str, pk: object) -> dict[str, str]:
    """The KMS encryption context binding a value to where it lives (opt-in).

    With it, a ciphertext copied into another row, column or table no longer decrypts.
    The application must pass the same three strings to decrypt (KMS compares exactly).
    """
    return {"table": table, "column": column, "pk": str(pk)}


class BadFernetKey(Exception):
    """A Fernet key that does not parse; carries the key's name only, never the key."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def multi_fernet(named: Sequence[tuple[str, str]]) -> MultiFernet:
    """A MultiFernet over (name, key) pairs, tried in order, for the tool (`FernetCodec`) and
    the application helper (`migration.runtime`). Raises BadFernetKey as `fernets` does."""
    return MultiFernet(fernets(named))


def fernets(named: Sequence[tuple[str, str]]) -> list[Fernet]:
    """A Fernet per (name, key) pair, in order: the one parser of Fernet keys.

    Raises BadFernetKey naming the first malformed key, outside any except clause, so no
    error it raises holds (or chains to one that holds) a key. Needs at least one key.
    """
    out: list[Fernet] = []
    for name, key in named:
        parsed: Fernet | None
        try:
            parsed = Fernet(key.encode("utf-8"))
        except (ValueError, binascii.Error, UnicodeEncodeError, TypeError):
            parsed = None
        if parsed is None:
            raise BadFernetKey(name)
        out.append(parsed)
    if not out:
        raise ValueError("no Fernet key given")
    return out


class FernetCodec:
    """Opens Fernet tokens with the current key and every legacy key, as MultiFernet does."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigError(
                "ENCRYPTION_KEY is not set: export the Fernet key the application uses "
                "(older keys go in ENCRYPTION_KEY_LEGACY, comma-separated)"
            )
        named = [("ENCRYPTION_KEY" if i == 0 else f"ENCRYPTION_KEY_LEGACY key #{i}", key)
                 for i, key in enumerate(keys)]
        bad: str | None = None
        try:
            self._each = fernets(named)
        except BadFernetKey as exc:
            bad = exc.name
        if bad is not None:
            # Never echo the key: only say which one is malformed and what a good one is.
            raise ConfigError(
                f"{bad} is not a valid Fernet key (it must be 32 bytes in url-safe "
                "base64, 44 characters ending in '='): set the key the application "
                "really encrypts with"
            ) from None
        self._multi = MultiFernet(self._each)

    def decrypt(self, token: str) -> bytes | None:
        """The plaintext a token holds, or None when no key opens it (corrupt, unknown key)."""
        try:
            return self._multi.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
            return None

    def which_key(self, token: str) -> str:
        """Which key opens a token, as verify's census names it: "current" (ENCRYPTION_KEY),
        "legacy #N" (the Nth ENCRYPTION_KEY_LEGACY key), "" (none: corrupt, unknown key).

        The first key, in MultiFernet's order, whose HMAC authenticates the token: the token
        is checked, never decrypted, so no plaintext is ever made."""
        for i, f in enumerate(self._each):
            try:
                f.extract_timestamp(token.encode("ascii"))
            except (InvalidToken, UnicodeEncodeError, ValueError, TypeError):
                continue
            return fernet_key_label(i)
        return ""


def fernet_key_label(index: int) -> str:
    """The census's name for the Fernet key at `index` of ENCRYPTION_KEY, then
    ENCRYPTION_KEY_LEGACY's keys: "current", "legacy #1", "legacy #2", ..."""
    return "current" if index == 0 else f"legacy #{index}"


KEY_ID_LABEL = b"kms-migrate fernet key id v1"


def fernet_key_ids(keys: Sequence[str]) -> list[str]:
    """An identifier per Fernet key, in order: HMAC-SHA256 of a fixed label under the
    key, 64 bits of it. It tells keys apart and reveals nothing about them (nor lets
    anyone check a guessed key faster than against any Fernet token)."""
    out: list[str] = []
    for key in keys:
        try:
            raw = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError):
            raw = key.encode()
        out.append(hmac.new(raw, KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16])
    return out
