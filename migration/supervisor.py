"""Ranged runs: one migrate or rollback spread over processes and machines (the
supervisor: the command that plans the ranges, starts this machine's workers, shows progress
and concludes the run; the worker itself is worker.py).

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
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import Engine, func, select

from checkpoints import control, leases, store
from checkpoints.lock import LockHeld, RunLock
from checkpoints.rollback_journal import pending
from checkpoints.store import BatchCounts, Run
from checkpoints.tables import journal

from .batches import ColumnSummary
from .config import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_ROWS_PER_RANGE,
    Settings,
)
from .errors import ConfigError, WorkersFailed
from .guard import close_guards, guards_for
from .kms import KMS
from .logs import get_logger
from .migrator import MigrateResult, Mode, prepare_keys, run_kind
from .progress import NullProgress, Progress
from .ranged_start import (
    RangedStart,
    Split,
    join_or_refuse,
    plan_rollback,
    start_ranged_migrate,
)
from .reader import BoundTarget, bind_targets, count_after
from .rollback import (
    RollbackResult,
    check_can_roll_back,
    start_rollback_run,
)
from .settle import Settle, settle_failures
from .steer import Steered, state_line
from .worker_spec import MAX_HEARTBEAT, WorkerSpec, heartbeat_every, settings_to_dict

__all__ = [
    "DEFAULT_LEASE_SECONDS", "DEFAULT_ROWS_PER_RANGE", "Here", "WorkersFailed", "migrate_ranged",
    "refuse_sqlite_workers", "rollback_ranged", "spawn_processes",
]

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


@dataclass(frozen=True)
class Here:
    """This command's share of a ranged run: how many workers it starts here and how, the
    range size and lease if it starts the run, and what it tells the operator."""

    workers: int
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    rows_per_range: int = DEFAULT_ROWS_PER_RANGE
    progress: Progress | None = None
    should_stop: Callable[[], bool] | None = None
    before_first_write: Callable[[], None] | None = None
    spawn: Spawn = spawn_processes
    log_opts: Mapping[str, Any] = field(default_factory=dict)


def migrate_ranged(
    settings: Settings, *, engine: Engine, kms: KMS, here: Here, new_run: bool = False,
) -> MigrateResult:
    """`migrate --workers N` (or `rekey --workers N`): start, resume or join a ranged run;
    run N workers here."""
    started = time.monotonic()
    bound = bind_targets(engine, settings.targets)
    prepare_keys(settings, engine, bound, kms)
    close_guards(guards_for(settings, engine))  # each worker has its own; refused here first
    kind = run_kind(settings, Mode())
    start = start_ranged_migrate(settings, engine, kms,
                                 Split(here.rows_per_range, here.workers), new_run=new_run,
                                 before_first_write=here.before_first_write)
    if start.run.max_kms_rps is not None:  # the run's limit, whoever started it
        settings = replace(settings, max_kms_rps=start.run.max_kms_rps)
    result = MigrateResult(dry_run=False, kind=kind, run_id=start.run.id,
                           resumed=start.resumed, joined=start.joined)
    spec = WorkerSpec(kind, start.run.id, start.lock.token, here.lease_seconds,
                      settings_to_dict(settings), dict(here.log_opts))
    pids = _work_here(engine, start, spec, here,
                      _column_totals_migrate(engine, start.run.id, bound), bound)
    with engine.connect() as conn:
        result.columns = _summaries(conn, start.run.id)
        result.failures = store.failures_of(conn, start.run.id)
        result.kms_requests, result.retries, result.throttles = _kms_counts(conn, start.run.id,
                                                                            pids)
    result.kms_requests += kms.requests
    result.rate_limit = settings.max_kms_rps or None
    result.steered = Steered.of_run(engine, start.run.id)
    result.seconds = time.monotonic() - started
    return result


def rollback_ranged(engine: Engine, *, settings: Settings, here: Here) -> RollbackResult:
    """`rollback --workers N`: the journal's id space split into ranges, per column."""
    started = time.monotonic()
    check_can_roll_back(engine)
    close_guards(guards_for(settings, engine))  # each worker has its own; refused here first
    store.ensure_schema(engine)
    try:
        run_lock = RunLock.acquire(engine, "rollback")
    except LockHeld as exc:
        run_lock, run = join_or_refuse(engine, "rollback", exc)
        start = RangedStart(run, run_lock, joined=True, resumed=True)
    else:
        try:
            if here.before_first_write is not None:
                here.before_first_write()  # the lock is ours: e.g. the SQLite backup
            run, resumed = start_rollback_run(engine, settings.batch_size, run_lock,
                                              ranged=True)
            with engine.begin() as conn:
                plan_rollback(conn, run, Split(here.rows_per_range, here.workers)
                              .sizing(settings.batch_size), run_lock)
        except BaseException:
            run_lock.release(engine)
            raise
        start = RangedStart(run, run_lock, joined=False, resumed=resumed)
    spec = WorkerSpec("rollback", start.run.id, start.lock.token, here.lease_seconds,
                      settings_to_dict(settings), dict(here.log_opts))
    _work_here(engine, start, spec, here, _column_totals_rollback(engine, start.run))
    result = RollbackResult(run_id=start.run.id, resumed=start.resumed,
                            undoes=start.run.undoes_run_id)
    with engine.connect() as conn:
        result.columns = _summaries(conn, start.run.id)
        result.failures = store.failures_of(conn, start.run.id)
    result.steered = Steered.of_run(engine, start.run.id)
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


def _column_totals_rollback(engine: Engine, run: Run) -> dict[tuple[str, str], int]:
    j = journal.c
    with engine.connect() as conn:
        q = select(j.table_name, j.column_name, func.count()).where(
            pending(run.undoes_run_id)).group_by(j.table_name, j.column_name)
        return {(t, c): int(n) for t, c, n in conn.execute(q)}


def _processed(engine: Engine, run_id: int) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        totals = leases.range_totals(conn, run_id)
    return {k: c.total for k, c in totals.items()}


def _run_workers(engine: Engine, spec: WorkerSpec, here: Here,
                 totals: dict[tuple[str, str], int]) -> tuple[list[int], list[int]]:
    """Start the workers, show progress from the ranges, forward a stop; their exit codes.

    The columns advance together, so progress is one count over all of them (the ranges'
    processed rows, polled from the database, whichever machine's worker did them)."""
    progress, should_stop = here.progress or NullProgress(), here.should_stop
    seen = [sum(_processed(engine, spec.run_id).values())]
    name = f"{len(totals)} column(s), all workers"
    progress.start(name, "", sum(totals.values()))
    procs = list(here.spawn(spec, here.workers))
    forwarded = False
    ticks = 0
    try:
        try:
            while _poll_all(procs):
                if should_stop is not None and should_stop() and not forwarded:
                    _signal_all(procs, signal.SIGTERM)  # first: after the batch in flight
                    forwarded = True
                _advance(engine, spec.run_id, seen, progress, name)
                time.sleep(0.25)
                ticks += 1
                if ticks % 4 == 0:
                    _note(engine, spec.run_id, progress)
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


def _note(engine: Engine, run_id: int, progress: Progress) -> None:
    """The run's pause or hold on the progress line (every worker obeys it itself)."""
    with contextlib.suppress(Exception):  # best effort, as progress is
        with engine.connect() as conn:
            c = control.read(conn, run_id)
        if c is not None:
            progress.note(state_line(c, c.held))


def _signal_all(procs: Sequence[Proc], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)


def _conclude(engine: Engine, start: RangedStart, codes: Sequence[int],
              bound: Sequence[BoundTarget] = ()) -> None:
    """After this machine's workers exited: complete the run when every range is done,
    release the lock when no worker of the run is left anywhere; otherwise say why.

    `bound`: a migrate run's targets; the command that completes the run settles its
    failures (`settle_failures`: tokens written behind its ranges recorded, failures whose
    value is gone dropped), so exit 0 means nothing is left and exit 1 names what is."""
    run_id = start.run.id
    with engine.begin() as conn:
        leases.mark_dead_here(conn, run_id)
        left = leases.undone(conn, run_id)
        others = leases.live_workers(conn, run_id, timedelta(minutes=2))
        if left == 0:
            # Workers elsewhere that went silent (their machine died) are not running:
            # status would show them so forever once the run is over.
            leases.mark_silent_lost(conn, run_id, timedelta(seconds=3 * MAX_HEARTBEAT))
            # True when this command completed it: no other one records twice.
            if store.complete_ranged(conn, run_id) and start.run.kind != "rollback":
                settle_failures(conn, bound, run_id, Settle.of(start.run.kind))
        elif not others and all(c != 2 for c in codes):
            # Stopped between batches; a run another worker stopped on its fatal error
            # stays `stopped`, with that error as its note.
            store.interrupt_running(conn, run_id)
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
    engine: Engine, start: RangedStart, spec: WorkerSpec, here: Here,
    totals: dict[tuple[str, str], int], bound: Sequence[BoundTarget] = (),
) -> list[int]:
    """Run this machine's workers of the run to their end, then conclude (which raises
    unless the whole run is done); the workers' pids."""
    with engine.connect() as conn:
        others = len(leases.live_workers(conn, spec.run_id,
                                         timedelta(seconds=3 * heartbeat_every(
                                             spec.lease_seconds))))
    # Each worker's rate share from the start.
    spec = replace(spec, workers=here.workers, others=others)
    get_logger(run_id=spec.run_id, kind=spec.kind).info(
        "workers_starting", workers=here.workers, joined=start.joined, others=others)
    codes, pids = _run_workers(engine, spec, here, totals)
    _conclude(engine, start, codes, bound)
    return pids


def _summaries(conn: Any, run_id: int) -> list[ColumnSummary]:
    return [ColumnSummary(table, column, counts)
            for (table, column), counts in _column_counts(conn, run_id).items()]


def _column_counts(conn: Any, run_id: int) -> dict[tuple[str, str], BatchCounts]:
    """A ranged run's counts per column: what it did before it was ranged (its column
    checkpoints), plus its ranges."""
    out = {key: ck.counts for key, ck in sorted(store.load_checkpoints(conn, run_id).items())}
    for key, c in leases.range_totals(conn, run_id).items():
        out[key] = out.get(key, BatchCounts()) + c
    return out


def _kms_counts(conn: Any, run_id: int, pids: Sequence[int]) -> tuple[int, int, int]:
    mine = [w for w in leases.list_workers(conn, run_id) if w.pid in set(pids)]
    return (sum(w.kms_requests for w in mine), sum(w.retries for w in mine),
            sum(w.throttles for w in mine))


def refuse_sqlite_workers(url: str, workers: int) -> None:
    from .db import is_sqlite

    if workers > 1 and is_sqlite(url):
        raise ConfigError(
            f"--workers {workers} needs PostgreSQL: SQLite lets one process write at a time, "
            "so more workers would only queue on its lock; use --workers 1 (or leave it out) "
            "on SQLite; nothing was written"
        )

