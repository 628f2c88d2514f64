"""The subcommands that steer a live run from any terminal: `pause`, `resume`, `set`
(migration/steer_run.py does the work); cli.py registers them on its group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from .db import make_engine
from .errors import EXIT_OK
from .logs import configure_logging
from .options import db_option, db_url_from, finite
from .steer_run import pause_run, resume_run, set_run

__all__ = ["pause_cmd", "resume_cmd", "set_cmd"]

F = TypeVar("F", bound=Callable[..., Any])
MAX_RUN_ID = 2**31 - 1  # runs.id is an INTEGER: a larger id is no run's (and no query's)


def _run_option(f: F) -> F:
    f = click.option("--run", "run_id", type=click.IntRange(1, MAX_RUN_ID), metavar="ID",
                     help="The run to steer (default: the one running, else the newest "
                          "unfinished migrate, rekey or rollback run).")(f)
    return db_option(f)


@click.command("pause")
@_run_option
@click.option("--note", metavar="TEXT", help="Why, for status and the run's summary.")
def pause_cmd(db: str | None, run_id: int | None, note: str | None) -> int:
    """Pause a run, on every machine: each process lets its batch in flight commit, then
    holds (no KMS call, no write; its lock and leases kept alive) until `resume`. A run
    restarted while paused starts paused. Records who paused it, where and when."""
    configure_logging("warning")
    engine = make_engine(db_url_from(db))
    click.echo(pause_run(engine, run_id, note).line)
    return EXIT_OK


@click.command("resume")
@_run_option
def resume_cmd(db: str | None, run_id: int | None) -> int:
    """Resume a paused run, on every machine (within one heartbeat, 5 s at most)."""
    configure_logging("warning")
    engine = make_engine(db_url_from(db))
    click.echo(resume_run(engine, run_id).line)
    return EXIT_OK


@click.command("set")
@_run_option
@click.option("--max-kms-rps", type=finite(min=0), metavar="R",
              help="KMS requests per second for the whole run (0: no limit), shared by its "
                   "live workers.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), metavar="N",
              help="Rows per batch from now on (fixed: turns --batch-time off).")
@click.option("--batch-time", type=finite(min=0), metavar="SECONDS",
              help="Size batches to take about this long (0: a fixed size again: the one "
                   "set with --batch-size, else where it is).")
def set_cmd(db: str | None, run_id: int | None, **limits: Any) -> int:
    """Change a running run's limits live, on every machine (within one heartbeat). They
    replace the run's own, and processes that join or resume it take them."""
    configure_logging("warning")
    engine = make_engine(db_url_from(db))
    click.echo(set_run(engine, run_id, limits).line)
    return EXIT_OK
