"""Unit tests of migration/codec.py: value shapes, MultiFernet opening, the stored KMS text."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.fernet import Fernet

from migration.codec import (
    FERNET_PREFIX,
    FernetCodec,
    ValueKind,
    classify,
    decode_kms,
    encode_kms,
)
from migration.errors import ConfigError, KmsMigrateError

GUIDE_EXAMPLE_KEY = "my-super-secret-key-12345"  # the guide's placeholder: not a Fernet key


# -- classify ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "", b""])
def test_classify_calls_null_and_empty_values_empty(value: object) -> None:
    assert classify(value) is ValueKind.EMPTY


def test_classify_calls_a_real_fernet_token_fernet() -> None:
    token = Fernet(Fernet.generate_key()).encrypt(b"escrow secret").decode()
    assert token.startswith(FERNET_PREFIX)
    assert classify(token) is ValueKind.FERNET


def test_classify_calls_stored_kms_base64_kms() -> None:
    # Real KMS ciphertext blobs start with 0x01; the stored text is standard base64 of it.
    stored = encode_kms(b"\x01\x02\x02\x00x" + os.urandom(180))
    assert classify(stored) is ValueKind.KMS


@pytest.mark.parametrize(
    "garbage", ["hello", "   ", "GAAAAABnot-fernet", "gAAAA", 42, b"gAAAAAbytes"]
)
def test_classify_calls_garbage_other_not_fernet(garbage: object) -> None:
    assert classify(garbage) is ValueKind.OTHER


def test_no_blob_whose_first_byte_is_not_0x80_ever_looks_like_fernet() -> None:
    # The whole format split rests on this: only a 0x80 version byte gives the gAAAAA prefix.
    tail = b"\x00" * 40
    for first in range(256):
        if first == 0x80:
            continue
        assert classify(encode_kms(bytes([first]) + tail)) is ValueKind.KMS, first


# -- FernetCodec ------------------------------------------------------------------------------

def test_codec_opens_tokens_of_the_current_key() -> None:
    current = Fernet.generate_key().decode()
    codec = FernetCodec([current])
    token = Fernet(current.encode()).encrypt(b"current secret").decode()
    assert codec.decrypt(token) == b"current secret"


def test_codec_opens_tokens_of_every_legacy_key() -> None:
    current, old1, old2 = (Fernet.generate_key().decode() for _ in range(3))
    codec = FernetCodec([current, old1, old2])
    for n, key in enumerate((old1, old2)):
        token = Fernet(key.encode()).encrypt(f"legacy {n}".encode()).decode()
        assert codec.decrypt(token) == f"legacy {n}".encode()


def test_codec_returns_none_for_a_token_of_an_unknown_key() -> None:
    codec = FernetCodec([Fernet.generate_key().decode()])
    stranger = Fernet(Fernet.generate_key()).encrypt(b"someone else's").decode()
    assert codec.decrypt(stranger) is None


def test_codec_returns_none_for_a_corrupt_token() -> None:
    key = Fernet.generate_key().decode()
    codec = FernetCodec([key])
    token = Fernet(key.encode()).encrypt(b"secret").decode()
    flipped = token[:30] + ("A" if token[30] != "A" else "B") + token[31:]
    truncated = token[:-12] + "AAAAAAAAAAA="
    for bad in (flipped, truncated, FERNET_PREFIX + "not-a-token", token[:20], "é" + token):
        assert codec.decrypt(bad) is None, bad


def test_malformed_key_is_a_config_error_that_never_shows_the_key() -> None:
    with pytest.raises(ConfigError) as excinfo:
        FernetCodec([GUIDE_EXAMPLE_KEY])
    err = excinfo.value
    assert "ENCRYPTION_KEY" in str(err)
    assert "not a valid Fernet key" in str(err)
    assert GUIDE_EXAMPLE_KEY not in str(err)
    assert GUIDE_EXAMPLE_KEY not in repr(err)
    assert "12345" not in str(err)
    # `from None`: no chained exception can carry the key into a traceback either.
    assert err.__cause__ is None and err.__suppress_context__
    assert isinstance(err, KmsMigrateError) and err.exit_code == 2


def test_malformed_legacy_key_is_named_by_position_and_not_shown() -> None:
    good = Fernet.generate_key().decode()
    short = base64.urlsafe_b64encode(b"k" * 16).decode()  # valid base64, 16 bytes: too short
    with pytest.raises(ConfigError) as excinfo:
        FernetCodec([good, good, short])
    assert "ENCRYPTION_KEY_LEGACY key #2" in str(excinfo.value)
    assert short not in str(excinfo.value)
    assert good not in str(excinfo.value)


@pytest.mark.parametrize("bad", ["", "ключ-не-base64", "=" * 44])
def test_other_malformed_keys_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a valid Fernet key"):
        FernetCodec([bad])


def test_missing_key_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY is not set"):
        FernetCodec([])


# -- the stored KMS text ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 150, 300, 6144])
def test_encode_then_decode_kms_round_trips_any_blob(size: int) -> None:
    blob = os.urandom(size)
    text = encode_kms(blob)
    assert isinstance(text, str)
    assert decode_kms(text) == blob


def test_encode_kms_is_standard_base64_as_the_guide_writes_it() -> None:
    # The guide's decrypt_secret uses base64.b64decode: '+' and '/', not '-' and '_'.
    assert encode_kms(b"\xfb\xff\xbf") == "+/+/"
    assert encode_kms(b"\x01\x02") == base64.b64encode(b"\x01\x02").decode()


@pytest.mark.parametrize(
    "text",
    ["not base64!", "-_-_", "AAA", "", "é", "QUJD\nREVG", "gAAAAA*"],
)
def test_decode_kms_of_non_base64_is_none(text: str) -> None:
    assert decode_kms(text) is None
