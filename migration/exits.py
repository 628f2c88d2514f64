"""The one place an exception becomes an exit code and one line on stderr.

`main()` hands every exception a command raised here, the unexpected ones included, and
prints what `outcome` gives: never a traceback, never an exception's message unless the
error is one whose message is known to be safe (the tree in `migration.errors`, click's
usage errors, the checkpoints package's lock and lease errors, a database driver's first
line). An unexpected exception is named by its type only; where it was raised goes to
the debug log, frame by frame, without any message or local variable.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from checkpoints.errors import BookkeepingError

from .db import PG_LOCK_TIMEOUT, SQLITE_BUSY_TIMEOUT, scrub_known
from .errors import EXIT_FATAL, EXIT_INTERRUPTED, KmsMigrateError
from .logs import get_logger

__all__ = ["BOOKKEEPING_ERRORS", "Outcome", "outcome", "report"]

# The lock and lease errors of the checkpoints package (which never imports migration/):
# their messages name runs, hosts and pids, never a value; one base class covers them all
BOOKKEEPING_ERRORS: tuple[type[Exception], ...] = (BookkeepingError,)

INTERRUPTED = ("kms-migrate: interrupted; committed batches are kept, re-run the same "
               "command to resume")

# click >= 8.2 raises this UsageError for a bare group; older click prints the help itself.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


@dataclass(frozen=True)
class Outcome:
    """What `main()` does with an exception: exit with `code`, after printing `line` on
    stderr (None: nothing to print, as for click's own exit)."""

    code: int
    line: str | None


def report(exc: BaseException) -> int:
    """Show what an exception means (one line on stderr, or click's help) and return the
    exit code."""
    if isinstance(exc, _NO_ARGS_IS_HELP):  # bare `kms-migrate`: the help, as click shows it
        exc.show()
        return int(exc.exit_code)
    result = outcome(exc)
    if result.line is not None:
        click.echo(scrub_known(result.line).replace("\n", " "), err=True)
    return result.code


def outcome(exc: BaseException) -> Outcome:
    """The exit code and one line for any exception; every database credential this
    process used is masked by `report` before the line is printed."""
    if isinstance(exc, click.exceptions.Exit):
        return Outcome(exc.exit_code, None)
    if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
        return Outcome(EXIT_INTERRUPTED, INTERRUPTED)
    if isinstance(exc, click.UsageError):
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        msg = exc.format_message().replace("\n", " ")
        return Outcome(EXIT_FATAL, f"kms-migrate: error: {msg}{hint}")
    if isinstance(exc, click.ClickException):
        return Outcome(EXIT_FATAL, f"kms-migrate: error: {exc.format_message()}")
    if isinstance(exc, KmsMigrateError):
        return Outcome(exc.exit_code, exc.one_line())
    if isinstance(exc, BOOKKEEPING_ERRORS):
        return Outcome(EXIT_FATAL, f"kms-migrate: error: {exc}")
    if isinstance(exc, SQLAlchemyError):
        return Outcome(EXIT_FATAL, _database_line(exc))
    # The last guard. Not str(exc): the message of an exception nobody anticipated could
    # hold a value.
    with contextlib.suppress(Exception):
        _log_unexpected(exc)
    return Outcome(EXIT_FATAL, (
        f"kms-migrate: error: unexpected {type(exc).__name__} (its message is not shown, as "
        "it could hold a secret); committed batches are kept: re-run with --log-level debug "
        "to log where it was raised, and report it"))


def _database_line(exc: SQLAlchemyError) -> str:
    """Never the statement or its parameters (they hold tokens): the driver's first line."""
    orig = getattr(exc, "orig", None)
    reason = str(orig).strip().splitlines()[0] if orig else type(exc).__name__
    if "database is locked" in reason:
        reason = (f"the SQLite database is locked by another writer (waited "
                  f"{SQLITE_BUSY_TIMEOUT:g} s); let it finish or stop it")
    elif "lock timeout" in reason:
        reason = (f"a row or table stayed locked by another session for "
                  f"{PG_LOCK_TIMEOUT:g} s; let it finish or stop it")
    return (f"kms-migrate: database error: {reason}; committed batches are kept, "
            "re-run to resume")


def _log_unexpected(exc: BaseException) -> None:
    """An unexpected exception, at debug level: its type and where it was raised, frame by
    frame (file, line, function), and the types of the exceptions it chained. Never its
    message, nor any chained one's, nor local variables: those can hold a value, a token or
    a password; the code's location and names cannot."""
    chain: list[str] = []
    frames: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(type(seen).__name__)
        frames.extend(f"{Path(f.filename).name}:{f.lineno} in {f.name}"
                      for f in traceback.extract_tb(seen.__traceback__))
        seen = seen.__cause__ or seen.__context__
    get_logger().debug("unexpected_error", error_type=chain[0], chained=chain[1:],
                       frames=frames)
