"""One batch of a rekey run between its read and its write: the per-value half of moving
KMS values from one key (or encryption context) to another with KMS ReEncrypt, so the
plaintext never leaves KMS. `RekeySteps` has the shape of `batches.ColumnSteps` (prepare,
then finish), so the column loops, the applier, the journal and the workers are the same.

For each KMS value: ReEncrypt from the source key (`SourceKeyId` pinned) and context to the
destination key and context; then the check, before anything is written: by default a
second ReEncrypt of the new ciphertext, destination to destination, thrown away (it opens
under the destination key and context), with both answers naming the expected
`SourceKeyId` and `KeyId`; with `verify_decrypt`, a Decrypt of the old and the new value
(pinned to their keys) compared in constant time instead.

A value that does not open under the source is asked once more whether it opens under the
destination: then it is already where the run takes it (a resumed or repeated run, or a
value the application wrote with the new key), counted `already`. The values the run does
not own are left untouched and named: Fernet tokens (migrate's), garbage, and values
under another key.

An AccessDenied on one value's ReEncrypt is that value's (left, named) once the run has
shown it works (`Rekey.settled`: a value re-encrypted from the source, asked again on each
denial, or one found under the destination); before that, it stops the run, as a missing
permission must. The start-up sample (`refusals.check_source_opens_something`) usually
settles it before the first batch.
"""

from __future__ import annotations

import hmac
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from checkpoints.store import BatchCounts, FailureRow

from .applier import Rewrite
from .batches import ALREADY, Outcome, Prepared, finish_rows
from .codec import KMS_MAX_CIPHERTEXT, ValueKind, classify, decode_kms, encryption_context
from .errors import FatalKMSError
from .kms import KMS, KeyInfo
from .reader import BoundTarget, Row

__all__ = [
    "REASON_DENIED", "REASON_FERNET", "REASON_GARBAGE", "REASON_NOT_SOURCE", "Denied", "Rekey",
    "RekeySteps",
]

REASON_FERNET = ("a Fernet token, not a KMS value: left untouched (kms-migrate migrate moves "
                 "it to KMS first)")
REASON_GARBAGE = "neither a Fernet token nor a KMS ciphertext: left untouched"
REASON_NOT_SOURCE = ("does not open under the source key and context (under another key, "
                     "another encryption context, or corrupt): left untouched")
REASON_DENIED = ("KMS denied re-encrypting it from the source key, while other values of the "
                 "run re-encrypt or are under the destination: it is under a key this caller "
                 "may not use (were every value under the source denied so, kms:ReEncryptFrom "
                 "on the source would be missing): left untouched")
Context = Mapping[str, str] | None


class Denied(str):
    """The outcome of a value whose ReEncrypt was denied before any value of the run had
    re-encrypted or was found under the destination: the reason, with the error to raise
    should the batch show nothing of the kind either."""

    error: FatalKMSError

    def __new__(cls, error: FatalKMSError) -> Denied:
        self = super().__new__(cls, REASON_DENIED)
        self.error = error
        return self


@dataclass(frozen=True)
class Rekey:
    """The two keys and contexts of a rekey run, and how a new ciphertext is checked."""

    kms: KMS
    source: KeyInfo
    dest: KeyInfo
    verify_decrypt: bool = False
    # A value this run re-encrypted from the source, (old blob, contexts): the proof that an
    # AccessDenied on another value is about that value, not the run's permissions.
    _good: list[tuple[bytes, Context, Context]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # A value found under the destination already: the run has work of its own beyond the
    # denied values, so a denial is that value's, not a stop (see `settled`).
    _already: threading.Event = field(default_factory=threading.Event, repr=False)

    @staticmethod
    def of(kms: KMS, verify_decrypt: bool) -> Rekey:
        """The run's Rekey on this KMS (its described source and destination keys), one
        per process: every column and range of the run shares what proves its permissions,
        so a column (or range) that opens with a value KMS denies does not stop a run
        whose values re-encrypt."""
        assert kms.key is not None and kms.dest is not None
        found = _BY_KMS.get(kms)
        if (found is None or found.source != kms.key or found.dest != kms.dest
                or found.verify_decrypt != verify_decrypt):
            found = _BY_KMS[kms] = Rekey(kms, kms.key, kms.dest, verify_decrypt)
        return found

    def one(self, item: tuple[bytes, Context, Context]) -> Outcome:
        """One value: the new ciphertext, ALREADY, or why it is left (never the value)."""
        blob, src_ctx, dst_ctx = item
        if len(blob) > KMS_MAX_CIPHERTEXT:
            return (f"too long to be a KMS ciphertext ({len(blob)} bytes; KMS takes at most "
                    f"{KMS_MAX_CIPHERTEXT}): left untouched")
        try:
            out = self.kms.reencrypt(blob, self.dest.arn, src_ctx, dst_ctx,
                                     source=self.source.arn)
        except FatalKMSError as exc:
            return self._denied(exc)
        if out is not None and out[1] == self.source.arn:
            with self._lock:
                if not self._good:
                    self._good.append(item)
        if out is None or out[1] != self.source.arn:
            # Not under the source key and context (a KMS that ignored the pinned SourceKeyId
            # named the key it did use: the new ciphertext is dropped either way).
            return self._elsewhere(blob, dst_ctx, out[1] if out else "")
        new, _, key = out
        if key != self.dest.arn:
            return f"KMS re-encrypted it under {key or 'an unnamed key'}, not the destination"
        why = self._check(blob, new, src_ctx, dst_ctx)
        return new if why is None else why

    def _denied(self, exc: FatalKMSError) -> Outcome:
        """KMS denied a ReEncrypt from the source: about this value (a ciphertext under a
        key this caller may not use: moto answers so, and so may KMS), or about the run's
        permissions? Raised again when it is about the destination, or when a value this
        run re-encrypted no longer re-encrypts (asked again; that call's own error stops
        the run). Before any value re-encrypted, it is left for `RekeySteps.finish` to
        decide once the batch is through (`Denied`). With one key on both sides (only the
        context changes) KMS's answer cannot say which side it is about: it is treated as
        the source's, so a value under a key this caller may not use is left, not fatal."""
        if exc.code != "AccessDeniedException" or (exc.key == self.dest.arn
                                                    and self.dest.arn != self.source.arn):
            raise exc
        with self._lock:
            known = self._good[0] if self._good else None
        if known is None:
            return REASON_DENIED if self._already.is_set() else Denied(exc)
        blob, src_ctx, dst_ctx = known
        if self.kms.reencrypt(blob, self.dest.arn, src_ctx, dst_ctx,
                              source=self.source.arn) is None:
            raise exc
        return REASON_DENIED

    def settled(self) -> bool:
        """Whether a denial is a value's own: a value of this run re-encrypted from the
        source (its permissions work), or one was under the destination already (a run
        done before, or the application writing with the new key: then a denied value left
        behind must not make the run unfinishable, as it would if every re-run stopped on
        it; were the source's permission missing, each value under it is named with the
        reason saying so, and none is written)."""
        with self._lock:
            return bool(self._good) or self._already.is_set()

    def _elsewhere(self, blob: bytes, dst_ctx: Context, named: str) -> Outcome:
        """A value not under the source: ALREADY when it opens under the destination key
        and context, else why it is left."""
        if self._opens_at_dest(blob, dst_ctx):
            self._already.set()
            return ALREADY
        if named and named not in (self.source.arn, self.dest.arn):
            return f"under another KMS key ({named}): left untouched"
        return REASON_NOT_SOURCE

    def _opens_at_dest(self, blob: bytes, dst_ctx: Context) -> bool:
        """Whether a ciphertext opens under the destination key and context, shown by a
        ReEncrypt destination to destination whose result is thrown away."""
        out = self.kms.reencrypt(blob, self.dest.arn, dst_ctx, dst_ctx, source=self.dest.arn)
        return out is not None and out[1] == self.dest.arn and out[2] == self.dest.arn

    def _check(self, old: bytes, new: bytes, src_ctx: Context, dst_ctx: Context) -> str | None:
        """Why the new ciphertext must not be written, or None: it opens under the
        destination (default), or holds the same plaintext as the old (verify_decrypt)."""
        if not self.verify_decrypt:
            if self._opens_at_dest(new, dst_ctx):
                return None
            return ("the new ciphertext did not open under the destination key and context "
                    "when checked: left untouched")
        before = self.kms.decrypt_with_key(old, src_ctx, key=self.source.arn)
        after = self.kms.decrypt_with_key(new, dst_ctx, key=self.dest.arn)
        if before is None or after is None:
            return "a Decrypt of the old or the new ciphertext failed: left untouched"
        if not hmac.compare_digest(before[0], after[0]):
            return "the new ciphertext holds a different plaintext: left untouched"
        return None


_BY_KMS: weakref.WeakKeyDictionary[KMS, Rekey] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RekeySteps:
    """The two steps of each batch of one column of a rekey run (see batches.ColumnSteps):
    `prepare` classifies the values and submits the ReEncrypts, `finish` waits for them
    and turns them into compare-and-swap rewrites and named failures."""

    target: BoundTarget
    column: str
    rekey: Rekey
    from_context: bool = False
    to_context: bool = False

    def item(self, row: Row) -> tuple[bytes, Context, Context] | None:
        """What `Rekey.one` takes for a row holding a KMS value: (blob, source context,
        destination context); None for any other value."""
        blob = decode_kms(row.value) if classify(row.value) is ValueKind.KMS else None
        if blob is None:
            return None
        ctx = encryption_context(self.target.name, self.column, self.target.pk_text(row.pk))
        return blob, ctx if self.from_context else None, ctx if self.to_context else None

    def prepare(self, rows: list[Row]) -> Prepared:
        bt, column = self.target, self.column
        skipped = 0
        failures: list[FailureRow] = []
        waiting: list[Row] = []
        items: list[tuple[bytes, Context, Context]] = []
        for row in rows:
            kind = classify(row.value)
            item = self.item(row)
            if kind is ValueKind.EMPTY:
                skipped += 1
            elif item is None:
                why = REASON_FERNET if kind is ValueKind.FERNET else REASON_GARBAGE
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), why))
            else:
                waiting.append(row)
                items.append(item)
        pending = self.rekey.kms.submit(self.rekey.one, items)
        return Prepared(rows, waiting, pending, failures, skipped, already=0)

    def finish(self, prep: Prepared) -> tuple[list[Rewrite], list[FailureRow], BatchCounts]:
        """As migrate's; and a denial no re-encrypted value disproves stops the run."""
        denied = [r for r in prep.pending.result() if isinstance(r, Denied)]
        if denied and not self.rekey.settled():
            raise denied[0].error
        return finish_rows(prep, self.target, self.column, again="run kms-migrate rekey again")
