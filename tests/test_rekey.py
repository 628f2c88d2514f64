"""Rekey (issue 13): KMS values moved to another key, or bound to an encryption context,
with KMS ReEncrypt, on the same pipeline as migrate: journal, rollback, dry-run, values
the run does not own left untouched, fatal destination errors, and the KMS calls made.

In-process, against moto and the suite's SQLite and PostgreSQL (`db_url`); the subprocess
tests (SIGKILL, workers) are in tests/test_rekey_e2e.py.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import botocore.exceptions
import pytest
from botocore.awsrequest import AWSResponse
from sqlalchemy import create_engine, select, text, update

from benchmarks.fake_kms import RawBody
from checkpoints.tables import journal, runs
from migration.census import by_key, census_rows
from migration.config import Settings
from migration.db import make_engine
from migration.migrator import MigrateResult, Mode, migrate
from migration.rewrap import REASON_FERNET, REASON_GARBAGE
from migration.rollback import rollback
from migration.sample import coinflip_metadata
from migration.verify import verify
from tests.conftest import ALIAS, Keys, KmsHandle, _make_key
from tests.helpers import (
    Cell,
    assert_clean,
    make_db,
    make_kms,
    migrate_db,
    run_main,
    snapshot,
)

NEXT = "alias/coinflip-next-key"
ROWS = 40  # users and wagers each: 160 cells


@pytest.fixture
def migrated(db_url: str, keys: Keys, kms: KmsHandle) -> Iterator[Any]:
    """The coinflip sample migrated to KMS key A (alias/coinflip-master-key), a second key B
    (alias/coinflip-next-key): (url, truth, snapshot before and after the migrate, B)."""
    truth = make_db(db_url, ROWS, keys.current, keys.legacy, bad_values=True)
    fernet = snapshot(db_url)
    migrate_db(db_url, keys, kms)
    yield db_url, truth, fernet, snapshot(db_url), _make_key(kms.client, NEXT)


def rekey_settings(url: str, **kw: Any) -> Settings:
    kw.setdefault("key_id", ALIAS)
    kw.setdefault("to_key_id", NEXT)
    return Settings(db_url=url, batch_size=kw.pop("batch_size", 10), concurrency=4, **kw)


def run_rekey(settings: Settings, client: Any, mode: Mode | None = None) -> MigrateResult:
    mode = mode or Mode()
    engine = make_engine(settings.db_url, read_only=mode.dry_run)
    try:
        with make_kms(client, settings) as kms:
            return migrate(settings, engine=engine, kms=kms, mode=mode)
    finally:
        engine.dispose()


def opened(kms: KmsHandle, stored: str, context: dict[str, str] | None = None) -> tuple[str, str]:
    """(plaintext, ARN of the key) of a stored KMS value, as moto opens it."""
    extra = {"EncryptionContext": context} if context else {}
    resp = kms.client.decrypt(CiphertextBlob=base64.b64decode(stored), **extra)
    return resp["Plaintext"].decode(), resp["KeyId"]


def context_of(cell: Cell) -> dict[str, str]:
    table, pk, column = cell
    return {"table": table, "column": column, "pk": pk}


def journal_rows(url: str) -> list[Any]:
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            q = (select(journal.c.run_id, runs.c.kind, journal.c.table_name, journal.c.pk,
                        journal.c.column_name, journal.c.original, journal.c.migrated,
                        journal.c.status)
                 .join(runs, runs.c.id == journal.c.run_id).order_by(journal.c.id))
            return list(conn.execute(q))
    finally:
        eng.dispose()


def set_cells(url: str, values: dict[Cell, str]) -> None:
    """Write values into cells, as the application would."""
    _, users, wagers = coinflip_metadata()
    eng = create_engine(url)
    with eng.begin() as conn:
        for (table, pk, column), value in values.items():
            t, key = (users, users.c.user_id) if table == "users" else (wagers, wagers.c.wager_id)
            conn.execute(update(t).where(key == (int(pk) if table == "users" else pk))
                         .values({column: value}))
    eng.dispose()


# -- the run ---------------------------------------------------------------------------------

def test_rekey_moves_every_value_to_the_new_key_and_verify_sees_them_there(
    migrated: Any, kms: KmsHandle,
) -> None:
    url, truth, _, after_migrate, nxt = migrated
    result = run_rekey(rekey_settings(url), kms.client)
    now = snapshot(url)
    moved = {cell for cell in now if now[cell] != after_migrate[cell]}
    assert moved == set(truth.plaintexts)
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    for cell in moved:
        assert opened(kms, now[cell]) == (truth.plaintexts[cell], nxt.arn)
    # The journal of the rekey run holds each replaced ciphertext, byte for byte.
    rekeyed = [r for r in journal_rows(url) if r.kind == "rekey"]
    assert Counter((r.table_name, r.pk, r.column_name) for r in rekeyed) == Counter(moved)
    for r in rekeyed:
        cell = (r.table_name, r.pk, r.column_name)
        assert r.original == after_migrate[cell] and r.migrated == now[cell]
    # Values it does not own: left untouched and each named, as a Fernet token or garbage.
    assert {(f.table_name, f.pk, f.column_name) for f in result.failures} == set(truth.bad)
    reasons = {f.reason for f in result.failures}
    assert reasons <= {REASON_FERNET, REASON_GARBAGE} and REASON_FERNET in reasons
    for cell in truth.bad:
        assert now[cell] == after_migrate[cell]
    # verify under the new key: every KMS value opens, none under another key.
    engine = make_engine(url, read_only=True)
    with make_kms(kms.client, Settings(db_url=url, key_id=NEXT)) as vk:
        checked = verify(Settings(db_url=url, key_id=NEXT, batch_size=10), engine=engine,
                         kms=vk)
    engine.dispose()
    assert sum(c.kms_ok for c in checked.columns) == len(truth.plaintexts)
    assert sum(c.other_key for c in checked.columns) == 0
    # Its census: every KMS value under the new key, and the old key named at 0.
    census = by_key(census_rows(checked))["kms"]
    assert census == {nxt.arn: len(truth.plaintexts), kms.arn: 0}


def test_finalize_after_a_rekey_verifies_under_the_new_key_and_deletes_every_layer(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str], env_keys: Keys,
) -> None:
    url, truth, _, _, _ = migrated
    set_cells(url, dict.fromkeys(truth.bad, ""))  # finalize needs nothing left to migrate
    run_rekey(rekey_settings(url), kms.client)
    # Under the old key, verify fails (every value is under another key): nothing deleted.
    rc, _, err = run_main(capsys, "finalize", "--db", url, "--yes")
    assert rc == 2 and "under another KMS key" in err, err
    assert "--key-id the rekey's destination key" in err and "\n" not in err.strip()
    assert len(journal_rows(url)) == 2 * len(truth.plaintexts)
    rc, _out, err = run_main(capsys, "finalize", "--db", url, "--yes", "--key-id", NEXT)
    assert rc == 0, err
    assert journal_rows(url) == []
    rc, _, err = run_main(capsys, "rollback", "--db", url, "--yes")
    assert rc == 2 and "finalize" in err, err


def test_status_speaks_of_a_rekey_and_a_spent_rollback_says_so(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    url, _, _, _, _ = migrated
    run_rekey(rekey_settings(url), kms.client)
    rc, out, _ = run_main(capsys, "status", "--db", url)
    assert rc == 0 and "latest rekey run 2" in out
    assert "rekeyed" in out and "already there" in out
    for _ in range(2):  # the rekey's layer, then the migrate's
        assert run_main(capsys, "rollback", "--db", url, "--yes")[0] == 0
    rc, out, err = run_main(capsys, "rollback", "--db", url, "--yes")
    assert rc == 0 and "nothing to roll back" in out, (out, err)


def test_rekey_then_rollback_then_rollback_restores_each_layer_byte_for_byte(
    migrated: Any, kms: KmsHandle,
) -> None:
    url, _, fernet, after_migrate, _ = migrated
    run_rekey(rekey_settings(url), kms.client)
    assert snapshot(url) != after_migrate
    engine = make_engine(url)
    first = rollback(engine, batch_size=7)
    assert snapshot(url) == after_migrate  # the rekey undone: the ciphertexts under key A
    assert first.undoes is not None and first.conflicts == 0
    second = rollback(engine, batch_size=7)
    assert second.undoes is None
    assert snapshot(url) == fernet  # then the migrate undone: the Fernet tokens
    engine.dispose()
    statuses = Counter((r.kind, r.status) for r in journal_rows(url))
    assert set(statuses) == {("migrate", "rolled_back"), ("rekey", "rolled_back")}


def test_a_context_added_by_rekey_is_then_required(migrated: Any, kms: KmsHandle) -> None:
    url, truth, _, _, _ = migrated
    # Same key, a context added: allowed when only the context changes.
    result = run_rekey(rekey_settings(url, to_key_id=ALIAS, to_encryption_context=True),
                       kms.client)
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    now = snapshot(url)
    for cell, plain in truth.plaintexts.items():
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            opened(kms, now[cell])  # the guide's decrypt_secret passes no context
        assert exc.value.response["Error"]["Code"] == "InvalidCiphertextException"
        assert opened(kms, now[cell], context_of(cell)) == (plain, kms.arn)
    # Run again: every value is already where the run takes it; nothing is rewritten.
    again = run_rekey(rekey_settings(url, to_key_id=ALIAS, to_encryption_context=True),
                      kms.client, Mode(new_run=True))
    assert sum(c.migrated for c in again.columns) == 0
    assert sum(c.already for c in again.columns) == len(truth.plaintexts)
    assert snapshot(url) == now
    # And on to the next key, reading the context and keeping it.
    on = run_rekey(rekey_settings(url, encryption_context=True, to_encryption_context=True),
                   kms.client, Mode(new_run=True))
    assert sum(c.migrated for c in on.columns) == len(truth.plaintexts)


def test_a_value_under_another_key_is_listed_with_that_key_and_left_untouched(
    migrated: Any, kms: KmsHandle,
) -> None:
    url, truth, _, _, _ = migrated
    other = _make_key(kms.client, "alias/someone-else")
    cell = sorted(truth.plaintexts)[0]
    foreign = base64.b64encode(kms.client.encrypt(KeyId=other.arn, Plaintext=b"theirs")[
        "CiphertextBlob"]).decode()
    set_cells(url, {cell: foreign})
    result = run_rekey(rekey_settings(url), kms.client)
    named = {(f.table_name, f.pk, f.column_name): f.reason for f in result.failures}
    assert other.arn in named[cell]
    assert snapshot(url)[cell] == foreign


def test_base64_garbage_is_listed_and_never_stops_the_run(
    migrated: Any, kms: KmsHandle,
) -> None:
    """Base64 that is no ciphertext: moto answers InvalidCiphertextException to a short one
    and AccessDeniedException to a long one (an unknown key id in its header), which a run
    must not take for its own permissions while other values re-encrypt, even in the first
    batch, and even as the first value of it."""
    url, truth, _, _, _ = migrated
    import os

    first = min(c for c in truth.plaintexts if c[0] == "users")
    later = sorted(truth.plaintexts)[-1]
    unknown_key = b"00000000-0000-4000-8000-000000000000" + os.urandom(84)
    junk = {first: base64.b64encode(unknown_key).decode(),
            later: base64.b64encode(b"hello world").decode()}
    set_cells(url, junk)
    result = run_rekey(rekey_settings(url), kms.client)
    left = {(f.table_name, f.pk, f.column_name): f.reason for f in result.failures}
    assert set(junk) <= set(left)
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts) - len(junk)
    now = snapshot(url)
    for cell, value in junk.items():
        assert now[cell] == value


def test_dry_run_rekey_writes_nothing(migrated: Any, kms: KmsHandle) -> None:
    url, truth, _, after_migrate, _ = migrated
    rows_before = journal_rows(url)
    result = run_rekey(rekey_settings(url), kms.client, Mode(dry_run=True))
    assert result.dry_run and result.run_id is None
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert snapshot(url) == after_migrate
    assert journal_rows(url) == rows_before
    eng = create_engine(url)
    with eng.connect() as conn:
        assert [k for (k,) in conn.execute(select(runs.c.kind))] == ["migrate"]
    eng.dispose()


# -- no plaintext enters the process ---------------------------------------------------------

class Recorder:
    """A before-send handler that records each KMS operation and lets moto answer, or
    answers `error` (code, message) to ReEncrypt calls once `after` of them passed."""

    def __init__(self, error: tuple[str, str] | None = None, after: int = 0) -> None:
        self.ops: list[str] = []
        self.error, self.after = error, after

    def __call__(self, request: Any, event_name: str = "", **_: Any) -> AWSResponse | None:
        op = event_name.rsplit(".", 1)[-1]
        self.ops.append(op)
        if self.error is None or op != "ReEncrypt":
            return None
        if self.ops.count("ReEncrypt") <= self.after:
            return None
        code, message = self.error
        body = json.dumps({"__type": code, "message": message}).encode()
        return AWSResponse(request.url, 400, {
            "x-amzn-RequestId": "6f1c3c5e-0000-4000-8000-000000000000",
            "Content-Type": "application/x-amz-json-1.1",
            "Content-Length": str(len(body))}, RawBody(body))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Recorder]]:
    """Every KMS client the CLI makes gets the next Recorder of the list (a plain one when
    the list is empty)."""
    from migration import kms_client, options

    queue: list[Recorder] = []
    made = kms_client.make_client

    def make(region: str, concurrency: int) -> Any:
        client = made(region, concurrency)
        rec = queue.pop(0) if queue else Recorder()
        queue_seen.append(rec)
        client.meta.events.register_first("before-send.kms.*", rec)
        return client

    queue_seen: list[Recorder] = []
    monkeypatch.setattr(options, "make_client", make)
    yield queue
    queue[:] = queue_seen


def test_default_rekey_calls_only_reencrypt_and_describekey(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    recorded: list[Recorder], monkeypatch: pytest.MonkeyPatch, keys: Keys,
) -> None:
    url, truth, _, _, nxt = migrated
    monkeypatch.delenv("ENCRYPTION_KEY", raising=False)  # a rekey needs no Fernet key
    rec = Recorder()
    recorded.append(rec)
    code, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                              "--no-progress", "--batch-size", "10")
    assert code == 1, err  # the sample's bad values are left, and listed
    assert set(rec.ops) == {"DescribeKey", "ReEncrypt"}, Counter(rec.ops)
    assert rec.ops.count("DescribeKey") == 2  # the source and the destination
    # Each value: its ReEncrypt, and the check of the new ciphertext; and the same for the
    # one sampled value that shows the source key and context open something.
    assert rec.ops.count("ReEncrypt") == 2 * len(truth.plaintexts) + 2
    assert f"rekey run 2: {url.split('://')[0]}" in out or "rekey run 2" in out
    assert f"{ALIAS} -> {NEXT}" in out
    assert_clean(out, err, keys=keys)
    now = snapshot(url)
    assert all(opened(kms, now[c])[1] == nxt.arn for c in truth.plaintexts)


def test_verify_decrypt_proves_equality_with_decrypt_of_both(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    recorded: list[Recorder],
) -> None:
    url, truth, _, _, _ = migrated
    rec = Recorder()
    recorded.append(rec)
    code, _, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                            "--no-progress", "--verify-decrypt")
    assert code == 1, err
    ops = Counter(rec.ops)
    assert ops["ReEncrypt"] == len(truth.plaintexts) + 1  # + the sampled value at the start
    assert ops["Decrypt"] == 2 * (len(truth.plaintexts) + 1)
    assert "Encrypt" not in ops


# -- fatal errors of the destination ---------------------------------------------------------

@pytest.mark.parametrize(("code", "message", "fix"), [
    ("AccessDeniedException",
     "User: arn:aws:iam::123456789012:user/rotator is not authorized to perform: "
     "kms:ReEncryptTo on resource: {dest} because no identity-based policy allows it",
     "grant the caller kms:ReEncryptTo on the key"),
    ("DisabledException", "{dest} is disabled.", "enable it (aws kms enable-key --key-id {dest}"),
])
def test_a_fatal_error_of_the_destination_stops_at_once_naming_it(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    recorded: list[Recorder], code: str, message: str, fix: str, keys: Keys,
) -> None:
    url, truth, _, after_migrate, nxt = migrated
    # Let the first three batches through (2 ReEncrypts per value, 10 values a batch).
    recorded.append(Recorder((code, message.format(dest=nxt.arn)), after=60))
    rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                            "--no-progress", "--batch-size", "10", "--concurrency", "1")
    assert rc == 2, (out, err)
    line = err.strip()
    assert "\n" not in line and nxt.arn in line and fix.format(dest=nxt.arn) in line, line
    assert ALIAS not in line  # the source key is not the one blamed
    assert_clean(out, err, keys=keys)
    # Some batches committed, then nothing: the batch in flight wrote nothing, and every
    # value rewritten has its journal row.
    now = snapshot(url)
    moved = {c for c in now if now[c] != after_migrate[c]}
    assert 0 < len(moved) < len(truth.plaintexts)
    assert {(r.table_name, r.pk, r.column_name) for r in journal_rows(url)
            if r.kind == "rekey"} == moved
    eng = create_engine(url)
    with eng.connect() as conn:
        state, note = conn.execute(text(
            "SELECT state, note FROM kms_migrate_runs WHERE kind = 'rekey'")).one()
    eng.dispose()
    assert state == "stopped" and nxt.arn in note
    # Fixed: the same command resumes and finishes, each value rekeyed once.
    rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                            "--no-progress", "--batch-size", "10")
    assert rc == 1 and "(resumed)" in out, err
    rekeyed = Counter((r.table_name, r.pk, r.column_name) for r in journal_rows(url)
                      if r.kind == "rekey")
    assert set(rekeyed) == set(truth.plaintexts) and max(rekeyed.values()) == 1


@pytest.mark.parametrize("after", [0, 40])
def test_reencrypt_denied_on_the_source_stops_the_run_naming_it(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    recorded: list[Recorder], after: int,
) -> None:
    """Denied from the first call, or revoked mid-run (a value that re-encrypted before is
    asked again and denied too): the run's permission, not a value's: it stops."""
    url, _, _, _, _ = migrated
    msg = ("User: arn:aws:iam::123456789012:user/rotator is not authorized to perform: "
           f"kms:ReEncryptFrom on resource: {kms.arn}")
    recorded.append(Recorder(("AccessDeniedException", msg), after=after))
    rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                            "--no-progress", "--batch-size", "10", "--concurrency", "1")
    line = err.strip()
    assert rc == 2 and "\n" not in line, (out, err)
    assert "ReEncryptFrom" in line and ALIAS in line and NEXT not in line, line


def test_a_disabled_destination_is_refused_before_anything_is_written(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    url, _, _, after_migrate, nxt = migrated
    kms.client.disable_key(KeyId=nxt.key_id)
    rc, _out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes")
    line = err.strip()
    assert rc == 2 and "\n" not in line and NEXT in line and "disabled" in line, err
    assert snapshot(url) == after_migrate


def test_a_source_key_or_context_that_opens_no_sampled_value_is_refused(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    """The rekey's silent no-op (every value read, every one left): values migrated without
    a context, rekeyed as if they carried one; or a source key none of them is under."""
    url, _, _, after_migrate, _ = migrated
    _make_key(kms.client, "alias/unused")
    for args in (["--from-encryption-context"], ["--from-key", "alias/unused"]):
        rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                                *args)
        line = err.strip()
        assert rc == 2 and "\n" not in line and "opens none of the" in line, (args, err)
        assert "--from-encryption-context" in line and "nothing was written" in line
        assert snapshot(url) == after_migrate
    # Once every value is under the destination, a new run is not refused: they are done.
    assert run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes")[0] == 1
    rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes")
    assert rc == 1 and "rekeyed" in out, err  # the sample's bad values are still listed


def test_a_rekey_that_changes_nothing_is_refused(
    migrated: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    url, _, _, after_migrate, _ = migrated
    rc, _out, err = run_main(capsys, "rekey", "--db", url, "--to-key", ALIAS, "--yes")
    assert rc == 2 and "would change nothing" in err and "\n" not in err.strip(), err
    assert snapshot(url) == after_migrate


def test_resuming_a_rekey_with_another_destination_is_refused(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str], env_keys: Keys,
) -> None:
    url, _, _, _, _ = migrated
    _make_key(kms.client, "alias/third")
    settings = rekey_settings(url)
    engine = make_engine(url)
    with make_kms(kms.client, settings) as k:
        stop = iter(range(100))
        with pytest.raises(KeyboardInterrupt):
            from migration.pipeline import Hooks

            migrate(settings, engine=engine, kms=k,
                    hooks=Hooks(should_stop=lambda: next(stop) >= 1))
    engine.dispose()
    rc, _, err = run_main(capsys, "rekey", "--db", url, "--to-key", "alias/third", "--yes")
    assert rc == 2 and "the destination KMS key" in err and "\n" not in err.strip(), err
    rc, _, err = run_main(capsys, "migrate", "--db", url, "--yes")
    assert rc == 2 and "rekey run 2 is unfinished" in err, err


def test_settings_reach_the_report(migrated: Any, kms: KmsHandle, tmp_path: Any,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, truth, _, _, _ = migrated
    path = tmp_path / "r.json"
    rc, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", NEXT, "--yes",
                            "--dry-run", "--report", str(path))
    assert rc == 1, err
    report = json.loads(path.read_text())
    assert report["command"] == "rekey" and report["to_key_id"] == NEXT
    assert report["estimate_for_real_run"]["values_to_rekey"] == len(truth.plaintexts)
    assert report["estimate_for_real_run"]["kms_requests"] == 2 * len(truth.plaintexts) + 2
    assert "would rekey" in out


def test_dataclass_replace_keeps_the_destination() -> None:
    s = rekey_settings("sqlite://")
    assert replace(s, batch_size=3).to_key_id == NEXT


def test_a_rekey_is_steered_like_a_migrate(migrated: Any, kms: KmsHandle,
                                           tmp_path: Any) -> None:
    """A rekey run held by its pause file makes no ReEncrypt while the file exists, and one
    paused from the bookkeeping goes on only once resumed; then every value is moved."""
    import threading
    import time

    from checkpoints import control
    from checkpoints.control import Who

    url, truth, _, _, _ = migrated
    hold = tmp_path / "hold"
    hold.touch()
    settings = rekey_settings(url, pause_file=str(hold))
    k = make_kms(kms.client, settings)
    engine = make_engine(url)
    out: list[MigrateResult] = []
    t = threading.Thread(target=lambda: out.append(migrate(settings, engine=engine, kms=k)))
    t.start()
    layer = len(journal_rows(url))  # the migrate's
    deadline = time.monotonic() + 30
    held = None
    while not held and time.monotonic() < deadline:
        time.sleep(0.1)
        with engine.connect() as conn:
            held = conn.execute(select(runs.c.held).where(runs.c.kind == "rekey")).scalar()
    assert held == f"pause file {hold} exists"
    calls = k.requests  # the DescribeKeys and the start-up sample, then nothing
    with engine.begin() as conn:
        run_id = conn.execute(select(runs.c.id).where(runs.c.kind == "rekey")).scalar_one()
        control.pause(conn, run_id, Who("ops", "h"), "rotation window closed")
    hold.unlink()
    time.sleep(2.5)
    assert k.requests == calls and len(journal_rows(url)) == layer
    with engine.begin() as conn:
        control.resume(conn, run_id, Who("ops", "h"))
    t.join(60)
    assert not t.is_alive()
    result = out[0]
    assert result.kind == "rekey" and sum(c.migrated for c in result.columns) == len(
        truth.plaintexts)
    assert [c.action for c in result.steered.changes] == ["hold", "pause", "release", "resume"]
    engine.dispose()
