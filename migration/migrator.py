"""Orchestrates a migrate run: targets, batches, resume, dry-run, summary.

The order of one batch: read (reader) -> Fernet decrypt (codec) -> KMS encrypt and verify
(kms, concurrently) -> one transaction (applier). The slow KMS work happens before the
short write transaction, as lockbox's migrator does its computation outside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select

from checkpoints import store
from checkpoints.lock import RunLock
from checkpoints.store import FailureRow, Run
from checkpoints.tables import failures, runs

from . import __version__
from .batches import (
    REASON_BEHIND,
    REASON_EMPTY,
    REASON_NO_KEY,
    REASON_OVERSIZE,
    ColumnSummary,
)
from .codec import FernetCodec, fernet_key_ids
from .config import Settings, targets_fingerprint
from .errors import ConfigError, ResumeMismatchError
from .guard import close_guards, guards_for
from .kms import KMS
from .logs import get_logger
from .pages import Fetcher, key_list_fetcher, keyset_fetcher
from .pipeline import ColumnJob, Hooks, migrate_column
from .reader import (
    BoundTarget,
    Row,
    bind_targets,
    count_after,
)
from .refusals import (
    check_keys_open_something,
    check_source_opens_something,
    refuse_other_settings,
    refuse_to_start,
)
from .rewrap import Rekey
from .runs import RunEnd, acquire_lock, lifecycle
from .settle import Settle, settle_run
from .steer import Steered, Steering, steered, steering_for

__all__ = [
    "REASON_BEHIND",
    "REASON_EMPTY",
    "REASON_NO_KEY",
    "REASON_OVERSIZE",
    "ColumnSummary",
    "MigrateResult",
    "Mode",
    "migrate",
    "new_run",
    "prepare_keys",
    "run_kind",
]



@dataclass
class MigrateResult:
    dry_run: bool
    kind: str = "migrate"  # migrate | retry | rekey
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
    steered: Steered = field(default_factory=Steered)  # pauses, holds, changes

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.columns)

    @property
    def conflicts(self) -> int:
        return sum(c.conflicts for c in self.columns)

    def real_run_calls(self, settings: Settings) -> int:
        """The KMS requests of the real run a dry-run rehearsed: per value, Encrypt and its
        verifying Decrypt (migrate); ReEncrypt and its checking ReEncrypt, or ReEncrypt
        and two Decrypts with --verify-decrypt (rekey); plus the DescribeKey calls."""
        todo = sum(c.migrated for c in self.columns)
        if self.kind == "rekey":
            return (3 if settings.verify_decrypt else 2) * todo + 2
        return 2 * todo + 1


@dataclass(frozen=True)
class Mode:
    """How a migrate command runs. `dry_run`: the same reads, decrypts, KMS encrypts and
    verifies, nothing written. `retry_failed`: only the values runs recorded as failed.
    `new_run`: abandon an unfinished run instead of resuming it."""

    dry_run: bool = False
    retry_failed: bool = False
    new_run: bool = False


def run_kind(settings: Settings, mode: Mode) -> str:
    """The kind of run a command makes: rekey (its settings name a destination key),
    retry (--retry-failed) or migrate."""
    if settings.to_key_id is not None:
        return "rekey"
    return "retry" if mode.retry_failed else "migrate"


def new_run(settings: Settings, kms: KMS, mode: Mode, *, ranged: bool = False) -> store.NewRun:
    """What a new run of this command records: its kind, targets, keys (described)."""
    assert kms.key is not None
    kind = run_kind(settings, mode)
    rekey = kind == "rekey"
    assert not rekey or kms.dest is not None
    return store.NewRun(
        kind, settings.batch_size,
        targets=[(t.table, c) for t in settings.targets for c in t.columns],
        targets_json=json.dumps([t.as_dict() for t in settings.targets], sort_keys=True),
        fingerprint=targets_fingerprint(
            settings.targets, settings.encryption_context,
            to_context=settings.to_encryption_context if rekey else None),
        key_id=settings.key_id, key_arn=kms.key.arn, region=settings.region,
        tool_version=__version__, ranged=ranged and kind != "retry",
        fernet_key_ids=(json.dumps(fernet_key_ids(settings.fernet_keys))
                        if kind == "migrate" else None),
        to_key_id=settings.to_key_id if rekey else None,
        to_key_arn=kms.dest.arn if rekey and kms.dest else None)


def resume_or_start(engine: Engine, settings: Settings, kms: KMS, run_lock: RunLock,
                    mode: Mode, ranged: bool = False) -> tuple[Run, bool]:
    """The run this command works on, with the lock bound to it: the unfinished migrate (or
    rekey) run resumed, or a new one (always new for a retry); whether it was resumed."""
    new = new_run(settings, kms, mode, ranged=ranged)
    with engine.begin() as conn:
        refuse_to_start(conn, new.kind)
        if new.kind == "retry":
            old = store.unfinished_run(conn, "retry")
            if old is not None:  # a retry re-reads the failures: nothing to resume
                store.set_state(conn, old.id, "abandoned", note="superseded by a new retry")
            retry = store.create_run(conn, new)
            run_lock.bind_run(conn, retry.id)
            return retry, False
        run = store.unfinished_run(conn, new.kind)
        if run is not None and mode.new_run:
            store.set_state(conn, run.id, "abandoned", note="abandoned by --new-run")
            run = None
        if run is not None:
            refuse_other_settings(run, settings, new)
            if run.ranged and not ranged:
                raise ResumeMismatchError(
                    f"unfinished {run.kind} run {run.id} was started with --workers: resume "
                    "it with --workers (any number; 1 on SQLite), or add --new-run to "
                    "abandon it; nothing was written"
                )
            store.set_state(conn, run.id, "running")
            run_lock.bind_run(conn, run.id)
            return run, True
        run = store.create_run(conn, new)
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
    kind = run_kind(settings, mode)
    if kind == "rekey" and mode.retry_failed:
        raise ConfigError("rekey has no --retry-failed: run rekey again, it re-reads every "
                          "value and counts those under the destination as done")
    bound = bind_targets(engine, settings.targets)
    codec = prepare_keys(settings, engine, bound, kms, check=not mode.retry_failed)
    guards = guards_for(settings, engine)  # before the lock: a refusal writes nothing
    result = MigrateResult(dry_run=mode.dry_run, kind=kind)
    log = get_logger(dry_run=mode.dry_run, key_id=settings.key_id, kind=kind)
    run_lock: RunLock | None = None
    positions: dict[tuple[str, str], store.Checkpoint | None] = {
        (bt.name, c): None for bt in bound for c in bt.target.columns}
    steering: Steering | None = None
    if not mode.dry_run:
        try:
            run_lock, run = _take_run(engine, settings, kms, mode, before_first_write)
        except BaseException:
            close_guards(guards)
            raise
        result.run_id, result.resumed = run
        log = log.bind(run_id=result.run_id)
        with engine.connect() as conn:
            positions = dict(store.load_checkpoints(conn, result.run_id))
    if not mode.dry_run or guards:  # a dry-run obeys its guards (its pause file) too
        steering = steering_for(engine, result.run_id, settings, kms=kms, guards=guards,
                                progress=hooks.progress)
    log.info("run_started", resumed=result.resumed, batch_size=settings.batch_size,
             batch_time=settings.batch_time,
             concurrency=settings.concurrency, encryption_context=settings.encryption_context,
             to_key_id=settings.to_key_id, to_encryption_context=settings.to_encryption_context)
    fence = run_lock.fence if run_lock else None
    end = RunEnd()
    try:
        with lifecycle(engine, result.run_id, end), steered(steering, run_lock, guards):
            hooks = hooks.steered_by(steering, settings)
            columns = _Columns(engine, settings, kms, codec, result, log, hooks, fence,
                               positions, mode.retry_failed)
            for bt in bound:
                for column in bt.target.columns:
                    columns.run(bt, column)
            if not mode.dry_run:
                hooks.hold()  # a run paused after its last batch settles once resumed
                # Exit 0 means nothing is left, exit 1 names only values that are: see
                # settle_column (a retry only drops its failures whose value is gone).
                settle_run(engine, bound, result.run_id, result.columns, fence,
                           Settle.of(kind))
    finally:
        if steering is not None:
            result.steered = Steered.of(engine, steering)
        _close(engine, kms, result, end.state, started)
        if run_lock is not None:
            run_lock.release(engine)
        hooks.progress.finish()
        log.info("run_finished", state=end.state, seconds=round(result.seconds, 3),
                 kms_requests=result.kms_requests, retries=result.retries)
    return result


def prepare_keys(settings: Settings, engine: Engine, bound: Sequence[BoundTarget], kms: KMS,
                 *, check: bool = True) -> FernetCodec | None:
    """Describe the run's KMS key (and a rekey run's destination); for a migrate run, the
    Fernet codec, checked to open a sample of the tokens (`check`; a retry's keys are
    checked by retrying, each failure named). Refuses a rekey that would change nothing."""
    kms.describe()
    if settings.to_key_id is None:
        codec = FernetCodec(settings.fernet_keys)
        if check:
            check_keys_open_something(engine, bound, codec)
        return codec
    dest = kms.describe_dest(settings.to_key_id)
    source = kms.key
    assert source is not None
    if dest.arn == source.arn and (settings.encryption_context
                                   == settings.to_encryption_context):
        raise ConfigError(
            f"--to-key {settings.to_key_id} is the source key ({dest.arn}) with the same "
            "encryption context: a rekey would change nothing; name another key, or add "
            "--to-encryption-context to bind the values to their rows; nothing was written")
    if check:
        # The run's own Rekey: a value that re-encrypts here proves its permissions for
        # the whole run (see Rekey._denied).
        check_source_opens_something(
            engine, bound, Rekey.of(kms, settings.verify_decrypt),
            from_context=settings.encryption_context,
            to_context=settings.to_encryption_context)
    return None


def _take_run(engine: Engine, settings: Settings, kms: KMS, mode: Mode,
              before_first_write: Callable[[], None] | None,
              ) -> tuple[RunLock, tuple[int, bool]]:
    """The lock, then the run resumed or started: (lock, (run id, resumed))."""
    store.ensure_schema(engine)
    kind = run_kind(settings, mode)
    run_lock = acquire_lock(engine, kind)
    try:
        with engine.connect() as conn:
            refuse_to_start(conn, kind)
        if before_first_write is not None:
            # Every check passed and the lock is ours: e.g. the SQLite backup (a refused
            # second migrate must not write a copy).
            before_first_write()
        run, resumed = resume_or_start(engine, settings, kms, run_lock, mode)
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
    codec: FernetCodec | None  # None for a rekey run
    result: MigrateResult
    log: Any
    hooks: Hooks
    fence: Callable[[Connection], None] | None
    positions: dict[tuple[str, str], store.Checkpoint | None]
    retry_failed: bool

    def run(self, bt: BoundTarget, column: str) -> None:
        """One column, from its checkpoint (for --retry-failed: the keys its runs recorded
        as failed)."""
        engine, size = self.engine, self.hooks.size(self.settings.batch_size)
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
