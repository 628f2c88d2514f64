"""Orchestrates a migrate run: targets, batches, resume, dry-run, summary.

The order of one batch: read (reader) -> Fernet decrypt (codec) -> KMS encrypt and verify
(kms, concurrently) -> one transaction (applier). The slow KMS work happens before the
short write transaction, as lockbox's migrator does its computation outside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Connection, Engine, select

from checkpoints import store
from checkpoints.lock import RunLock
from checkpoints.store import BatchCounts, FailureRow, Run
from checkpoints.tables import failures, runs

from . import __version__
from .applier import REASON_CONFLICT
from .batches import (
    REASON_BEHIND,
    REASON_EMPTY,
    REASON_NO_KEY,
    REASON_OVERSIZE,
    ColumnSummary,
)
from .codec import FERNET_PREFIX, FernetCodec, ValueKind, classify, fernet_key_ids
from .config import Settings, targets_fingerprint
from .errors import ConfigError, ResumeMismatchError
from .kms import KMS
from .logs import get_logger
from .pipeline import (
    ColumnJob,
    Fetcher,
    Hooks,
    key_list_fetcher,
    keyset_fetcher,
    migrate_column,
)
from .reader import (
    BoundTarget,
    Row,
    bind_targets,
    count_after,
)
from .refusals import check_keys_open_something, refuse_other_settings, refuse_to_start
from .runs import RunEnd, acquire_lock, lifecycle

__all__ = [
    "REASON_BEHIND",
    "REASON_EMPTY",
    "REASON_NO_KEY",
    "REASON_OVERSIZE",
    "ColumnSummary",
    "MigrateResult",
    "Mode",
    "migrate",
    "settle_column",
    "settle_failures",
    "settle_run",
]



@dataclass
class MigrateResult:
    dry_run: bool
    run_id: int | None = None
    resumed: bool = False
    joined: bool = False  # joined a ranged run another command started (--workers)
    columns: list[ColumnSummary] = field(default_factory=list)
    failures: list[FailureRow] = field(default_factory=list)
    kms_requests: int = 0
    retries: int = 0
    throttles: int = 0
    rate_limit: float | None = None  # requests/s configured (None: no limit)
    rate_now: float | None = None  # where the adaptive limit ended
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.columns)

    @property
    def conflicts(self) -> int:
        return sum(c.conflicts for c in self.columns)


@dataclass(frozen=True)
class Mode:
    """How a migrate command runs. `dry_run`: the same reads, decrypts, KMS encrypts and
    verifies, nothing written. `retry_failed`: only the values runs recorded as failed.
    `new_run`: abandon an unfinished run instead of resuming it."""

    dry_run: bool = False
    retry_failed: bool = False
    new_run: bool = False


def resume_or_start(engine: Engine, settings: Settings, key_arn: str, run_lock: RunLock,
                    mode: Mode, ranged: bool = False) -> tuple[Run, bool]:
    """The run this command works on, with the lock bound to it: the unfinished migrate run
    resumed, or a new one (always new for a retry); whether it was resumed."""
    new = store.NewRun(
        "retry" if mode.retry_failed else "migrate", settings.batch_size,
        targets=[(t.table, c) for t in settings.targets for c in t.columns],
        targets_json=json.dumps([t.as_dict() for t in settings.targets], sort_keys=True),
        fingerprint=targets_fingerprint(settings.targets, settings.encryption_context),
        key_id=settings.key_id, key_arn=key_arn, region=settings.region,
        tool_version=__version__, ranged=ranged)
    with engine.begin() as conn:
        refuse_to_start(conn, retry_failed=mode.retry_failed)
        if mode.retry_failed:
            old = store.unfinished_run(conn, "retry")
            if old is not None:  # a retry re-reads the failures: nothing to resume
                store.set_state(conn, old.id, "abandoned", note="superseded by a new retry")
            retry = store.create_run(conn, replace(new, ranged=False))
            run_lock.bind_run(conn, retry.id)
            return retry, False
        run = store.unfinished_run(conn, "migrate")
        if run is not None and mode.new_run:
            store.set_state(conn, run.id, "abandoned", note="abandoned by --new-run")
            run = None
        if run is not None:
            refuse_other_settings(run, settings, key_arn)
            if run.ranged and not ranged:
                raise ResumeMismatchError(
                    f"unfinished migrate run {run.id} was started with --workers: resume it "
                    "with --workers (any number; 1 on SQLite), or add --new-run to abandon "
                    "it; nothing was written"
                )
            store.set_state(conn, run.id, "running")
            run_lock.bind_run(conn, run.id)
            return run, True
        run = store.create_run(conn, replace(
            new, fernet_key_ids=json.dumps(fernet_key_ids(settings.fernet_keys))))
        run_lock.bind_run(conn, run.id)
        return run, False


def migrate(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    mode: Mode = Mode(),
    hooks: Hooks | None = None,
    before_first_write: Callable[[], None] | None = None,
) -> MigrateResult:
    """Re-encrypt every Fernet value of the targets with KMS; resume an unfinished run.

    With `mode.dry_run`, the same reads, decrypts, KMS encrypts and verifies happen, and
    nothing is written (the engine is read-only too, as a second guard).
    `before_first_write` (e.g. the SQLite backup) runs once every check passed and the lock
    is ours."""
    if mode.dry_run and mode.retry_failed:
        raise ConfigError("--retry-failed cannot be combined with --dry-run")
    started = time.monotonic()
    hooks = hooks or Hooks()
    bound = bind_targets(engine, settings.targets)
    codec = FernetCodec(settings.fernet_keys)
    if not mode.retry_failed:  # a retry's keys are checked by retrying (each failure named)
        check_keys_open_something(engine, bound, codec)
    key = kms.describe()
    result = MigrateResult(dry_run=mode.dry_run)
    log = get_logger(dry_run=mode.dry_run, key_id=settings.key_id)
    run_lock: RunLock | None = None
    positions: dict[tuple[str, str], store.Checkpoint | None] = {
        (bt.name, c): None for bt in bound for c in bt.target.columns}
    if not mode.dry_run:
        run_lock, run = _take_run(engine, settings, key.arn, mode, before_first_write)
        result.run_id, result.resumed = run
        log = log.bind(run_id=result.run_id)
        with engine.connect() as conn:
            positions = dict(store.load_checkpoints(conn, result.run_id))
    log.info("run_started", resumed=result.resumed, batch_size=settings.batch_size,
             concurrency=settings.concurrency, encryption_context=settings.encryption_context)
    fence = run_lock.fence if run_lock else None
    end = RunEnd()
    try:
        with lifecycle(engine, result.run_id, end):
            columns = _Columns(engine, settings, kms, codec, result, log, hooks, fence,
                               positions, mode.retry_failed)
            for bt in bound:
                for column in bt.target.columns:
                    columns.run(bt, column)
            if not mode.dry_run:
                # Exit 0 means nothing is left, exit 1 names only values that are: see
                # settle_column (a retry only drops its failures whose value is gone).
                settle_run(engine, bound, result, fence, behind=not mode.retry_failed)
    finally:
        _close(engine, kms, result, end.state, started)
        if run_lock is not None:
            run_lock.release(engine)
        hooks.progress.finish()
        log.info("run_finished", state=end.state, seconds=round(result.seconds, 3),
                 kms_requests=result.kms_requests, retries=result.retries)
    return result


def _take_run(engine: Engine, settings: Settings, key_arn: str, mode: Mode,
              before_first_write: Callable[[], None] | None,
              ) -> tuple[RunLock, tuple[int, bool]]:
    """The lock, then the run resumed or started: (lock, (run id, resumed))."""
    store.ensure_schema(engine)
    run_lock = acquire_lock(engine, "migrate")
    try:
        with engine.connect() as conn:
            refuse_to_start(conn, retry_failed=mode.retry_failed)
        if before_first_write is not None:
            # Every check passed and the lock is ours: e.g. the SQLite backup (a refused
            # second migrate must not write a copy).
            before_first_write()
        run, resumed = resume_or_start(engine, settings, key_arn, run_lock, mode)
    except BaseException:
        run_lock.release(engine)
        raise
    return run_lock, (run.id, resumed)


def _close(engine: Engine, kms: KMS, result: MigrateResult, state: str,
           started: float) -> None:
    """What the result reports once the run ended (however it ended): KMS figures, time,
    and for a completed run its settled failures."""
    result.kms_requests, result.retries = kms.requests, kms.retries
    if kms.limiter is not None:
        result.rate_limit, result.rate_now = kms.limiter.max_rate, kms.limiter.rate
        result.throttles = kms.limiter.throttles
    result.seconds = time.monotonic() - started
    if result.run_id is not None and state == "completed":
        with engine.connect() as conn:
            result.failures = store.failures_of(conn, result.run_id)


def settle_run(engine: Engine, bound: Sequence[BoundTarget], result: MigrateResult,
                     fence: Callable[[Connection], None] | None, *, behind: bool = True) -> None:
    """`settle_failures` for every column of a migrate run, in one fenced transaction,
    counted into the result's column summaries."""
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        change = settle_failures(conn, bound, result.run_id, behind=behind)
    for summary in result.columns:
        summary.add(change[(summary.table, summary.column)])


def settle_failures(conn: Connection, bound: Sequence[BoundTarget], run_id: int | None,
                    *, behind: bool = True) -> dict[tuple[str, str], BatchCounts]:
    """`settle_column` for every column of the targets; the change of each one's counts."""
    return {(bt.name, column): settle_column(conn, bt, column, run_id, behind=behind)
            for bt in bound for column in bt.target.columns}


def settle_column(conn: Connection, bt: BoundTarget, column: str, run_id: int | None,
                  *, behind: bool = True) -> BatchCounts:
    """Once a migrate run has been through a column, make its failures the Fernet tokens
    the column still holds that the run did not migrate, in the caller's transaction; the
    change of its counts. Exit 0 then means nothing is left, and exit 1 names only values
    that exist.

    - A token the run neither migrated nor recorded is recorded (REASON_BEHIND): it was
      written behind the run's cursor (by the application, or before a resume). Not for a
      retry (`behind` False), which answers for the recorded failures only (and reads only
      their rows).
    - A recorded failure or conflict whose row is gone or holds no Fernet token any more
      (deleted, or rewritten by the application since, e.g. between an interrupted pass
      and its resume) is dropped, and taken off the count it was in: no value of it is
      left."""
    assert run_id is not None
    recorded = store.failures_in(conn, run_id, bt.name, column)
    known = {pk for _, pk, _ in recorded}
    holding = _fernet_keys(conn, bt, column, None if behind else known)
    gone = [(i, reason) for i, pk, reason in recorded if pk not in holding]
    conflicts = sum(reason == REASON_CONFLICT for _, reason in gone)
    dropped = BatchCounts(failed=len(gone) - conflicts, conflicts=conflicts)
    store.forget_failures(conn, run_id, bt.name, column, [i for i, _ in gone], dropped)
    log = get_logger(run_id=run_id)
    if gone:
        log.warning("failed_values_gone", table=bt.name, column=column, count=len(gone))
    left = [FailureRow(bt.name, column, pk, REASON_BEHIND)
            for pk in sorted(holding - known)] if behind else []
    if left:
        ck = store.load_checkpoints(conn, run_id)[(bt.name, column)]
        store.record_batch(conn, run_id, bt.name, column,
                           store.Batch(ck.last_pk, BatchCounts(failed=len(left)), done=True,
                                       failure_rows=left))
        log.warning("written_behind_the_run", table=bt.name, column=column, count=len(left))
    return BatchCounts(failed=len(left) - dropped.failed, conflicts=-conflicts)


def _fernet_keys(conn: Connection, bt: BoundTarget, column: str,
                 only: set[str] | None) -> set[str]:
    """The keys (as text) of the rows whose value in `column` is a Fernet token: every
    such row, or only those among the keys `only`."""
    col = bt.col(column)
    if only is None:
        # LIKE narrows the read on the server (case-insensitive on some databases: classify
        # decides); the prefix holds neither '%' nor '_'.
        pages = [select(bt.pk, col).where(bt.pk.is_not(None), col.like(f"{FERNET_PREFIX}%"))]
    else:
        keys = sorted(bt.pk_value(pk) for pk in only)
        pages = [select(bt.pk, col).where(bt.pk.in_(keys[i:i + 500]))
                 for i in range(0, len(keys), 500)]
    return {bt.pk_text(pk) for q in pages for pk, value in conn.execute(q)
            if classify(value) is ValueKind.FERNET}


def failed_keys(engine: Engine, bt: BoundTarget, column: str) -> list[Any]:
    """Every key of this column that a migrate or retry run recorded as failed, sorted."""
    f, r = failures.c, runs.c
    q = (
        select(f.pk).distinct()
        .select_from(failures.join(runs, r.id == f.run_id))
        .where(f.table_name == bt.name, f.column_name == column, r.kind.in_(("migrate", "retry")))
    )
    with engine.connect() as conn:
        return sorted(bt.pk_value(pk) for (pk,) in conn.execute(q))



@dataclass
class _Columns:
    """What every column of one migrate run shares; `run` migrates one of them."""

    engine: Engine
    settings: Settings
    kms: KMS
    codec: FernetCodec
    result: MigrateResult
    log: Any
    hooks: Hooks
    fence: Callable[[Connection], None] | None
    positions: dict[tuple[str, str], store.Checkpoint | None]
    retry_failed: bool

    def run(self, bt: BoundTarget, column: str) -> None:
        """One column, from its checkpoint (for --retry-failed: the keys its runs recorded
        as failed)."""
        engine, size = self.engine, self.settings.batch_size
        summary = ColumnSummary(bt.name, column)
        self.result.columns.append(summary)
        ck = self.positions.get((bt.name, column))
        if ck is not None:
            summary.add(ck.counts)
            if ck.done:
                return
        after = bt.pk_value(ck.last_pk) if ck and ck.last_pk is not None else None
        fetch: Fetcher[Row]
        if self.retry_failed:
            keys = failed_keys(engine, bt, column)
            fetch = key_list_fetcher(engine, bt, column, keys, size)
            self.hooks.progress.start(bt.name, column, len(keys))
        else:
            fetch = keyset_fetcher(engine, bt, column, size)
            self.hooks.progress.start(bt.name, column, count_after(engine, bt, after))
        job = ColumnJob(engine, bt, column, self.settings, run_id=self.result.run_id,
                        fence=self.fence, after=after, kms=self.kms, codec=self.codec,
                        log=self.log)
        migrate_column(job, fetch, summary, self.hooks, self.result.failures)
