"""The life of a run, the same for every kind: its lock, and how its end is recorded.

- `lock_held`: the run lock for a block (refused with RunLockedError when another run holds
  it; a lock lost mid-run stops the block with RunLockedError, exit 2).
- `graceful_stop`: Ctrl-C and SIGTERM become a stop request, which the column loops
  honour between batches (a second one aborts the batch in flight); `worker_signals`,
  the same in a worker process (which ignores Ctrl-C: its command forwards it).
- `lifecycle`: whatever ends the block, its run row says how, once: `completed` when the
  block ends, `interrupted` on KeyboardInterrupt (Ctrl-C, or a stop request turned into one
  between batches by `pipeline.Hooks`), `stopped` with the error's one line on a fatal KMS
  error, and nothing when the lock was lost (the run belongs to the new holder).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from sqlalchemy import Engine

from checkpoints import store
from checkpoints.lock import LockHeld, LockLost, RunLock

from .errors import FatalKMSError, RunLockedError
from .logs import get_logger

__all__ = [
    "RunEnd", "StopRequest", "acquire_lock", "graceful_stop", "lifecycle", "lock_held",
    "set_state_quietly", "worker_signals",
]


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


@dataclass
class RunEnd:
    """How a run ended, as `lifecycle` recorded it."""

    state: str = "stopped"
    note: str | None = None


@contextlib.contextmanager
def lifecycle(engine: Engine, run_id: int | None, end: RunEnd | None = None) -> Iterator[RunEnd]:
    """Record on run `run_id` how the block ended (nothing for None: a dry-run)."""
    end = end if end is not None else RunEnd()
    record = run_id is not None
    try:
        yield end
        end.state = "completed"
    except KeyboardInterrupt:
        end.state = "interrupted"
        raise
    except LockLost as exc:
        record = False  # the new holder owns the run's state now
        raise RunLockedError(str(exc)) from None
    except FatalKMSError as exc:
        end.state, end.note = "stopped", str(exc)
        raise
    finally:
        if record:
            assert run_id is not None
            set_state_quietly(engine, run_id, end.state, end.note)


def set_state_quietly(engine: Engine, run_id: int, state: str, note: str | None,
                      log: Any = None) -> None:
    """Record how a run ended; a dead connection must not hide the original error."""
    try:
        with engine.begin() as conn:
            store.set_state(conn, run_id, state, note=note)
    except Exception:  # best effort: the run stays resumable either way
        (log or get_logger(run_id=run_id)).warning("run_state_not_recorded", state=state)


class StopRequest:
    """First Ctrl-C (or SIGTERM): finish the batch in flight, then stop. Second: abort now."""

    def __init__(self) -> None:
        self._requested = False

    def requested(self) -> bool:
        return self._requested

    def handle(self, signum: int, frame: object) -> None:
        if self._requested:
            raise KeyboardInterrupt  # the batch in flight rolls back whole
        self._requested = True
        click.echo("kms-migrate: stopping once the batch in flight has committed "
                   "(press Ctrl-C again to abort it)", err=True)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a stop between batches while a run writes."""
    stop = StopRequest()
    old = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
