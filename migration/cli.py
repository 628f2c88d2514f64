"""The command line: parses options, calls one plain function per subcommand, maps errors.

Exit codes: 0 all done and nothing failed; 1 done, some values failed (each listed, left
untouched); 2 refused to start or stopped on a fatal error (one line on stderr);
130 interrupted (resumable).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from . import __version__, exits, options
from .backup import backup_before_first_write
from .census import record as record_census
from .cli_info import demo_cmd, iam_policy_cmd, status_cmd
from .cli_rewrite import migrate_cmd, rekey_cmd
from .cli_steer import pause_cmd, resume_cmd, set_cmd
from .config import (
    DEFAULT_BATCH_SIZE,
    Settings,
)
from .db import (
    make_engine,
    safe_url,
)
from .errors import (
    EXIT_FAILURES,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
)
from .options import (
    confirm,
    db_option,
    db_url_from,
    log_options,
    log_opts_of,
    make_kms,
    refuse_misplaced_rekey_options,
    rekey_options,
    settings_from,
    steer_fields,
    target_options,
    writing_run_options,
)
from .pipeline import Hooks
from .progress import make_progress
from .render import print_rollback, print_verify
from .rollback import journal_left, rollback
from .runs import graceful_stop, worker_signals
from .supervisor import (
    DEFAULT_ROWS_PER_RANGE,
    Here,
    refuse_sqlite_workers,
    rollback_ranged,
)
from .verify import verify
from .worker import work, worker_engine
from .worker_spec import WorkerSpec, settings_from_dict

__all__ = ["cli", "main"]

# -- output ------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kms-migrate")
def cli() -> None:
    """Move Fernet-encrypted secrets in SQL columns to AWS KMS: resumable, verified, reversible.

    Fernet keys come from ENCRYPTION_KEY and ENCRYPTION_KEY_LEGACY (comma-separated) in the
    environment, never from the command line. AWS credentials and endpoint come from boto3's
    default chain (IAM role, profile, AWS_* variables, AWS_ENDPOINT_URL_KMS).

    Exit codes: 0 done; 1 done, some values failed; 2 refused or stopped; 130 interrupted.
    """


cli.add_command(migrate_cmd)
cli.add_command(rekey_cmd)
cli.add_command(status_cmd)
cli.add_command(demo_cmd)
cli.add_command(iam_policy_cmd)
cli.add_command(pause_cmd)
cli.add_command(resume_cmd)
cli.add_command(set_cmd)


@cli.command("verify")
@target_options
@click.option("--encryption-context", is_flag=True,
              help="Decrypt with the context migrate --encryption-context wrote with.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              metavar="N",
              help="Verify with N processes on this machine, each taking key ranges (they "
                   "only read, so they need no coordination through the database); "
                   "--max-kms-rps is divided among them.")
@click.option("--rows-per-range", type=click.IntRange(1, 10_000_000),
              default=DEFAULT_ROWS_PER_RANGE, show_default=True,
              help="With --workers: rows per key range, the unit a process takes.")
@log_options
def verify_cmd(**opts: Any) -> int:
    """Decrypt every KMS value in the target columns with KMS; report what is left or broken,
    and the values by key: KMS values by key ARN, Fernet tokens by the Fernet key (current,
    legacy #N) that opens them, empty, unreadable (the census).

    Exit 1 when a Fernet token is left or a value cannot be decrypted. Reads the targets on
    read-only sessions and writes nothing to them; it records its census in the bookkeeping
    table kms_migrate_census, when the bookkeeping tables exist (it never creates them), for
    `status` to show; a census it cannot record is a warning, not an error.
    """
    options.setup_logging(opts)
    settings = settings_from(opts)
    engine = make_engine(settings.db_url, read_only=True)
    with make_kms(settings) as kms:
        result = verify(settings, engine=engine, kms=kms, workers=opts["workers"],
                        rows_per_range=opts["rows_per_range"], log_opts=log_opts_of(opts))
    recorded = record_census(settings.db_url, result)
    print_verify(result, recorded)
    options.WARNINGS.extend(result.warnings)
    if recorded.warning is not None:
        options.WARNINGS.append(recorded.warning)
    return EXIT_OK if result.ok else EXIT_FAILURES


@cli.command("rollback")
@db_option
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=DEFAULT_BATCH_SIZE,
              show_default=True, help="Journal rows per batch (one transaction each).")
@writing_run_options
def rollback_cmd(**opts: Any) -> int:
    """Put back the original Fernet token of every value the tool migrated.

    Restores exact original bytes from the journal, only where the column still holds the
    value the tool wrote. Resumable. Needs no KMS access and no Fernet key.
    """
    options.setup_logging(opts)
    url = db_url_from(opts.get("db"))
    workers = opts.get("workers")
    if workers is not None:
        refuse_sqlite_workers(url, workers)
    settings = Settings(db_url=url, batch_size=opts["batch_size"], **steer_fields(url, opts))
    engine = make_engine(url)
    confirm("ROLLBACK", url, opts["yes"], "restore the Fernet tokens in")
    with graceful_stop() as stop:
        backup = lambda: backup_before_first_write(  # noqa: E731
            engine, url, "rollback", opts["no_backup"])
        progress = make_progress("rollback", not opts["no_progress"])
        if workers is not None:
            here = Here(workers, lease_seconds=opts["lease_seconds"],
                        rows_per_range=opts["rows_per_range"], progress=progress,
                        should_stop=stop.requested, before_first_write=backup,
                        log_opts=log_opts_of(opts))
            result = rollback_ranged(engine, settings=settings, here=here)
        else:
            result = rollback(engine, batch_size=opts["batch_size"],
                              hooks=Hooks(progress, should_stop=stop.requested),
                              before_first_write=backup, settings=settings)
    print_rollback(result)
    from .finalize import finalized_note

    with engine.connect() as conn:
        note = finalized_note(conn)
        below = journal_left(conn, None) if result.undoes is not None else 0
    if result.undoes is not None:
        click.echo(f"this rollback undid rekey run {result.undoes}: the values it moved hold "
                   "their ciphertexts under its source key again"
                   + (f"; {below} value(s) of the migrate runs' journal remain, which a "
                      "second `kms-migrate rollback` would put back to Fernet" if below else ""))
    if note is not None:
        click.echo(note)
    return EXIT_FAILURES if result.failures else EXIT_OK


@cli.command("finalize")
@target_options
@click.option("--encryption-context", is_flag=True,
              help="Verify with the context migrate --encryption-context wrote with.")
@click.option("--yes", is_flag=True,
              help="Do not ask for confirmation (asked on every database, SQLite too).")
@log_options
def finalize_cmd(**opts: Any) -> int:
    """Delete the rollback journal once verify passes: the last step, and irreversible.

    Why: the journal keeps the original Fernet token of every migrated value, and the old
    ENCRYPTION_KEY still opens them: while it exists, a database dump plus a stolen .env
    still decrypt every secret, the very exposure the migration removes.

    When: after `kms-migrate verify` passes, the application reads and writes KMS, and you
    no longer need `rollback`. It runs verify itself first (same options, KMS needed) and
    deletes nothing unless verify passes and no migrate, retry or rollback run is unfinished.

    Irreversible: afterwards `rollback` refuses; only a backup taken before the migration
    still has the Fernet tokens. Deletes in batches (one transaction each); if interrupted,
    run it again to delete the rest.
    """
    from .finalize import finalize

    options.setup_logging(opts)
    settings = settings_from(opts)
    engine = make_engine(settings.db_url)
    confirm("FINALIZE", settings.db_url, opts["yes"], "delete the rollback journal of",
             always=True)
    with make_kms(settings) as kms, graceful_stop() as stop:
        result = finalize(settings, engine=engine, kms=kms, batch_size=settings.batch_size,
                          should_stop=stop.requested)
    checked = sum(c.kms_ok for c in result.verify.columns)
    click.echo(f"finalize run {result.run_id}" + (" (resumed)" if result.resumed else "")
               + f": {safe_url(settings.db_url)}")
    click.echo(f"verify: OK ({checked} KMS value(s) decrypted, no Fernet value left)")
    if result.extra:
        click.echo("also verified, as the rollback journal holds them: "
                   + ", ".join(result.extra))
    click.echo(f"deleted {result.deleted} rollback journal row(s) in {result.batches} "
               f"batch(es); {result.seconds:.2f} s")
    click.echo("rollback is no longer possible. Backups taken before the migration still "
               "hold the Fernet tokens: guard them like the old key, or destroy them.")
    return EXIT_OK


@cli.command("preflight")
@target_options
@click.option("--encryption-context", is_flag=True,
              help="Do the round trip with an encryption context (table, column, pk), as "
                   "migrate --encryption-context will: checks a policy that requires one.")
@rekey_options
@log_options
def preflight_cmd(**opts: Any) -> int:
    """Check that a migration can start (with --to-key: a rekey), one line per check;
    writes nothing.

    Checks, in order: the database is reachable (read-only session); each target table
    exists with its single-column primary key and text columns; ENCRYPTION_KEY (and
    ENCRYPTION_KEY_LEGACY) are valid Fernet keys and open a sample of up to 20 Fernet tokens
    per column; the KMS key exists (DescribeKey), is Enabled, is a symmetric ENCRYPT_DECRYPT
    key, lives in --region; an Encrypt+Decrypt round trip of a random test value works; and
    who the caller is (STS GetCallerIdentity, where allowed). Informational lines show an
    unfinished run and the run lock.

    With --to-key, the checks are a rekey's, from the source key (--from-key, default
    --key-id) to --to-key: no Fernet key is needed; each key gets its own lines (source key,
    destination key); a stored KMS value under the source is re-encrypted to the
    destination with the contexts given (--from-encryption-context,
    --to-encryption-context), then from the destination to itself, and KMS must name the
    expected keys (the results are thrown away); with --verify-decrypt, the old and the
    new ciphertexts also decrypt to the same bytes.

    Each line is "ok", "FAIL" (with the fix), "info" or "skip" (an earlier check failed).
    Exit 0 when no check failed, 2 when any did. --batch-size, --concurrency and
    --max-kms-rps are accepted for symmetry with migrate and not used.
    """
    from .preflight import format_check, preflight, summary

    options.setup_logging(opts)
    refuse_misplaced_rekey_options(opts, rekey=bool(opts.get("to_key")),
                                   what="pass --to-key KEY (the destination key) too")
    settings = settings_from(opts)
    checks = preflight(settings, env=os.environ)
    for check in checks:
        click.echo(format_check(check))
    click.echo(summary(checks))
    failed = [c.name for c in checks if c.ok is False]
    if failed:
        click.echo(f"kms-migrate: preflight: {len(failed)} check(s) failed "
                   f"({', '.join(failed)}); fix each as its FAIL line says, then re-run",
                   err=True)
        return EXIT_FATAL
    return EXIT_OK


@cli.command("worker", hidden=True)
def worker_cmd() -> int:
    """One worker of a ranged run (started by migrate/rollback --workers; spec on stdin)."""
    try:
        spec = WorkerSpec.from_json(sys.stdin.read())
    except (ValueError, TypeError):
        raise ConfigError("kms-migrate worker is started by migrate or rollback --workers, "
                          "which hand it its instructions on stdin; run one of those") from None
    options.setup_logging(spec.log)
    settings = settings_from_dict(spec.settings)
    engine = worker_engine(settings.db_url, spec.lease_seconds)
    with make_kms(settings) as kms, worker_signals() as stop:
        try:
            work(spec, settings, engine=engine, kms=kms, should_stop=stop, watch_parent=True)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED  # the command that started it says so, once
    return EXIT_OK


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: one line on stderr for every refusal, never a traceback.

    Every exception, the unexpected ones included, goes through `exits.report`, the one
    place that maps an exception to its exit code and line."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    options.WARNINGS.clear()
    code: int
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="kms-migrate",
                      standalone_mode=False)
        code = rv if isinstance(rv, int) else EXIT_OK
    except (Exception, KeyboardInterrupt) as exc:
        code = exits.report(exc)
    if code != EXIT_FATAL:  # a refusal stays one line
        for warning in options.WARNINGS:
            click.echo(warning, err=True)
    sys.stdout.flush()
    sys.exit(code)
