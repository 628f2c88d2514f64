"""Data and sequences that once stopped, looped or misled a run (issue 11, defects 2, 3, 6, 9
and 12): every loop ends, NULL keys are refused, the key check samples across the key
range, statements fit the database's parameter limit, conflicts are named and retried."""

from __future__ import annotations

import subprocess
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import create_engine, delete, select, update

from checkpoints.tables import checkpoints, runs
from migration.sample import coinflip_metadata
from tests.conftest import Keys, KmsHandle, MotoServer, kms_migrate_bin
from tests.helpers import make_db, snapshot

# A command that loops forever is cut off here and fails its test.
LOOP_TIMEOUT = 60.0


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with a timeout: an endless loop fails the test."""
    return subprocess.run([kms_migrate_bin(), *args], env=env, capture_output=True, text=True,
                          timeout=LOOP_TIMEOUT)


def _retry_checkpoint(url: str) -> Any:
    eng = create_engine(url)
    with eng.connect() as conn:
        row = conn.execute(
            select(checkpoints).join(runs, runs.c.id == checkpoints.c.run_id)
            .where(runs.c.kind == "retry", checkpoints.c.table_name == "users",
                   checkpoints.c.column_name == "encrypted_secret")
        ).one()
    eng.dispose()
    return row


# -- defect 2: --retry-failed over keys deleted since ----------------------------------------

def test_retry_failed_ends_when_whole_pages_of_failed_keys_were_deleted(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli_env: dict[str, str],
) -> None:
    truth = make_db(db_url, 30, keys.current, keys.legacy, bad_values=False)
    _, users, _ = coinflip_metadata()
    cells = sorted((c for c in truth.plaintexts if c[0] == "users" and c[2] == "encrypted_secret"),
                   key=lambda c: int(c[1]))
    bad = [int(c[1]) for c in cells[:10]]
    third = Fernet.generate_key()  # a key the operator forgot to configure
    eng = create_engine(db_url)
    with eng.begin() as conn:
        for pk in bad:
            token = Fernet(third).encrypt(truth.plaintexts[("users", str(pk),
                                                            "encrypted_secret")].encode())
            conn.execute(update(users).where(users.c.user_id == pk)
                         .values(encrypted_secret=token.decode()))
    common = ["--db", db_url, "--yes", "--no-backup", "--no-progress", "--batch-size", "4"]
    first = run_cli(["migrate", *common], cli_env)
    assert first.returncode == 1, first.stdout + first.stderr
    # The application deletes the first eight failed rows: two whole pages of the key list.
    with eng.begin() as conn:
        conn.execute(delete(users).where(users.c.user_id.in_(bad[:8])))
    eng.dispose()
    env = {**cli_env, "ENCRYPTION_KEY_LEGACY": f"{keys.legacy},{third.decode()}"}  # the fix
    retry = run_cli(["migrate", "--retry-failed", *common], env)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    after = snapshot(db_url)
    for pk in bad[8:]:
        cell = ("users", str(pk), "encrypted_secret")
        assert server_kms.decrypt_text(after[cell]) == truth.plaintexts[cell]
    ck = _retry_checkpoint(db_url)
    assert ck.done and ck.batches == 3  # ten listed keys, four a page: three batches
    assert ck.last_pk == str(bad[-1])
