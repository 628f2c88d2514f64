"""The options the subcommands share, as click decorators (defaults from config.py)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TIME,
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
from .logs import configure_from_options
from .ratelimit import RateLimiter

__all__ = [
    "PASSWORD_IN_ARGV",
    "WARNINGS",
    "confirm",
    "db_option",
    "db_url_from",
    "finite",
    "log_options",
    "log_opts_of",
    "progress_option",
    "refuse_misplaced_rekey_options",
    "rekey_options",
    "settings_from",
    "setup_logging",
    "source_key_id",
    "steer_fields",
    "steer_options",
    "target_options",
    "workers_options",
    "writing_run_options",
]

F = TypeVar("F", bound=Callable[..., Any])


class Finite(click.FloatRange):
    """click's FloatRange, refusing NaN and the infinities: NaN compares false with every
    bound, so FloatRange lets it through, and a NaN limit breaks what reads it (a batch
    sizer's round(nan), a replica lag never above it, a rate limit silently lifted)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def finite(min: float | None = None, max: float | None = None, *,
           min_open: bool = False) -> Finite:
    """A float option's type: within the bounds, and a finite number."""
    return Finite(min=min, max=max, min_open=min_open)


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
    f = click.option("--lease-seconds", type=finite(2, 3600), metavar="S",
                     default=DEFAULT_LEASE_SECONDS, show_default=True,
                     help="With --workers: how long a silent worker keeps its range before "
                          "another worker takes it over (on the same host: as soon as its "
                          "process is gone). Must exceed the clock skew between machines.")(f)
    f = click.option("--workers", type=click.IntRange(1, 256), metavar="N",
                     help="Run N worker processes on this machine, coordinated through the "
                          "database (PostgreSQL; 1 on SQLite). The same command on another "
                          "machine joins the run. --max-kms-rps is shared by all workers.")(f)
    return f


def steer_options(f: F) -> F:
    """--batch-time, and what holds a run by itself: --pause-file, --max-replica-lag with
    --replica, --max-active-sessions (see migration/steer.py)."""
    f = click.option("--max-active-sessions", type=click.IntRange(1), metavar="N",
                     help="PostgreSQL: hold the run while more than N sessions are active "
                          "(as pt-online-schema-change's --max-load).")(f)
    f = click.option("--replica", "replicas", multiple=True, metavar="URL",
                     help="PostgreSQL: a replica whose lag --max-replica-lag reads on the "
                          "replica itself (repeatable), when this role cannot read "
                          "pg_stat_replication on the primary.")(f)
    f = click.option("--max-replica-lag", type=finite(min=0, min_open=True),
                     metavar="SECONDS",
                     help="PostgreSQL: hold the run while any streaming replica's replay lag "
                          "is above this (read from pg_stat_replication, or --replica).")(f)
    f = click.option("--pause-file", type=click.Path(dir_okay=False), metavar="PATH",
                     help="Hold the run while this file exists (as gh-ost's throttle flag "
                          "file); checked at every heartbeat.")(f)
    return click.option("--batch-time", type=finite(min=0), metavar="SECONDS",
                        help="Size batches to take about this long each (KMS work and write), "
                             "within 10 to 5,000 rows, starting at --batch-size; 0: a fixed "
                             f"--batch-size. [default: {DEFAULT_BATCH_TIME:g} when --batch-size "
                             "is not given]")(f)


def _batch_time(opts: dict[str, Any]) -> float | None:
    """--batch-time as given; else the default, unless --batch-size was given (a size the
    operator chose stays fixed)."""
    given = opts.get("batch_time")
    if given is not None:
        return float(given) or None
    ctx = click.get_current_context(silent=True)
    chosen = (ctx is not None and "batch_size" in ctx.params
              and ctx.get_parameter_source("batch_size") is not click.core.ParameterSource.DEFAULT)
    return None if chosen else DEFAULT_BATCH_TIME


def _refuse_guards_on_sqlite(url: str, opts: dict[str, Any]) -> None:
    flags = [flag for name, flag in (("max_replica_lag", "--max-replica-lag"),
                                     ("replicas", "--replica"),
                                     ("max_active_sessions", "--max-active-sessions"))
             if opts.get(name)]
    if flags and is_sqlite(url):
        raise ConfigError(f"{', '.join(flags)} watch a PostgreSQL server: SQLite has no "
                          "replicas or sessions to watch; leave them out; nothing was written")


def progress_option(f: F) -> F:
    return click.option("--no-progress", is_flag=True,
                        help="No progress bar or progress lines on stderr.")(f)


# The options that describe a rekey (KMS values moved from one key, or context, to another),
# as click names them, and as the operator types them.
REKEY_FLAGS = {"to_key": "--to-key", "from_key": "--from-key",
               "from_encryption_context": "--from-encryption-context",
               "to_encryption_context": "--to-encryption-context",
               "verify_decrypt": "--verify-decrypt"}


def rekey_options(f: F) -> F:
    """--to-key, --from-key, --from-encryption-context, --to-encryption-context and
    --verify-decrypt, for the commands that prepare or check a rekey."""
    f = click.option("--verify-decrypt", is_flag=True,
                     help="Rekey: check each new ciphertext by decrypting the old and the new "
                          "and comparing them (needs kms:Decrypt on both keys; the plaintext "
                          "enters this process's memory), instead of a ReEncrypt of the new "
                          "one from the destination to itself.")(f)
    f = click.option("--to-encryption-context", is_flag=True,
                     help="Rekey: give the new ciphertexts the encryption context (table, "
                          "column, pk).")(f)
    f = click.option("--from-encryption-context", is_flag=True,
                     help="Rekey: the values now carry the encryption context (table, column, "
                          "pk): they were migrated with --encryption-context.")(f)
    f = click.option("--from-key", metavar="KEY",
                     help="Rekey: the key the values are under now (default: --key-id).")(f)
    return click.option("--to-key", metavar="KEY",
                        help="Rekey: the KMS key (id, ARN or alias) to move the values "
                             "to.")(f)


def refuse_misplaced_rekey_options(opts: dict[str, Any], *, rekey: bool, what: str) -> None:
    """Refuse, in one line, the rekey options without a rekey (`what` says how to ask for
    one), --encryption-context with one (it does not say which side), and --from-key and
    --key-id naming two keys."""
    if not rekey:
        given = [flag for name, flag in REKEY_FLAGS.items() if opts.get(name)]
        if given:
            one = len(given) == 1
            raise ConfigError(f"{', '.join(given)} {'is' if one else 'are'} for a rekey: "
                              f"{what}, or leave {'it' if one else 'them'} out")
        return
    if opts.get("encryption_context"):
        raise ConfigError("--encryption-context does not say which key's side it is about in "
                          "a rekey: pass --from-encryption-context (the values carry the "
                          "context now) and/or --to-encryption-context (give it to the new "
                          "ciphertexts)")
    from_key, key_id = opts.get("from_key"), opts.get("key_id")
    if from_key and key_id and from_key != key_id:
        raise ConfigError(f"--from-key {from_key} and --key-id {key_id} name two source keys: "
                          "pass one of them")


def source_key_id(opts: dict[str, Any], env: Mapping[str, str] = os.environ) -> str:
    """The key a command starts from: --from-key, else --key-id, else $AWS_KMS_KEY_ID, else
    the default alias."""
    return str(opts.get("from_key") or opts.get("key_id") or env.get("AWS_KMS_KEY_ID")
               or DEFAULT_KEY_ID)


def db_option(f: F) -> F:
    return click.option("--db", "db", metavar="URL",
                        help="Database URL (default: $DATABASE_URL), e.g. sqlite:///app.db or "
                             "postgresql+psycopg://user@host/db. A password here is what ps "
                             "shows every user of the machine: export DATABASE_URL "
                             "instead.")(f)


def target_options(f: F) -> F:
    f = click.option("--max-kms-rps", type=finite(min=0), default=DEFAULT_MAX_KMS_RPS,
                     show_default=True,
                     help="KMS requests per second for the whole run (0: no limit). The "
                          "default leaves a live application 80% of a 10,000/s quota; it "
                          "halves when KMS throttles and recovers slowly.")(f)
    f = click.option("--concurrency", type=click.IntRange(1, 512), default=DEFAULT_CONCURRENCY,
                     show_default=True, help="KMS calls in flight.")(f)
    f = click.option("--batch-size", type=click.IntRange(1, 100_000), default=DEFAULT_BATCH_SIZE,
                     show_default=True, help="Rows per batch (one transaction each); given, it "
                                             "stays fixed, else it is where --batch-time "
                                             "starts.")(f)
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
    --yes, the steering options and the log options."""
    f = log_options(f)
    f = steer_options(f)
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


def setup_logging(opts: dict[str, Any]) -> None:
    """A command's logging, from its log options (the one place every command sets it up;
    the state machine's tests replace it to count batches)."""
    configure_from_options(opts)


def log_opts_of(opts: dict[str, Any]) -> dict[str, Any]:
    """The log options of a command, for the processes it starts (workers, verify's pool)."""
    return {k: opts.get(k) for k in ("log_level", "log_format", "log_file")}


def db_url_from(flag: str | None) -> str:
    """--db, else DATABASE_URL; a password on the command line draws a warning."""
    url = resolve_db_url(flag)
    if flag and carries_password(flag) and PASSWORD_IN_ARGV not in WARNINGS:
        WARNINGS.append(PASSWORD_IN_ARGV)
    return url


def steer_fields(url: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The Settings fields of the steering options (refused on SQLite where they watch
    PostgreSQL)."""
    _refuse_guards_on_sqlite(url, opts)
    return {"batch_time": _batch_time(opts), "pause_file": opts.get("pause_file") or None,
            "max_replica_lag": opts.get("max_replica_lag"),
            "replicas": tuple(opts.get("replicas") or ()),
            "max_active_sessions": opts.get("max_active_sessions")}


def settings_from(opts: dict[str, Any]) -> Settings:
    env = os.environ
    url = db_url_from(opts.get("db"))
    return Settings(
        db_url=url,
        targets=load_targets(opts.get("config_file")),
        key_id=source_key_id(opts, env),
        region=validate_region(opts.get("region") or env.get("AWS_REGION") or DEFAULT_REGION),
        batch_size=opts.get("batch_size") or DEFAULT_BATCH_SIZE,
        concurrency=opts.get("concurrency") or DEFAULT_CONCURRENCY,
        max_kms_rps=(DEFAULT_MAX_KMS_RPS if opts.get("max_kms_rps") is None
                     else float(opts["max_kms_rps"])),
        encryption_context=bool(opts.get("encryption_context")
                                or opts.get("from_encryption_context")),
        to_key_id=opts.get("to_key") or None,
        to_encryption_context=bool(opts.get("to_encryption_context")),
        verify_decrypt=bool(opts.get("verify_decrypt")),
        fernet_keys=fernet_keys_from_env(env),
        **steer_fields(url, opts),
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
