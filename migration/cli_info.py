"""The subcommands that only look: `status`, `demo` (a rehearsal on its own sample
database) and `iam-policy`; cli.py registers them on its group."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from .config import DEFAULT_KEY_ID, DEFAULT_REGION
from .db import make_engine, safe_url
from .errors import EXIT_OK, ConfigError
from .kms_client import validate_region
from .logs import configure_logging
from .options import (
    db_option,
    db_url_from,
    refuse_misplaced_rekey_options,
    rekey_options,
    source_key_id,
)
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
                   "pass the key ARN itself. With --which rekey: the source key.")
@click.option("--region", metavar="R",
              help=f"AWS region of the key (default: $AWS_REGION, else {DEFAULT_REGION}).")
@click.option("--app-writes/--app-read-only", default=True, show_default=True,
              help="Whether the application policy also allows kms:Encrypt (it writes new "
                   "secrets with KMS, USE_AWS_KMS=true) or only kms:Decrypt.")
@click.option("--which", type=click.Choice(["migration", "application", "both", "rekey"]),
              default="both", show_default=True,
              help="Which policy to print: both as {\"migration\": ..., \"application\": ...}, "
                   "or one bare policy document (rekey: the policy of kms-migrate rekey, "
                   "which needs --to-key).")
@click.option("--encryption-context", is_flag=True,
              help="Allow Encrypt and Decrypt only with the encryption context keys table, "
                   "column and pk and no other (for migrate --encryption-context and an "
                   "application passing context=...). DescribeKey stays unconditioned.")
@rekey_options
def iam_policy_cmd(**opts: Any) -> int:
    """Print least-privilege IAM policies (JSON) for the KMS key, naming its key ARN.

    The migration's policy allows kms:Encrypt, kms:Decrypt and kms:DescribeKey; the
    application's allows kms:Decrypt, plus kms:Encrypt unless --app-read-only. Both name
    the one key by its key ARN (an alias ARN as Resource does not grant use of the key),
    instead of the guide's key/* (every key of the account).

    --which rekey prints the policy of a rekey from the source key (--from-key, default
    --key-id) to --to-key: kms:ReEncryptFrom on the source, kms:ReEncryptTo and
    kms:ReEncryptFrom on the destination, kms:DescribeKey on both, and with
    --verify-decrypt kms:Decrypt on both; --from-encryption-context and
    --to-encryption-context add the encryption context conditions of each side.

    Attach each to its own IAM role or user (aws iam put-role-policy --policy-document
    file://policy.json); the key policy must let IAM policies grant access (the default
    key policy does). Remove the migration's policy once the migration is verified. The
    output is plain JSON, as IAM requires (no comments).
    """
    from .iam import policies, rekey_policy, resolve_key_arn

    configure_logging("warning")
    rekey = opts["which"] == "rekey"
    if rekey and not opts.get("to_key"):
        raise ConfigError("iam-policy --which rekey needs --to-key KEY: the key (id, ARN or "
                          "alias) the rekey moves the values to")
    refuse_misplaced_rekey_options(opts, rekey=rekey, what="add --which rekey")
    reg = validate_region(opts.get("region") or os.environ.get("AWS_REGION") or DEFAULT_REGION)
    flag = "--from-key" if opts.get("from_key") else "--key-id"
    arn, note = resolve_key_arn(source_key_id(opts), reg, flag=flag)
    notes = [note]
    if rekey:
        dest, dest_note = resolve_key_arn(str(opts["to_key"]), reg, flag="--to-key")
        notes.append(dest_note)
        doc = rekey_policy(arn, dest, from_context=bool(opts.get("from_encryption_context")),
                           to_context=bool(opts.get("to_encryption_context")),
                           verify_decrypt=bool(opts.get("verify_decrypt")))
    else:
        doc = policies(arn, opts["which"], app_writes=opts["app_writes"],
                       encryption_context=opts["encryption_context"])
    for line in notes:
        if line:
            click.echo(f"kms-migrate: {line}", err=True)
    click.echo(json.dumps(doc, indent=2))
    return EXIT_OK
