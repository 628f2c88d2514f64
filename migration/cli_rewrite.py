"""The commands that rewrite the secrets: `migrate` (Fernet to KMS) and `rekey` (KMS key to
KMS key with ReEncrypt), two kinds of run of one pipeline, sharing one body (`_rewrite`):
engine, confirmation, backup, one process or --workers, summary, report, exit code."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import click

from . import options
from .backup import backup_before_first_write, had_bookkeeping
from .config import Settings
from .db import make_engine
from .errors import EXIT_FAILURES, EXIT_OK, ConfigError
from .migrator import Mode, migrate
from .options import (
    confirm,
    log_opts_of,
    make_kms,
    refuse_misplaced_rekey_options,
    rekey_options,
    settings_from,
    target_options,
    writing_run_options,
)
from .pipeline import Hooks
from .progress import make_progress
from .render import estimate_seconds, print_migrate
from .report import build_report, write_report
from .runs import graceful_stop
from .supervisor import Here, migrate_ranged, refuse_sqlite_workers

__all__ = ["migrate_cmd", "rekey_cmd"]


@click.command("migrate")
@target_options
@click.option("--dry-run", is_flag=True,
              help="Read, decrypt, encrypt and verify with KMS, and write nothing at all.")
@click.option("--encryption-context", is_flag=True,
              help="Bind each ciphertext to its table, column and primary key (KMS encryption "
                   "context): a value copied to another row no longer decrypts. Every reader "
                   "must then pass the same context; off by default (the guide passes none).")
@click.option("--new-run", is_flag=True,
              help="Abandon an unfinished run instead of resuming it (migrated values stay).")
@click.option("--retry-failed", is_flag=True,
              help="Retry only the values earlier runs recorded as failed (after fixing them "
                   "or adding a legacy key).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a JSON report: counts, failures, KMS requests, estimated cost, "
                   "duration (and, for a dry-run, the estimate for the real run).")
@writing_run_options
def migrate_cmd(**opts: Any) -> int:
    """Re-encrypt every Fernet value in the target columns with KMS, batch by batch.

    Each batch: Fernet decrypt, KMS Encrypt, KMS Decrypt and compare, then one transaction
    with compare-and-swap updates, the rollback journal and the checkpoint. Re-running
    resumes an unfinished run where it stopped.
    """
    options.setup_logging(opts)
    settings = settings_from(opts)
    if not os.environ.get("ENCRYPTION_KEY", "").strip():
        # ENCRYPTION_KEY_LEGACY alone would run, migrate the legacy tokens and fail every
        # current-key value (and the codec would name a legacy key ENCRYPTION_KEY).
        raise ConfigError(
            "ENCRYPTION_KEY is not set: export the Fernet key the application uses "
            "(older keys go in ENCRYPTION_KEY_LEGACY, comma-separated)"
        )
    if opts["dry_run"] and opts["retry_failed"]:
        raise ConfigError("--retry-failed writes; it cannot be combined with --dry-run")
    if opts["retry_failed"] and opts.get("workers") is not None:
        raise ConfigError("--retry-failed runs in one process: leave --workers out")
    return _rewrite(opts, settings, Mode(bool(opts["dry_run"]), opts["retry_failed"],
                                         opts["new_run"]))


@click.command("rekey")
@target_options
@rekey_options
@click.option("--dry-run", is_flag=True,
              help="Re-encrypt and check with KMS, and write nothing at all.")
@click.option("--new-run", is_flag=True,
              help="Abandon an unfinished rekey run instead of resuming it.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a JSON report: counts, values left, KMS requests, cost, duration.")
@writing_run_options
def rekey_cmd(**opts: Any) -> int:
    """Move every KMS value under the source key (--from-key, default --key-id) to --to-key,
    or to the encryption context, with KMS ReEncrypt: the plaintext never leaves KMS.

    The same batches, compare-and-swap, journal, checkpoint, resume, rate limit and
    --workers as migrate. Each new ciphertext is checked before it is written (a second
    ReEncrypt, destination to destination, thrown away; or --verify-decrypt). Fernet
    tokens, values under other keys and garbage are listed and left untouched. `rollback`
    restores the ciphertexts it replaced. Needs no Fernet key.
    """
    options.setup_logging(opts)
    if not opts.get("to_key"):
        raise ConfigError("rekey needs --to-key KEY: the KMS key (id, ARN or alias) to move "
                          "the values to; nothing was written")
    refuse_misplaced_rekey_options(opts, rekey=True, what="")
    settings = replace(settings_from(opts), fernet_keys=())
    return _rewrite(opts, settings, Mode(bool(opts["dry_run"]), False, opts["new_run"]))


def _rewrite(opts: dict[str, Any], settings: Settings, mode: Mode) -> int:
    """The body a migrate and a rekey command share: engine, confirmation, backup, one
    process or --workers, summary, report, exit code."""
    dry, rekey = mode.dry_run, settings.to_key_id is not None
    workers = opts.get("workers")
    if workers is not None:
        if dry:
            raise ConfigError("--workers applies to runs that write; a --dry-run runs in one "
                              "process (leave --workers out)")
        refuse_sqlite_workers(settings.db_url, workers)
    engine = make_engine(settings.db_url, read_only=dry)
    if not dry:
        confirm("REKEY" if rekey else "MIGRATE", settings.db_url, opts["yes"],
                "re-encrypt the KMS values in" if rekey else "re-encrypt the secrets in")
    started_at = datetime.now(UTC)
    kind = "rekey" if rekey else "migrate"
    label = f"dry-run {kind}" if dry and rekey else "dry-run" if dry else kind
    had_tables = had_bookkeeping(engine)
    with make_kms(settings) as kms, graceful_stop() as stop:
        backup = lambda: backup_before_first_write(  # noqa: E731
            engine, settings.db_url, kind, opts["no_backup"], had_tables)
        progress = make_progress(label, not opts["no_progress"])
        if workers is not None:
            here = Here(workers, lease_seconds=opts["lease_seconds"],
                        rows_per_range=opts["rows_per_range"], progress=progress,
                        should_stop=stop.requested, before_first_write=backup,
                        log_opts=log_opts_of(opts))
            result = migrate_ranged(settings, engine=engine, kms=kms, here=here,
                                    new_run=mode.new_run)
        else:
            result = migrate(settings, engine=engine, kms=kms, mode=mode,
                             hooks=Hooks(progress, should_stop=stop.requested),
                             before_first_write=backup)
    print_migrate(result, settings)
    if opts["report_path"]:
        estimate = estimate_seconds(result.real_run_calls(settings), result.kms_requests,
                                    result.seconds, result.rate_limit)
        path = write_report(opts["report_path"], build_report(
            result, settings, started_at=started_at, estimate_seconds=estimate))
        click.echo(f"report written to {path}")
    # Exit 0 only when nothing is left: a conflict is a value still to migrate.
    return EXIT_FAILURES if result.failed or result.conflicts else EXIT_OK
