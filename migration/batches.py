"""One batch of values between its read and its write: classify, Fernet-decrypt, start the
KMS round trips (prepare), then turn their outcomes into compare-and-swap rewrites and named
failures (finish). The per-value half of the pipeline; the column loops are in pipeline.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from checkpoints.store import BatchCounts, FailureRow

from .applier import Rewrite
from .codec import (
    KMS_MAX_PLAINTEXT,
    FernetCodec,
    ValueKind,
    classify,
    column_length,
    encode_kms,
    encryption_context,
    kms_text_length,
)
from .kms import KMS, REASON_EMPTY, Pending
from .reader import BoundTarget, Row

__all__ = [
    "ALREADY",
    "REASON_BEHIND",
    "REASON_EMPTY",
    "REASON_NO_KEY",
    "REASON_OVERSIZE",
    "Already",
    "ColumnSteps",
    "ColumnSummary",
    "Outcome",
    "Prepared",
    "Steps",
    "finish_rows",
    "reason_unfit",
]

REASON_NO_KEY = (
    "no Fernet key opens this token (corrupt, or made with a key that is in neither "
    "ENCRYPTION_KEY nor ENCRYPTION_KEY_LEGACY)"
)
REASON_OVERSIZE = f"plaintext is over KMS's {KMS_MAX_PLAINTEXT}-byte Encrypt limit"
REASON_BEHIND = (
    "a Fernet token written after the run had passed this row (the application still "
    "writes Fernet): migrate --retry-failed picks it up"
)

class Already:
    """The outcome of a value already where the run takes it (a rekey run: under the
    destination key and context): counted `already`, not rewritten."""

    def __repr__(self) -> str:
        return "ALREADY"


ALREADY = Already()
Outcome = bytes | str | Already  # one value's KMS work: new ciphertext, failure reason, or ALREADY


@dataclass
class ColumnSummary:
    """What a run did to one column: its counts (`add` sums a batch's in), and the values
    whose KMS text does not fit the column's declared length (failed, counted in `failed`
    too) with the length the longest of them needs."""

    table: str
    column: str
    counts: BatchCounts = field(default_factory=BatchCounts)
    unfit: int = 0
    unfit_need: int = 0
    column_type: str = ""  # as declared, e.g. VARCHAR(255)

    def add(self, c: BatchCounts) -> None:
        self.counts = self.counts + c

    @property
    def migrated(self) -> int:
        return self.counts.migrated

    @property
    def skipped(self) -> int:
        return self.counts.skipped

    @property
    def already(self) -> int:
        return self.counts.already

    @property
    def failed(self) -> int:
        return self.counts.failed

    @property
    def conflicts(self) -> int:
        return self.counts.conflicts


@dataclass
class Prepared:
    """One batch between its read and its write: Fernet done, KMS round trips submitted.

    The plaintexts live only in the submitted calls; nothing here holds one.
    """

    rows: list[Row]
    waiting: list[Row]
    pending: Pending[Outcome]
    failures: list[FailureRow]
    skipped: int
    already: int
    unfit: list[int] = field(default_factory=list)  # the length each unfit value needs

    def cancel(self) -> None:
        self.pending.cancel()


def reason_unfit(need: int, bt: BoundTarget, column: str, *, estimated: bool,
                 again: str = "migrate --retry-failed") -> str:
    """Why a value is left: its KMS text is longer than the column (never the value);
    `again`: the command that picks it up once the column is wider."""
    kind = bt.col(column).type
    if estimated:
        return (f"its KMS ciphertext will not fit the column ({kind}): about {need} "
                "characters on AWS KMS; widen the column first")
    return (f"its KMS ciphertext ({need} characters) does not fit the column ({kind}): "
            f"widen the column, then {again}")


class Steps(Protocol):
    """One batch's two steps, for the column loop (`pipeline.migrate_column`): migrate's
    `ColumnSteps` and rekey's `rewrap.RekeySteps`."""

    def prepare(self, rows: list[Row]) -> Prepared: ...

    def finish(self, prep: Prepared) -> tuple[list[Rewrite], list[FailureRow], BatchCounts]: ...


@dataclass(frozen=True)
class ColumnSteps:
    """The two steps of each batch of one column: `prepare` (classify, Fernet-decrypt,
    start the KMS round trips, non-blocking) and `finish` (wait for them; compare-and-swap
    rewrites and failures).

    With `size_for_aws` (a dry-run), a value whose KMS text would not fit the column's
    declared length on real AWS KMS (codec.kms_text_length) fails in `prepare`: a
    rehearsal against moto, whose ciphertexts are shorter, must not hide it."""

    target: BoundTarget
    column: str
    codec: FernetCodec
    kms: KMS
    with_context: bool = False
    size_for_aws: bool = False

    def finish(self, prep: Prepared) -> tuple[list[Rewrite], list[FailureRow], BatchCounts]:
        return finish_rows(prep, self.target, self.column)

    def prepare(self, rows: list[Row]) -> Prepared:
        """Classify and Fernet-decrypt a batch, and start its KMS round trips."""
        bt, column, codec, kms = self.target, self.column, self.codec, self.kms
        with_context = self.with_context
        skipped = already = 0
        unfit: list[int] = []
        length = column_length(bt.col(column)) if self.size_for_aws else None
        failures: list[FailureRow] = []
        waiting: list[Row] = []
        plaintexts: list[bytes] = []
        contexts: list[dict[str, str]] = []
        for row in rows:
            kind = classify(row.value)
            if kind is ValueKind.EMPTY:
                skipped += 1
            elif kind in (ValueKind.KMS, ValueKind.OTHER):
                already += 1
            else:
                plaintext = codec.decrypt(row.value)
                why = self._refusal(plaintext, length, unfit)
                if why is not None or plaintext is None:
                    failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk),
                                               why or REASON_NO_KEY))
                else:
                    waiting.append(row)
                    plaintexts.append(plaintext)
                    if with_context:
                        contexts.append(encryption_context(bt.name, column, bt.pk_text(row.pk)))
        pending: Pending[Outcome]
        if with_context:
            pending = kms.submit(kms.round_trip_in_context, list(zip(plaintexts, contexts,
                                                                     strict=True)))
        else:
            pending = kms.submit(kms.round_trip, plaintexts)
        del plaintexts
        return Prepared(rows, waiting, pending, failures, skipped, already, unfit)

    def _refusal(self, plaintext: bytes | None, length: int | None,
                 unfit: list[int]) -> str | None:
        """Why this value cannot go to KMS Encrypt (its failure), or None."""
        if plaintext is None:
            return REASON_NO_KEY
        if not plaintext:
            return REASON_EMPTY
        if len(plaintext) > KMS_MAX_PLAINTEXT:
            return REASON_OVERSIZE
        need = kms_text_length(len(plaintext))
        if length is not None and need > length:
            unfit.append(need)
            return reason_unfit(need, self.target, self.column, estimated=True)
        return None


def finish_rows(
    prep: Prepared, bt: BoundTarget, column: str, again: str = "migrate --retry-failed",
) -> tuple[list[Rewrite], list[FailureRow], BatchCounts]:
    """Wait for a batch's KMS work; turn it into compare-and-swap rewrites and failures.

    A new ciphertext longer than the column's declared length is that value's failure,
    decided here: written, it would fail the whole batch's transaction (PostgreSQL: "value
    too long") on every re-run, or be cut short by a database that truncates.
    """
    results = prep.pending.result()
    rewrites: list[Rewrite] = []
    failures = list(prep.failures)
    length = column_length(bt.col(column))
    already = prep.already
    for row, result in zip(prep.waiting, results, strict=True):
        if isinstance(result, Already):
            already += 1
        elif isinstance(result, bytes):
            text = encode_kms(result)
            if length is not None and len(text) > length:
                prep.unfit.append(len(text))
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk),
                                           reason_unfit(len(text), bt, column, estimated=False,
                                                        again=again)))
                continue
            rewrites.append(Rewrite(row.pk, old=row.value, new=text))
        else:
            failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), result))
    counts = BatchCounts(migrated=len(rewrites), skipped=prep.skipped, already=already,
                         failed=len(failures))
    return rewrites, failures, counts
