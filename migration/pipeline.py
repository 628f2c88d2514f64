"""The column loops every kind of run drives: one column (or one key range of it) read page
by page, each page through its steps, each written in one transaction.

- `migrate_column`: rows -> prepare (batches.py: Fernet, KMS round trips; or rewrap.py:
  KMS ReEncrypt for a rekey run) -> finish -> applier; migrate, `--retry-failed`, rekey
  and ranged workers drive it, a dry-run with no writer.
- `rollback_column`: journal entries -> applier's mirror compare-and-swap.
- `verify_column`: rows -> KMS Decrypt pinned to the run's key -> counts by format and key
  (writes nothing: verify records its census afterwards, `migration.census`).

A loop works on a `ColumnJob` (what and where) and `Hooks` (progress, the per-batch hook,
the stop request). Pages come from a `Fetcher`, which alone decides "is this the last
page?" (`last_page`), and whose cursor strictly increases: every loop ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, Engine

from checkpoints.leases import Lease
from checkpoints.store import BatchCounts, FailureRow

from .applier import (
    REASON_CONFLICT,
    REASON_CONFLICT_REKEY,
    Writer,
    apply_migrate_batch,
    apply_rollback_batch,
)
from .batches import ColumnSteps, ColumnSummary, Prepared, Steps
from .codec import FernetCodec, ValueKind, classify, decode_kms, encryption_context
from .config import Settings
from .kms import KMS, Opening
from .logs import get_logger
from .pages import Fetcher, Size, journal_fetcher, keyset_fetcher
from .progress import NullProgress, Progress
from .reader import BoundTarget, Row
from .rewrap import Rekey, RekeySteps
from .sizing import BatchSizer
from .steer import Steering

__all__ = [
    "BatchHook", "ColumnCheck", "ColumnJob", "Hooks", "Problem", "migrate_column",
    "rollback_column", "verify_column",
]

BatchHook = Callable[[str, str, BatchCounts], None]
Problem = tuple[str, str, str, str]  # table, column, pk, why


@dataclass(frozen=True)
class ColumnJob:
    """One column of one run, or one key range of it: what a column loop works on.

    `after`/`upto`: the keys (journal ids for a rollback) the loop starts after and ends
    at, either end open when None. `run_id` None: nothing is written (dry-run, verify).
    `lease`: the range of a ranged run whose checkpoint each batch moves. `undoes`: for a
    rollback, the rekey run whose journal it replays (None: the migrate layer)."""

    engine: Engine
    target: BoundTarget
    column: str
    settings: Settings
    run_id: int | None = None
    fence: Callable[[Connection], None] | None = None
    lease: Lease | None = None
    after: Any | None = None
    upto: Any | None = None
    kms: KMS | None = None
    codec: FernetCodec | None = None
    log: Any = None
    undoes: int | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def writer(self) -> Writer:
        assert self.run_id is not None
        return Writer(self.engine, self.target, self.column, self.run_id, self.fence,
                      self.lease, REASON_CONFLICT_REKEY if self.settings.to_key_id is not None
                      else REASON_CONFLICT)

    def logger(self) -> Any:
        log = self.log if self.log is not None else get_logger()
        return log.bind(table=self.name, column=self.column)

    def steps(self, dry: bool) -> Steps:
        """What each batch goes through: a rekey run's (its settings name a destination
        key: ReEncrypt) or a migrate run's (Fernet decrypt, KMS Encrypt and Decrypt)."""
        kms, settings = self.kms, self.settings
        assert kms is not None
        if settings.to_key_id is not None:
            assert kms.key is not None and kms.dest is not None
            return RekeySteps(self.target, self.column,
                              Rekey.of(kms, settings.verify_decrypt),
                              from_context=settings.encryption_context,
                              to_context=settings.to_encryption_context)
        assert self.codec is not None
        # A dry-run sizes the KMS texts for real AWS KMS.
        return ColumnSteps(self.target, self.column, self.codec, kms,
                           settings.encryption_context, size_for_aws=dry)


@dataclass(frozen=True)
class Hooks:
    """What a column loop reports after each committed batch, how it is told to stop, and
    how it is steered: `steering` holds it between batches while the run is paused or
    held; `sizer` gives each batch's size and learns from each batch's time."""

    progress: Progress = field(default_factory=NullProgress)
    on_batch: BatchHook | None = None
    should_stop: Callable[[], bool] | None = None
    steering: Steering | None = None
    sizer: BatchSizer | None = None

    def steered_by(self, steering: Steering | None, settings: Settings) -> Hooks:
        """These hooks with a run's steering and its sizer (without steering, a dry-run:
        a sizer of its own, for --batch-time)."""
        sizer = (steering.sizer if steering is not None
                 else BatchSizer(settings.batch_size, settings.batch_time))
        return replace(self, steering=steering, sizer=sizer)

    def size(self, fixed: int) -> Size:
        """The batch size a fetcher asks for: the sizer's, else `fixed`."""
        return self.sizer if self.sizer is not None else fixed

    def blocked(self) -> bool:
        return self.steering is not None and self.steering.blocked()

    def hold(self) -> bool:
        """Wait while the run is paused or held; whether it waited."""
        if not self.blocked():
            return False
        assert self.steering is not None
        self.steering.hold(self.should_stop)
        return True

    def timed(self, rows: int, seconds: float) -> None:
        if self.sizer is not None:
            self.sizer.observe(rows, seconds)

    def batch_done(self, table: str, column: str, rows: int, counts: BatchCounts,
                   *, last: bool) -> None:
        """After a batch committed: progress, the hook, then the stop request (raised as
        KeyboardInterrupt between batches, never after the last one)."""
        self.progress.advance(table, column, rows)
        if self.on_batch is not None:
            self.on_batch(table, column, counts)
        if not last and self.should_stop is not None and self.should_stop():
            raise KeyboardInterrupt  # asked to stop: this batch is committed, stop here


def _moved_on(job: ColumnJob, after: Any, cursor: Any, last: bool) -> None:
    """Every loop ends: a page that is not the last must move the cursor on."""
    if not last and (cursor is None or cursor == after):
        raise RuntimeError(f"paging {job.name}.{job.column} did not advance past key {after!r}")


# -- migrate ---------------------------------------------------------------------------------

def migrate_column(job: ColumnJob, fetch: Fetcher[Row], summary: ColumnSummary, hooks: Hooks,
                   dry_failures: list[FailureRow] | None = None) -> None:
    """Migrate one column from `job.after` to the end of what `fetch` pages through.

    With no `job.run_id` (a dry-run) nothing is written: the failures go to
    `dry_failures`. The next page is read and its KMS work started before this page's
    write, so the two overlap; the pages hold disjoint keys, and the next one writes
    nothing until this one has committed its checkpoint. While the run is paused or held
    (`hooks.steering`) no batch starts: the read-ahead's KMS work is dropped, and once the
    run goes on its page is read again (it may have changed meanwhile)."""
    bt, column = job.target, job.column
    clog = job.logger()
    dry = job.run_id is None
    summary.column_type = str(bt.col(column).type)
    after = job.after
    hooks.hold()
    rows, cursor, done = fetch(after)
    steps = job.steps(dry)
    prep = steps.prepare(rows)
    upcoming: Prepared | None = None
    batch_no = 0
    since = time.monotonic()
    try:
        while True:
            batch_no += 1
            batch_rows, last_pk = rows, cursor
            _moved_on(job, after, last_pk, done)
            rewrites, failures, counts = steps.finish(prep)
            summary.unfit += len(prep.unfit)
            summary.unfit_need = max([summary.unfit_need, *prep.unfit])
            next_done = True
            if not done:
                after = last_pk
                rows, cursor, next_done = fetch(last_pk)
                if not hooks.blocked():
                    upcoming = steps.prepare(rows)
            if dry:
                if dry_failures is not None:
                    dry_failures.extend(failures)
            else:
                counts = apply_migrate_batch(job.writer(), rewrites, failures, counts,
                                             last_pk, done)
            summary.add(counts)
            clog.info("batch_checked" if dry else "batch_committed", batch=batch_no,
                      migrated=counts.migrated, skipped=counts.skipped, already=counts.already,
                      failed=counts.failed, conflicts=counts.conflicts)
            # The sizer learns from the values that needed KMS work: a stretch of NULL,
            # empty or already-KMS rows is fast and must not grow the size that the next
            # stretch of Fernet tokens then takes many times the target to get through.
            since = _timed(hooks, len(batch_rows) - counts.skipped - counts.already, since)
            hooks.batch_done(bt.name, column, len(batch_rows), counts, last=done)
            if done:
                return
            if hooks.blocked():  # paused: start nothing, and read the page again after
                _cancel(upcoming)
                upcoming = None
                hooks.hold()
                rows, cursor, next_done = fetch(after)
                since = time.monotonic()
            prep, upcoming = upcoming or steps.prepare(rows), None
            done = next_done
    except BaseException:
        # Whatever stopped us, the batch read ahead writes nothing: drop its KMS work.
        _cancel(prep, upcoming)
        raise


def _cancel(*preps: Prepared | None) -> None:
    for prep in preps:
        if prep is not None:
            prep.cancel()


def _timed(hooks: Hooks, rows: int, since: float) -> float:
    """A batch committed: its time (since the one before) to the sizer; now."""
    now = time.monotonic()
    hooks.timed(rows, now - since)
    return now


# -- rollback --------------------------------------------------------------------------------

def rollback_column(job: ColumnJob, summary: ColumnSummary, hooks: Hooks) -> int:
    """Replay one column's journal from id `job.after` (to id `job.upto`, the end of a range
    of a ranged run, whose checkpoint `job.lease` then moves); the number of batches."""
    assert job.run_id is not None
    bt, column = job.target, job.column
    fetch = journal_fetcher(job.engine, bt.name, column, hooks.size(job.settings.batch_size),
                            job.upto, job.undoes)
    writer = job.writer()
    clog = job.logger()
    after = job.after or 0
    batch_no = 0
    since = time.monotonic()
    while True:
        if hooks.hold():  # paused or held: no batch starts
            since = time.monotonic()
        entries, cursor, done = fetch(after)
        _moved_on(job, after, cursor, done)
        counts = apply_rollback_batch(writer, entries, done)
        summary.add(counts)
        batch_no += 1
        clog.info("batch_committed", batch=batch_no, restored=counts.migrated,
                  conflicts=counts.conflicts)
        since = _timed(hooks, len(entries), since)
        hooks.batch_done(bt.name, column, len(entries), counts, last=done)
        if done:
            return batch_no
        after = cursor


# -- verify ----------------------------------------------------------------------------------

@dataclass
class ColumnCheck:
    table: str
    column: str
    kms_ok: int = 0
    fernet_left: int = 0
    empty: int = 0
    undecryptable: int = 0
    # Under another KMS key than the one configured: a problem (the application's key-scoped
    # policy cannot decrypt them). Counted per key ARN ("" when this caller may not use it).
    other_key: int = 0
    other_keys: dict[str, int] = field(default_factory=dict)
    # The Fernet tokens by the key that opens them (`FernetCodec.which_key`: "current",
    # "legacy #N", "" for none or when verify was given no Fernet key); sums to fernet_left.
    fernet_keys: dict[str, int] = field(default_factory=dict)

    def add(self, other: ColumnCheck) -> None:
        """Add the counts of another part (a key range) of the same column."""
        self.kms_ok += other.kms_ok
        self.fernet_left += other.fernet_left
        self.empty += other.empty
        self.undecryptable += other.undecryptable
        self.other_key += other.other_key
        for mine, theirs in ((self.other_keys, other.other_keys),
                             (self.fernet_keys, other.fernet_keys)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n


def verify_column(job: ColumnJob, check: ColumnCheck, problems: list[Problem]) -> None:
    """Verify the rows of one column with `after < pk <= upto`, batch by batch in key
    order, counting into `check` and appending to `problems` (writes nothing). With
    `job.codec`, each Fernet token is counted under the key that opens it."""
    assert job.kms is not None
    bt, column, settings = job.target, job.column, job.settings
    fetch = keyset_fetcher(job.engine, bt, column, settings.batch_size, job.upto)
    log = job.logger()
    after = job.after
    while True:
        rows, cursor, done = fetch(after)
        _moved_on(job, after, cursor, done)
        blobs = _classify_for_verify(job, rows, check, problems)
        opened = job.kms.map(job.kms.open_stored, [(b, c) for _, b, c in blobs])
        _tally(job, check, problems, [pk for pk, _, _ in blobs], opened)
        log.info("batch_verified", rows=len(rows))
        if done:
            return
        after = cursor


def _classify_for_verify(job: ColumnJob, rows: Sequence[Row], check: ColumnCheck,
                         problems: list[Problem]) -> list[tuple[str, bytes, Any]]:
    """Count the empty, Fernet and non-base64 values; the (pk, blob, context) to open."""
    bt, column = job.target, job.column
    blobs: list[tuple[str, bytes, Any]] = []
    for row in rows:
        kind = classify(row.value)
        pk = bt.pk_text(row.pk)
        if kind is ValueKind.EMPTY:
            check.empty += 1
        elif kind is ValueKind.FERNET:
            check.fernet_left += 1
            key = job.codec.which_key(row.value) if job.codec is not None else ""
            check.fernet_keys[key] = check.fernet_keys.get(key, 0) + 1
            problems.append((bt.name, column, pk, "still a Fernet token"))
        else:
            blob = decode_kms(row.value) if kind is ValueKind.KMS else None
            if blob is None:
                check.undecryptable += 1
                problems.append((bt.name, column, pk, "neither a Fernet token nor base64"))
            else:
                ctx = (encryption_context(bt.name, column, pk)
                       if job.settings.encryption_context else None)
                blobs.append((pk, blob, ctx))
    return blobs


def _tally(job: ColumnJob, check: ColumnCheck, problems: list[Problem], pks: Sequence[str],
           opened: Sequence[Opening]) -> None:
    table, column = job.name, job.column
    reason = ("KMS cannot decrypt it with this row's encryption context"
              if job.settings.encryption_context else "KMS cannot decrypt it")
    for pk, out in zip(pks, opened, strict=True):
        if out.ok:
            check.kms_ok += 1
        elif out.other_key is not None:
            check.other_key += 1
            check.other_keys[out.other_key] = check.other_keys.get(out.other_key, 0) + 1
            problems.append((table, column, pk, f"under another KMS key ({out.other_key})"
                             if out.other_key else "under a KMS key this caller cannot use"))
        else:
            check.undecryptable += 1
            problems.append((table, column, pk, out.problem or reason))
