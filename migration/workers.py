"""Ranged runs: one migrate or rollback spread over processes and machines.

The run's key space is split into ranges recorded in the bookkeeping tables
(`checkpoints.leases`). A worker claims a range under a lease, works through it batch by
batch with the same pipeline and applier as a single-process run (each batch's
rewrites, journal, failures and the range's checkpoint in one transaction, the range
moved by a compare-and-swap on the lease token), and claims the next. A worker that dies
leaves its lease to expire (at once on its own host, where its pid can be checked); the
next claimer resumes the range from its checkpoint.

The run lock (`checkpoints.lock`) is shared by all the workers of the run: they prove it
with `FOR SHARE` in every batch, so they never wait on each other, and a takeover fences
all of them out at once. `migrate --workers N` starts N worker processes on this
machine; the same command on another machine, against the same database, joins the run.

The rate limit is divided among the live workers: each one sets its own token bucket to
`--max-kms-rps / live workers`, re-counted at every heartbeat. A bucket kept in the
database would cost a round trip and a write on one hot row per KMS call (or per batch
of tokens), which is the contention the ranges exist to avoid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import DBAPIError

from checkpoints import leases, store
from checkpoints.leases import Lease, LeaseLost
from checkpoints.lock import LockHeld, LockLost, RunLock
from checkpoints.store import BatchCounts, Run
from checkpoints.tables import checkpoints, journal, lock, runs

from .codec import FernetCodec
from .config import Settings, Target, fernet_keys_from_env
from .errors import ConfigError, KmsMigrateError, RunLockedError, WorkersFailed
from .kms import KMS, KeyInfo
from .logs import get_logger
from .migrator import (
    ColumnSummary,
    MigrateResult,
    _Hooks,
    _keyset_fetcher,
    _migrate_column,
    _resume_or_start,
    _writer,
    check_keys_open_something,
    record_left_behind,
    refuse_other_settings,
    refuse_to_start,
)
from .progress import NullProgress, Progress
from .reader import BoundTarget, bind_target, bind_targets, count_after
from .rollback import (
    RollbackResult,
    _pk_name,
    _rollback_column,
    check_can_roll_back,
    start_rollback_run,
)

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_ROWS_PER_RANGE",
    "WorkerSpec",
    "migrate_ranged",
    "rollback_ranged",
    "work",
]

DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_ROWS_PER_RANGE = 20_000
MAX_HEARTBEAT = 5.0  # seconds between heartbeats, at most (a quarter of the lease below 20 s)
# Ranges in a row a worker may lose to its database session being cut off (the server
# ends a session left idle inside a transaction, e.g. by a worker frozen mid-batch) before
# it stops on the error: the batch rolled back whole, so it claims again, boundedly.
MAX_SESSION_LOSSES = 3
SIBLINGS_WAIT = 120.0  # seconds a worker counts its not-yet-registered siblings as live
WORKER_STATEMENT_TIMEOUT = 120.0  # seconds: a worker's statements are one batch's


def worker_engine(url: str, lease_seconds: float) -> Engine:
    """A worker's engine: its sessions are cut off by the server when idle inside a
    transaction for half a lease, so a worker frozen mid-batch (GC pause, VM freeze,
    SIGSTOP) releases its row locks and its share of the run lock's row before its lease
    expires, and the range's next claimer can work; once it runs again, its batch fails
    on the lost session and rolls back, and its range's lease is no longer its own."""
    from .db import idle_timeout_for_lease, make_engine

    return make_engine(url, idle_timeout=idle_timeout_for_lease(lease_seconds),
                       statement_timeout=WORKER_STATEMENT_TIMEOUT)


def heartbeat_every(lease_seconds: float) -> float:
    return min(MAX_HEARTBEAT, lease_seconds / 4)


# -- what a worker is told ------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs but its Fernet keys, which it reads from its own
    environment like any kms-migrate command. Sent on the worker's stdin (not argv, which
    `ps` shows: the database URL may hold a password)."""

    kind: str  # migrate | rollback
    run_id: int
    lock_token: str
    lease_seconds: float
    settings: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)
    workers: int = 1  # started by the same command, this one included
    others: int = 0  # live workers of the run elsewhere when the command started its own

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    d = asdict(replace(settings, fernet_keys=()))
    d.pop("fernet_keys")
    d["targets"] = [t.as_dict() for t in settings.targets]
    return d


def settings_from_dict(d: dict[str, Any]) -> Settings:
    targets = tuple(Target(t["table"], t["primary_key"], tuple(t["columns"]))
                    for t in d["targets"])
    return Settings(**{**d, "targets": targets}, fernet_keys=fernet_keys_from_env())


# -- the worker -----------------------------------------------------------------------------

@dataclass
class WorkerOutcome:
    worker_id: str
    state: str  # finished | interrupted
    ranges: int = 0
    batches: int = 0


class Heartbeat(threading.Thread):
    """Every few seconds, in its own short transaction: renew the held lease, record the
    worker's heartbeat and KMS counts, re-count the live workers to set this worker's
    share of the rate limit, and notice a run stopped by another worker."""

    def __init__(self, engine: Engine, spec: WorkerSpec, worker_id: str, kms: KMS,
                 run_lock: RunLock, watch_parent: bool) -> None:
        super().__init__(name="kms-migrate-heartbeat", daemon=True)
        self.engine, self.spec, self.worker_id, self.kms = engine, spec, worker_id, kms
        self.run_lock = run_lock
        self.every = heartbeat_every(spec.lease_seconds)
        self.lease: Lease | None = None
        self.stop_reason: str | None = None
        self.live = 1
        self._done = threading.Event()
        self._ppid = os.getppid() if watch_parent else None
        self._max_rps = float(spec.settings.get("max_kms_rps") or 0)
        # The share from the first call on: this worker's siblings, started at the same
        # moment, may not have registered yet, but will. Counted as live until the count
        # has reached them once (or, for a sibling that never came, for SIBLINGS_WAIT).
        self._expected = max(1, spec.workers + spec.others)
        self._expect_until = time.monotonic() + SIBLINGS_WAIT

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.beat()

    def close(self) -> None:
        self._done.set()

    def wait(self, seconds: float) -> None:
        self._done.wait(seconds)

    def beat(self) -> None:
        limiter = self.kms.limiter
        try:
            with self.engine.begin() as conn:
                lease = self.lease
                if lease is not None:
                    leases.renew(conn, lease)
                leases.heartbeat(
                    conn, self.worker_id, kms_requests=self.kms.requests,
                    retries=self.kms.retries,
                    throttles=limiter.throttles if limiter else 0,
                    rate=limiter.rate if limiter else None,
                )
                live = leases.live_workers(conn, self.spec.run_id,
                                           timedelta(seconds=3 * self.every))
                state = conn.execute(
                    select(runs.c.state).where(runs.c.id == self.spec.run_id)).scalar()
            self.run_lock.touch(self.engine, timedelta(seconds=self.every))
        except Exception as exc:  # a database hiccup: the next beat tries again
            get_logger(worker=self.worker_id).warning("heartbeat_failed",
                                                      error=type(exc).__name__)
            return
        self.live = max(1, len(live))
        if self._expected > self.live and time.monotonic() < self._expect_until:
            self.live = self._expected
        else:
            self._expected = 0  # every sibling came (or never will): the live count rules
        if limiter is not None and self._max_rps > 0:
            limiter.set_max_rate(self._max_rps / self.live)
        if state != "running":  # stopped by another worker's fatal error, or abandoned
            self.stop_reason = f"run {self.spec.run_id} is {state}"
        if self._ppid is not None and os.getppid() != self._ppid:
            self.stop_reason = "the command that started this worker is gone"


def work(
    spec: WorkerSpec,
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    should_stop: Callable[[], bool] | None = None,
    watch_parent: bool = False,
) -> WorkerOutcome:
    """Claim ranges of the run and work through them until every range is done.

    Waits (polling) while other live workers still hold the last ranges, so that a range
    whose worker dies is picked up and the run ends complete. Stops after the batch in
    flight when `should_stop` says so, or when the run was stopped by another worker.
    """
    run_lock = RunLock(spec.lock_token, spec.kind)
    try:
        with engine.begin() as conn:
            run_lock.shared_fence(conn)  # still this run's lock: refuse to start otherwise
            worker_id = leases.register_worker(conn, spec.run_id)
    except LockLost:
        with engine.connect() as conn:
            run = store.get_run(conn, spec.run_id)
        if run is not None and run.state == "completed":
            return WorkerOutcome("", "finished")  # joined as the last range was done
        raise RunLockedError(
            f"run {spec.run_id}'s lock was taken over or released before this worker could "
            "start (the run was resumed or finished elsewhere): nothing was written; check "
            "`kms-migrate status`") from None
    log = get_logger(run_id=spec.run_id, worker=worker_id, kind=spec.kind)
    beat = Heartbeat(engine, spec, worker_id, kms, run_lock, watch_parent)
    beat.beat()  # the rate share before the first call
    beat.start()
    outcome = WorkerOutcome(worker_id, "interrupted")
    state, note = "interrupted", None

    def stopping() -> bool:
        return bool(beat.stop_reason) or (should_stop is not None and should_stop())

    job = _Job(spec, settings, engine, kms, run_lock, log, stopping)
    poll = min(1.0, spec.lease_seconds / 10)
    log.info("worker_started", pid=os.getpid(), rate_share=round(
        kms.limiter.max_rate, 1) if kms.limiter else None)
    losses = 0  # ranges lost in a row to a session cut off
    try:
        while not stopping():
            with engine.begin() as conn:
                lease = leases.claim(conn, spec.run_id, worker_id, spec.lease_seconds)
                left = leases.undone(conn, spec.run_id) if lease is None else 1
            if lease is None:
                if left == 0:
                    outcome.state = state = "finished"
                    break
                beat.wait(poll)  # others hold the last ranges: take one over if they die
                continue
            beat.lease = lease
            log.info("range_claimed", range=lease.range_id, table=lease.table_name,
                     column=lease.column_name, resume_after=lease.last_pk or lease.lo)
            try:
                outcome.batches += job.run(lease)
                outcome.ranges += 1
                losses = 0
            except LeaseLost:
                log.warning("lease_lost", range=lease.range_id)
            except DBAPIError as exc:
                if not exc.connection_invalidated or losses >= MAX_SESSION_LOSSES:
                    raise
                # The batch in flight rolled back with its session (cut off by the server,
                # e.g. after this process was frozen inside it): nothing of it was written.
                # Its range may have moved to another worker by now: claim again.
                losses += 1
                log.warning("session_lost", range=lease.range_id,
                            error=type(exc.orig).__name__ if exc.orig else type(exc).__name__)
            finally:
                beat.lease = None
                _release_quietly(engine, lease)
        if state != "finished" and beat.stop_reason:
            note = beat.stop_reason
            log.warning("worker_stopping", reason=note)
    except LockLost as exc:
        state, note = "stopped", "lock taken over"
        raise RunLockedError(str(exc)) from None
    except KmsMigrateError as exc:
        state, note = "failed", str(exc)
        # The others stop after their batch (unless this worker was fenced out: the run
        # is then another command's, which this error says nothing about).
        _stop_run_quietly(engine, spec.run_id, str(exc), spec.lock_token)
        raise
    finally:
        beat.close()
        _finish_quietly(engine, worker_id, state, note, kms)
        log.info("worker_finished", state=state, ranges=outcome.ranges)
    if state != "finished":
        raise KeyboardInterrupt  # stopped between batches: resumable
    return outcome


class _Job:
    """One range's work, for a migrate or a rollback worker."""

    def __init__(self, spec: WorkerSpec, settings: Settings, engine: Engine, kms: KMS,
                 run_lock: RunLock, log: Any, stopping: Callable[[], bool]) -> None:
        self.spec, self.settings, self.engine, self.kms = spec, settings, engine, kms
        self.run_lock, self.log, self.stopping = run_lock, log, stopping
        self.bound: dict[tuple[str, str], BoundTarget] = {}
        if spec.kind == "migrate":
            for bt in bind_targets(engine, settings.targets):
                for column in bt.target.columns:
                    self.bound[(bt.name, column)] = bt
            self.codec = FernetCodec(settings.fernet_keys)
            with engine.connect() as conn:
                run = store.get_run(conn, spec.run_id)
            if kms.key is None and run is not None and run.key_arn:
                # The run's key as the command that started the run described it (a run
                # refuses another key): Decrypt is pinned to it, and from now on KMS's
                # ValidationException is about a value (see KMS._classify), as in migrate.
                kms.key = KeyInfo(key_id=settings.key_id, arn=run.key_arn)

    def target(self, table: str, column: str) -> BoundTarget:
        bt = self.bound.get((table, column))
        if bt is None:  # a rollback: the journal names the tables
            with self.engine.connect() as conn:
                bt = bind_target(conn, Target(table, _pk_name(self.engine, table), (column,)))
            self.bound[(table, column)] = bt
        return bt

    def run(self, lease: Lease) -> int:
        bt = self.target(lease.table_name, lease.column_name)
        if self.spec.kind == "rollback":
            return self._rollback(bt, lease)
        column = lease.column_name
        start = lease.last_pk if lease.last_pk is not None else lease.lo
        after = bt.pk_value(start) if start is not None else None
        upto = bt.pk_value(lease.hi) if lease.hi is not None else None
        fetch = _keyset_fetcher(self.engine, bt, column, self.settings.batch_size, upto)
        write = _writer(self.engine, bt, column, self.spec.run_id, self.run_lock.shared_fence,
                        lease)
        result = MigrateResult(dry_run=False, run_id=self.spec.run_id)
        summary = ColumnSummary(bt.name, column)
        batches = 0

        def on_batch(table: str, col: str, counts: BatchCounts) -> None:
            nonlocal batches
            batches += 1

        hooks = _Hooks(on_batch, NullProgress(), self.stopping)
        _migrate_column(bt, column, after, fetch, self.settings, self.codec, self.kms, result,
                        summary, self.log.bind(range=lease.range_id), hooks, write)
        return batches

    def _rollback(self, bt: BoundTarget, lease: Lease) -> int:
        column = lease.column_name
        start = lease.last_pk if lease.last_pk is not None else lease.lo
        return _rollback_column(
            self.engine, bt, column, int(start) if start is not None else 0,
            self.settings.batch_size, self.spec.run_id, self.run_lock.shared_fence,
            ColumnSummary(bt.name, column), self.log.bind(range=lease.range_id),
            NullProgress(), self.stopping,
            upto=int(lease.hi) if lease.hi is not None else None, lease=lease)


def _release_quietly(engine: Engine, lease: Lease) -> None:
    with contextlib.suppress(Exception), engine.begin() as conn:
        leases.release(conn, lease)


def _finish_quietly(engine: Engine, worker_id: str, state: str, note: str | None,
                    kms: KMS) -> None:
    limiter = kms.limiter
    with contextlib.suppress(Exception), engine.begin() as conn:
        leases.finish_worker(conn, worker_id, state, note, kms_requests=kms.requests,
                             retries=kms.retries,
                             throttles=limiter.throttles if limiter else 0)


def _stop_run_quietly(engine: Engine, run_id: int, note: str, lock_token: str) -> None:
    """Stop the run on this worker's fatal error, if the run's lock is still the one this
    worker was started under."""
    held = select(lock.c.token).where(lock.c.token == lock_token).exists()
    with contextlib.suppress(Exception), engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state == "running", held)
                     .values(state="stopped", note=note, updated_at=store.now()))


# -- the command that starts workers ----------------------------------------------------------

class Proc(Protocol):
    """What the supervisor needs of a worker process (subprocess.Popen has it)."""

    pid: int

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


Spawn = Callable[[WorkerSpec, int], Sequence[Proc]]


def spawn_processes(spec: WorkerSpec, n: int) -> list[Proc]:
    """N `kms-migrate worker` processes, each told its spec on stdin. They inherit the
    environment (Fernet keys, AWS credentials) and ignore Ctrl-C: the command forwards a
    stop to them as SIGTERM (first: after the batch in flight; second: at once)."""
    procs: list[Proc] = []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-m", "migration", "worker"],
                             stdin=subprocess.PIPE, text=True)
        assert p.stdin is not None
        p.stdin.write(spec.to_json())
        p.stdin.close()
        procs.append(p)
    return procs


@dataclass
class RangedStart:
    run: Run
    lock: RunLock
    joined: bool
    resumed: bool


BIND_WAIT = 10.0  # seconds to wait for the lock's holder to name its run
PLAN_WAIT = 600.0  # seconds to wait for a ranged run's plan (one pass over each key index)
JOIN_POLL = 0.2


def _join_or_refuse(engine: Engine, kind: str, exc: LockHeld) -> tuple[RunLock, Run]:
    """The lock is held: join when it is held by an unfinished ranged run of this kind.

    A ranged run is joinable from the moment it exists; while its command is still
    planning its ranges (seconds on big tables), wait for them: a worker that found no
    range would take the run for done."""
    started = time.monotonic()
    while True:
        held = RunLock.held_by(engine)
        if held is None:
            break  # released in between: the run ended or failed to start
        run_lock, run_id = held
        waited = time.monotonic() - started
        if run_id is None:  # taken a moment ago: its holder is about to name its run
            if waited < BIND_WAIT:
                time.sleep(JOIN_POLL)
                continue
            break
        with engine.connect() as conn:
            run = store.get_run(conn, run_id)
            ready = run is not None and leases.planned(conn, run_id)
        if (run is None or run.kind != kind or not run.ranged
                or run.state not in store.UNFINISHED):
            break
        if ready:
            return run_lock, run
        if run.state != "running" or waited >= PLAN_WAIT:
            break
        time.sleep(JOIN_POLL)
    raise RunLockedError(str(exc)) from None


def start_ranged_migrate(
    settings: Settings, engine: Engine, key_arn: str, *, new_run: bool,
    rows_per_range: int, workers: int = 1,
    before_first_write: Callable[[], None] | None = None,
) -> RangedStart:
    """Take the run lock and start or resume a ranged run, or join the one running.

    `before_first_write` (e.g. the SQLite backup) runs once the lock is ours and every
    check passed, before the run starts (not when joining a run already running)."""
    store.ensure_schema(engine)
    try:
        run_lock = RunLock.acquire(engine, "migrate")
    except LockHeld as exc:
        run_lock, run = _join_or_refuse(engine, "migrate", exc)
        refuse_other_settings(run, settings, key_arn)
        if run.max_kms_rps is not None and run.max_kms_rps != settings.max_kms_rps:
            get_logger(run_id=run.id).warning(
                "joining_with_the_runs_rate_limit", max_kms_rps=run.max_kms_rps,
                given=settings.max_kms_rps)
        if new_run:
            raise RunLockedError(
                f"migrate run {run.id} is running with workers: --new-run cannot abandon it "
                "while they work; stop them first (Ctrl-C where they were started)"
            ) from None
        return RangedStart(run, run_lock, joined=True, resumed=True)
    try:
        targets_json = json.dumps([t.as_dict() for t in settings.targets], sort_keys=True)
        with engine.connect() as conn:
            refuse_to_start(conn)
        if before_first_write is not None:
            before_first_write()
        run, resumed = _resume_or_start(engine, settings, key_arn, targets_json, new_run,
                                        run_lock, ranged=True)
        bound = bind_targets(engine, settings.targets)
        with engine.begin() as conn:
            _plan(conn, run, [(bt, c) for bt in bound for c in bt.target.columns],
                  _Sizing(rows_per_range, RANGES_PER_WORKER * workers, settings.batch_size),
                  run_lock)
            conn.execute(update(runs).where(runs.c.id == run.id)
                         .values(max_kms_rps=settings.max_kms_rps))
            run = store.get_run(conn, run.id) or run
    except BaseException:
        run_lock.release(engine)
        raise
    return RangedStart(run, run_lock, joined=False, resumed=resumed)


RANGES_PER_WORKER = 4  # per column, at the least: the last ranges end close together


@dataclass(frozen=True)
class _Sizing:
    rows_per_range: int
    min_ranges: int
    min_rows: int  # a batch: a range smaller than that is not worth a claim


def _plan(conn: Any, run: Run, columns: Sequence[tuple[BoundTarget, str]],
          sizing: _Sizing, lock: RunLock) -> None:
    """Split each unfinished column into ranges from its checkpoint on (once per run);
    on a ranged run this command now holds the lock of, void the leases of the workers
    that held it before (none of them can commit any more: the lock token changed)."""
    if _resume_planned(conn, run, lock):
        return
    cks = store.load_checkpoints(conn, run.id)
    for bt, column in columns:
        ck = cks.get((bt.name, column))
        if ck is None or ck.done:
            continue
        where = [bt.pk > bt.pk_value(ck.last_pk)] if ck.last_pk is not None else []
        bounds = leases.boundaries(conn, bt.table, bt.pk, where, sizing.rows_per_range,
                                   min_ranges=sizing.min_ranges, min_rows=sizing.min_rows)
        leases.create_ranges(conn, run.id, bt.name, column, ck.last_pk,
                             [bt.pk_text(b) for b in bounds])
    conn.execute(update(runs).where(runs.c.id == run.id).values(ranged=True))


def _resume_planned(conn: Any, run: Run, lock: RunLock) -> bool:
    """A run whose ranges exist already (a ranged run resumed): void the leases of the
    workers that held it before this command took its lock, and mark those workers lost;
    not those of workers that joined since. Whether it was planned."""
    if not leases.planned(conn, run.id):
        return False  # a new run (ranged from its creation), or a single-process one
    before = lock.acquired_at(conn)
    leases.release_all(conn, run.id, before=before)
    leases.mark_lost(conn, run.id, before=before)
    return True


def _plan_rollback(conn: Any, run: Run, sizing: _Sizing, lock: RunLock) -> None:
    if _resume_planned(conn, run, lock):
        return
    j = journal.c
    for (table, column), ck in sorted(store.load_checkpoints(conn, run.id).items()):
        if ck.done:
            continue
        start = int(ck.last_pk) if ck.last_pk is not None else 0
        where = [j.table_name == table, j.column_name == column, j.status == "migrated",
                 j.id > start]
        bounds = leases.boundaries(conn, journal, j.id, where, sizing.rows_per_range,
                                   min_ranges=sizing.min_ranges, min_rows=sizing.min_rows)
        leases.create_ranges(conn, run.id, table, column, ck.last_pk, [str(b) for b in bounds])
    conn.execute(update(runs).where(runs.c.id == run.id).values(ranged=True))


def migrate_ranged(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    workers: int,
    new_run: bool = False,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    rows_per_range: int = DEFAULT_ROWS_PER_RANGE,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_first_write: Callable[[], None] | None = None,
    spawn: Spawn = spawn_processes,
    log_opts: dict[str, Any] | None = None,
) -> MigrateResult:
    """`migrate --workers N`: start, resume or join a ranged run; run N workers here."""
    started = time.monotonic()
    bound = bind_targets(engine, settings.targets)
    check_keys_open_something(engine, bound, FernetCodec(settings.fernet_keys))
    key = kms.describe()
    start = start_ranged_migrate(settings, engine, key.arn, new_run=new_run,
                                 rows_per_range=rows_per_range, workers=workers,
                                 before_first_write=before_first_write)
    if start.run.max_kms_rps is not None:  # the run's limit, whoever started it
        settings = replace(settings, max_kms_rps=start.run.max_kms_rps)
    result = MigrateResult(dry_run=False, run_id=start.run.id, resumed=start.resumed,
                           joined=start.joined)
    spec = WorkerSpec("migrate", start.run.id, start.lock.token, lease_seconds,
                      settings_to_dict(settings), log_opts or {})
    pids = _work_here(engine, start, spec, workers,
                      _column_totals_migrate(engine, start.run.id, bound), progress,
                      should_stop, spawn, bound)
    with engine.connect() as conn:
        result.columns = _summaries(conn, start.run.id)
        result.failures = store.failures_of(conn, start.run.id)
        result.kms_requests, result.retries, result.throttles = _kms_counts(conn, start.run.id,
                                                                            pids)
    result.kms_requests += kms.requests
    result.rate_limit = settings.max_kms_rps or None
    result.seconds = time.monotonic() - started
    return result


def rollback_ranged(
    engine: Engine,
    *,
    settings: Settings,
    workers: int,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    rows_per_range: int = DEFAULT_ROWS_PER_RANGE,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_first_write: Callable[[], None] | None = None,
    spawn: Spawn = spawn_processes,
    log_opts: dict[str, Any] | None = None,
) -> RollbackResult:
    """`rollback --workers N`: the journal's id space split into ranges, per column."""
    started = time.monotonic()
    check_can_roll_back(engine)
    store.ensure_schema(engine)
    try:
        run_lock = RunLock.acquire(engine, "rollback")
    except LockHeld as exc:
        run_lock, run = _join_or_refuse(engine, "rollback", exc)
        start = RangedStart(run, run_lock, joined=True, resumed=True)
    else:
        try:
            if before_first_write is not None:
                before_first_write()  # the lock is ours: e.g. the SQLite backup
            run, resumed = start_rollback_run(engine, settings.batch_size, run_lock,
                                              ranged=True)
            with engine.begin() as conn:
                _plan_rollback(conn, run, _Sizing(rows_per_range, RANGES_PER_WORKER * workers,
                                                  settings.batch_size), run_lock)
        except BaseException:
            run_lock.release(engine)
            raise
        start = RangedStart(run, run_lock, joined=False, resumed=resumed)
    spec = WorkerSpec("rollback", start.run.id, start.lock.token, lease_seconds,
                      settings_to_dict(settings), log_opts or {})
    _work_here(engine, start, spec, workers, _column_totals_rollback(engine, start.run.id),
               progress, should_stop, spawn)
    result = RollbackResult(run_id=start.run.id, resumed=start.resumed)
    with engine.connect() as conn:
        result.columns = _summaries(conn, start.run.id)
        result.failures = store.failures_of(conn, start.run.id)
    result.seconds = time.monotonic() - started
    return result


# -- supervising -----------------------------------------------------------------------------

def _column_totals_migrate(engine: Engine, run_id: int,
                           bound: Sequence[BoundTarget]) -> dict[tuple[str, str], int]:
    """Rows each column still has to go through (for progress), from the ranges left."""
    out: dict[tuple[str, str], int] = {}
    with engine.connect() as conn:
        rows = leases.list_ranges(conn, run_id)
    by_name = {bt.name: bt for bt in bound}
    for r in rows:
        if r.done:
            continue
        bt = by_name[r.table_name]
        start = r.last_pk if r.last_pk is not None else r.lo
        n = count_after(engine, bt, bt.pk_value(start) if start is not None else None,
                        bt.pk_value(r.hi) if r.hi is not None else None)
        key = (r.table_name, r.column_name)
        out[key] = out.get(key, 0) + n
    return out


def _column_totals_rollback(engine: Engine, run_id: int) -> dict[tuple[str, str], int]:
    j = journal.c
    with engine.connect() as conn:
        q = select(j.table_name, j.column_name, func.count()).where(
            j.status == "migrated").group_by(j.table_name, j.column_name)
        return {(t, c): int(n) for t, c, n in conn.execute(q)}


def _processed(engine: Engine, run_id: int) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        totals = leases.range_totals(conn, run_id)
    return {k: c.migrated + c.skipped + c.already + c.failed + c.conflicts
            for k, c in totals.items()}


def _run_workers(
    engine: Engine, spec: WorkerSpec, n: int, totals: dict[tuple[str, str], int],
    progress: Progress, should_stop: Callable[[], bool] | None, spawn: Spawn,
) -> tuple[list[int], list[int]]:
    """Start the workers, show progress from the ranges, forward a stop; their exit codes.

    The columns advance together, so progress is one count over all of them (the ranges'
    processed rows, polled from the database, whichever machine's worker did them)."""
    seen = [sum(_processed(engine, spec.run_id).values())]
    name = f"{len(totals)} column(s), all workers"
    progress.start(name, "", sum(totals.values()))
    procs = list(spawn(spec, n))
    forwarded = False
    try:
        try:
            while _poll_all(procs):
                if should_stop is not None and should_stop() and not forwarded:
                    _signal_all(procs, signal.SIGTERM)  # first: after the batch in flight
                    forwarded = True
                _advance(engine, spec.run_id, seen, progress, name)
                time.sleep(0.25)
        except KeyboardInterrupt:
            # A second stop: abort the batches in flight (a worker takes its second
            # SIGTERM as that), then conclude as after any stop: the run is resumable.
            if not forwarded:
                _signal_all(procs, signal.SIGTERM)
            _signal_all(procs, signal.SIGTERM)
            for p in procs:
                p.wait()
        _advance(engine, spec.run_id, seen, progress, name)
    finally:
        progress.finish()
    return [p.poll() or 0 for p in procs], [p.pid for p in procs]


def _poll_all(procs: Sequence[Proc]) -> bool:
    """Poll every worker, so each one that died is reaped at once (a zombie's pid still
    looks alive, and its range would wait a full lease); whether any still runs."""
    return [p.poll() for p in procs].count(None) > 0


def _advance(engine: Engine, run_id: int, seen: list[int], progress: Progress,
             name: str) -> None:
    with contextlib.suppress(Exception):  # progress is best effort: never stop a run for it
        n = sum(_processed(engine, run_id).values())
        if n > seen[0]:
            progress.advance(name, "", n - seen[0])
            seen[0] = n


def _signal_all(procs: Sequence[Proc], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)


def _conclude(engine: Engine, start: RangedStart, codes: Sequence[int],
              bound: Sequence[BoundTarget] = ()) -> None:
    """After this machine's workers exited: complete the run when every range is done,
    release the lock when no worker of the run is left anywhere; otherwise say why.

    `bound`: a migrate run's targets; the command that completes the run records the
    Fernet tokens written behind its ranges (`record_left_behind`), so exit 0 still means
    nothing is left."""
    run_id = start.run.id
    with engine.begin() as conn:
        leases.mark_dead_here(conn, run_id)
        left = leases.undone(conn, run_id)
        others = leases.live_workers(conn, run_id, timedelta(minutes=2))
        if left == 0:
            # Workers elsewhere that went silent (their machine died) are not running:
            # status would show them so forever once the run is over.
            leases.mark_silent_lost(conn, run_id, timedelta(seconds=3 * MAX_HEARTBEAT))
            conn.execute(update(checkpoints).where(checkpoints.c.run_id == run_id)
                         .values(done=True, updated_at=store.now()))
            completed = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state.in_(
                store.UNFINISHED)).values(state="completed", finished_at=store.now(),
                                          updated_at=store.now())).rowcount
            if completed == 1:  # this command completed it: no other one records twice
                for bt in bound:
                    for column in bt.target.columns:
                        record_left_behind(conn, bt, column, run_id)
        elif not others and all(c != 2 for c in codes):
            # Stopped between batches; a run another worker stopped on its fatal error
            # stays `stopped`, with that error as its note.
            conn.execute(update(runs).where(runs.c.id == run_id, runs.c.state == "running")
                         .values(state="interrupted", updated_at=store.now()))
        run = store.get_run(conn, run_id)
    if left == 0 or not others:
        start.lock.release(engine)
    if left == 0:
        return
    if run is not None and run.state == "stopped" and run.note and all(
            c in (0, 130) for c in codes):
        # This machine's workers stopped because a worker elsewhere met a fatal error.
        raise WorkersFailed(
            f"run {run_id} was stopped by a worker's error ({run.note}); it keeps every "
            "committed batch: fix the cause, then re-run the same command to resume")
    failed = sum(1 for c in codes if c not in (0, 130))  # 2, or killed by a signal
    if failed:
        why = f" ({run.note})" if run is not None and run.note else ""
        raise WorkersFailed(
            f"{failed} of {len(codes)} worker(s) stopped on an error or were killed{why}; run "
            f"{run_id} keeps "
            "every committed batch: fix the cause, then re-run the same command to resume"
        )
    raise KeyboardInterrupt  # stopped between batches (the others, if any, go on): resumable


def _work_here(
    engine: Engine, start: RangedStart, spec: WorkerSpec, n: int,
    totals: dict[tuple[str, str], int], progress: Progress | None,
    should_stop: Callable[[], bool] | None, spawn: Spawn, bound: Sequence[BoundTarget] = (),
) -> list[int]:
    """Run this machine's N workers of the run to their end, then conclude (which raises
    unless the whole run is done); the workers' pids."""
    with engine.connect() as conn:
        others = len(leases.live_workers(conn, spec.run_id,
                                         timedelta(seconds=3 * heartbeat_every(
                                             spec.lease_seconds))))
    spec = replace(spec, workers=n, others=others)  # each worker's rate share from the start
    get_logger(run_id=spec.run_id, kind=spec.kind).info(
        "workers_starting", workers=n, joined=start.joined, others=others)
    codes, pids = _run_workers(engine, spec, n, totals, progress or NullProgress(),
                               should_stop, spawn)
    _conclude(engine, start, codes, bound)
    return pids


def _summaries(conn: Any, run_id: int) -> list[ColumnSummary]:
    out = []
    for (table, column), counts in _column_counts(conn, run_id).items():
        summary = ColumnSummary(table, column)
        summary.add(counts)
        out.append(summary)
    return out


def _column_counts(conn: Any, run_id: int) -> dict[tuple[str, str], BatchCounts]:
    """A ranged run's counts per column: what it did before it was ranged (its column
    checkpoints), plus its ranges."""
    out: dict[tuple[str, str], BatchCounts] = {}
    for key, ck in sorted(store.load_checkpoints(conn, run_id).items()):
        out[key] = BatchCounts(ck.migrated, ck.skipped, ck.already, ck.failed, ck.conflicts)
    for key, c in leases.range_totals(conn, run_id).items():
        b = out.get(key, BatchCounts())
        out[key] = BatchCounts(b.migrated + c.migrated, b.skipped + c.skipped,
                               b.already + c.already, b.failed + c.failed,
                               b.conflicts + c.conflicts)
    return out


def _kms_counts(conn: Any, run_id: int, pids: Sequence[int]) -> tuple[int, int, int]:
    mine = [w for w in leases.list_workers(conn, run_id) if w.pid in set(pids)]
    return (sum(w.kms_requests for w in mine), sum(w.retries for w in mine),
            sum(w.throttles for w in mine))


@contextlib.contextmanager
def worker_signals() -> Iterator[Callable[[], bool]]:
    """In a worker process: ignore Ctrl-C (the terminal sends it to the whole group; the
    command forwards it), first SIGTERM stops after the batch, second aborts it."""
    requested = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True

    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def refuse_sqlite_workers(url: str, workers: int) -> None:
    from .db import is_sqlite

    if workers > 1 and is_sqlite(url):
        raise ConfigError(
            f"--workers {workers} needs PostgreSQL: SQLite lets one process write at a time, "
            "so more workers would only queue on its lock; use --workers 1 (or leave it out) "
            "on SQLite; nothing was written"
        )

