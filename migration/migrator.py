"""Orchestrates a migrate run: targets, batches, resume, dry-run, summary.

The order of one batch: read (reader) -> Fernet decrypt (codec) -> KMS encrypt and verify
(kms, concurrently) -> one transaction (applier). The slow KMS work happens before the
short write transaction, as lockbox's migrator does its computation outside it.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select

from checkpoints import store
from checkpoints.leases import Lease
from checkpoints.lock import LockHeld, LockLost, RunLock
from checkpoints.store import BatchCounts, FailureRow, Run
from checkpoints.tables import failures, runs

from . import __version__
from .applier import Rewrite, apply_migrate_batch
from .codec import (
    FERNET_PREFIX,
    KMS_MAX_PLAINTEXT,
    FernetCodec,
    ValueKind,
    classify,
    column_length,
    encode_kms,
    encryption_context,
    fernet_key_ids,
    kms_text_length,
)
from .config import Settings, targets_fingerprint
from .db import max_bind_params
from .errors import ConfigError, FatalKMSError, ResumeMismatchError, RunLockedError
from .kms import KMS, REASON_EMPTY, Pending
from .logs import get_logger
from .progress import NullProgress, Progress
from .reader import (
    BoundTarget,
    Row,
    bind_targets,
    count_after,
    fetch_batch,
    fetch_keys,
    spread_sample,
)

__all__ = [
    "REASON_BEHIND", "REASON_EMPTY", "REASON_NO_KEY", "REASON_OVERSIZE", "ColumnSummary",
    "MigrateResult", "migrate", "name_left_behind", "record_left_behind",
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
SAMPLE_IN_CHUNK = 500  # keys per IN list when leaving out recorded failures


@dataclass
class ColumnSummary:
    table: str
    column: str
    migrated: int = 0
    skipped: int = 0
    already: int = 0
    failed: int = 0
    conflicts: int = 0
    # Values whose KMS text does not fit the column's declared length (failed, counted
    # in `failed` too), and the length the longest of them needs.
    unfit: int = 0
    unfit_need: int = 0
    column_type: str = ""  # as declared, e.g. VARCHAR(255)

    def add(self, c: BatchCounts) -> None:
        self.migrated += c.migrated
        self.skipped += c.skipped
        self.already += c.already
        self.failed += c.failed
        self.conflicts += c.conflicts


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


BatchHook = Callable[[str, str, BatchCounts], None]


@dataclass
class Prepared:
    """One batch between its read and its write: Fernet done, KMS round trips submitted.

    The plaintexts live only in the submitted calls; nothing here holds one.
    """

    rows: list[Row]
    waiting: list[Row]
    pending: Pending[bytes | str]
    failures: list[FailureRow]
    skipped: int
    already: int
    unfit: list[int] = field(default_factory=list)  # the length each unfit value needs

    def cancel(self) -> None:
        self.pending.cancel()


def reason_unfit(need: int, bt: BoundTarget, column: str, *, estimated: bool) -> str:
    """Why a value is left: its KMS text is longer than the column (never the value)."""
    kind = bt.col(column).type
    if estimated:
        return (f"its KMS ciphertext will not fit the column ({kind}): about {need} "
                "characters on AWS KMS; widen the column first")
    return (f"its KMS ciphertext ({need} characters) does not fit the column ({kind}): "
            "widen the column, then migrate --retry-failed")


def prepare_rows(
    rows: list[Row], bt: BoundTarget, column: str, codec: FernetCodec, kms: KMS,
    with_context: bool = False, *, size_for_aws: bool = False,
) -> Prepared:
    """Classify and Fernet-decrypt a batch, and start its KMS round trips (non-blocking).

    With `size_for_aws` (a dry-run), a value whose KMS text would not fit the column's
    declared length on real AWS KMS (codec.kms_text_length) fails here: a rehearsal
    against moto, whose ciphertexts are shorter, must not hide it.
    """
    skipped = already = 0
    unfit: list[int] = []
    length = column_length(bt.col(column)) if size_for_aws else None
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
            if plaintext is None:
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), REASON_NO_KEY))
            elif not plaintext:
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), REASON_EMPTY))
            elif len(plaintext) > KMS_MAX_PLAINTEXT:
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), REASON_OVERSIZE))
            elif length is not None and kms_text_length(len(plaintext)) > length:
                need = kms_text_length(len(plaintext))
                unfit.append(need)
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk),
                                           reason_unfit(need, bt, column, estimated=True)))
            else:
                waiting.append(row)
                plaintexts.append(plaintext)
                if with_context:
                    contexts.append(encryption_context(bt.name, column, bt.pk_text(row.pk)))
    pending: Pending[bytes | str]
    if with_context:
        pending = kms.submit(kms.round_trip_in_context, list(zip(plaintexts, contexts,
                                                                 strict=True)))
    else:
        pending = kms.submit(kms.round_trip, plaintexts)
    del plaintexts
    return Prepared(rows, waiting, pending, failures, skipped, already, unfit)


def finish_rows(
    prep: Prepared, bt: BoundTarget, column: str
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
    for row, result in zip(prep.waiting, results, strict=True):
        if isinstance(result, bytes):
            text = encode_kms(result)
            if length is not None and len(text) > length:
                prep.unfit.append(len(text))
                failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk),
                                           reason_unfit(len(text), bt, column, estimated=False)))
                continue
            rewrites.append(Rewrite(row.pk, old=row.value, new=text))
        else:
            failures.append(FailureRow(bt.name, column, bt.pk_text(row.pk), result))
    counts = BatchCounts(migrated=len(rewrites), skipped=prep.skipped, already=prep.already,
                         failed=len(failures))
    return rewrites, failures, counts


def check_keys_open_something(
    engine: Engine, bound: Sequence[BoundTarget], codec: FernetCodec
) -> None:
    """Refuse to start when the Fernet keys open none of a spread sample of Fernet values.

    Without this, a wrong ENCRYPTION_KEY makes a run that "succeeds" with every value
    failed: the classic silent no-op of re-encryption tools. The sample is spread over
    each column's key range (the oldest rows are the likeliest to be under a legacy or
    unknown key), and leaves out values a run already recorded as failed: those are
    named in the failure list, and must not stop the migration of the others.
    """
    sampled = 0
    with engine.connect() as conn:
        for bt in bound:
            for column in bt.target.columns:
                tokens = fernet_sample(conn, bt, column)
                sampled += len(tokens)
                if any(codec.decrypt(r.value) is not None for r in tokens):
                    return
    if sampled:
        raise ConfigError(
            f"the Fernet keys open none of the {sampled} Fernet tokens sampled across the "
            "targets: set ENCRYPTION_KEY (and ENCRYPTION_KEY_LEGACY) to the keys the "
            "application encrypted them with; nothing was written"
        )


def fernet_sample(conn: Connection, bt: BoundTarget, column: str) -> list[Row]:
    """The Fernet tokens of a sample spread over one column's key range, less the values
    a run already recorded as failed (the key check's sample, and preflight's)."""
    tokens = [r for r in spread_sample(conn, bt, column) if classify(r.value) is ValueKind.FERNET]
    if tokens and store.schema_present(conn):
        known = _recorded_failures(conn, bt, column, [r.pk for r in tokens])
        tokens = [r for r in tokens if bt.pk_text(r.pk) not in known]
    return tokens


def _recorded_failures(
    conn: Connection, bt: BoundTarget, column: str, pks: Sequence[Any]
) -> set[str]:
    """Which of these keys a run recorded as failed in this column (as key text)."""
    texts = [bt.pk_text(pk) for pk in pks]
    f = failures.c
    out: set[str] = set()
    step = max(1, min(SAMPLE_IN_CHUNK, max_bind_params(conn) - 2))
    for i in range(0, len(texts), step):
        out.update(conn.execute(
            select(f.pk).where(f.table_name == bt.name, f.column_name == column,
                               f.pk.in_(texts[i:i + step]))).scalars())
    return out


def acquire_lock(engine: Engine, kind: str) -> RunLock:
    try:
        return RunLock.acquire(engine, kind)
    except LockHeld as exc:
        raise RunLockedError(str(exc)) from None


@contextlib.contextmanager
def lock_held(engine: Engine, kind: str) -> Iterator[RunLock]:
    """Hold the run lock for a block; a lock lost to another process stops it (exit 2)."""
    run_lock = acquire_lock(engine, kind)
    try:
        yield run_lock
    except LockLost as exc:
        raise RunLockedError(str(exc)) from None
    finally:
        run_lock.release(engine)


def refuse_other_settings(run: Run, settings: Settings, key_arn: str) -> None:
    """Raise ResumeMismatchError unless this command's key, targets and encryption context
    are the run's own (to resume it, or to join it as a worker)."""
    fingerprint = targets_fingerprint(settings.targets, settings.encryption_context)
    pairs = [(t.table, c) for t in settings.targets for c in t.columns]
    changed: list[str] = []
    if run.key_arn != key_arn:
        changed.append(
            f"the KMS key (run used {run.key_id} = {run.key_arn}, now {settings.key_id} "
            f"= {key_arn})"
        )
    if run.targets_fingerprint == targets_fingerprint(
        settings.targets, not settings.encryption_context
    ):
        changed.append(
            "the encryption context (run used "
            f"{'none' if settings.encryption_context else '--encryption-context'}, "
            f"now {'--encryption-context' if settings.encryption_context else 'none'})"
        )
    elif run.targets_fingerprint != fingerprint:
        was = ", ".join(f"{t['table']}.{c}" for t in run.targets for c in t["columns"])
        now = ", ".join(f"{t}.{c}" for t, c in pairs)
        changed.append(f"the targets (run used {was}; now {now})")
    if changed:
        raise ResumeMismatchError(
            f"unfinished migrate run {run.id} was started with other settings: "
            f"{'; and '.join(changed)}. Re-run with the run's settings to finish it, "
            "or add --new-run to abandon it and start a new run; nothing was written"
        )
    refuse_missing_keys(run, settings.fernet_keys)


def refuse_missing_keys(run: Run, keys: Sequence[str]) -> None:
    """Raise ResumeMismatchError unless `keys` include every Fernet key the run was
    started with (compared by identifier): with one missing, every value under it would
    be recorded as a failure. Names the missing keys by their position, never a value."""
    if not run.fernet_key_ids:
        return  # a run from before the identifiers were recorded
    want: list[str] = json.loads(run.fernet_key_ids)
    have = set(fernet_key_ids(keys))
    missing = [str(n) for n, kid in enumerate(want, 1) if kid not in have]
    if missing:
        raise ResumeMismatchError(
            f"migrate run {run.id} was started with {len(want)} Fernet key(s) and this "
            f"command lacks key {', '.join(missing)} of them (key 1 is the ENCRYPTION_KEY "
            "it was started with, the ENCRYPTION_KEY_LEGACY entries follow in order): set "
            "the same keys as where the run was started, then re-run; nothing was written"
        )


def refuse_to_start(conn: Connection, *, retry_failed: bool = False) -> None:
    """Raise ResumeMismatchError when a migrate (or retry) must not start now: a finalize
    or a rollback is unfinished, or (for a retry) a migrate is."""
    fin = store.unfinished_run(conn, "finalize")
    if fin is not None:
        # It has deleted part of the journal: a migrate now would mix a fresh journal with
        # a partial one, and a later rollback would restore only part of the values.
        raise ResumeMismatchError(
            f"finalize run {fin.id} is unfinished: it has deleted part of the rollback "
            "journal; finish it first (kms-migrate finalize), then migrate again; nothing "
            "was written"
        )
    rb = store.unfinished_run(conn, "rollback")
    if rb is not None:
        raise ResumeMismatchError(
            f"rollback run {rb.id} is unfinished: finish it first (kms-migrate rollback), "
            "then migrate again; nothing was written"
        )
    if retry_failed:
        mig = store.unfinished_run(conn, "migrate")
        if mig is not None:
            raise ResumeMismatchError(
                f"migrate run {mig.id} is unfinished: finish it first (kms-migrate "
                "migrate), then retry its failures; nothing was written"
            )


def _resume_or_start(
    engine: Engine,
    settings: Settings,
    key_arn: str,
    targets_json: str,
    new_run: bool,
    run_lock: RunLock,
    retry_failed: bool = False,
    ranged: bool = False,
) -> tuple[Run, bool]:
    fingerprint = targets_fingerprint(settings.targets, settings.encryption_context)
    pairs = [(t.table, c) for t in settings.targets for c in t.columns]
    with engine.begin() as conn:
        refuse_to_start(conn, retry_failed=retry_failed)
        if retry_failed:
            old = store.unfinished_run(conn, "retry")
            if old is not None:  # a retry re-reads the failures: nothing to resume
                store.set_state(conn, old.id, "abandoned", note="superseded by a new retry")
            retry = store.create_run(
                conn, kind="retry", targets=pairs, targets_json=targets_json,
                fingerprint=fingerprint, batch_size=settings.batch_size,
                key_id=settings.key_id, key_arn=key_arn, region=settings.region,
                tool_version=__version__,
            )
            run_lock.bind_run(conn, retry.id)
            return retry, False
        run = store.unfinished_run(conn, "migrate")
        if run is not None and new_run:
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
        run = store.create_run(
            conn, kind="migrate", targets=pairs, targets_json=targets_json,
            fingerprint=fingerprint, batch_size=settings.batch_size, key_id=settings.key_id,
            key_arn=key_arn, region=settings.region, tool_version=__version__,
            ranged=ranged, fernet_key_ids=json.dumps(fernet_key_ids(settings.fernet_keys)),
        )
        run_lock.bind_run(conn, run.id)
        return run, False


def migrate(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    dry_run: bool = False,
    new_run: bool = False,
    on_batch: BatchHook | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    retry_failed: bool = False,
    before_first_write: Callable[[], None] | None = None,
) -> MigrateResult:
    """Re-encrypt every Fernet value of the targets with KMS; resume an unfinished run.

    With dry_run, the same reads, decrypts, KMS encrypts and verifies happen, and nothing
    is written (the engine is read-only too, as a second guard).
    """
    started = time.monotonic()
    bound = bind_targets(engine, settings.targets)
    codec = FernetCodec(settings.fernet_keys)
    check_keys_open_something(engine, bound, codec)
    key = kms.describe()
    result = MigrateResult(dry_run=dry_run)
    log = get_logger(dry_run=dry_run, key_id=settings.key_id)

    run_lock: RunLock | None = None
    if dry_run and retry_failed:
        raise ConfigError("--retry-failed cannot be combined with --dry-run")
    if dry_run:
        positions: dict[tuple[str, str], store.Checkpoint | None] = {
            (bt.name, c): None for bt in bound for c in bt.target.columns
        }
    else:
        store.ensure_schema(engine)
        run_lock = acquire_lock(engine, "migrate")
        targets_json = json.dumps([t.as_dict() for t in settings.targets], sort_keys=True)
        try:
            with engine.connect() as conn:
                refuse_to_start(conn, retry_failed=retry_failed)
            if before_first_write is not None:
                # Every check passed and the lock is ours: e.g. the SQLite backup (a
                # refused second migrate must not write a copy).
                before_first_write()
            run, result.resumed = _resume_or_start(
                engine, settings, key.arn, targets_json, new_run, run_lock, retry_failed
            )
        except BaseException:
            run_lock.release(engine)
            raise
        result.run_id = run.id
        log = log.bind(run_id=run.id)
        with engine.connect() as conn:
            positions = dict(store.load_checkpoints(conn, run.id))
    log.info("run_started", resumed=result.resumed, batch_size=settings.batch_size,
             concurrency=settings.concurrency, encryption_context=settings.encryption_context)

    state = "stopped"
    try:
        for bt in bound:
            for column in bt.target.columns:
                summary = ColumnSummary(bt.name, column)
                result.columns.append(summary)
                ck = positions.get((bt.name, column))
                if ck is not None:
                    summary.add(BatchCounts(ck.migrated, ck.skipped, ck.already,
                                            ck.failed, ck.conflicts))
                    if ck.done:
                        continue
                after = bt.pk_value(ck.last_pk) if ck and ck.last_pk is not None else None
                hooks = _Hooks(on_batch, progress or NullProgress(), should_stop)
                if retry_failed:
                    keys = failed_keys(engine, bt, column)
                    fetch = _key_list_fetcher(engine, bt, column, keys, settings.batch_size)
                    hooks.progress.start(bt.name, column, len(keys))
                else:
                    fetch = _keyset_fetcher(engine, bt, column, settings.batch_size)
                    hooks.progress.start(bt.name, column, count_after(engine, bt, after))
                write = None if dry_run else _writer(engine, bt, column, result.run_id,
                                                     run_lock.fence if run_lock else None)
                _migrate_column(bt, column, after, fetch, settings, codec, kms, result,
                                summary, log, hooks, write)
        if not dry_run and not retry_failed:
            # Exit 0 means nothing is left: a token the application wrote behind the
            # cursor (this run's, or before a resume) is named now, never passed over.
            name_left_behind(engine, bound, result, run_lock.fence if run_lock else None)
        state = "completed"
    except KeyboardInterrupt:
        state = "interrupted"
        raise
    except LockLost as exc:
        result.run_id = None  # the new holder owns the run's state now
        raise RunLockedError(str(exc)) from None
    except FatalKMSError as exc:
        state = "stopped"
        if result.run_id is not None:
            _set_state_quietly(engine, result.run_id, state, str(exc))
            result.run_id = None  # already recorded
        raise
    finally:
        result.kms_requests, result.retries = kms.requests, kms.retries
        if kms.limiter is not None:
            result.rate_limit, result.rate_now = kms.limiter.max_rate, kms.limiter.rate
            result.throttles = kms.limiter.throttles
        result.seconds = time.monotonic() - started
        if result.run_id is not None:
            _set_state_quietly(engine, result.run_id, state, None)
            if state == "completed":
                with engine.connect() as conn:
                    result.failures = store.failures_of(conn, result.run_id)
        if run_lock is not None:
            run_lock.release(engine)
        if progress is not None:
            progress.finish()
        log.info("run_finished", state=state, seconds=round(result.seconds, 3),
                 kms_requests=result.kms_requests, retries=result.retries)
    return result


def name_left_behind(engine: Engine, bound: Sequence[BoundTarget], result: MigrateResult,
                     fence: Callable[[Connection], None] | None) -> None:
    """`record_left_behind` for every column of a migrate run, in one fenced transaction,
    counted into the result's column summaries."""
    by_name = {b.name: b for b in bound}
    with engine.begin() as conn:
        if fence is not None:
            fence(conn)
        for summary in result.columns:
            summary.failed += record_left_behind(conn, by_name[summary.table], summary.column,
                                                 result.run_id)


def record_left_behind(conn: Connection, bt: BoundTarget, column: str,
                       run_id: int | None) -> int:
    """Once a migrate run has been through a column: record as failures (REASON_BEHIND)
    the Fernet tokens it holds that the run neither migrated nor already recorded, in the
    caller's transaction; how many. They were written behind the run's cursor (by the
    application, or before a resume), and would otherwise be left under an exit 0."""
    assert run_id is not None
    f = failures.c
    recorded = set(conn.execute(select(f.pk).where(
        f.run_id == run_id, f.table_name == bt.name, f.column_name == column)).scalars())
    col = bt.col(column)
    # LIKE narrows the read on the server (case-insensitive on some databases: classify
    # decides); the prefix holds neither '%' nor '_'.
    q = select(bt.pk, col).where(bt.pk.is_not(None), col.like(f"{FERNET_PREFIX}%"))
    left = [
        FailureRow(bt.name, column, bt.pk_text(pk), REASON_BEHIND)
        for pk, value in conn.execute(q)
        if classify(value) is ValueKind.FERNET and bt.pk_text(pk) not in recorded
    ]
    if left:
        ck = store.load_checkpoints(conn, run_id)[(bt.name, column)]
        store.record_batch(conn, run_id, bt.name, column, last_pk=ck.last_pk,
                           counts=BatchCounts(failed=len(left)), done=True, failure_rows=left)
        get_logger(run_id=run_id).warning("written_behind_the_run", table=bt.name,
                                          column=column, values=len(left))
    return len(left)


# after -> (rows, cursor, last page?). The cursor is the key the page covered up to: the
# next page starts after it. It comes from what was asked for, not from the rows found, so
# it advances even when a page finds no row (keys deleted since they were listed).
Fetcher = Callable[[Any], tuple[list[Row], Any, bool]]
# (rewrites, failures, counts, last_pk, done) -> the counts as committed
Writer = Callable[[list[Rewrite], list[FailureRow], BatchCounts, Any, bool], BatchCounts]


def _writer(
    engine: Engine, bt: BoundTarget, column: str, run_id: int | None,
    fence: Callable[[Connection], None] | None, lease: Lease | None = None,
) -> Writer:
    """How a batch commits: one transaction through the applier."""
    assert run_id is not None

    def write(rewrites: list[Rewrite], failures: list[FailureRow], counts: BatchCounts,
              last_pk: Any, done: bool) -> BatchCounts:
        return apply_migrate_batch(
            engine, bt, column, run_id, rewrites=rewrites, failures=failures, counts=counts,
            last_pk=last_pk, done=done, fence=fence, lease=lease,
        )
    return write


def _keyset_fetcher(
    engine: Engine, bt: BoundTarget, column: str, size: int, upto: Any | None = None
) -> Fetcher:
    def fetch(after: Any) -> tuple[list[Row], Any, bool]:
        rows = fetch_batch(engine, bt, column, after, size, upto)
        # The range's last key read: done, without an empty batch to find out.
        at_end = upto is not None and bool(rows) and rows[-1].pk == upto
        cursor = rows[-1].pk if rows else after  # no row: the last page (len < size)
        return rows, cursor, len(rows) < size or at_end
    return fetch


def _key_list_fetcher(
    engine: Engine, bt: BoundTarget, column: str, keys: list[Any], size: int
) -> Fetcher:
    """Pages through a sorted list of keys (--retry-failed) instead of the whole table."""
    def fetch(after: Any) -> tuple[list[Row], Any, bool]:
        start = 0 if after is None else bisect.bisect_right(keys, after)
        page = keys[start:start + size]
        # The cursor is the page's last key, found or not: a page whose rows were all
        # deleted since still moves on (falling back to None would start over, forever).
        cursor = page[-1] if page else after
        return fetch_keys(engine, bt, column, page), cursor, start + size >= len(keys)
    return fetch


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


def _migrate_column(
    bt: BoundTarget,
    column: str,
    after: object,
    fetch: Fetcher,
    settings: Settings,
    codec: FernetCodec,
    kms: KMS,
    result: MigrateResult,
    summary: ColumnSummary,
    log: object,
    hooks: _Hooks,
    write: Writer | None,
) -> None:
    """Migrate one column from key `after` to the end of what `fetch` pages through; with
    no `write` (a dry-run) the failures go to the result instead."""
    clog = log.bind(table=bt.name, column=column)  # type: ignore[attr-defined]
    batch_no = 0
    rows, cursor, done = fetch(after)
    ctx = settings.encryption_context
    dry = write is None  # a dry-run sizes the KMS texts for real AWS KMS
    summary.column_type = str(bt.col(column).type)
    prep = prepare_rows(rows, bt, column, codec, kms, ctx, size_for_aws=dry)
    upcoming: Prepared | None = None
    try:
        while True:
            batch_no += 1
            batch_rows = rows
            last_pk = cursor
            if not done and (last_pk is None or last_pk == after):
                # Every loop ends: a page that is not the last must move the cursor on.
                raise RuntimeError(
                    f"paging {bt.name}.{column} did not advance past key {after!r}")
            rewrites, failures, counts = finish_rows(prep, bt, column)
            summary.unfit += len(prep.unfit)
            summary.unfit_need = max([summary.unfit_need, *prep.unfit])
            next_done = True
            if not done:
                # Read the next batch and start its KMS work now, so that it overlaps this
                # batch's write. Safe: the two batches hold disjoint keys, and the next one
                # writes nothing until this one has committed its checkpoint.
                after = last_pk
                rows, cursor, next_done = fetch(last_pk)
                upcoming = prepare_rows(rows, bt, column, codec, kms, ctx, size_for_aws=dry)
            if write is None:
                result.failures.extend(failures)
            else:
                counts = write(rewrites, failures, counts, last_pk, done)
            summary.add(counts)
            clog.info("batch_checked" if write is None else "batch_committed",
                      batch=batch_no, migrated=counts.migrated, skipped=counts.skipped,
                      already=counts.already, failed=counts.failed, conflicts=counts.conflicts)
            hooks.progress.advance(bt.name, column, len(batch_rows))
            if hooks.on_batch is not None:
                hooks.on_batch(bt.name, column, counts)
            if done:
                return
            if hooks.should_stop is not None and hooks.should_stop():
                raise KeyboardInterrupt  # asked to stop: this batch is committed, stop here
            assert upcoming is not None
            prep, upcoming, done = upcoming, None, next_done
    except BaseException:
        # Whatever stopped us, the batch read ahead writes nothing: drop its KMS work.
        prep.cancel()
        if upcoming is not None:
            upcoming.cancel()
        raise


@dataclass(frozen=True)
class _Hooks:
    on_batch: BatchHook | None
    progress: Progress
    should_stop: Callable[[], bool] | None


def _set_state_quietly(engine: Engine, run_id: int, state: str, note: str | None) -> None:
    """Record how a run ended; a dead connection must not hide the original error."""
    try:
        with engine.begin() as conn:
            store.set_state(conn, run_id, state, note=note)
    except Exception:  # best effort: the run stays resumable either way
        get_logger(run_id=run_id).warning("run_state_not_recorded", state=state)
