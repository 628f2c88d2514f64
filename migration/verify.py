"""Scans the target columns and decrypts every KMS value with KMS (writes nothing).

Counts each value as: KMS ok, Fernet left (still to migrate), empty (NULL or ''), or
undecryptable (neither a Fernet token nor a ciphertext KMS opens).

With ``workers > 1`` each column's key space is cut into ranges (the database's own key
order, as ranged migrate plans them) and the ranges are verified by a pool of processes on
this machine, each with its own read-only engine and KMS client, the KMS rate limit
divided among them. Verify writes nothing, so the ranges need no lease in the database:
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

from .codec import ValueKind, classify, decode_kms, encryption_context
from .config import Settings
from .db import is_sqlite, make_engine, safe_url, sqlite_path
from .errors import ConfigError, DatabaseError, KmsMigrateError
from .kms import KMS, KeyInfo, Opening, RateLimiter, make_client
from .logs import configure_from_options, get_logger
from .reader import BoundTarget, bind_targets, fetch_batch
from .workers import DEFAULT_ROWS_PER_RANGE

__all__ = ["ColumnCheck", "VerifyResult", "verify"]

Problem = tuple[str, str, str, str]  # table, column, pk, why


@dataclass
class ColumnCheck:
    table: str
    column: str
    kms_ok: int = 0
    fernet_left: int = 0
    empty: int = 0
    undecryptable: int = 0
    # Under another KMS key than the one configured: a problem (the application's key-scoped
    # policy cannot decrypt them). Counted per key ARN ("" when this caller may not use it).
    other_key: int = 0
    other_keys: dict[str, int] = field(default_factory=dict)

    def add(self, other: ColumnCheck) -> None:
        """Add the counts of another part (a key range) of the same column."""
        self.kms_ok += other.kms_ok
        self.fernet_left += other.fernet_left
        self.empty += other.empty
        self.undecryptable += other.undecryptable
        self.other_key += other.other_key
        for arn, n in other.other_keys.items():
            self.other_keys[arn] = self.other_keys.get(arn, 0) + n


@dataclass
class VerifyResult:
    columns: list[ColumnCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    kms_requests: int = 0
    seconds: float = 0.0

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
    """Decrypt every KMS value of the targets; report leftovers and undecryptable values.

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
    result = VerifyResult()
    reason = _reason(settings)
    if workers == 1:
        log = get_logger(kind="verify")
        for bt in bound:
            for column in bt.target.columns:
                check = ColumnCheck(bt.name, column)
                result.columns.append(check)
                _verify_column(settings, engine, kms, bt, column, key.arn, reason, check,
                               result.problems, log)
        result.kms_requests = kms.requests
    else:
        _verify_ranged(settings, engine, bound, key.arn, workers, rows_per_range,
                       dict(log_opts or {}), result)
        result.kms_requests += kms.requests
    result.seconds = time.monotonic() - started
    return result


def _reason(settings: Settings) -> str:
    return ("KMS cannot decrypt it with this row's encryption context"
            if settings.encryption_context else "KMS cannot decrypt it")


def _verify_column(
    settings: Settings, engine: Engine, kms: KMS, bt: BoundTarget, column: str, arn: str,
    reason: str, check: ColumnCheck, problems: list[Problem], log: Any,
    after: Any | None = None, upto: Any | None = None,
) -> None:
    """Verify the rows of one column with `after < pk <= upto` (either end open when None),
    batch by batch in key order, counting into `check` and appending to `problems`."""
    while True:
        rows = fetch_batch(engine, bt, column, after, settings.batch_size, upto)
        blobs: list[tuple[str, bytes]] = []
        ctxs: list[dict[str, str] | None] = []
        for row in rows:
            kind = classify(row.value)
            pk = bt.pk_text(row.pk)
            if kind is ValueKind.EMPTY:
                check.empty += 1
            elif kind is ValueKind.FERNET:
                check.fernet_left += 1
                problems.append((bt.name, column, pk, "still a Fernet token"))
            else:
                blob = decode_kms(row.value) if kind is ValueKind.KMS else None
                if blob is None:
                    check.undecryptable += 1
                    problems.append((bt.name, column, pk, "neither a Fernet token nor base64"))
                else:
                    blobs.append((pk, blob))
                    ctxs.append(encryption_context(bt.name, column, pk)
                                if settings.encryption_context else None)
        opened = kms.map(kms.open_stored,
                         [(b, c) for (_, b), c in zip(blobs, ctxs, strict=True)])
        _tally(check, problems, bt.name, column, blobs, opened, reason)
        log.info("batch_verified", table=bt.name, column=column, rows=len(rows))
        if len(rows) < settings.batch_size or (upto is not None and rows[-1].pk == upto):
            return  # the end of the column, or of the range
        after = rows[-1].pk


def _tally(
    check: ColumnCheck,
    problems: list[Problem],
    table: str,
    column: str,
    blobs: Sequence[tuple[str, bytes]],
    opened: Sequence[Opening],
    reason: str,
) -> None:
    for (pk, _), out in zip(blobs, opened, strict=True):
        if out.ok:
            check.kms_ok += 1
        elif out.other_key is not None:
            check.other_key += 1
            check.other_keys[out.other_key] = check.other_keys.get(out.other_key, 0) + 1
            problems.append((table, column, pk, f"under another KMS key ({out.other_key})"
                             if out.other_key else "under a KMS key this caller cannot use"))
        else:
            check.undecryptable += 1
            problems.append((table, column, pk, out.problem or reason))


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


def _verify_ranged(
    settings: Settings, engine: Engine, bound: Sequence[BoundTarget], arn: str, workers: int,
    rows_per_range: int, log_opts: dict[str, Any], result: VerifyResult,
) -> None:
    tasks: list[_Task] = []
    with engine.connect() as conn:
        for bt in bound:
            bounds = leases.boundaries(conn, bt.table, bt.pk, [], rows_per_range,
                                       min_ranges=4 * workers, min_rows=settings.batch_size)
            los: list[Any | None] = [None, *bounds]
            his: list[Any | None] = [*bounds, None]
            for column in bt.target.columns:
                index = len(result.columns)
                result.columns.append(ColumnCheck(bt.name, column))
                tasks.extend(_Task(index, bt.name, column, lo, hi)
                             for lo, hi in zip(los, his, strict=True))
    log = get_logger(kind="verify")
    log.info("verify_ranges", ranges=len(tasks), workers=workers)
    child_settings = replace(settings, fernet_keys=())  # verify needs no Fernet key
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_child,
        initargs=(child_settings, workers, arn, log_opts),
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
            "killer); verify writes nothing, so nothing is lost: run verify again (with "
            "fewer --workers if memory is short)")
    for task, f in zip(tasks, futures, strict=True):  # column order, then key order
        out = f.result()
        result.columns[task.index].add(out.check)
        result.problems.extend(out.problems)
        result.kms_requests += out.kms_requests


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
    arn: str
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
        _child = _Child(settings, engine, bound, kms, arn, get_logger(kind="verify"))
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
        _verify_column(c.settings, c.engine, c.kms, bt, task.column, c.arn,
                       _reason(c.settings), check, problems, c.log, task.after, task.upto)
    except SQLAlchemyError as exc:
        # Not the statement or its parameters: the driver's first line, as the CLI prints.
        orig = getattr(exc, "orig", None)
        why = str(orig).strip().splitlines()[0] if orig else type(exc).__name__
        raise DatabaseError(
            f"database error while verifying {task.table}.{task.column}: {why}") from None
    return _RangeOutcome(check, problems, c.kms.requests - before)
