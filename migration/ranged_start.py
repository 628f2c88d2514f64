"""Starting, resuming or joining a ranged run: the run lock (shared by the run's workers,
joined by the same command on another machine), and the plan of its key ranges, made once
by the command that starts the run while joiners wait for it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from checkpoints import leases, store
from checkpoints.leases import Sizing
from checkpoints.lock import LockHeld, RunLock
from checkpoints.rollback_journal import pending
from checkpoints.store import Run
from checkpoints.tables import journal

from .config import (
    Settings,
)
from .errors import RunLockedError
from .kms import KMS
from .logs import get_logger
from .migrator import Mode, resume_or_start, run_kind
from .migrator import new_run as make_new_run
from .reader import BoundTarget, bind_targets
from .refusals import refuse_other_settings, refuse_to_start

__all__ = [
    "RANGES_PER_WORKER", "RangedStart", "Sizing", "join_or_refuse", "plan_ranges",
    "plan_rollback", "resume_planned", "start_ranged_migrate",
]


@dataclass
class RangedStart:
    run: Run
    lock: RunLock
    joined: bool
    resumed: bool


BIND_WAIT = 10.0  # seconds to wait for the lock's holder to name its run
PLAN_WAIT = 600.0  # seconds to wait for a ranged run's plan (one pass over each key index)
JOIN_POLL = 0.2


def join_or_refuse(engine: Engine, kind: str, exc: LockHeld) -> tuple[RunLock, Run]:
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
    settings: Settings, engine: Engine, kms: KMS, split: Split, *, new_run: bool = False,
    before_first_write: Callable[[], None] | None = None,
) -> RangedStart:
    """Take the run lock and start or resume a ranged migrate (or rekey) run, or join the
    one running. `kms` has the run's keys described.

    `before_first_write` (e.g. the SQLite backup) runs once the lock is ours and every
    check passed, before the run starts (not when joining a run already running)."""
    store.ensure_schema(engine)
    kind = run_kind(settings, Mode())
    try:
        run_lock = RunLock.acquire(engine, kind)
    except LockHeld as exc:
        run_lock, run = join_or_refuse(engine, kind, exc)
        refuse_other_settings(run, settings, make_new_run(settings, kms, Mode(), ranged=True))
        if run.max_kms_rps is not None and run.max_kms_rps != settings.max_kms_rps:
            get_logger(run_id=run.id).warning(
                "joining_with_the_runs_rate_limit", max_kms_rps=run.max_kms_rps,
                given=settings.max_kms_rps)
        if new_run:
            raise RunLockedError(
                f"{kind} run {run.id} is running with workers: --new-run cannot abandon it "
                "while they work; stop them first (Ctrl-C where they were started)"
            ) from None
        return RangedStart(run, run_lock, joined=True, resumed=True)
    try:
        with engine.connect() as conn:
            refuse_to_start(conn, kind)
        if before_first_write is not None:
            before_first_write()
        run, resumed = resume_or_start(engine, settings, kms, run_lock,
                                        Mode(new_run=new_run), ranged=True)
        bound = bind_targets(engine, settings.targets)
        with engine.begin() as conn:
            plan_ranges(conn, run, [(bt, c) for bt in bound for c in bt.target.columns],
                  split.sizing(settings.batch_size),
                  run_lock)
            store.set_run_rate(conn, run.id, settings.max_kms_rps)
            run = store.get_run(conn, run.id) or run
    except BaseException:
        run_lock.release(engine)
        raise
    return RangedStart(run, run_lock, joined=False, resumed=resumed)


RANGES_PER_WORKER = 4  # per column, at the least: the last ranges end close together


@dataclass(frozen=True)
class Split:
    """How the command that plans a ranged run splits each column: about `rows_per_range`
    rows a range, and at least RANGES_PER_WORKER ranges for each of its `workers`."""

    rows_per_range: int
    workers: int = 1

    def sizing(self, batch_size: int) -> Sizing:
        return Sizing(self.rows_per_range, RANGES_PER_WORKER * self.workers, batch_size)


def plan_ranges(conn: Any, run: Run, columns: Sequence[tuple[BoundTarget, str]],
          sizing: Sizing, lock: RunLock) -> None:
    """Split each unfinished column into ranges from its checkpoint on (once per run);
    on a ranged run this command now holds the lock of, void the leases of the workers
    that held it before (none of them can commit any more: the lock token changed)."""
    if resume_planned(conn, run, lock):
        return
    cks = store.load_checkpoints(conn, run.id)
    for bt, column in columns:
        ck = cks.get((bt.name, column))
        if ck is None or ck.done:
            continue
        where = [bt.pk > bt.pk_value(ck.last_pk)] if ck.last_pk is not None else []
        bounds = leases.boundaries(conn, bt.table, bt.pk, where, sizing)
        leases.create_ranges(conn, run.id, bt.name, column, ck.last_pk,
                             [bt.pk_text(b) for b in bounds])
    store.mark_ranged(conn, run.id)


def resume_planned(conn: Any, run: Run, lock: RunLock) -> bool:
    """A run whose ranges exist already (a ranged run resumed): void the leases of the
    workers that held it before this command took its lock, and mark those workers lost;
    not those of workers that joined since. Whether it was planned."""
    if not leases.planned(conn, run.id):
        return False  # a new run (ranged from its creation), or a single-process one
    before = lock.acquired_at(conn)
    leases.release_all(conn, run.id, before=before)
    leases.mark_lost(conn, run.id, before=before)
    return True


def plan_rollback(conn: Any, run: Run, sizing: Sizing, lock: RunLock) -> None:
    if resume_planned(conn, run, lock):
        return
    j = journal.c
    for (table, column), ck in sorted(store.load_checkpoints(conn, run.id).items()):
        if ck.done:
            continue
        start = int(ck.last_pk) if ck.last_pk is not None else 0
        where = [j.table_name == table, j.column_name == column, pending(run.undoes_run_id),
                 j.id > start]
        bounds = leases.boundaries(conn, journal, j.id, where, sizing)
        leases.create_ranges(conn, run.id, table, column, ck.last_pk, [str(b) for b in bounds])
    store.mark_ranged(conn, run.id)
