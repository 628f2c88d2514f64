"""Steering one process of a run: the pause, the live limits and the holds, read from the
run's row at every heartbeat (`Steering.poll`), obeyed between batches (`Steering.hold`).

- `kms-migrate pause` / `resume` (any terminal, any machine) set and clear the run's
  pause; `set` stores limits that replace the command's own (`--max-kms-rps`, divided
  among the run's live workers; `--batch-size`; `--batch-time`).
- A guard (`migration.guard`: the pause file, replica lag, active sessions) holds this
  process while it gives a reason. The hold is recorded on the run for `status` by the
  process that saw it begin (`checkpoints.control.hold`), and counted.
- While held, nothing starts: no KMS call, no write. The heartbeat goes on (this
  module's `SteeringThread` for a one-process run, the worker's own otherwise), so the
  lock and the leases stay held and nobody takes the run over as dead.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from checkpoints import control
from checkpoints.control import Control
from checkpoints.lock import RunLock

from .config import Settings
from .guard import Guard, close_guards
from .kms import KMS
from .logs import get_logger
from .progress import Progress
from .ratelimit import RateLimiter
from .sizing import BatchSizer

__all__ = [
    "MAX_HEARTBEAT", "POLL_SECONDS", "GuardWatch", "Steered", "Steering", "SteeringThread",
    "pause_line", "state_line", "steered", "steering_for",
]

MAX_HEARTBEAT = 5.0  # seconds between heartbeats, at most (a quarter of the lease below 20 s)
POLL_SECONDS = 1.0  # a one-process run reads its steering this often (workers: heartbeat)
WAKE_SECONDS = 0.2  # a held loop looks at its stop request this often
# Seconds the guards may take to answer before the run holds for them: beyond what their
# own timeouts allow one poll (a replica's connect and statement timeouts).
GUARDS_OVERDUE = 20.0


def pause_line(c: Control) -> str:
    """ "paused by alice@host at 12:00:03 UTC (note)" """
    at = c.paused_at.strftime("%Y-%m-%d %H:%M:%S UTC") if c.paused_at else "?"
    note = f" ({c.pause_note})" if c.pause_note else ""
    return f"paused by {c.paused_by} at {at}{note}"


def state_line(c: Control | None, held: str | None) -> str | None:
    """What holds a run: its pause, else `held` (a guard's reason); None when nothing."""
    if c is not None and c.paused:
        return pause_line(c)
    return f"held: {held}" if held else None


@dataclass(eq=False)
class Steering:
    """One process's view of its run's steering. `poll` (from a heartbeat thread) reads
    and applies it; `hold` (from the column loop, between batches) waits while the run
    is paused or a guard holds it."""

    engine: Engine
    run_id: int | None  # None: a dry-run, which has no run to read (its guards only)
    sizer: BatchSizer
    kms: KMS | None = None
    max_kms_rps: float = 0.0  # the command's own limit (0: none)
    guards: Sequence[Guard] = ()
    progress: Progress | None = None
    log: Any = None
    share: int = 1  # live processes sharing the run's rate limit (a worker sets it)
    # The run's live processes, as "host pid N" (a worker sets them at each heartbeat);
    # None: this one alone (a one-process run, whose lock is this process's).
    peers: set[str] | None = None
    control: Control | None = field(default=None, init=False)
    held: str | None = field(default=None, init=False)  # the guard reason it holds for
    holds: int = field(default=0, init=False)  # times it began to hold (pause or guard)
    held_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = get_logger(run_id=self.run_id)
        self.by = f"{socket.gethostname()} pid {os.getpid()}"
        self._applied: tuple[int | None, float | None] = (None, None)
        self._free = threading.Event()
        self._free.set()
        self._lock = threading.Lock()
        # The guards are asked on a thread of their own: a replica that takes seconds to
        # answer must not delay the heartbeat that renews this process's lease.
        self._watch = GuardWatch(self.guards) if self.guards else None

    # -- the heartbeat side --------------------------------------------------------------

    def poll(self) -> None:
        """Read the run's steering and the guards, apply the limits, block or free the
        column loop. Never raises: a database hiccup keeps the last state."""
        c: Control | None = None
        if self.run_id is not None:
            try:
                with self.engine.begin() as conn:
                    c = control.read(conn, self.run_id)
            except Exception as exc:
                self.log.warning("steering_not_read", error=type(exc).__name__)
                return
            if c is None:
                return
        reason = self._watch.latest() if self._watch is not None else None
        with self._lock:
            self.control = c
            if c is not None:
                self._apply(c)
            self._record(reason, c)
            self._block(c, reason)


    def _apply(self, c: Control) -> None:
        # A number that is none (NaN, infinity: refused by `set`, but a row is anyone's to
        # write) is taken as unset, never as a limit.
        c = replace(c, max_kms_rps=_number(c.max_kms_rps), batch_time=_number(c.batch_time))
        rps = c.max_kms_rps if c.max_kms_rps is not None else self.max_kms_rps
        kms = self.kms
        if kms is not None:
            share = rps / max(1, self.share)
            if share <= 0:
                if kms.limiter is not None:
                    kms.limiter.lift()  # the calls waiting in it go now
                kms.limiter = None
            elif kms.limiter is None:
                kms.limiter = RateLimiter(share)
            elif abs(kms.limiter.max_rate - share) > 1e-9:
                kms.limiter.set_max_rate(share)
        if (c.batch_size, c.batch_time) != self._applied:
            self._size(c.batch_size, c.batch_time)
            self._applied = (c.batch_size, c.batch_time)

    def _size(self, size: int | None, target: float | None) -> None:
        """Apply the row's batch size and time as a process reading the row for the first
        time would (a worker that joins, a restart): every process of the run then sizes
        its batches alike, whatever sequence of `set` commands led there. A time (> 0)
        is followed from the set size, if that changed; without one (0 or unset) a set
        size is fixed; a time of 0 with no size keeps the size where it is."""
        before_size, before_target = self._applied
        if size is not None and (size != before_size or not target):
            self.sizer.fix(size)
        if target:
            if target != before_target or size != before_size:
                self.sizer.follow(target)
        elif target is not None and size is None:
            self.sizer.follow(None)

    def _record(self, reason: str | None, c: Control | None = None) -> None:
        """Record on the run (for `status`) a hold this process began or ended. Read
        against the row `c`: a hold recorded by a process of the run that is gone
        (killed while held: nobody else would release it) is cleared, and this process's
        own hold, if the row no longer shows one, is recorded again. A dry-run (no run
        row) only logs."""
        if self.run_id is None:
            if reason != self.held:
                if reason is not None:
                    self.log.warning("run_held", reason=reason)
                else:
                    self.log.info("run_released", reason=self.held)
            self.held = reason
            return
        stale = c.held_by if c is not None and self._gone(c.held_by) else None
        vacant = c is not None and (c.held is None or stale is not None)
        began = reason is not None and (self.held is None or vacant)
        ended = reason is None and self.held is not None
        if stale is None and not began and not ended:
            if reason is not None and c is not None and c.held_by == self.by[:255] and (
                    c.held != control.one_line(reason, control.NOTE_LIMIT)):
                self._reword(reason)
            self.held = reason
            return
        try:
            with self.engine.begin() as conn:
                if stale is not None:
                    control.release(conn, self.run_id, stale, "its process is gone")
                if began and reason is not None:
                    control.hold(conn, self.run_id, self.by, reason)
                elif ended:
                    control.release(conn, self.run_id, self.by)
        except Exception as exc:  # the next poll tries again
            self.log.warning("hold_not_recorded", error=type(exc).__name__)
            return
        if began and self.held is None:
            self.log.warning("run_held", reason=reason)
        elif ended:
            self.log.info("run_released", reason=self.held)
        self.held = reason

    def _reword(self, reason: str) -> None:
        try:
            with self.engine.begin() as conn:
                assert self.run_id is not None
                control.reword(conn, self.run_id, self.by, reason)
        except Exception as exc:  # display only: the next poll tries again
            self.log.warning("hold_not_recorded", error=type(exc).__name__)

    def _gone(self, held_by: str | None) -> bool:
        """Whether a hold's recorder is no live process of the run."""
        if held_by is None or held_by == self.by[:255]:
            return False
        return self.peers is None or held_by not in {p[:255] for p in self.peers}

    def _block(self, c: Control | None, reason: str | None) -> None:
        why = state_line(c, reason)
        if why is not None and self._free.is_set():
            self._free.clear()
            self.holds += 1
            if c is not None and c.paused:
                self.log.warning("run_paused", by=c.paused_by, note=c.pause_note)
        elif why is None and not self._free.is_set():
            self._free.set()
            self.log.info("run_resumed")
        if self.progress is not None:
            self.progress.note(why)

    # -- the column loop's side ---------------------------------------------------------

    def blocked(self) -> bool:
        return not self._free.is_set()

    def hold(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Wait while the run is paused or held; a stop request ends the wait
        (KeyboardInterrupt: the run stops between batches, resumable)."""
        if self._free.is_set():
            return
        started = time.monotonic()
        try:
            while not self._free.wait(WAKE_SECONDS):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
        finally:
            self.held_seconds += time.monotonic() - started

    def close(self) -> None:
        """Clear this process's hold record, close the guards."""
        if self._watch is not None:
            self._watch.close()
        if self.held is not None:
            self._record(None)
        close_guards(self.guards)


def _number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class GuardWatch(threading.Thread):
    """Asks the guards every POLL_SECONDS on a thread of its own; `latest` is the newest
    answer (the first one is waited for: a run starts held when it must), or, while the
    guards take more than `overdue` seconds to answer (a query stuck on a network gone
    dark), a reason to hold: their last answer says nothing about now."""

    def __init__(self, guards: Sequence[Guard], every: float = POLL_SECONDS,
                 overdue: float = GUARDS_OVERDUE) -> None:
        super().__init__(name="kms-migrate-guards", daemon=True)
        self.guards, self.every, self.overdue = list(guards), every, overdue
        self._reason: str | None = None
        self._asking: float | None = None  # when the guards were asked, until they answer
        self._asked = threading.Event()
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.is_set():
            self._asking = time.monotonic()
            self._reason = next((r for g in self.guards if (r := g.reason())), None)
            self._asking = None
            self._asked.set()
            self._done.wait(self.every)

    def latest(self) -> str | None:
        self._asked.wait(self.overdue)
        asking = self._asking
        if asking is not None and (late := time.monotonic() - asking) > self.overdue:
            return f"the guards have not answered for {late:.0f} s"
        return self._reason

    def close(self) -> None:
        # Briefly: a guard stuck in a query must not delay a stopping process (a daemon
        # thread, it dies with it; what it would answer matters to nobody now).
        self._done.set()
        self.join(timeout=1)


class SteeringThread(threading.Thread):
    """A one-process run's heartbeat: poll the steering every POLL_SECONDS and keep the
    run lock's heartbeat fresh (`touch`), so that a long pause is never taken for death."""

    def __init__(self, steering: Steering, touch: Callable[[], None] | None = None,
                 every: float = POLL_SECONDS) -> None:
        super().__init__(name="kms-migrate-steering", daemon=True)
        self.steering, self.touch, self.every = steering, touch, every
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.steering.poll()
            if self.touch is not None:
                try:
                    self.touch()
                except Exception as exc:  # the next beat tries again
                    self.steering.log.warning("heartbeat_failed", error=type(exc).__name__)

    def close(self) -> None:
        self._done.set()
        self.join(timeout=5)


def steering_for(engine: Engine, run_id: int | None, settings: Settings, *, kms: KMS | None,
                 guards: Sequence[Guard], progress: Progress | None) -> Steering:
    """The steering of a one-process run (a worker builds its own)."""
    return Steering(engine, run_id, BatchSizer(settings.batch_size, settings.batch_time),
                    kms=kms, max_kms_rps=settings.max_kms_rps, guards=guards,
                    progress=progress)


@contextlib.contextmanager
def steered(steering: Steering | None, run_lock: RunLock | None,
            guards: Sequence[Guard] = ()) -> Iterator[Steering | None]:
    """A one-process run, steered: its steering read once before the first batch, then by
    a thread that also keeps the run lock's heartbeat fresh (a dry-run has no lock: its
    guards only). No steering: only the guards are closed at the end."""
    if steering is None:
        try:
            yield steering
        finally:
            close_guards(guards)
        return
    steering.poll()
    every = timedelta(seconds=POLL_SECONDS)
    thread = SteeringThread(steering, touch=None if run_lock is None else (
        lambda: run_lock.touch(steering.engine, every)))
    thread.start()
    try:
        yield steering
    finally:
        thread.close()
        steering.close()


@dataclass
class Steered:
    """What steering did to a run, for its summary and report: how often this command's
    processes held and for how long, and every change of the run (`kms_migrate_changes`)."""

    holds: int = 0
    held_seconds: float = 0.0
    changes: list[control.Change] = field(default_factory=list)

    @classmethod
    def of(cls, engine: Engine, steering: Steering) -> Steered:
        """A one-process run's: its own holds, and the run's changes."""
        return cls(steering.holds, steering.held_seconds, _changes(engine, steering.run_id))

    @classmethod
    def of_run(cls, engine: Engine, run_id: int) -> Steered:
        """A ranged run's, for the command that ran some of its workers: the holds are
        the pauses and holds among the run's changes (its workers counted their own)."""
        changes = _changes(engine, run_id)
        return cls(sum(1 for c in changes if c.action in ("pause", "hold")), 0.0, changes)


def _changes(engine: Engine, run_id: int | None) -> list[control.Change]:
    """Every change of a run (none for a dry-run); best effort: a summary without them
    rather than no summary."""
    if run_id is None:
        return []
    try:
        with engine.connect() as conn:
            return control.changes_of(conn, run_id)
    except Exception:
        return []
