"""The worker of a ranged run (`kms-migrate worker`, started by the supervisor): one
process that claims ranges of the run under a lease and works through each with the
pipeline's column loops, each batch moving the range's checkpoint by a compare-and-swap on
the lease token; a heartbeat thread keeps its lease and its share of the rate limit.

The rate limit is divided among the live workers: each one sets its own token bucket to
`--max-kms-rps / live workers`, re-counted at every heartbeat. A bucket kept in the
database would cost a round trip and a write on one hot row per KMS call (or per batch
of tokens), which is the contention the ranges exist to avoid.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError

from checkpoints import leases, store
from checkpoints.leases import Lease, LeaseLost
from checkpoints.lock import LockLost, RunLock
from checkpoints.store import BatchCounts
from checkpoints.tables import runs

from .batches import ColumnSummary
from .codec import FernetCodec
from .config import (
    Settings,
    Target,
)
from .errors import KmsMigrateError, RunLockedError
from .guard import guards_for
from .kms import KMS, KeyInfo
from .logs import get_logger
from .pages import keyset_fetcher
from .pipeline import ColumnJob, Hooks, migrate_column, rollback_column
from .reader import BoundTarget, bind_target, bind_targets, primary_key_of
from .sizing import BatchSizer
from .steer import Steering
from .worker_spec import WorkerSpec, heartbeat_every

__all__ = ["Heartbeat", "WorkerOutcome", "work", "worker_engine"]

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


# -- the worker -----------------------------------------------------------------------------

@dataclass
class WorkerOutcome:
    worker_id: str
    state: str  # finished | interrupted (stopped | failed while it raises)
    ranges: int = 0
    batches: int = 0


class Heartbeat(threading.Thread):
    """Every few seconds, in its own short transaction: renew the held lease, record the
    worker's heartbeat and KMS counts, re-count the live workers to set this worker's
    share of the rate limit, and notice a run stopped by another worker; then read the
    run's steering (pause, live limits, guards: `Steering.poll`)."""

    def __init__(self, engine: Engine, spec: WorkerSpec, worker_id: str, run_lock: RunLock,
                 steering: Steering, watch_parent: bool) -> None:
        super().__init__(name="kms-migrate-heartbeat", daemon=True)
        self.engine, self.spec, self.worker_id = engine, spec, worker_id
        self.run_lock, self.steering = run_lock, steering
        assert steering.kms is not None
        self.kms: KMS = steering.kms
        self.every = heartbeat_every(spec.lease_seconds)
        self.lease: Lease | None = None
        self.stop_reason: str | None = None
        self.live = 1
        self._done = threading.Event()
        self._ppid = os.getppid() if watch_parent else None
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
        # The run's pause and live limits (the rate shared among the live workers).
        self.steering.share = self.live
        # The run's live processes: a hold recorded by one that is not among them is gone
        # with it (it was killed while held), and is cleared.
        self.steering.peers = {f"{w.host} pid {w.pid}" for w in live} | {self.steering.by}
        self.steering.poll()
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
    worker_id = _register(engine, spec, run_lock)
    if worker_id is None:
        return WorkerOutcome("", "finished")  # joined as the last range was done
    log = get_logger(run_id=spec.run_id, worker=worker_id, kind=spec.kind)
    sizer = BatchSizer(settings.batch_size, settings.batch_time)
    steering = Steering(engine, spec.run_id, sizer, kms=kms, max_kms_rps=settings.max_kms_rps,
                        guards=guards_for(settings, engine), log=log)
    beat = Heartbeat(engine, spec, worker_id, run_lock, steering, watch_parent)
    beat.beat()  # the rate share, and the pause, before the first call
    beat.start()
    outcome = WorkerOutcome(worker_id, "interrupted")
    note: str | None = None

    def stopping() -> bool:
        return bool(beat.stop_reason) or (should_stop is not None and should_stop())

    job = _Job(spec, settings, engine, kms, run_lock, log, stopping, steering, sizer)
    log.info("worker_started", pid=os.getpid(), rate_share=round(
        kms.limiter.max_rate, 1) if kms.limiter else None)
    try:
        _claim_until_done(job, beat, outcome)
        if outcome.state != "finished" and beat.stop_reason:
            note = beat.stop_reason
            log.warning("worker_stopping", reason=note)
    except LockLost as exc:
        outcome.state, note = "stopped", "lock taken over"
        raise RunLockedError(str(exc)) from None
    except KmsMigrateError as exc:
        outcome.state, note = "failed", str(exc)
        # The others stop after their batch (unless this worker was fenced out: the run
        # is then another command's, which this error says nothing about).
        _stop_run_quietly(engine, spec.run_id, str(exc), spec.lock_token)
        raise
    finally:
        beat.close()
        steering.close()
        _finish_quietly(engine, worker_id, outcome.state, note, kms)
        log.info("worker_finished", state=outcome.state, ranges=outcome.ranges)
    if outcome.state != "finished":
        raise KeyboardInterrupt  # stopped between batches: resumable
    return outcome


def _register(engine: Engine, spec: WorkerSpec, run_lock: RunLock) -> str | None:
    """This worker's id in the run, once the run's lock is checked to be still the one it
    was started under; None when the run completed meanwhile."""
    try:
        with engine.begin() as conn:
            run_lock.shared_fence(conn)  # still this run's lock: refuse to start otherwise
            return leases.register_worker(conn, spec.run_id)
    except LockLost:
        with engine.connect() as conn:
            run = store.get_run(conn, spec.run_id)
        if run is not None and run.state == "completed":
            return None
        raise RunLockedError(
            f"run {spec.run_id}'s lock was taken over or released before this worker could "
            "start (the run was resumed or finished elsewhere): nothing was written; check "
            "`kms-migrate status`") from None


def _claim_until_done(job: _Job, beat: Heartbeat, outcome: WorkerOutcome) -> None:
    """Claim range after range and work through each, until no range is left (state
    "finished") or the worker is asked to stop."""
    spec, engine, log = job.spec, job.engine, job.log
    poll = min(1.0, spec.lease_seconds / 10)
    losses = 0  # ranges lost in a row to a session cut off
    while not job.stopping():
        job.steering.hold(job.stopping)  # a paused run claims nothing
        try:
            with engine.begin() as conn:
                lease = leases.claim(conn, spec.run_id, outcome.worker_id, spec.lease_seconds)
                left = leases.undone(conn, spec.run_id) if lease is None else 1
        except DBAPIError as exc:  # the claim rolled back whole: claim again, boundedly
            losses = _after_session_lost(exc, losses, log, None)
            continue
        if lease is None:
            if left == 0:
                outcome.state = "finished"
                return
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
            # The batch in flight rolled back with its session (cut off by the server,
            # e.g. after this process was frozen inside it): nothing of it was written.
            # Its range may have moved to another worker by now: claim again.
            losses = _after_session_lost(exc, losses, log, lease.range_id)
        finally:
            beat.lease = None
            _release_quietly(engine, lease)


def _after_session_lost(exc: DBAPIError, losses: int, log: Any, range_id: int | None) -> int:
    """A transaction lost with its database session (the server cut it off, e.g. while this
    process was frozen) wrote nothing: go on claiming, up to MAX_SESSION_LOSSES in a row;
    any other database error, or one loss too many, stops the worker (raised again)."""
    if not exc.connection_invalidated or losses >= MAX_SESSION_LOSSES:
        raise exc
    log.warning("session_lost", range=range_id,
                error=type(exc.orig).__name__ if exc.orig else type(exc).__name__)
    return losses + 1


@dataclass
class _Job:
    """One range's work, for a migrate or a rollback worker."""

    spec: WorkerSpec
    settings: Settings
    engine: Engine
    kms: KMS
    run_lock: RunLock
    log: Any
    stopping: Callable[[], bool]
    steering: Steering
    sizer: BatchSizer
    bound: dict[tuple[str, str], BoundTarget] = field(default_factory=dict)
    codec: FernetCodec | None = None
    undoes: int | None = None  # a rollback's layer: the rekey run it restores

    def __post_init__(self) -> None:
        spec, settings, engine, kms = self.spec, self.settings, self.engine, self.kms
        with engine.connect() as conn:
            run = store.get_run(conn, spec.run_id)
        self.undoes = run.undoes_run_id if run is not None else None
        if spec.kind in ("migrate", "rekey"):
            for bt in bind_targets(engine, settings.targets):
                for column in bt.target.columns:
                    self.bound[(bt.name, column)] = bt
            if spec.kind == "migrate":
                self.codec = FernetCodec(settings.fernet_keys)
            if kms.key is None and run is not None and run.key_arn:
                # The run's keys as the command that started the run described them (a run
                # refuses other keys): calls are pinned to them, and from now on KMS's
                # ValidationException is about a value (see KMS._classify), as in migrate.
                kms.key = KeyInfo(key_id=settings.key_id, arn=run.key_arn)
                if run.to_key_arn and settings.to_key_id:
                    kms.dest = KeyInfo(key_id=settings.to_key_id, arn=run.to_key_arn)

    def target(self, table: str, column: str) -> BoundTarget:
        bt = self.bound.get((table, column))
        if bt is None:  # a rollback: the journal names the tables
            with self.engine.connect() as conn:
                bt = bind_target(conn, Target(table, primary_key_of(self.engine, table),
                                                (column,)))
            self.bound[(table, column)] = bt
        return bt

    def hooks(self, on_batch: Callable[[str, str, BatchCounts], None] | None = None) -> Hooks:
        return Hooks(on_batch=on_batch, should_stop=self.stopping, steering=self.steering,
                     sizer=self.sizer)

    def run(self, lease: Lease) -> int:
        bt = self.target(lease.table_name, lease.column_name)
        column = lease.column_name
        start = lease.last_pk if lease.last_pk is not None else lease.lo
        log = self.log.bind(range=lease.range_id)
        if self.spec.kind == "rollback":
            job = ColumnJob(self.engine, bt, column, self.settings, run_id=self.spec.run_id,
                            fence=self.run_lock.shared_fence, lease=lease,
                            after=int(start) if start is not None else 0,
                            upto=int(lease.hi) if lease.hi is not None else None, log=log,
                            undoes=self.undoes)
            return rollback_column(job, ColumnSummary(bt.name, column), self.hooks())
        job = ColumnJob(self.engine, bt, column, self.settings, run_id=self.spec.run_id,
                        fence=self.run_lock.shared_fence, lease=lease,
                        after=bt.pk_value(start) if start is not None else None,
                        upto=bt.pk_value(lease.hi) if lease.hi is not None else None,
                        kms=self.kms, codec=self.codec, log=log)
        batches = 0

        def on_batch(table: str, col: str, counts: BatchCounts) -> None:
            nonlocal batches
            batches += 1

        hooks = self.hooks(on_batch)
        fetch = keyset_fetcher(self.engine, bt, column, hooks.size(self.settings.batch_size),
                               job.upto)
        migrate_column(job, fetch, ColumnSummary(bt.name, column), hooks)
        return batches


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
    with contextlib.suppress(Exception), engine.begin() as conn:
        store.stop_running(conn, run_id, note, lock_token=lock_token)
