"""Scale-out end to end: `migrate --workers 3` on PostgreSQL, one worker SIGKILLed.

The real CLI in a subprocess against moto's KMS server; the killed worker's range is
claimed again by a surviving worker and resumed from its own checkpoint, and at the end
every good value was migrated exactly once (one journal row each), the bad ones are
untouched, and `rollback --workers 3` puts every original byte back.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

import pytest

from tests.conftest import Keys, KmsHandle, MotoServer
from tests.helpers import assert_no_leaks, dump_bookkeeping, make_db, snapshot
from tests.test_e2e import (  # noqa: F401  (cli and outputs are fixtures)
    Outputs,
    check_invariant,
    cli,
    journal_entries,
    kill_in_range,
    outputs,
    poll_engine,
    runs_of,
    scalar,
    scalar_rows,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROWS = 300  # users and wagers each: 1,200 target cells


def test_three_workers_one_sigkilled(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    url = pg_url
    truth = make_db(url, ROWS, keys.current, keys.legacy, bad_values=True)
    before = snapshot(url)
    eng = poll_engine(url)
    common = ["--db", url, "--yes", "--batch-size", "10", "--workers", "3",
              "--rows-per-range", "60", "--lease-seconds", "5", "--log-level", "debug"]

    mig = cli.start(["migrate", *common, "--concurrency", "4"])
    # Kill a worker once all three are working and a quarter of the values is committed,
    # at the start of a range (at most 2 of its 6 batches committed), so that the kill
    # lands while it holds that range.
    quarter = len(truth.plaintexts) // 4
    holding = ("SELECT w.pid, r.id FROM kms_migrate_workers w JOIN kms_migrate_ranges r "
               "ON r.id = w.range_id AND r.worker_id = w.id WHERE w.state = 'running' "
               "AND NOT r.done AND r.batches <= 2 ORDER BY r.id LIMIT 1")
    victim_range = kill_in_range(
        eng, mig, "three workers working, a quarter of the values committed, one at a "
        "range's start",
        lambda: (
            (scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = 'running'")
             or 0) == 3
            and (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= quarter),
        holding)
    done = mig.wait(timeout=180)
    assert done.rc == 1, done.err  # 1: the sample's bad values failed, everything else done
    assert "Traceback" not in done.err

    # The run completed, every range is done, and the victim's range was claimed again.
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_ranges WHERE NOT done") == 0
    ranges = scalar(eng, "SELECT count(*) FROM kms_migrate_ranges")
    assert ranges >= 4 * (ROWS // 60)  # 4 columns, 5 or so ranges each
    assert scalar(eng, "SELECT claims FROM kms_migrate_ranges WHERE id = :r",
                  r=victim_range) >= 2
    states = Counter(s for (s,) in scalar_rows(eng, "SELECT state FROM kms_migrate_workers"))
    assert states == {"finished": 2, "lost": 1}
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_lock") == 0  # released

    # Exactly once: every good value migrated, one journal row each, the original in it.
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert changed == len(truth.plaintexts)
    per_cell = Counter(e.cell for e in entries)
    assert set(per_cell) == set(truth.plaintexts) and max(per_cell.values()) == 1
    after = snapshot(url)
    for cell in before:
        if cell not in truth.plaintexts:
            assert after[cell] == before[cell]
    fails = Counter(scalar_rows(eng, "SELECT table_name, pk, column_name "
                                     "FROM kms_migrate_failures"))
    assert set(fails) == set(truth.bad) and max(fails.values()) == 1
    summary = {line.split()[0]: line.split()[1:] for line in done.out.splitlines()
               if line.startswith(("users.", "wagers."))}
    assert sum(int(v[0]) for v in summary.values()) == len(truth.plaintexts)

    # status shows each worker and each range.
    st = cli.run(["status", "--db", url, "--json"])
    assert st.rc == 0, st.err
    status = json.loads(st.out)
    assert len(status["workers"]) == 3 and len(status["ranges"]) == ranges
    assert {w["state"] for w in status["workers"]} == {"finished", "lost"}

    # Rollback with three workers, one SIGKILLed too: every original byte is back.
    rb = cli.start(["rollback", "--db", url, "--yes", "--batch-size", "10", "--workers", "3",
                    "--rows-per-range", "60", "--lease-seconds", "5"])
    holding = holding.replace("r.batches <= 2", "r.batches <= 2 AND r.run_id = 2")
    victim_range = kill_in_range(
        eng, rb, "a rollback worker at a range's start, a quarter restored", lambda: (
            (scalar(eng, "SELECT count(*) FROM kms_migrate_journal "
                         "WHERE status = 'rolled_back'") or 0) >= quarter),
        holding)
    rbd = rb.wait(timeout=180)
    assert rbd.rc == 0, rbd.err
    assert scalar(eng, "SELECT claims FROM kms_migrate_ranges WHERE id = :r",
                  r=victim_range) >= 2
    assert snapshot(url) == before
    assert {e.status for e in journal_entries(eng)} == {"rolled_back"}
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed"),
                                                     ("rollback", "completed")]
    # No plaintext, Fernet key or AWS secret in any output (debug logs of every worker
    # included) or in any bookkeeping table, ranges and workers included.
    assert "range_claimed" in done.err
    assert_no_leaks(outputs.texts, dump_bookkeeping(url), truth, keys)


def test_ctrl_c_stops_every_worker_after_its_batch_and_the_run_resumes(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    url = pg_url
    truth = make_db(url, 150, keys.current, keys.legacy, bad_values=False)
    before = snapshot(url)
    eng = poll_engine(url)
    common = ["--db", url, "--yes", "--batch-size", "10", "--workers", "2",
              "--rows-per-range", "40", "--concurrency", "2"]
    mig = cli.start(["migrate", *common])
    tenth = len(truth.plaintexts) // 10
    wait_until(mig, "two workers running and a tenth of the values committed", lambda: (
        (scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = 'running'")
         or 0) == 2
        and (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= tenth))
    mig.signal(signal.SIGINT)  # Ctrl-C: the command forwards it to its workers
    done = mig.wait(timeout=60)
    assert done.rc == 130, done.err
    assert "Traceback" not in done.err
    assert done.err.count("re-run the same command to resume") == 1  # once, not per worker
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "interrupted")]
    states = [s for (s,) in scalar_rows(eng, "SELECT state FROM kms_migrate_workers")]
    assert states == ["interrupted", "interrupted"]
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_lock") == 0
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert 0 < changed < len(truth.plaintexts) and len(entries) == changed

    res = cli.run(["migrate", *common], timeout=120)
    assert res.rc == 0, res.err
    assert "(resumed)" in res.out
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)
    assert max(Counter(e.cell for e in entries).values()) == 1


def test_the_same_command_started_again_joins_the_run(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """As a second machine would: the same command, while the first one runs, adds its
    workers to the same run instead of refusing or starting another."""
    url = pg_url
    truth = make_db(url, 200, keys.current, keys.legacy, bad_values=False)
    before = snapshot(url)
    eng = poll_engine(url)
    common = ["--db", url, "--yes", "--batch-size", "10", "--rows-per-range", "25",
              "--concurrency", "2"]
    first = cli.start(["migrate", *common, "--workers", "2"])
    wait_until(first, "the first command's workers committing", lambda: (
        scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= 20)
    second = cli.start(["migrate", *common, "--workers", "1"])
    a, b = first.wait(timeout=180), second.wait(timeout=180)
    assert (a.rc, b.rc) == (0, 0), (a.err, b.err)
    assert "run 1:" in a.out and "run 1 (joined)" in b.out
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]
    assert scalar(eng, "SELECT count(DISTINCT pid) FROM kms_migrate_workers "
                       "WHERE run_id = 1") == 3  # 2 + 1 workers, all in the one run
    # The joined worker (the last started) did real work, and no value was done twice.
    joined_ranges = scalar(eng, "SELECT count(*) FROM kms_migrate_ranges r JOIN "
                                "kms_migrate_workers w ON w.id = r.worker_id WHERE "
                                "w.started_at = (SELECT max(started_at) FROM "
                                "kms_migrate_workers)")
    assert joined_ranges >= 1
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)
    assert max(Counter(e.cell for e in entries).values()) == 1
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_lock") == 0
