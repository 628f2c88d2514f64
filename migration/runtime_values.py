"""The application helper's handling of secrets and stored values (`migration.runtime`):
each check raises without ever letting the value into the error, nor chaining an error
that holds it (a UnicodeError holds the text or the bytes), and the messages it raises.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from .errors import SecretDecryptError

__all__ = [
    "EMPTY_VALUE",
    "NOT_A_FORMAT",
    "NOT_ENCODABLE",
    "NOT_UTF8",
    "NO_FERNET_KEY_OPENS",
    "as_text",
    "checked_context",
    "decode_guide_base64",
    "plain_bytes",
    "utf8",
]

NOT_A_FORMAT = (
    "the value is neither a Fernet token nor a KMS ciphertext (standard base64 of a "
    "CiphertextBlob)"
)
EMPTY_VALUE = "the value is empty (NULL or ''): there is nothing to decrypt"
NO_FERNET_KEY_OPENS = (
    "no Fernet key opens this token (corrupt, or made with a key that is in neither "
    "ENCRYPTION_KEY nor ENCRYPTION_KEY_LEGACY)"
)
NOT_UTF8 = "the decrypted secret is not UTF-8 text"
NOT_ENCODABLE = (
    "the secret cannot be encoded as UTF-8 (it holds a lone surrogate, e.g. from a "
    "surrogateescape decode): pass the secret as valid text"
)


def plain_bytes(plaintext: str) -> bytes:
    if not isinstance(plaintext, str):
        raise TypeError(f"encrypt_secret takes a str, not {type(plaintext).__name__}")
    data: bytes | None
    try:
        data = plaintext.encode("utf-8")
    except UnicodeEncodeError:  # its .object, args and repr hold the whole secret
        data = None
    if data is None:  # raised here, outside the except, so nothing chains to that error
        raise ValueError(NOT_ENCODABLE)
    return data


def utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    raise SecretDecryptError(NOT_UTF8)  # outside the except: the error holds the bytes


def checked_context(context: Mapping[str, str] | None) -> dict[str, str] | None:
    if not context:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise TypeError(
            "an encryption context maps str to str: build it with "
            "encryption_context(table, column, pk)"
        )
    encodable = True
    try:
        for k, v in context.items():
            k.encode("utf-8")
            v.encode("utf-8")
    except UnicodeEncodeError:  # it would hold the text
        encodable = False
    if not encodable:
        raise ValueError("the encryption context holds text that cannot be encoded as UTF-8 "
                         "(a lone surrogate): pass valid text")
    return dict(context)


def as_text(value: object) -> str:
    """The stored value as text; bytes from a BLOB column are taken as ASCII."""
    if isinstance(value, str):
        return value
    text: str | None = None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            text = None
    if text is None:
        raise SecretDecryptError(EMPTY_VALUE if value is None else NOT_A_FORMAT)
    return text


def decode_guide_base64(text: str) -> bytes | None:
    """The blob behind base64 that is not the strict stored format (`classify` says OTHER),
    decoded as the guide's helper decodes it.

    The guide uses non-strict ``base64.b64decode``, which skips characters outside the
    alphabet (newlines, spaces), so a value it wrote or reads is read here too. Anything
    that does not decode to a KMS ciphertext is refused by KMS itself.
    """
    try:
        blob = base64.b64decode(text.encode("utf-8"), validate=False)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        blob = None
    return blob or None
