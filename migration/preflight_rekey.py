"""Preflight of a rekey (`kms-migrate preflight --to-key KEY`): both keys, and a ReEncrypt
round trip of a stored value, as the run will make it. A rekey needs no Fernet key.

A rekey moves the KMS values from the source key (--from-key, default --key-id) and its
context (--from-encryption-context) to the destination key and context (--to-key,
--to-encryption-context) with KMS ReEncrypt. Each key gets migrate's key lines (DescribeKey,
Enabled, symmetric, region), named "source key ..." and "destination key ...". Then a real
stored value under the source, from a small sample spread over each target column, is
re-encrypted from the source to the destination (`SourceKeyId` pinned) with the contexts
the run will give, and the result from the destination to itself, as the run checks each
new ciphertext; KMS must name the expected keys (`SourceKeyId`, `KeyId`) each time. Both
new ciphertexts are thrown away: nothing is written. With --verify-decrypt, the old and the
new ciphertexts are also decrypted, each pinned to its key, and compared in constant time;
the plaintexts are dropped at once and never shown.

When no sampled value opens under the source (no KMS values yet, values under another key
or context, or already moved), an info line says so and the round trip uses a random test
value encrypted under the source instead, when this caller may kms:Encrypt with the source
key (the rekey itself does not need that permission); otherwise the round trip is skipped,
saying why.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .codec import (
    KMS_MAX_CIPHERTEXT,
    ValueKind,
    classify,
    decode_kms,
    encryption_context,
)
from .config import Settings
from .errors import FatalKMSError, KMSValueError
from .iam import is_key_arn
from .kms import KMS
from .preflight_kms import KeyRole, check_key, preflight_kms
from .preflight_lines import AGAIN, Check, skip
from .reader import BoundTarget, spread_sample

__all__ = ["DECRYPT", "DESTINATION", "ROUND_TRIP", "SAMPLE", "SOURCE", "check_rekey"]

SOURCE = KeyRole("source key", "source key", "--from-key")
DESTINATION = KeyRole("destination key", "destination key", "--to-key")
ROUND_TRIP = "ReEncrypt round trip"
DECRYPT = "Decrypt check"  # --verify-decrypt
SAMPLE = "rekey sample"
TRIES = 6  # stored values tried at most, one ReEncrypt each, round robin over the columns
PROBES, WINDOW = 6, 4  # the sample of each column (reader.spread_sample)
TEST_BYTES = 32
Context = Mapping[str, str] | None


@dataclass(frozen=True)
class Stored:
    """One stored KMS value of the sample: where it lives and its ciphertext."""

    table: str
    column: str
    pk: str
    blob: bytes


@dataclass(frozen=True)
class Pair:
    """The two keys, as KMS is called with them (ARNs once described), each with the
    preflight KMS that names it in its errors."""

    src: KMS
    dst: KMS
    source: str
    dest: str
    from_context: bool
    to_context: bool

    def contexts(self, table: str, column: str, pk: str) -> tuple[Context, Context]:
        ctx = encryption_context(table, column, pk)
        return (ctx if self.from_context else None), (ctx if self.to_context else None)


@dataclass(frozen=True)
class Moved:
    """A value re-encrypted from the source to the destination, and KMS's answer."""

    what: str  # "a stored value (users.encrypted_secret, pk 7)" or the test value
    old: bytes
    new: bytes
    key_id: str  # the KeyId KMS answered
    src_ctx: Context
    dst_ctx: Context


def check_rekey(
    engine: Engine | None, settings: Settings, bound: Mapping[str, BoundTarget], client: Any,
    checks: list[Check], sleep: Callable[[float], None],
) -> str | None:
    """The key lines of the source and of the destination, the round trip (and the
    Decrypt check with --verify-decrypt); the source key's ARN if resolved."""
    assert settings.to_key_id is not None
    region = settings.region
    src, client = check_key(client, settings.key_id, region, SOURCE, checks, sleep)
    dst, client = check_key(client, settings.to_key_id, region, DESTINATION, checks, sleep)
    blocked = src.blocked or dst.blocked
    if blocked:
        checks.append(skip(ROUND_TRIP, blocked))
        if settings.verify_decrypt:
            checks.append(skip(DECRYPT, blocked))
        return src.arn
    pair = Pair(preflight_kms(client, src.use, region, sleep),
                preflight_kms(client, dst.use, region, sleep), src.use, dst.use,
                settings.encryption_context, settings.to_encryption_context)
    stored, sampled = _sample(engine, settings, bound)
    lines = _round_trip(pair, stored, sampled, settings)
    if settings.verify_decrypt and lines[-1].name != DECRYPT:
        lines.append(skip(DECRYPT, "the ReEncrypt round trip did not run or failed"))
    checks.extend(lines)
    return src.arn


def _sample(
    engine: Engine | None, settings: Settings, bound: Mapping[str, BoundTarget]
) -> tuple[list[Stored], str]:
    """Up to TRIES stored KMS values, round robin over the target columns (from a sample
    spread over each one's key range), and what the sample held, for the info line."""
    if engine is None:
        return [], "the database is unreachable"
    columns: list[list[Stored]] = []
    try:
        with engine.connect() as conn:
            for bt in (bound[t.table] for t in settings.targets if t.table in bound):
                columns.extend(_stored(conn, bt, column) for column in bt.target.columns)
    except SQLAlchemyError as exc:
        return [], f"the target columns could not be read ({type(exc).__name__})"
    found = sum(len(c) for c in columns)
    picked = [s for row in zip_longest(*columns) for s in row if s is not None][:TRIES]
    if not found:
        return picked, "the sample of the target columns holds no KMS value"
    return picked, f"{found} KMS value(s) in the sample of the target columns"


def _stored(conn: Connection, bt: BoundTarget, column: str) -> list[Stored]:
    """The KMS values of a small sample spread over one column's key range (none too long
    for KMS to take: the run leaves those untouched without asking KMS)."""
    rows = spread_sample(conn, bt, column, probes=PROBES, window=WINDOW)
    blobs = [(bt.pk_text(r.pk), decode_kms(r.value)) for r in rows
             if classify(r.value) is ValueKind.KMS]
    return [Stored(bt.name, column, pk, blob) for pk, blob in blobs
            if blob is not None and len(blob) <= KMS_MAX_CIPHERTEXT]


def _round_trip(pair: Pair, stored: list[Stored], sampled: str,
                settings: Settings) -> list[Check]:
    lines: list[Check] = []
    moved: Moved | str
    try:
        found = _first_under_source(pair, stored)
        if found is not None:
            moved = found
        elif stored and not _any_at_destination(pair, stored):
            # What the rekey itself refuses to start on (refusals.check_source_opens_something).
            return [Check(SAMPLE, False, (
                f"{sampled}; none of the {len(stored)} tried opens under {pair.source}"
                f"{_ctx_words(pair.from_context)}, nor under the destination: the rekey "
                "would read every value and leave every one, and refuses to start; check "
                "--from-key and --from-encryption-context (kms-migrate verify --key-id KEY "
                "counts the values by key)"))]
        else:
            tried = (f"; none of the {len(stored)} tried opens under {pair.source}"
                     f"{_ctx_words(pair.from_context)}, and some are under the destination "
                     "already (moved)" if stored else "")
            lines.append(Check(SAMPLE, None, f"{sampled}{tried}: the round trip tries a random "
                               "test value encrypted under the source key instead"))
            moved = _test_value(pair, settings)
    except FatalKMSError as exc:
        return [*lines, Check(ROUND_TRIP, False, str(exc))]
    if isinstance(moved, str):
        return [*lines, skip(ROUND_TRIP, moved)]
    lines.append(_check_at_destination(pair, moved))
    if settings.verify_decrypt and lines[-1].ok:
        lines.append(_decrypt_check(pair, moved))
    return lines


def _ctx_words(on: bool) -> str:
    return " with the encryption context (table, column, pk)" if on else " without a context"


def _names(expected: str, answered: str) -> bool:
    """Whether KMS's answer names the expected key (only a key ARN can be compared)."""
    return answered == expected or not is_key_arn(expected)


def _reencrypt(kms: KMS, blob: bytes, dest: str, contexts: tuple[Context, Context],
               source: str) -> tuple[bytes, str, str] | FatalKMSError | None:
    """ReEncrypt's answer; or the AccessDenied KMS gave (it may be about this one value);
    other fatal errors are raised."""
    try:
        return kms.reencrypt(blob, dest, contexts[0], contexts[1], source=source)
    except FatalKMSError as exc:
        if exc.code != "AccessDeniedException":
            raise
        return exc


def _first_under_source(pair: Pair, stored: list[Stored]) -> Moved | None:
    """The first stored value that re-encrypts from the source key and context.

    Access denied on one value may be about that value (a ciphertext naming a key this
    caller may not use; moto answers so for garbage too) or about the source key itself:
    the next value tells, and when none re-encrypts, the denial is raised."""
    denied: FatalKMSError | None = None
    for s in stored:
        src_ctx, dst_ctx = pair.contexts(s.table, s.column, s.pk)
        out = _reencrypt(pair.src, s.blob, pair.dest, (src_ctx, dst_ctx), pair.source)
        if isinstance(out, FatalKMSError):
            denied = denied or out
        # A KMS that ignores the pinned SourceKeyId (moto) names the key it did use.
        elif out is not None and _names(pair.source, out[1]):
            return Moved(f"a stored value ({s.table}.{s.column}, pk {s.pk})", s.blob, out[0],
                         out[2], src_ctx, dst_ctx)
    if denied is not None:
        raise denied
    return None


def _any_at_destination(pair: Pair, stored: list[Stored]) -> bool:
    """Whether a stored value opens under the destination key and context already (moved
    by an earlier rekey): a ReEncrypt destination -> destination, thrown away."""
    for s in stored:
        _, dst_ctx = pair.contexts(s.table, s.column, s.pk)
        out = _reencrypt(pair.dst, s.blob, pair.dest, (dst_ctx, dst_ctx), pair.dest)
        if isinstance(out, tuple) and _names(pair.dest, out[1]):
            return True
    return False


def _test_value(pair: Pair, settings: Settings) -> Moved | str:
    """A random value encrypted under the source and re-encrypted to the destination, or
    why there is none (this caller may not Encrypt with the source key)."""
    first = settings.targets[0]
    src_ctx, dst_ctx = pair.contexts(first.table, first.columns[0], "kms-migrate-preflight")
    try:
        blob = pair.src.encrypt(secrets.token_bytes(TEST_BYTES), src_ctx)  # never shown
    except FatalKMSError as exc:
        if exc.code != "AccessDeniedException":
            raise
        return ("no stored value to re-encrypt, and this caller may not kms:Encrypt with the "
                "source key to make a test value (the rekey does not need it): the round "
                f"trip is checked once a KMS value under {pair.source} is stored")
    out = pair.src.reencrypt(blob, pair.dest, src_ctx, dst_ctx, source=pair.source)
    if out is None or not _names(pair.source, out[1]):
        raise FatalKMSError(f"KMS could not re-encrypt a test value it had just encrypted with "
                            f"{pair.source}: check the endpoint (AWS_ENDPOINT_URL_KMS) and "
                            f"--from-key, {AGAIN}", "ReEncrypt")
    return Moved(f"a random {TEST_BYTES}-byte test value", blob, out[0], out[2], src_ctx,
                 dst_ctx)


def _check_at_destination(pair: Pair, moved: Moved) -> Check:
    """The run's check of a new ciphertext: ReEncrypt destination -> destination, both
    answers naming the destination key."""
    if not _names(pair.dest, moved.key_id):
        return Check(ROUND_TRIP, False, f"KMS re-encrypted {moved.what} under "
                     f"{moved.key_id or 'an unnamed key'}, not {pair.dest}: check the endpoint "
                     f"(AWS_ENDPOINT_URL_KMS) and --to-key, {AGAIN}")
    try:
        back = pair.dst.reencrypt(moved.new, pair.dest, moved.dst_ctx, moved.dst_ctx,
                                  source=pair.dest)
    except FatalKMSError as exc:
        return Check(ROUND_TRIP, False, str(exc))
    if back is None:
        return Check(ROUND_TRIP, False, f"the new ciphertext of {moved.what} did not open under "
                     f"{pair.dest}{_ctx_words(pair.to_context)} when re-encrypted from the "
                     f"destination to itself: check the endpoint and --to-key, {AGAIN}")
    if not (_names(pair.dest, back[1]) and _names(pair.dest, back[2])):
        return Check(ROUND_TRIP, False, f"checking the new ciphertext of {moved.what}, KMS named "
                     f"{back[1] or '?'} and {back[2] or '?'}, not {pair.dest} both times: check "
                     f"the endpoint (AWS_ENDPOINT_URL_KMS), {AGAIN}")
    return Check(ROUND_TRIP, True, (
        f"{moved.what} re-encrypted from {pair.source}{_ctx_words(pair.from_context)} to "
        f"{pair.dest}{_ctx_words(pair.to_context)}, then from the destination to itself: KMS "
        "named the expected keys each time; both results thrown away"))


def _decrypt_check(pair: Pair, moved: Moved) -> Check:
    """--verify-decrypt: the old and the new ciphertexts, each decrypted pinned to its key,
    hold the same bytes (compared in constant time, dropped at once)."""
    try:
        before = _decrypt(pair.src, moved.old, pair.source, moved.src_ctx)
        after = _decrypt(pair.dst, moved.new, pair.dest, moved.dst_ctx)
    except KMSValueError as exc:
        return Check(DECRYPT, False, f"KMS could not decrypt the old or the new ciphertext of "
                     f"{moved.what} ({exc}): check --from-key, --to-key and the context "
                     f"options, {AGAIN}")
    except FatalKMSError as exc:
        return Check(DECRYPT, False, str(exc))
    same = hmac.compare_digest(before[0], after[0])
    del before, after  # the plaintexts, never shown
    if not same:
        return Check(DECRYPT, False, f"the old and the new ciphertext of {moved.what} decrypt "
                     f"to different bytes: check the endpoint (AWS_ENDPOINT_URL_KMS), {AGAIN}")
    return Check(DECRYPT, True, f"{moved.what}: its old ciphertext, decrypted with the source "
                 "key, and its new one, with the destination key, hold the same bytes")


def _decrypt(kms: KMS, blob: bytes, key: str, context: Context) -> tuple[bytes, str]:
    """Decrypt pinned to `key`; KMSValueError when KMS says it does not open, or when a KMS
    that ignored the pin names another key."""
    extra: dict[str, Any] = {"EncryptionContext": dict(context)} if context else {}
    resp = kms.call("Decrypt", CiphertextBlob=blob, KeyId=key, **extra)
    opened_by = str(resp.get("KeyId") or "")
    if opened_by and not _names(key, opened_by):
        raise KMSValueError(f"opened by {opened_by}")
    return bytes(resp.get("Plaintext", b"")), opened_by
