"""Scans the target columns and decrypts every KMS value with KMS, on read-only sessions.

Counts each value as: KMS ok, Fernet left (still to migrate), empty (NULL or ''), or
undecryptable (neither a Fernet token nor a ciphertext KMS opens); and, for the key
census, each KMS value by the ARN of its key and each Fernet token by the Fernet key that
opens it (with no Fernet key given, Fernet tokens are counted under no key). `verify`
itself writes nothing; the command then records the census in the bookkeeping
(`migration.census`), never in a target table.

With ``workers > 1`` each column's key space is cut into ranges (the database's own key
order, as ranged migrate plans them) and the ranges are verified by a pool of processes on
this machine, each with its own read-only engine and KMS client, the KMS rate limit
divided among them. Verifying writes nothing, so the ranges need no lease in the database:
the pool hands them out. The result is the same as one process gives.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from checkpoints import leases
from checkpoints.census import known_key_arns

from .codec import FernetCodec, fernet_key_label
from .config import DEFAULT_ROWS_PER_RANGE, Settings
from .db import is_sqlite, make_engine, safe_url, sqlite_path
from .errors import ConfigError, DatabaseError, KmsMigrateError
from .kms import KMS, KeyInfo, RateLimiter, make_client
from .logs import configure_from_options, get_logger
from .pipeline import ColumnCheck, ColumnJob, Problem, verify_column
from .reader import BoundTarget, bind_targets

__all__ = ["ColumnCheck", "VerifyResult", "verify"]

@dataclass
class VerifyResult:
    columns: list[ColumnCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    kms_requests: int = 0
    seconds: float = 0.0
    # For the census: the ARN of the key verify decrypted with; the Fernet keys it was
    # given ("current", "legacy #N"); the KMS keys the bookkeeping's runs recorded (a
    # census names them, at 0 when no value is under them); warnings for the command.
    key_arn: str = ""
    fernet_keys: tuple[str, ...] = ()
    known_arns: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.fernet_left or c.undecryptable or c.other_key for c in self.columns)

    def other_keys(self) -> dict[str, int]:
        """How many values each other KMS key holds, over every column ("" for a key this
        caller may not use)."""
        out: dict[str, int] = {}
        for c in self.columns:
            for arn, n in c.other_keys.items():
                out[arn] = out.get(arn, 0) + n
        return out


def verify(
    settings: Settings,
    *,
    engine: Engine,
    kms: KMS,
    workers: int = 1,
    rows_per_range: int = DEFAULT_ROWS_PER_RANGE,
    log_opts: Mapping[str, Any] | None = None,
) -> VerifyResult:
    """Decrypt every KMS value of the targets; report leftovers and undecryptable values,
    and count the values by format and key (writes nothing).

    With `workers` > 1, the key ranges (about `rows_per_range` rows each) are verified by
    that many processes; `log_opts` (log_level, log_format, log_file, as the CLI takes
    them) configures their logging (by default: warnings and errors on stderr).
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if rows_per_range < 1:
        raise ConfigError(f"--rows-per-range must be at least 1, got {rows_per_range}")
    if workers > 1 and is_sqlite(settings.db_url) and sqlite_path(settings.db_url) is None:
        raise ConfigError("verify --workers needs a database other processes can open, not "
                          f"{safe_url(settings.db_url)}: leave --workers out")
    started = time.monotonic()
    bound = bind_targets(engine, settings.targets)
    key = kms.describe()  # fails fast on a key that is missing, disabled or misused
    result = VerifyResult(key_arn=key.arn)
    codec = _census_codec(settings, result)
    with engine.connect() as conn:
        result.known_arns = tuple(known_key_arns(conn))
    if workers == 1:
        log = get_logger(kind="verify")
        for bt in bound:
            for column in bt.target.columns:
                check = ColumnCheck(bt.name, column)
                result.columns.append(check)
                verify_column(ColumnJob(engine, bt, column, settings, kms=kms, codec=codec,
                                        log=log), check, result.problems)
        result.kms_requests = kms.requests
    else:
        tasks = _plan_ranges(engine, bound, settings, workers, rows_per_range, result)
        children = replace(settings, fernet_keys=settings.fernet_keys if codec else ())
        outcomes = _verify_ranges(children, key.arn, workers, dict(log_opts or {}), tasks)
        for task, out in zip(tasks, outcomes, strict=True):  # column order, then key order
            result.columns[task.index].add(out.check)
            result.problems.extend(out.problems)
            result.kms_requests += out.kms_requests
        result.kms_requests += kms.requests
    result.seconds = time.monotonic() - started
    return result


def _census_codec(settings: Settings, result: VerifyResult) -> FernetCodec | None:
    """The Fernet keys that tell the census which key opens each Fernet token (None: no key
    given, or one is malformed, said in a warning; verify needs none to verify)."""
    if not settings.fernet_keys:
        return None
    try:
        codec = FernetCodec(settings.fernet_keys)
    except ConfigError as exc:  # names the key, never shows it
        result.warnings.append(f"kms-migrate: warning: {exc}; verify went on, counting the "
                               "Fernet tokens under no key")
        return None
    result.fernet_keys = tuple(fernet_key_label(i) for i in range(len(settings.fernet_keys)))
    return codec


# -- the parallel mode ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Task:
    """One key range (after, upto] of one column; `index` is the column's place."""

    index: int
    table: str
    column: str
    after: Any | None
    upto: Any | None


@dataclass
class _RangeOutcome:
    check: ColumnCheck
    problems: list[Problem]
    kms_requests: int


def _plan_ranges(engine: Engine, bound: Sequence[BoundTarget], settings: Settings,
                 workers: int, rows_per_range: int, result: VerifyResult) -> list[_Task]:
    """Each column's key ranges, as tasks; a (still empty) check per column in `result`."""
    tasks: list[_Task] = []
    with engine.connect() as conn:
        for bt in bound:
            bounds = leases.boundaries(conn, bt.table, bt.pk, [], leases.Sizing(
                rows_per_range, min_ranges=4 * workers, min_rows=settings.batch_size))
            los: list[Any | None] = [None, *bounds]
            his: list[Any | None] = [*bounds, None]
            for column in bt.target.columns:
                index = len(result.columns)
                result.columns.append(ColumnCheck(bt.name, column))
                tasks.extend(_Task(index, bt.name, column, lo, hi)
                             for lo, hi in zip(los, his, strict=True))
    return tasks


def _verify_ranges(settings: Settings, arn: str, workers: int, log_opts: dict[str, Any],
                   tasks: Sequence[_Task]) -> list[_RangeOutcome]:
    """The tasks verified by `workers` processes; their outcomes, in the tasks' order."""
    log = get_logger(kind="verify")
    log.info("verify_ranges", ranges=len(tasks), workers=workers)
    # The Fernet keys go along (pickled through the pool's pipe: never argv, never a log)
    # only to name the key of each Fernet token; no child decrypts one.
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_child,
        initargs=(settings, workers, arn, log_opts),
    )
    futures: list[Future[_RangeOutcome]] = []
    clean = broken = False
    try:
        futures = [pool.submit(_verify_range, task) for task in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if isinstance(exc, BrokenProcessPool):
                broken = True
            elif exc is not None:
                raise exc  # the first error (a fatal KMS error, say), as the child raised it
        clean = not broken
    except BrokenProcessPool:  # submit() on a pool a process already left
        broken = True
    finally:
        if not clean:
            _stop_pool(pool, futures)
        pool.shutdown(wait=True, cancel_futures=True)
    if broken:  # raised outside the except: one line for the CLI, no traceback
        raise KmsMigrateError(
            "a verify process died mid-run (killed by a signal or the out-of-memory "
            "killer); verify had written nothing, so nothing is lost: run verify again (with "
            "fewer --workers if memory is short)")
    return [f.result() for f in futures]


def _stop_pool(pool: ProcessPoolExecutor, futures: Sequence[Future[_RangeOutcome]]) -> None:
    """Cancel what has not started and end the workers at once (they only read, so a
    range cut short loses nothing)."""
    for f in futures:
        f.cancel()
    procs: Mapping[int, Any] = getattr(pool, "_processes", None) or {}
    for proc in list(procs.values()):
        if proc.is_alive():
            proc.terminate()


# In each pool process: its own engine, targets and KMS, set up once by `_init_child`.

@dataclass
class _Child:
    settings: Settings
    engine: Engine
    bound: dict[str, BoundTarget]
    kms: KMS
    codec: FernetCodec | None
    log: Any


_child: _Child | None = None
_child_error: Exception | None = None


def _init_child(settings: Settings, workers: int, arn: str, log_opts: dict[str, Any]) -> None:
    """Pool initializer. An error is kept and raised by every task (an initializer that
    raises would only break the pool, without the reason)."""
    global _child, _child_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        configure_from_options(log_opts)
        engine = make_engine(settings.db_url, read_only=True)
        bound = {bt.name: bt for bt in bind_targets(engine, settings.targets)}
        client = make_client(settings.region, settings.concurrency)
        rate = settings.max_kms_rps / workers
        limiter = RateLimiter(rate) if rate > 0 else None
        kms = KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency,
                  limiter=limiter)
        kms.key = KeyInfo(key_id=settings.key_id, arn=arn)
        codec = FernetCodec(settings.fernet_keys) if settings.fernet_keys else None
        _child = _Child(settings, engine, bound, kms, codec, get_logger(kind="verify"))
    except Exception as exc:
        _child_error = exc


def _verify_range(task: _Task) -> _RangeOutcome:
    """Pool task: verify one key range of one column."""
    if _child_error is not None:
        raise _child_error
    assert _child is not None
    c = _child
    bt = c.bound[task.table]
    check = ColumnCheck(task.table, task.column)
    problems: list[Problem] = []
    before = c.kms.requests
    try:
        verify_column(ColumnJob(c.engine, bt, task.column, c.settings, after=task.after,
                                upto=task.upto, kms=c.kms, codec=c.codec, log=c.log),
                      check, problems)
    except SQLAlchemyError as exc:
        # Not the statement or its parameters: the driver's first line, as the CLI prints.
        orig = getattr(exc, "orig", None)
        why = str(orig).strip().splitlines()[0] if orig else type(exc).__name__
        raise DatabaseError(
            f"database error while verifying {task.table}.{task.column}: {why}") from None
    return _RangeOutcome(check, problems, c.kms.requests - before)
