"""Scans the target columns and decrypts every KMS value with KMS (writes nothing).

Counts each value as: KMS ok, Fernet left (still to migrate), empty (NULL or ''), or
undecryptable (neither a Fernet token nor a ciphertext KMS opens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from .codec import ValueKind, classify, decode_kms, encryption_context
from .config import Settings
from .kms import KMS
from .logs import get_logger
from .reader import BoundTarget, bind_targets, fetch_batch

__all__ = ["ColumnCheck", "VerifyResult", "verify"]


@dataclass
class ColumnCheck:
    table: str
    column: str
    kms_ok: int = 0
    fernet_left: int = 0
    empty: int = 0
    undecryptable: int = 0
    other_key: int = 0  # opened by KMS, but under another key than the one configured


@dataclass
class VerifyResult:
    columns: list[ColumnCheck] = field(default_factory=list)
    problems: list[tuple[str, str, str, str]] = field(default_factory=list)  # table, col, pk, why
    kms_requests: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(c.fernet_left or c.undecryptable for c in self.columns)


def verify(settings: Settings, *, engine: Engine, kms: KMS) -> VerifyResult:
    """Decrypt every KMS value of the targets; report leftovers and undecryptable values."""
    started = time.monotonic()
    bound = bind_targets(engine, settings.targets)
    key = kms.describe()
    result = VerifyResult()
    log = get_logger(kind="verify")
    reason = ("KMS cannot decrypt it with this row's encryption context"
              if settings.encryption_context else "KMS cannot decrypt it")
    for bt in bound:
        for column in bt.target.columns:
            _verify_column(settings, engine, kms, bt, column, key.arn, reason, result, log)
    result.kms_requests = kms.requests
    result.seconds = time.monotonic() - started
    return result


def _verify_column(
    settings: Settings, engine: Engine, kms: KMS, bt: BoundTarget, column: str, arn: str,
    reason: str, result: VerifyResult, log: Any,
) -> None:
    check = ColumnCheck(bt.name, column)
    result.columns.append(check)
    after = None
    while True:
        rows = fetch_batch(engine, bt, column, after, settings.batch_size)
        blobs: list[tuple[str, bytes]] = []
        ctxs: list[dict[str, str] | None] = []
        for row in rows:
            kind = classify(row.value)
            pk = bt.pk_text(row.pk)
            if kind is ValueKind.EMPTY:
                check.empty += 1
            elif kind is ValueKind.FERNET:
                check.fernet_left += 1
                result.problems.append((bt.name, column, pk, "still a Fernet token"))
            else:
                blob = decode_kms(row.value) if isinstance(row.value, str) else None
                if blob is None:
                    check.undecryptable += 1
                    result.problems.append(
                        (bt.name, column, pk, "neither a Fernet token nor base64"))
                else:
                    blobs.append((pk, blob))
                    ctxs.append(encryption_context(bt.name, column, pk)
                                if settings.encryption_context else None)
        opened = kms.map(kms.decrypt_in_context,
                         [(b, c) for (_, b), c in zip(blobs, ctxs, strict=True)])
        _tally(check, result, bt.name, column, blobs, opened, arn, reason)
        log.info("batch_verified", table=bt.name, column=column, rows=len(rows))
        if len(rows) < settings.batch_size:
            return
        after = rows[-1].pk


def _tally(
    check: ColumnCheck,
    result: VerifyResult,
    table: str,
    column: str,
    blobs: Sequence[tuple[str, bytes]],
    opened: Sequence[tuple[bytes, str] | None],
    arn: str,
    reason: str,
) -> None:
    for (pk, _), out in zip(blobs, opened, strict=True):
        if out is None:
            check.undecryptable += 1
            result.problems.append((table, column, pk, reason))
        else:
            check.kms_ok += 1
            if out[1] and out[1] != arn:
                check.other_key += 1
