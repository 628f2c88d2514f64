"""The options the subcommands share, as click decorators (defaults from config.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_KEY_ID,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_KMS_RPS,
    DEFAULT_REGION,
    DEFAULT_ROWS_PER_RANGE,
    Settings,
    fernet_keys_from_env,
    load_targets,
    resolve_db_url,
)
from .db import carries_password, is_sqlite, safe_url
from .errors import ConfigError
from .kms import KMS
from .kms_client import make_client, validate_region
from .ratelimit import RateLimiter

__all__ = [
    "PASSWORD_IN_ARGV",
    "WARNINGS",
    "confirm",
    "db_option",
    "db_url_from",
    "log_options",
    "progress_option",
    "settings_from",
    "target_options",
    "workers_options",
    "writing_run_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def log_options(f: F) -> F:
    f = click.option("--log-file", type=click.Path(dir_okay=False),
                     help="Write log events to this file instead of stderr.")(f)
    f = click.option("--log-format", type=click.Choice(["console", "json"]), default="console",
                     show_default=True, help="Log line format.")(f)
    f = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     default="warning", show_default=True,
                     help="Least severe log events shown (batches log at info).")(f)
    return f


def workers_options(f: F) -> F:
    f = click.option("--rows-per-range", type=click.IntRange(1, 10_000_000), metavar="N",
                     default=DEFAULT_ROWS_PER_RANGE, show_default=True,
                     help="With --workers: rows per key range, the unit a worker claims "
                          "(set when the run starts; a small column still gets 4 ranges per "
                          "worker, of a batch at least).")(f)
    f = click.option("--lease-seconds", type=click.FloatRange(2, 3600), metavar="S",
                     default=DEFAULT_LEASE_SECONDS, show_default=True,
                     help="With --workers: how long a silent worker keeps its range before "
                          "another worker takes it over (on the same host: as soon as its "
                          "process is gone). Must exceed the clock skew between machines.")(f)
    f = click.option("--workers", type=click.IntRange(1, 256), metavar="N",
                     help="Run N worker processes on this machine, coordinated through the "
                          "database (PostgreSQL; 1 on SQLite). The same command on another "
                          "machine joins the run. --max-kms-rps is shared by all workers.")(f)
    return f


def progress_option(f: F) -> F:
    return click.option("--no-progress", is_flag=True,
                        help="No progress bar or progress lines on stderr.")(f)


def db_option(f: F) -> F:
    return click.option("--db", "db", metavar="URL",
                        help="Database URL (default: $DATABASE_URL), e.g. sqlite:///app.db or "
                             "postgresql+psycopg://user@host/db. A password here is what ps "
                             "shows every user of the machine: export DATABASE_URL "
                             "instead.")(f)


def target_options(f: F) -> F:
    f = click.option("--max-kms-rps", type=click.FloatRange(min=0), default=DEFAULT_MAX_KMS_RPS,
                     show_default=True,
                     help="KMS requests per second for the whole run (0: no limit). The "
                          "default leaves a live application 80% of a 10,000/s quota; it "
                          "halves when KMS throttles and recovers slowly.")(f)
    f = click.option("--concurrency", type=click.IntRange(1, 512), default=DEFAULT_CONCURRENCY,
                     show_default=True, help="KMS calls in flight.")(f)
    f = click.option("--batch-size", type=click.IntRange(1, 100_000), default=DEFAULT_BATCH_SIZE,
                     show_default=True, help="Rows per batch (one transaction each).")(f)
    f = click.option("--region", metavar="R",
                     help=f"AWS region of the key (default: $AWS_REGION, else "
                          f"{DEFAULT_REGION}).")(f)
    f = click.option("--key-id", metavar="KEY",
                     help="KMS key id, ARN or alias (default: $AWS_KMS_KEY_ID, else "
                          f"{DEFAULT_KEY_ID}).")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="TOML file of [[targets]] (default: the built-in coinflip targets: "
                          "users.encrypted_secret, users.referral_payout_escrow_secret, "
                          "wagers.creator_escrow_secret, wagers.acceptor_escrow_secret).")(f)
    return db_option(f)


def writing_run_options(f: F) -> F:
    """What every run that writes takes: --no-backup, the workers options, --no-progress,
    --yes and the log options."""
    f = log_options(f)
    f = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")(f)
    f = progress_option(f)
    f = workers_options(f)
    return click.option("--no-backup", is_flag=True,
                        help="SQLite only: skip the backup copy taken before the first "
                             "write.")(f)


PASSWORD_IN_ARGV = ("kms-migrate: warning: --db carries a password, which ps and "
                    "/proc/<pid>/cmdline show to every user of this machine while the command "
                    "runs: export DATABASE_URL instead")
WARNINGS: list[str] = []  # printed by main() once the command ran (a refusal stays one line)


def db_url_from(flag: str | None) -> str:
    """--db, else DATABASE_URL; a password on the command line draws a warning."""
    url = resolve_db_url(flag)
    if flag and carries_password(flag) and PASSWORD_IN_ARGV not in WARNINGS:
        WARNINGS.append(PASSWORD_IN_ARGV)
    return url


def settings_from(opts: dict[str, Any]) -> Settings:
    env = os.environ
    return Settings(
        db_url=db_url_from(opts.get("db")),
        targets=load_targets(opts.get("config_file")),
        key_id=opts.get("key_id") or env.get("AWS_KMS_KEY_ID") or DEFAULT_KEY_ID,
        region=validate_region(opts.get("region") or env.get("AWS_REGION") or DEFAULT_REGION),
        batch_size=opts.get("batch_size") or DEFAULT_BATCH_SIZE,
        concurrency=opts.get("concurrency") or DEFAULT_CONCURRENCY,
        max_kms_rps=(DEFAULT_MAX_KMS_RPS if opts.get("max_kms_rps") is None
                     else float(opts["max_kms_rps"])),
        encryption_context=bool(opts.get("encryption_context")),
        fernet_keys=fernet_keys_from_env(env),
    )


def confirm(word: str, url: str, yes: bool, what: str, *, always: bool = False) -> None:
    """Ask the operator to type `word` before writing to a non-SQLite database (to any
    database with `always`, for what cannot be undone)."""
    if yes or (is_sqlite(url) and not always):
        return
    if not sys.stdin.isatty():
        raise ConfigError(
            f"refusing to {what} {safe_url(url)} without confirmation: run it from a terminal "
            "or pass --yes; nothing was written"
        )
    typed = click.prompt(f"This will {what} {safe_url(url)}. Type {word} to proceed",
                         default="", show_default=False)
    if typed.strip() != word:
        raise ConfigError(f"cancelled (you did not type {word}); nothing was written")


def make_kms(settings: Settings) -> KMS:
    """The run's KMS: one boto3 client, credentials and endpoint from boto3's own chain."""
    client = make_client(settings.region, settings.concurrency)
    limiter = RateLimiter(settings.max_kms_rps) if settings.max_kms_rps > 0 else None
    return KMS(client, settings.key_id, settings.region, concurrency=settings.concurrency,
               limiter=limiter)
