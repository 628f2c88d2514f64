"""The subcommands that only look: `status`, `demo` (a rehearsal on its own sample
database) and `iam-policy`; cli.py registers them on its group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .config import DEFAULT_KEY_ID, DEFAULT_REGION
from .db import make_engine, safe_url
from .errors import EXIT_OK
from .kms_client import validate_region
from .logs import configure_logging
from .options import db_option, db_url_from
from .render import print_status
from .status import collect_status

__all__ = ["demo_cmd", "iam_policy_cmd", "status_cmd"]


@click.command("status")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status_cmd(db: str | None, as_json: bool) -> int:
    """Show runs (state, timings), progress per table and column, failures, and the values
    by format and key that the latest verify counted (its census)."""
    configure_logging("warning")
    url = db_url_from(db)
    engine = make_engine(url, read_only=True)
    report = collect_status(engine)
    if report is None:
        if as_json:
            click.echo(json.dumps({"runs": [], "census": None}))
        else:
            click.echo(f"no kms-migrate runs in {safe_url(url)}")
        return EXIT_OK
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return EXIT_OK
    print_status(report)
    return EXIT_OK


@click.command("demo")
@click.option("--dir", "workdir", type=click.Path(file_okay=False),
              help="Where to put the sample database (default: a new temporary folder).")
@click.option("--rows", type=click.IntRange(10, 1_000_000), default=200, show_default=True,
              help="Users in the sample database (wagers: the same number).")
def demo_cmd(workdir: str | None, rows: int) -> int:
    """A rehearsal with no AWS account: a sample SQLite database and an emulated KMS (moto).

    Runs dry-run, migrate (interrupted and resumed), verify, status and rollback end to end,
    and checks each step's promise.
    """
    from .demo import run_demo

    configure_logging("warning")
    return run_demo(Path(workdir) if workdir else None, rows)


@click.command("iam-policy")
@click.option("--key-id", metavar="KEY",
              help="KMS key id, ARN or alias, resolved to the key ARN with DescribeKey "
                   f"(default: $AWS_KMS_KEY_ID, else {DEFAULT_KEY_ID}). Without credentials, "
                   "pass the key ARN itself.")
@click.option("--region", metavar="R",
              help=f"AWS region of the key (default: $AWS_REGION, else {DEFAULT_REGION}).")
@click.option("--app-writes/--app-read-only", default=True, show_default=True,
              help="Whether the application policy also allows kms:Encrypt (it writes new "
                   "secrets with KMS, USE_AWS_KMS=true) or only kms:Decrypt.")
@click.option("--which", type=click.Choice(["migration", "application", "both"]),
              default="both", show_default=True,
              help="Which policy to print: both as {\"migration\": ..., \"application\": ...}, "
                   "or one bare policy document.")
@click.option("--encryption-context", is_flag=True,
              help="Allow Encrypt and Decrypt only with the encryption context keys table, "
                   "column and pk and no other (for migrate --encryption-context and an "
                   "application passing context=...). DescribeKey stays unconditioned.")
def iam_policy_cmd(key_id: str | None, region: str | None, app_writes: bool, which: str,
                   encryption_context: bool) -> int:
    """Print least-privilege IAM policies (JSON) for the KMS key, naming its key ARN.

    The migration's policy allows kms:Encrypt, kms:Decrypt and kms:DescribeKey; the
    application's allows kms:Decrypt, plus kms:Encrypt unless --app-read-only. Both name
    the one key by its key ARN (an alias ARN as Resource does not grant use of the key),
    instead of the guide's key/* (every key of the account).

    Attach each to its own IAM role or user (aws iam put-role-policy --policy-document
    file://policy.json); the key policy must let IAM policies grant access (the default
    key policy does). Remove the migration's policy once the migration is verified. The
    output is plain JSON, as IAM requires (no comments).
    """
    from .iam import policies, resolve_key_arn

    configure_logging("warning")
    env = os.environ
    key = key_id or env.get("AWS_KMS_KEY_ID") or DEFAULT_KEY_ID
    reg = validate_region(region or env.get("AWS_REGION") or DEFAULT_REGION)
    arn, note = resolve_key_arn(key, reg)
    if note:
        click.echo(f"kms-migrate: {note}", err=True)
    doc = policies(arn, which, app_writes=app_writes, encryption_context=encryption_context)
    click.echo(json.dumps(doc, indent=2))
    return EXIT_OK
