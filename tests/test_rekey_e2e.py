"""Rekey end to end (issue 13): the real CLI in a subprocess against moto's KMS server,
killed with SIGKILL mid-rekey (SQLite and PostgreSQL), and `rekey --workers 3` with a
worker SIGKILLed (PostgreSQL). After the resume every value is under exactly one of the
two keys, with its own plaintext, and none was re-encrypted twice (one journal row each).
"""

from __future__ import annotations

import base64
import signal
from collections import Counter
from typing import Any

import pytest

from migration.sample import SampleSecrets
from tests.conftest import Keys, KmsHandle, MotoServer, _make_key
from tests.helpers import Cell, assert_no_leaks, dump_bookkeeping, make_db, migrate_db, snapshot
from tests.test_e2e import (  # noqa: F401  (cli and outputs are fixtures)
    Outputs,
    cli,
    kill_in_range,
    outputs,
    poll_engine,
    runs_of,
    scalar,
    scalar_rows,
    wait_until,
)

pytestmark = pytest.mark.e2e

NEXT = "alias/coinflip-next-key"


def rekey_journal(eng: Any) -> Counter[Cell]:
    rows = scalar_rows(eng, "SELECT j.table_name, j.pk, j.column_name FROM kms_migrate_journal j "
                            "JOIN kms_migrate_runs r ON r.id = j.run_id WHERE r.kind = 'rekey'")
    return Counter((t, p, c) for t, p, c in rows)


def under_one_key(eng: Any, url: str, truth: SampleSecrets, before: dict[Cell, Any],
                  kms: KmsHandle, old: str, new: str) -> int:
    """Every good value opens to its own plaintext under exactly one of the keys: the old
    one with its pre-rekey bytes, or the new one with a journal row from those bytes. The
    number under the new key."""
    now = snapshot(url)
    journal = {(t, p, c): (o, m) for t, p, c, o, m in scalar_rows(
        eng, "SELECT j.table_name, j.pk, j.column_name, j.original, j.migrated "
             "FROM kms_migrate_journal j JOIN kms_migrate_runs r ON r.id = j.run_id "
             "WHERE r.kind = 'rekey'")}
    moved = 0
    for cell, plain in truth.plaintexts.items():
        resp = kms.client.decrypt(CiphertextBlob=base64.b64decode(now[cell]))
        assert resp["Plaintext"].decode() == plain, cell
        if resp["KeyId"] == new:
            moved += 1
            assert journal[cell] == (before[cell], now[cell]), cell
        else:
            assert resp["KeyId"] == old and now[cell] == before[cell], cell
            assert cell not in journal, cell
    for cell in before:
        if cell not in truth.plaintexts:
            assert now[cell] == before[cell], cell
    return moved


def test_sigkill_mid_rekey_then_resume(
    db_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    url = db_url
    truth = make_db(url, 120, keys.current, keys.legacy, bad_values=True)
    migrate_db(url, keys, server_kms)
    before = snapshot(url)
    nxt = _make_key(server_kms.client, NEXT)
    eng = poll_engine(url)
    args = ["rekey", "--db", url, "--to-key", NEXT, "--yes", "--batch-size", "5",
            "--concurrency", "4", "--log-level", "debug"]
    rk = cli.start(args)
    kill_at = len(truth.plaintexts) * 55 // 100
    wait_until(rk, f"{kill_at} values rekeyed", lambda: sum(rekey_journal(eng).values())
               >= kill_at)
    rk.signal(signal.SIGKILL)
    assert rk.wait().rc == -signal.SIGKILL
    assert runs_of(eng)[-1][1:] == ("rekey", "running"), "the run ended before the kill"
    moved = under_one_key(eng, url, truth, before, server_kms, server_kms.arn, nxt.arn)
    assert 0 < moved < len(truth.plaintexts)

    done = cli.run(args)
    assert done.rc == 1, done.err  # the sample's bad values are listed, left untouched
    assert "(resumed)" in done.out
    assert under_one_key(eng, url, truth, before, server_kms, server_kms.arn,
                         nxt.arn) == len(truth.plaintexts)
    per_cell = rekey_journal(eng)
    assert set(per_cell) == set(truth.plaintexts) and max(per_cell.values()) == 1
    assert runs_of(eng)[-1][1:] == ("rekey", "completed")
    assert_no_leaks(outputs.texts, dump_bookkeeping(url), truth, keys)


@pytest.mark.postgres
def test_rekey_with_three_workers_one_sigkilled(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
    cli_env: dict[str, str],
) -> None:
    url = pg_url
    truth = make_db(url, 300, keys.current, keys.legacy, bad_values=True)
    migrate_db(url, keys, server_kms)
    before = snapshot(url)
    nxt = _make_key(server_kms.client, NEXT)
    eng = poll_engine(url)
    # A rekey needs no Fernet key: its workers run without one.
    env = {k: v for k, v in cli_env.items() if not k.startswith("ENCRYPTION_KEY")}
    common = ["--db", url, "--yes", "--batch-size", "10", "--workers", "3",
              "--rows-per-range", "60", "--lease-seconds", "5", "--log-level", "debug"]
    rk = cli.start(["rekey", "--to-key", NEXT, *common, "--concurrency", "4"], env=env)
    holding = ("SELECT w.pid, r.id FROM kms_migrate_workers w JOIN kms_migrate_ranges r "
               "ON r.id = w.range_id AND r.worker_id = w.id WHERE w.state = 'running' "
               "AND NOT r.done AND r.batches <= 2 ORDER BY r.id LIMIT 1")
    quarter = len(truth.plaintexts) // 4
    victim_range = kill_in_range(
        eng, rk, "three workers, a quarter rekeyed, one at a range's start", lambda: (
            (scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = 'running'")
             or 0) == 3
            and sum(rekey_journal(eng).values()) >= quarter),
        holding)
    done = rk.wait(timeout=180)
    assert done.rc == 1, done.err
    assert scalar(eng, "SELECT claims FROM kms_migrate_ranges WHERE id = :r",
                  r=victim_range) >= 2
    states = Counter(s for (s,) in scalar_rows(
        eng, "SELECT w.state FROM kms_migrate_workers w JOIN kms_migrate_runs r "
             "ON r.id = w.run_id WHERE r.kind = 'rekey'"))
    assert states == {"finished": 2, "lost": 1}
    assert runs_of(eng)[-1][1:] == ("rekey", "completed")
    assert under_one_key(eng, url, truth, before, server_kms, server_kms.arn,
                         nxt.arn) == len(truth.plaintexts)
    per_cell = rekey_journal(eng)
    assert set(per_cell) == set(truth.plaintexts) and max(per_cell.values()) == 1
    fails = Counter(scalar_rows(eng, "SELECT f.table_name, f.pk, f.column_name FROM "
                                     "kms_migrate_failures f JOIN kms_migrate_runs r ON "
                                     "r.id = f.run_id WHERE r.kind = 'rekey'"))
    assert set(fails) == set(truth.bad) and max(fails.values()) == 1

    # Rolled back with workers: the ciphertexts under the old key, byte for byte.
    rb = cli.run(["rollback", *common], env=env, timeout=180)
    assert rb.rc == 0, rb.err
    assert snapshot(url) == before
    assert "undid rekey run" in rb.out
    assert_no_leaks(outputs.texts, dump_bookkeeping(url), truth, keys)

