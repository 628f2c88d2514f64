"""`kms-migrate demo`: the whole job rehearsed on a sample SQLite database and moto's KMS.

No AWS account is needed: moto emulates KMS in-process. Every step checks its own
promise, so the demo fails loudly (exit 2) if the tool ever broke one.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from cryptography.fernet import Fernet
from sqlalchemy import Engine, create_engine, select

from .census import Recorded, by_key, census_lines, census_rows
from .census import record as record_census
from .codec import encryption_context
from .config import Settings
from .db import make_engine
from .errors import DemoCheckFailed, KmsMigrateError
from .kms import KMS
from .migrator import Mode, migrate
from .options import make_kms
from .pipeline import Hooks
from .render import print_migrate, print_rollback, print_verify
from .rollback import rollback
from .runtime import KMSEncryption
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
        _after_steps(demo, engine, kms)
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


def _after_steps(demo: _Demo, engine: Engine, kms: KMS) -> None:
    """Steps 6-11: verify, a rekey and its rollback, status, rollback to the exact original
    bytes."""
    settings, truth = demo.settings, demo.truth
    click.echo("\n== 6. verify (the three bad values are expected to be reported)")
    vres = verify(settings, engine=make_engine(demo.url, read_only=True),
                  kms=make_kms(settings))
    recorded = record_census(demo.url, vres)
    print_verify(vres, recorded)
    _check(sum(c.kms_ok for c in vres.columns) == len(truth.plaintexts)
           and len(vres.problems) == len(truth.bad),
           "verify opens every migrated value and flags only the bad ones")

    migrated = _snapshot(demo.url)
    recorded = _rekey_steps(demo, engine, kms)

    click.echo("\n== 10. status")
    report = collect_status(engine)
    assert report is not None
    for r in report.runs:
        click.echo(f"  run {r['id']} {r['kind']}: {r['state']}")
    if report.census is not None:
        for line in census_lines(report.census):
            click.echo(f"  {line}")
    _check(report.census is not None and report.census["taken"] == recorded.taken,
           "status shows the census verify recorded")

    click.echo("\n== 11. rollback, once for the rekey, once for the migrate")
    rres = rollback(engine, batch_size=50)
    print_rollback(rres)
    _check(rres.undoes is not None and _snapshot(demo.url) == migrated,
           "the rekey's rollback put back the ciphertexts under the first key, byte for byte")
    rres = rollback(engine, batch_size=50)
    print_rollback(rres)
    _check(_snapshot(demo.url) == demo.before, "every target column is byte-identical to before")


NEXT_KEY = "alias/coinflip-next-key"


def _rekey_steps(demo: _Demo, engine: Engine, kms: KMS) -> Recorded:
    """Steps 7-9: rekey to a second key with the encryption context turned on; who can read
    the values then; the census that shows none left under the old key."""
    truth = demo.truth
    kms.client.create_alias(AliasName=NEXT_KEY, TargetKeyId=kms.client.create_key(
        Description="demo key, the next one")["KeyMetadata"]["KeyId"])
    settings = replace(demo.settings, to_key_id=NEXT_KEY, to_encryption_context=True,
                       fernet_keys=())
    click.echo(f"\n== 7. rekey to {NEXT_KEY}, binding each value to its row (KMS ReEncrypt: "
               "the plaintext never leaves KMS)")
    result = migrate(settings, engine=engine, kms=make_kms(settings))
    print_migrate(result, settings)
    _check(sum(c.migrated for c in result.columns) == len(truth.plaintexts),
           f"all {len(truth.plaintexts)} KMS values moved to {NEXT_KEY}")

    click.echo("\n== 8. who can read them now")
    now = _snapshot(demo.url)
    guide = 0
    for cell in truth.plaintexts:
        try:  # the guide's decrypt_secret: no encryption context
            kms.client.decrypt(CiphertextBlob=base64.b64decode(now[cell].encode()))
            guide += 1
        except kms.client.exceptions.InvalidCiphertextException:
            pass
    _check(guide == 0, "the guide's decrypt_secret (no context) can no longer read any of them")
    helper = KMSEncryption(settings.region, NEXT_KEY, kms.client)
    _check(all(helper.decrypt_secret(now[(t, pk, c)], context=encryption_context(t, c, pk))
               == plain for (t, pk, c), plain in truth.plaintexts.items()),
           "the application helper with context= reads every one")
    click.echo(f"\n== 9. verify under {NEXT_KEY} with the context: the census before "
               "disabling the old key")
    after = replace(settings, key_id=NEXT_KEY, encryption_context=True, to_key_id=None,
                    to_encryption_context=False, fernet_keys=demo.settings.fernet_keys)
    vres = verify(after, engine=make_engine(demo.url, read_only=True), kms=make_kms(after))
    recorded = record_census(demo.url, vres)
    print_verify(vres, recorded)
    kms_by_key = by_key(census_rows(vres))["kms"]
    old = kms.describe().arn
    _check(kms_by_key.get(old) == 0 and kms_by_key.get(vres.key_arn) == len(truth.plaintexts),
           f"the census counts 0 values under the old key and {len(truth.plaintexts)} under "
           "the new one")
    return recorded
