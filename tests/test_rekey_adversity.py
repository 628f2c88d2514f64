"""Adversity for rekey (issue 13): hostile data, odd sequences of commands, a hostile
environment. Each test names the defect it pins or the behaviour it checks."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ALIAS, Keys, KmsHandle, _make_key
from tests.helpers import (
    assert_no_leaks,
    assert_refused,
    dump_bookkeeping,
    make_db,
    migrate_db,
    run_main,
    snapshot,
)
from tests.test_rekey import (
    NEXT,
    Recorder,
    opened,
    rekey_settings,
    run_rekey,
    set_cells,
)

ROWS = 12


def vault_config(url: str, values: list[str], folder: Any, length: int = 400) -> str:
    """Table vault (id, secret VARCHAR(length)) holding `values`; a --config naming it."""
    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text(f"CREATE TABLE vault (id INTEGER PRIMARY KEY, "
                          f"secret VARCHAR({length}))"))
        for i, v in enumerate(values, 1):
            conn.execute(text("INSERT INTO vault (id, secret) VALUES (:i, :s)"),
                         {"i": i, "s": v})
    eng.dispose()
    config = folder / "vault.toml"
    config.write_text('[[targets]]\ntable = "vault"\nprimary_key = "id"\ncolumns = ["secret"]\n')
    return str(config)


@pytest.fixture
def migrated(db_url: str, keys: Keys, kms: KmsHandle) -> Any:
    truth = make_db(db_url, ROWS, keys.current, keys.legacy, bad_values=True)
    fernet = snapshot(db_url)
    migrate_db(db_url, keys, kms)
    return db_url, truth, fernet, snapshot(db_url), _make_key(kms.client, NEXT)


def test_same_key_context_rekey_leaves_a_value_kms_denies_and_goes_on(
    migrated: Any, kms: KmsHandle,
) -> None:
    """Defect: with one key on both sides (only the context changes), an AccessDenied on a
    value (a ciphertext under a key this caller may not use: moto answers so to base64
    naming an unknown key) was blamed on the destination, since the call's two keys are
    the same, and stopped the run (exit 2) instead of leaving that value, named."""
    url, truth, _, _, _ = migrated
    cell = sorted(truth.plaintexts)[3]
    junk = base64.b64encode(b"00000000-0000-4000-8000-000000000000" + os.urandom(84)).decode()
    set_cells(url, {cell: junk})
    result = run_rekey(rekey_settings(url, to_key_id=ALIAS, to_encryption_context=True),
                       kms.client)
    left = {(f.table_name, f.pk, f.column_name): f.reason for f in result.failures}
    assert cell in left and "denied" in left[cell]
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts) - 1
    assert snapshot(url)[cell] == junk


def test_same_key_rekey_denied_for_every_value_stops_naming_reencrypt_star(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same-key rekey whose permissions are missing still stops (nothing proves them),
    and the line names a permission that exists: kms:ReEncrypt* (a same-key ReEncrypt
    needs both kms:ReEncryptFrom and kms:ReEncryptTo), not "kms:ReEncrypt"."""
    url, _, _, after, _ = migrated
    msg = ("User: arn:aws:iam::123456789012:user/rotator is not authorized to perform: "
           f"kms:ReEncryptFrom on resource: {kms.arn}")
    rec = Recorder(("AccessDeniedException", msg))
    from migration import kms_client, options

    made = kms_client.make_client

    def make(region: str, concurrency: int) -> Any:
        client = made(region, concurrency)
        client.meta.events.register_first("before-send.kms.*", rec)
        return client

    monkeypatch.setattr(options, "make_client", make)
    code, out, err = run_main(capsys, "rekey", "--db", url, "--to-key", ALIAS,
                              "--to-encryption-context", "--yes", "--no-progress")
    line = assert_refused(code, out.split("\n", 1)[1] if out.startswith("backup") else out,
                          err, "kms:ReEncrypt*", kms.arn)
    assert "kms:ReEncrypt " not in line
    assert snapshot(url) == after


def test_a_conflicted_rekey_value_says_rekey_picks_it_up_and_exits_1(
    migrated: Any, kms: KmsHandle, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Defect: a value the application changed between a rekey's read and its write was
    named with migrate's reason, "migrate --retry-failed picks it up" (a retry reads only
    migrate's failures and does nothing for it; rekey has no --retry-failed), and the
    summary said "while being rekeyd". Now: rekey's own reason, and running rekey again
    (a new run) does pick it up; exit 1 until then."""
    from migration import rewrap

    url, truth, _, after, nxt = migrated
    orig = rewrap.RekeySteps.finish
    hit: list[Any] = []
    # The application writes a value under the source key into the row in between.
    donor = sorted(truth.plaintexts)[-1]

    def finish(self: Any, prep: Any) -> Any:
        out = orig(self, prep)
        if not hit and out[0]:
            rw = out[0][0]
            hit.append((self.target.name, self.target.pk_text(rw.pk), self.column))
            set_cells(url, {hit[0]: after[donor]})
        return out

    monkeypatch.setattr(rewrap.RekeySteps, "finish", finish)
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT, "--batch-size", "5")
    assert code == 1, (out, err)
    assert "being rekeyed were left as written" in out and "rekeyd" not in out
    line = next(x for x in out.splitlines() if f"pk={hit[0][1]} {hit[0][2]}:" in x)
    assert "being rekeyed" in line and "rekey, run again, picks it up" in line
    assert "retry-failed" not in line
    assert snapshot(url)[hit[0]] == after[donor]
    monkeypatch.setattr(rewrap.RekeySteps, "finish", orig)
    # What the line says works: the next rekey moves it (and only it).
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT)
    assert code == 1, (out, err)  # the sample's Fernet tokens and garbage are still left
    assert opened(kms, snapshot(url)[hit[0]])[1] == nxt.arn
    assert f"pk={hit[0][1]} {hit[0][2]}:" not in out


def test_a_rekeyed_value_too_long_for_its_column_says_rekey_picks_it_up(
    migrated: Any, kms: KmsHandle, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Any,
) -> None:
    """Defect (same family): a new ciphertext too long for its column was left with "widen
    the column, then migrate --retry-failed", which does nothing for a rekey's values.
    (moto's ciphertexts have one size under every key: the KMS answer is made longer.)"""
    from migration import rewrap

    url, truth, _, after, _ = migrated
    orig = rewrap.Rekey.one

    def one(self: Any, item: Any) -> Any:
        out = orig(self, item)
        return out + b"x" * 3000 if isinstance(out, bytes) else out

    monkeypatch.setattr(rewrap.Rekey, "one", one)
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT,
                         "--config", vault_config(
                             url, [after[c] for c in sorted(truth.plaintexts)[:3]], tmp_path))
    assert code == 1, (out, err)
    assert "does not fit the column" in out and "then run kms-migrate rekey again" in out
    assert "retry-failed" not in out, out



@pytest.fixture
def clean(db_url: str, keys: Keys, kms: KmsHandle) -> Any:
    truth = make_db(db_url, ROWS, keys.current, keys.legacy, bad_values=False)
    fernet = snapshot(db_url)
    migrate_db(db_url, keys, kms)
    return db_url, truth, fernet, snapshot(db_url), _make_key(kms.client, NEXT)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_main(capsys, *args, *(("--yes", "--no-progress")
                                     if args[0] in ("rekey", "rollback", "migrate") else ()))




def test_verify_decrypt_with_debug_json_logs_leaks_nothing(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str], keys: Keys,
    tmp_path: Any,
) -> None:
    """--verify-decrypt holds the plaintexts in memory: not one reaches the output, the
    debug JSON log, the report, status --json or the bookkeeping tables."""
    url, truth, _, _, _ = migrated
    log, rep = tmp_path / "log.json", tmp_path / "r.json"
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT, "--verify-decrypt",
                         "--log-level", "debug", "--log-format", "json", "--log-file",
                         str(log), "--report", str(rep))
    assert code == 1, (out, err)
    code2, out2, err2 = run_main(capsys, "status", "--db", url, "--json")
    assert code2 == 0
    assert log.read_text().count("\n") > 5  # it did log
    assert_no_leaks([out, err, log.read_text(), rep.read_text(), out2, err2],
                    dump_bookkeeping(url), truth, keys)


def test_two_rekeys_then_three_rollbacks_restore_each_layer_and_a_fourth_is_harmless(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    """A -> B, then B -> C with the context added; rollback three times: C, then B, then
    the Fernet tokens, each byte for byte; a fourth rollback restores nothing, exit 0."""
    url, _, fernet, after, _ = migrated
    _make_key(kms.client, "alias/third")
    assert cli(capsys, "rekey", "--db", url, "--to-key", NEXT)[0] == 1
    under_b = snapshot(url)
    assert cli(capsys, "rekey", "--db", url, "--key-id", NEXT, "--to-key", "alias/third",
               "--to-encryption-context")[0] == 1
    assert snapshot(url) != under_b
    for expected, undoes in ((under_b, "3"), (after, "2"), (fernet, None)):
        code, out, err = cli(capsys, "rollback", "--db", url)
        assert code == 0, (out, err)
        assert snapshot(url) == expected
        assert (f"undid rekey run {undoes}" in out) if undoes else ("undid rekey" not in out)
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 0 and snapshot(url) == fernet, (out, err)


def test_finalize_after_rekey_then_rekey_again_then_rollback(
    clean: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    """finalize after a rekey needs the destination key (verify under the old one fails,
    nothing deleted); once finalized, rollback refuses; a rekey after the finalize has a
    journal of its own, which one rollback restores, and then rollback refuses again."""
    url, _, _, _, _ = clean
    assert cli(capsys, "rekey", "--db", url, "--to-key", NEXT)[0] == 0
    under_b = snapshot(url)
    code, out, err = run_main(capsys, "finalize", "--db", url, "--yes")
    assert code == 2 and "under another KMS key" in err and "nothing was deleted" in err
    code, out, err = run_main(capsys, "finalize", "--db", url, "--yes", "--key-id", NEXT)
    assert code == 0, (out, err)
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 2 and "deleted by finalize" in err and snapshot(url) == under_b
    _make_key(kms.client, "alias/third")
    assert cli(capsys, "rekey", "--db", url, "--key-id", NEXT, "--to-key", "alias/third")[0] == 0
    assert snapshot(url) != under_b
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 0 and snapshot(url) == under_b, (out, err)
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 2 and "deleted by finalize" in err and snapshot(url) == under_b


def test_a_denied_value_opening_the_second_column_does_not_stop_a_proven_run(
    migrated: Any, kms: KmsHandle,
) -> None:
    """Defect: the proof that the run's permissions work (a value re-encrypted from the
    source) was kept per column (per range with --workers): a second column whose first
    batch held only a value KMS denies stopped the run (exit 2) though the first column had
    re-encrypted values under the same keys."""
    url, truth, _, _, _ = migrated
    column = "referral_payout_escrow_secret"
    first = min((c for c in truth.plaintexts if c[0] == "users" and c[2] == column),
                key=lambda c: int(c[1]))
    junk = base64.b64encode(b"00000000-0000-4000-8000-000000000000" + os.urandom(84)).decode()
    set_cells(url, {first: junk})
    result = run_rekey(rekey_settings(url, batch_size=1), kms.client)
    left = {(f.table_name, f.pk, f.column_name): f.reason for f in result.failures}
    assert first in left and "denied" in left[first]
    assert snapshot(url)[first] == junk


def _interrupt_rekey(url: str, client: Any, **kw: Any) -> None:
    """A rekey stopped after its first batch, the way Ctrl-C stops it (resumable)."""
    from migration.db import make_engine
    from migration.migrator import migrate
    from migration.pipeline import Hooks
    from tests.helpers import make_kms

    settings = rekey_settings(url, **kw)
    engine = make_engine(url)
    try:
        with make_kms(client, settings) as k, pytest.raises(KeyboardInterrupt):
            migrate(settings, engine=engine, kms=k, hooks=Hooks(should_stop=lambda: True))
    finally:
        engine.dispose()


def test_an_unfinished_rekey_resumes_only_as_itself(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str], env_keys: Keys,
    tmp_path: Any,
) -> None:
    """Stopped mid-way: status names it; migrate, migrate --retry-failed, finalize and a
    rekey with other contexts or targets refuse in one line; --verify-decrypt toggled
    resumes it; rollback of an unfinished rekey abandons it and restores its batches."""
    url, _, _, after, _ = migrated
    _interrupt_rekey(url, kms.client)
    code, out, err = run_main(capsys, "status", "--db", url)
    assert code == 0 and "rekey  interrupted" in out, (out, err)
    code, out, err = run_main(capsys, "status", "--db", url, "--json")
    assert code == 0 and '"run_kind": "rekey"' in out
    for args, fragment in (
        (("migrate",), "rekey run 2 is unfinished"),
        (("migrate", "--retry-failed"), "rekey run 2 is unfinished"),
        (("rekey", "--to-key", NEXT, "--to-encryption-context"),
         "the destination encryption context"),
        (("rekey", "--to-key", NEXT, "--from-encryption-context"), "the encryption context"),
        (("rekey", "--to-key", NEXT, "--config",
          vault_config(url, ["x"], tmp_path)), "the targets"),
        (("rekey", "--to-key", NEXT, "--from-key", NEXT), "would change nothing"),
        (("rekey", "--to-key", NEXT, "--from-key", ALIAS, "--key-id", NEXT), "two source keys"),
    ):
        code, out, err = cli(capsys, args[0], "--db", url, *args[1:])
        assert_refused(code, out, err, fragment)
    code, out, err = run_main(capsys, "finalize", "--db", url, "--yes", "--key-id", NEXT)
    assert code == 2 and "rekey run 2 is unfinished" in err, err
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT, "--verify-decrypt")
    assert code == 1 and "(resumed)" in out, (out, err)
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 0 and snapshot(url) == after, (out, err)


def test_rollback_of_an_unfinished_rekey_restores_it_then_rekey_starts_afresh(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str],
) -> None:
    url, truth, _, after, nxt = migrated
    _interrupt_rekey(url, kms.client)
    assert snapshot(url) != after
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 0 and snapshot(url) == after and "undid rekey run 2" in out, (out, err)
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT)
    assert code == 1 and "(resumed)" not in out, (out, err)
    now = snapshot(url)
    assert all(opened(kms, now[c])[1] == nxt.arn for c in truth.plaintexts)
    code, out, err = cli(capsys, "rollback", "--db", url)
    assert code == 0 and snapshot(url) == after, (out, err)


def test_a_row_deleted_between_the_read_and_the_write_leaves_nothing_and_exit_0(
    clean: Any, kms: KmsHandle, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The compare-and-swap finds no row: counted a conflict in the batch, then settled
    away (no value of it is left): exit 0, nothing named."""
    from migration import rewrap

    url, _, _, _, _ = clean
    orig = rewrap.RekeySteps.finish
    gone: list[Any] = []

    def finish(self: Any, prep: Any) -> Any:
        out = orig(self, prep)
        if not gone and out[0] and self.target.name == "wagers":
            gone.append(out[0][0].pk)
            eng = create_engine(url)
            with eng.begin() as conn:
                conn.execute(text("DELETE FROM wagers WHERE wager_id = :k"), {"k": gone[0]})
            eng.dispose()
        return out

    monkeypatch.setattr(rewrap.RekeySteps, "finish", finish)
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", NEXT, "--batch-size", "4")
    assert gone and code == 0, (out, err)
    assert "Values left" not in out


@pytest.mark.parametrize("where", ["another region", "a typo"])
def test_a_destination_key_kms_cannot_find_is_named_not_the_source(
    migrated: Any, kms: KmsHandle, capsys: pytest.CaptureFixture[str], where: str,
) -> None:
    """Defect: DescribeKey of the destination (--to-key) that KMS answered NotFound was
    reported as "KMS key alias/coinflip-master-key was not found": the source key, which
    exists, sending the operator to check the wrong key."""
    import boto3

    url, _, _, after, _ = migrated
    if where == "a typo":
        dest = "alias/coinflip-nxet-key"
    else:
        west = boto3.client("kms", region_name="us-west-2")
        dest = west.create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    code, out, err = cli(capsys, "rekey", "--db", url, "--to-key", dest)
    line = assert_refused(code, out, err, dest, "not found")
    assert ALIAS not in line
    assert snapshot(url) == after
