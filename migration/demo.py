"""`kms-migrate demo`: the whole job rehearsed on a sample SQLite database and moto's KMS.

No AWS account is needed: moto emulates KMS in-process. Every step checks its own
promise, so the demo fails loudly (exit 2) if the tool ever broke one.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography.fernet import Fernet
from sqlalchemy import Engine, create_engine, select

from .census import census_lines
from .census import record as record_census
from .config import Settings
from .db import make_engine
from .errors import DemoCheckFailed, KmsMigrateError
from .kms import KMS
from .migrator import Mode, migrate
from .options import make_kms
from .pipeline import Hooks
from .render import print_migrate, print_rollback, print_verify
from .rollback import rollback
from .sample import SampleSecrets, coinflip_metadata, create_coinflip_schema, fill_coinflip
from .status import collect_status
from .verify import verify

__all__ = ["run_demo"]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise DemoCheckFailed(f"demo check failed: {what}")
    click.echo(f"  ok: {what}")


def _snapshot(url: str) -> dict[tuple[str, str, str], Any]:
    _, users, wagers = coinflip_metadata()
    engine = create_engine(url)
    out: dict[tuple[str, str, str], Any] = {}
    with engine.connect() as conn:
        for t, pk in ((users, "user_id"), (wagers, "wager_id")):
            cols = [c for c in t.c if c.name.endswith("secret")]
            for row in conn.execute(select(t.c[pk], *cols)):
                for c, v in zip(cols, row[1:], strict=True):
                    out[(t.name, str(row[0]), c.name)] = v
    engine.dispose()
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_demo(workdir: Path | None, rows: int) -> int:
    try:
        from moto import mock_aws
    except ImportError:
        raise KmsMigrateError(
            "the demo emulates KMS with moto, which is not installed: "
            "pip install 'kms-migrate[demo]' (or run `make demo` in a checkout)"
        ) from None

    demo = _sample(workdir or Path(tempfile.mkdtemp(prefix="kms-migrate-demo-")), rows)
    with mock_aws():
        kms = make_kms(demo.settings)
        kms.client.create_alias(
            AliasName=demo.settings.key_id,
            TargetKeyId=kms.client.create_key(Description="demo key")["KeyMetadata"]["KeyId"],
        )
        click.echo(f"  emulated KMS key {demo.settings.key_id} in {demo.settings.region} (moto)")
        engine = make_engine(demo.url)
        _migrate_steps(demo, engine, kms)
        _after_steps(demo, engine)
    click.echo(f"\ndemo OK: the sample database is at {demo.db}")
    exe = sys.argv[0] if sys.argv and sys.argv[0].endswith("kms-migrate") else "kms-migrate"
    click.echo(f"Try: {exe} status --db sqlite:///{demo.db}")
    return 0


@dataclass(frozen=True)
class _Demo:
    db: Path
    url: str
    settings: Settings
    truth: SampleSecrets
    before: dict[tuple[str, str, str], Any]  # every target cell before the migration


def _sample(base: Path, rows: int) -> _Demo:
    """Step 1: the sample coinflip database, with two Fernet keys and three bad values."""
    base.mkdir(parents=True, exist_ok=True)
    db = base / "coinflip.db"
    if db.exists():
        db.unlink()
    url = f"sqlite:///{db}"
    current, legacy = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    click.echo(f"== 1. sample coinflip database: {db}")
    raw = create_engine(url)
    create_coinflip_schema(raw)
    truth = fill_coinflip(raw, rows, current, legacy)
    raw.dispose()
    click.echo(f"  {rows} users and {rows} wagers: {len(truth.plaintexts)} secrets, "
               f"{len(truth.empty)} NULL/empty, {len(truth.bad)} bad on purpose "
               "(corrupt token, unknown key, oversize plaintext)")
    settings = Settings(db_url=url, batch_size=50, concurrency=8, fernet_keys=(current, legacy))
    return _Demo(db, url, settings, truth, _snapshot(url))


def _migrate_steps(demo: _Demo, engine: Engine, kms: KMS) -> None:
    """Steps 2-5: a dry-run, an interrupted migrate, its resume, the application's read."""
    settings, truth = demo.settings, demo.truth
    click.echo("\n== 2. migrate --dry-run: everything but the writes")
    digest = _sha(demo.db)
    result = migrate(settings, engine=make_engine(demo.url, read_only=True), kms=kms,
                     mode=Mode(dry_run=True))
    print_migrate(result, settings)
    _check(_sha(demo.db) == digest, "the database file is byte-identical after the dry-run")

    click.echo("\n== 3. migrate, interrupted after 3 batches (as a crash or Ctrl-C would)")
    seen = [0]

    def stop_after_three(table: str, column: str, counts: object) -> None:
        seen[0] += 1
        if seen[0] == 3:
            raise KeyboardInterrupt

    try:
        migrate(settings, engine=engine, kms=make_kms(settings),
                hooks=Hooks(on_batch=stop_after_three))
    except KeyboardInterrupt:
        click.echo("  interrupted after 3 committed batches")
    click.echo("\n== 4. migrate again: resumes from the checkpoint")
    result = migrate(settings, engine=engine, kms=make_kms(settings))
    print_migrate(result, settings)
    _check(result.resumed, "the second migrate resumed the interrupted run")
    _check(sorted((f.table_name, f.pk, f.column_name) for f in result.failures)
           == sorted(truth.bad), "exactly the bad values failed, each listed")

    click.echo("\n== 5. the guide's decrypt_secret reads every migrated value")
    after = _snapshot(demo.url)
    ok = all(
        kms.client.decrypt(CiphertextBlob=base64.b64decode(after[cell].encode()))[
            "Plaintext"].decode() == plaintext
        for cell, plaintext in truth.plaintexts.items()
    )
    _check(ok, f"all {len(truth.plaintexts)} good values decrypt to their plaintext")
    _check(all(after[c] == demo.before[c] for c in truth.bad), "every bad value is untouched")


def _after_steps(demo: _Demo, engine: Engine) -> None:
    """Steps 6-8: verify, status, rollback to the exact original bytes."""
    settings, truth = demo.settings, demo.truth
    click.echo("\n== 6. verify (the three bad values are expected to be reported)")
    vres = verify(settings, engine=make_engine(demo.url, read_only=True),
                  kms=make_kms(settings))
    recorded = record_census(demo.url, vres)
    print_verify(vres, recorded)
    _check(sum(c.kms_ok for c in vres.columns) == len(truth.plaintexts)
           and len(vres.problems) == len(truth.bad),
           "verify opens every migrated value and flags only the bad ones")

    click.echo("\n== 7. status")
    report = collect_status(engine)
    assert report is not None
    for r in report.runs:
        click.echo(f"  run {r['id']} {r['kind']}: {r['state']}")
    if report.census is not None:
        for line in census_lines(report.census):
            click.echo(f"  {line}")
    _check(report.census is not None and report.census["taken"] == recorded.taken,
           "status shows the census verify recorded")

    click.echo("\n== 8. rollback")
    rres = rollback(engine, batch_size=50)
    print_rollback(rres)
    _check(_snapshot(demo.url) == demo.before, "every target column is byte-identical to before")
