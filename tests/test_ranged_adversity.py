"""Ranged runs under adversity, on the suite's real PostgreSQL with real processes.

A worker frozen inside its batch transaction (SIGSTOP), a worker SIGKILLed behind a live
one, the rate limit from the first second: what a run across processes and machines
meets, and what it must survive without losing, doubling or stalling a value.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import Keys, KmsHandle
from tests.helpers import make_db, snapshot
from tests.test_e2e import (  # noqa: F401  (cli and outputs are fixtures)
    Outputs,
    check_invariant,
    cli,
    outputs,
    poll_engine,
    runs_of,
    scalar,
    scalar_rows,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

IDLE_IN_TRANSACTION = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in "
                       "transaction' AND datname = current_database()")
GATE_LOCK = 4242  # the advisory lock the test holds to stop a batch inside its transaction

# While a row is in freeze_gate, every UPDATE of the target tables waits, inside the batch
# transaction that issued it, for the advisory lock the test holds.
FREEZE_GATE = [
    "CREATE TABLE freeze_gate (x int)",
    "INSERT INTO freeze_gate VALUES (1)",
    f"""CREATE FUNCTION freeze_gate() RETURNS trigger AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM freeze_gate) THEN
        PERFORM pg_advisory_xact_lock_shared({GATE_LOCK});
      END IF;
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER freeze_gate BEFORE UPDATE ON users FOR EACH ROW "
    "EXECUTE FUNCTION freeze_gate()",
    "CREATE TRIGGER freeze_gate BEFORE UPDATE ON wagers FOR EACH ROW "
    "EXECUTE FUNCTION freeze_gate()",
]


def test_a_worker_frozen_inside_its_batch_is_cut_off_and_its_range_resumed(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """SIGSTOP a worker while its batch transaction holds row locks and the run lock's
    FOR SHARE: the database cuts its session off within the idle-in-transaction timeout
    (below the lease), a worker of the same command started elsewhere takes its range
    over within about a lease, and the frozen worker, once continued, writes nothing."""
    url = pg_url
    lease = 5.0
    truth = make_db(url, 100, keys.current, keys.legacy, bad_values=False)
    before = snapshot(url)
    eng = poll_engine(url)
    with eng.begin() as conn:
        for sql in FREEZE_GATE:
            conn.execute(text(sql))
    holder = eng.connect()
    holder.execute(text(f"SELECT pg_advisory_lock({GATE_LOCK})"))
    holder.commit()
    common = ["migrate", "--db", url, "--yes", "--batch-size", "10", "--rows-per-range", "50",
              "--lease-seconds", str(lease), "--concurrency", "2", "--workers", "1"]
    first = cli.start(common)
    frozen: list[int] = []
    try:
        wait_until(first, "the worker's first batch waiting at the gate", lambda: bool(
            scalar(eng, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND NOT granted")))
        (pid, worker_id, range_id), = scalar_rows(
            eng, "SELECT pid, id, range_id FROM kms_migrate_workers WHERE state = 'running'")
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)
        frozen_at = time.monotonic()
        holder.execute(text("DELETE FROM freeze_gate"))
        holder.execute(text(f"SELECT pg_advisory_unlock({GATE_LOCK})"))
        holder.commit()
        # Its batch went on in the database, which now waits on the frozen client, holding
        # the batch's row locks and its share of the run lock's row.
        wait_until(first, "the frozen worker's session idle in its transaction", lambda: bool(
            scalar(eng, IDLE_IN_TRANSACTION)))

        second = cli.start(common)  # the same command on another machine: joins the run
        wait_until(second, "the frozen worker's range done by another worker", lambda: bool(
            scalar(eng, "SELECT done AND worker_id <> :w FROM kms_migrate_ranges "
                        "WHERE id = :r", w=worker_id, r=range_id)))
        took = time.monotonic() - frozen_at
        assert took < lease + 10, f"the frozen worker's range waited {took:.1f} s"
        # The frozen session is gone: nothing holds a transaction open for it.
        assert scalar(eng, IDLE_IN_TRANSACTION) == 0
    finally:
        for p in frozen:
            os.kill(p, signal.SIGCONT)
        holder.close()
    a, b = first.wait(timeout=120), second.wait(timeout=120)
    assert (a.rc, b.rc) == (0, 0), (a.err, b.err)
    assert "Traceback" not in a.err + b.err
    assert "session_lost" in a.err  # continued, its batch failed on its cut-off session
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]
    # Exactly once: the frozen batch never committed (no conflict, no second journal row).
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)
    assert max(Counter(e.cell for e in entries).values()) == 1
    assert scalar(eng, "SELECT sum(conflicts) + sum(failed) FROM kms_migrate_ranges") == 0
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_lock") == 0


def test_every_postgres_session_is_bounded(pg_url: str) -> None:
    """Idle-in-transaction timeout, lock timeout and TCP keepalives on every session; a
    worker's idle timeout is below its lease, and its statements are bounded too."""
    from migration.db import make_engine
    from migration.workers import worker_engine

    def shown(engine: Any) -> dict[str, str]:
        names = ("idle_in_transaction_session_timeout", "lock_timeout", "statement_timeout",
                 "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        with engine.connect() as conn:
            return {n: str(conn.execute(text(f"SHOW {n}")).scalar()) for n in names}

    command = shown(make_engine(pg_url))
    assert command["idle_in_transaction_session_timeout"] == "30s"
    assert command["lock_timeout"] == "30s"
    assert command["statement_timeout"] == "0"
    assert (command["tcp_keepalives_idle"], command["tcp_keepalives_interval"],
            command["tcp_keepalives_count"]) == ("30", "10", "3")
    worker = shown(worker_engine(pg_url, lease_seconds=20))
    assert worker["idle_in_transaction_session_timeout"] == "10s"
    assert worker["statement_timeout"] == "2min"
    assert worker_engine(pg_url, 600).url == make_engine(pg_url).url
    assert shown(worker_engine(pg_url, 600))["idle_in_transaction_session_timeout"] == "30s"


def test_a_zombie_is_not_alive() -> None:
    """A worker that died but was not reaped yet (a zombie) holds no lease: its pid still
    answers signal 0, but it runs nothing."""
    import subprocess
    import sys

    from checkpoints.leases import pid_alive

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _is_zombie(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _is_zombie(p.pid)  # not reaped: this test is its parent and has not waited
        assert not pid_alive(p.pid)
    finally:
        p.kill()
        p.wait()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_last_spawned_worker_sigkilled_loses_its_range_at_once(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """The supervisor reaps every dead worker each round, not only up to the first live
    one: the last-spawned worker SIGKILLed while the first lives has its range claimed
    again by a worker of the same host well within the lease (60 s)."""
    url = pg_url
    truth = make_db(url, 60, keys.current, keys.legacy, bad_values=False)
    before = snapshot(url)
    eng = poll_engine(url)
    # Slow enough (the rate limit) that a range takes seconds: the kill lands mid-range.
    mig = cli.start(["migrate", "--db", url, "--yes", "--batch-size", "5", "--workers", "3",
                     "--rows-per-range", "10", "--concurrency", "2", "--max-kms-rps", "30"])
    holding = ("SELECT w.pid, r.id FROM kms_migrate_workers w JOIN kms_migrate_ranges r "
               "ON r.id = w.range_id AND r.worker_id = w.id WHERE w.state = 'running' "
               "AND NOT r.done AND r.batches = 0 AND w.pid = (SELECT max(pid) FROM "
               "kms_migrate_workers) AND NOT EXISTS (SELECT 1 FROM kms_migrate_ranges "
               "WHERE NOT done AND lease_token IS NULL)")
    wait_until(mig, "the last-spawned worker starting a range, no range left unclaimed",
               lambda: (scalar(eng, "SELECT count(*) FROM kms_migrate_workers "
                                    "WHERE state = 'running'") or 0) == 3
               and bool(scalar_rows(eng, holding)))
    victim_pid, victim_range = scalar_rows(eng, holding)[0]
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(mig, "the killed worker's range claimed again", lambda: (
        scalar(eng, "SELECT claims FROM kms_migrate_ranges WHERE id = :r",
               r=victim_range) or 0) >= 2)
    took = time.monotonic() - killed_at
    assert took < 15, f"the dead worker's range waited {took:.1f} s for its lease"
    done = mig.wait(timeout=120)
    assert done.rc == 0, done.err  # the run completed: its other workers did the rest
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]
    changed, entries = check_invariant(eng, url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)
