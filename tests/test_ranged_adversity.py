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
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import Keys, KmsHandle, MotoServer
from tests.helpers import make_db, snapshot
from tests.test_e2e import (  # noqa: F401  (cli and outputs are fixtures)
    Outputs,
    check_invariant,
    cli,
    kill_in_range,
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
        wait_until(second, "the second command's worker registered", lambda: (scalar(
            eng, "SELECT count(*) FROM kms_migrate_workers") or 0) >= 2)
        ready_at = time.monotonic()  # the later of the freeze and the joiner's start
        wait_until(second, "the frozen worker's range done by another worker", lambda: bool(
            scalar(eng, "SELECT done AND worker_id <> :w FROM kms_migrate_ranges "
                        "WHERE id = :r", w=worker_id, r=range_id)))
        took = time.monotonic() - ready_at
        assert took < lease + 10, f"the frozen worker's range waited {took:.1f} s more"
        assert time.monotonic() - frozen_at < 45  # not the 30 s lock_timeout, then more
        # The frozen session is gone: no session sits in a transaction for longer than
        # the workers' idle timeout (half the lease).
        assert scalar(eng, IDLE_IN_TRANSACTION + " AND state_change < now() - "
                           "interval '3 seconds'") == 0
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
    from migration.worker import worker_engine

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
    mig = cli.start(["migrate", "--db", url, "--yes", "--batch-size", "3", "--workers", "3",
                     "--rows-per-range", "10", "--concurrency", "2", "--max-kms-rps", "30"])
    holding = ("SELECT w.pid, r.id FROM kms_migrate_workers w JOIN kms_migrate_ranges r "
               "ON r.id = w.range_id AND r.worker_id = w.id WHERE w.state = 'running' "
               "AND NOT r.done AND w.pid = (SELECT max(pid) FROM "
               "kms_migrate_workers) AND NOT EXISTS (SELECT 1 FROM kms_migrate_ranges "
               "WHERE NOT done AND lease_token IS NULL)")
    victim_range = kill_in_range(
        eng, mig, "the last-spawned worker in a range, no range left unclaimed",
        lambda: (scalar(eng, "SELECT count(*) FROM kms_migrate_workers "
                             "WHERE state = 'running'") or 0) == 3,
        holding)
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


def test_the_rate_limit_holds_from_the_first_second_with_four_workers(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any,  # noqa: F811  (the fixture imported above)
    cli_env: dict[str, str], outputs: Outputs,  # noqa: F811
) -> None:
    """`--max-kms-rps 40 --workers 4`: each worker starts at its final share (10/s), not
    at the share of the workers registered before it (40, 20, 13 and 10/s): counted by a
    proxy in front of KMS, no second, the first included, goes over the limit plus the
    workers' bursts."""
    from tests.kms_proxy import kms_proxy

    make_db(pg_url, 60, keys.current, keys.legacy, bad_values=False)
    limit, workers = 40, 4
    with kms_proxy(moto_server.url) as (url, state):
        starts: list[float] = []
        decide = state.decide

        def counted(target: str) -> str | None:
            if target in ("Encrypt", "Decrypt"):
                starts.append(time.monotonic())
            return decide(target)

        state.decide = counted  # type: ignore[method-assign]
        res = cli.run(["migrate", "--db", pg_url, "--yes", "--batch-size", "10",
                       "--workers", str(workers), "--rows-per-range", "20",
                       "--concurrency", "4", "--max-kms-rps", str(limit)],
                      env={**cli_env, "AWS_ENDPOINT_URL_KMS": url}, timeout=180)
    assert res.rc == 0, res.err
    starts.sort()
    assert len(starts) >= 2 * 200  # two calls a value, 240 values: some 12 s of work
    burst = workers * min(limit / workers, 32)  # each worker's bucket starts full
    first = starts[0]
    in_first_5s = sum(1 for t in starts if t < first + 5)
    assert in_first_5s <= (limit * 5 + burst) * 1.1, in_first_5s
    worst = max(sum(1 for t in starts[i:] if t < s + 1) for i, s in enumerate(starts))
    assert worst <= (limit + burst) * 1.1, worst


def _skew_clock(monkeypatch: pytest.MonkeyPatch, by: timedelta) -> None:
    """This process now runs on a host whose clock is off by `by`."""
    from checkpoints import leases, lock, store

    def skewed() -> datetime:
        return datetime.now(UTC) + by

    for module in (store, leases, lock):  # wherever a clock was read
        monkeypatch.setattr(module, "now", skewed, raising=False)


def test_a_host_with_a_skewed_clock_neither_steals_a_live_lease_nor_drops_live_workers(
    pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leases, heartbeats and the lock's staleness are judged by the database's clock:
    a host whose clock runs 10 minutes ahead does not take a live worker's range or the
    run's lock, nor count the live workers out of the rate share; a host whose clock runs
    behind is not presumed dead."""
    from checkpoints import leases
    from checkpoints.lock import LockHeld, RunLock
    from tests.test_workers import _claim, _register, _run_with_ranges

    eng, run_id = _run_with_ranges(pg_url, 1)
    live = _register(eng, run_id)
    assert _claim(eng, run_id, live, seconds=60) is not None
    RunLock.acquire(eng, "migrate")
    with eng.begin() as conn:  # held by a live process of another host
        conn.execute(text("UPDATE kms_migrate_lock SET host = 'elsewhere', run_id = :r"),
                     {"r": run_id})

    _skew_clock(monkeypatch, timedelta(minutes=10))
    ahead = _register(eng, run_id)
    assert _claim(eng, run_id, ahead) is None  # the only range's lease is live
    with eng.connect() as conn:
        assert live in {w.id for w in leases.live_workers(conn, run_id, timedelta(seconds=15))}
    with pytest.raises(LockHeld):
        RunLock.acquire(eng, "migrate")

    _skew_clock(monkeypatch, timedelta(minutes=-10))
    behind = _register(eng, run_id)
    with eng.begin() as conn:
        leases.heartbeat(conn, behind)
    monkeypatch.undo()
    with eng.connect() as conn:
        seen = {w.id for w in leases.live_workers(conn, run_id, timedelta(seconds=15))}
    assert {live, ahead, behind} <= seen


def test_a_worker_whose_run_lock_is_gone_says_so_in_one_line(
    pg_url: str, keys: Keys, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that registers after its run's lock was taken over (or released) by
    another command stops with the lock's one-line message, exit 2, not a raw LockLost."""
    import io

    from migration.worker_spec import WorkerSpec
    from tests.helpers import run_main
    from tests.test_workers import _run_with_ranges

    _, run_id = _run_with_ranges(pg_url, 1)
    spec = WorkerSpec("migrate", run_id, "not-the-lock-token", 60.0, {
        "db_url": pg_url, "targets": [], "batch_size": 10, "concurrency": 1})
    monkeypatch.setenv("ENCRYPTION_KEY", keys.current)
    monkeypatch.setattr("sys.stdin", io.StringIO(spec.to_json()))
    code, _, err = run_main(capsys, "worker")
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "lock was taken over" in err


def test_a_fenced_out_worker_does_not_stop_the_live_run(pg_url: str) -> None:
    """A worker whose lock was taken over meets a fatal error: the run, now another
    command's, is not marked stopped by it."""
    from checkpoints.lock import RunLock
    from migration.worker import _stop_run_quietly
    from tests.test_workers import _run_with_ranges

    eng, run_id = _run_with_ranges(pg_url, 1)
    old = RunLock.acquire(eng, "migrate")
    with eng.begin() as conn:  # taken over, as a command that found its workers dead does
        conn.execute(text("UPDATE kms_migrate_lock SET token = 'the-new-holder', "
                          "run_id = :r"), {"r": run_id})
    _stop_run_quietly(eng, run_id, "Encrypt failed: the key is disabled", old.token)
    assert runs_of(eng) == [(run_id, "migrate", "running")]
    now_held = RunLock("the-new-holder", "migrate")
    _stop_run_quietly(eng, run_id, "Encrypt failed: the key is disabled", now_held.token)
    assert runs_of(eng) == [(run_id, "migrate", "stopped")]


def test_a_joined_command_reports_another_machines_fatal_error(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """Another machine's worker stopped the run on a fatal error (the run is `stopped`,
    its note the error): this command's workers stop after their batch, and the command
    says why, exit 2, leaving the run `stopped` (not "interrupted", 130)."""
    make_db(pg_url, 100, keys.current, keys.legacy, bad_values=False)
    eng = poll_engine(pg_url)
    mig = cli.start(["migrate", "--db", pg_url, "--yes", "--batch-size", "5", "--workers", "2",
                     "--rows-per-range", "20", "--concurrency", "2", "--max-kms-rps", "100"])
    wait_until(mig, "batches committed", lambda: (
        scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= 20)
    note = "KMS key arn:aws:kms:us-east-1:123456789012:key/x is disabled (on another machine)"
    with eng.begin() as conn:  # what that machine's worker does on its fatal error
        conn.execute(text("UPDATE kms_migrate_runs SET state = 'stopped', note = :n"),
                     {"n": note})
    done = mig.wait(timeout=60)
    assert done.rc == 2, done.err
    assert note in done.err and "Traceback" not in done.err
    assert "interrupted" not in done.err
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "stopped")]
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_lock") == 0


def test_the_same_command_started_on_two_machines_at_once_joins(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """On a fresh database (both create the bookkeeping schema at once), and on a used
    one while the first command is still planning its ranges: the second command joins
    the first one's run instead of exiting 2."""
    from sqlalchemy import create_engine

    from checkpoints import store

    make_db(pg_url, 60, keys.current, keys.legacy, bad_values=False)
    eng = poll_engine(pg_url)
    args = ["migrate", "--db", pg_url, "--yes", "--batch-size", "10", "--workers", "1",
            "--rows-per-range", "20", "--concurrency", "2", "--max-kms-rps", "60"]
    a, b = cli.start(args), cli.start(args)
    da, db = a.wait(timeout=120), b.wait(timeout=120)
    assert (da.rc, db.rc) == (0, 0), (da.err, db.err)
    assert sorted("(joined)" in d.out for d in (da, db)) == [False, True]
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "completed")]

    # A used database: the first command is held while it plans (its ranges' INSERT
    # waits on a lock the test holds); the second one starts meanwhile.
    other = pg_url.rsplit("/", 1)[0] + "/" + "u" + pg_url.rsplit("/", 1)[1]
    with create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{other.rsplit("/", 1)[1]}"'))
    make_db(other, 60, keys.current, keys.legacy, bad_values=False)
    store.ensure_schema(create_engine(other))
    used = poll_engine(other)
    args[2] = other
    holder = used.connect()
    holder.execute(text("LOCK TABLE kms_migrate_ranges IN EXCLUSIVE MODE"))
    try:
        a = cli.start(args)
        wait_until(a, "the first command planning", lambda: bool(scalar(
            used, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                  "WHERE c.relname = 'kms_migrate_ranges' AND NOT l.granted")))
        b = cli.start(args)
        time.sleep(8)  # it has started up and met the first command's lock by now
        assert not b.finished(), b.wait().err
    finally:
        holder.rollback()
        holder.close()
    da, db = a.wait(timeout=120), b.wait(timeout=120)
    assert (da.rc, db.rc) == (0, 0), (da.err, db.err)
    assert "(joined)" in db.out and "(joined)" not in da.out
    assert [(k, s) for _, k, s in runs_of(used)] == [("migrate", "completed")]
    assert scalar(used, "SELECT count(DISTINCT pid) FROM kms_migrate_workers") == 2


def test_a_worker_that_joined_during_a_resumed_runs_planning_is_not_marked_lost(
    pg_url: str,
) -> None:
    """A command resuming a ranged run voids the leases of the workers that held it before
    it took the lock, and marks them lost; not those of a worker that joined it since."""
    from checkpoints import leases, store
    from checkpoints.lock import RunLock
    from checkpoints.store import BatchCounts
    from migration.ranged_start import resume_planned as _resume_planned
    from tests.test_workers import _claim, _register, _run_with_ranges

    eng, run_id = _run_with_ranges(pg_url, 2)
    gone = _register(eng, run_id)
    assert _claim(eng, run_id, gone) is not None
    resuming = RunLock.acquire(eng, "migrate")  # the old holder is gone
    joined = _register(eng, run_id)
    lease = _claim(eng, run_id, joined)
    assert lease is not None
    with eng.begin() as conn:
        run = store.get_run(conn, run_id)
        assert run is not None and _resume_planned(conn, run, resuming)
    with eng.begin() as conn:
        assert {w.id: w.state for w in leases.list_workers(conn, run_id)} == {
            gone: "lost", joined: "running"}
        leases.record_on_range(conn, lease, last_pk="5", counts=BatchCounts(migrated=5),
                               done=False)  # its lease is still its own
        assert leases.claim(conn, run_id, joined, 60) is not None  # the one voided


def test_a_command_with_fewer_fernet_keys_may_neither_join_nor_resume(
    pg_url: str, keys: Keys, server_kms: KmsHandle, cli_env: dict[str, str],
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """The run records an identifier of each of its Fernet keys (an HMAC under the key:
    it reveals nothing of it). A command whose keys do not cover them (its .env lacks
    ENCRYPTION_KEY_LEGACY) refuses to join or resume, naming the missing key by its
    position, never its value: it would record every legacy-key value as a failure."""
    truth = make_db(pg_url, 60, keys.current, keys.legacy, bad_values=False)
    before = snapshot(pg_url)
    eng = poll_engine(pg_url)
    args = ["migrate", "--db", pg_url, "--yes", "--batch-size", "5", "--workers", "1",
            "--rows-per-range", "10", "--concurrency", "2", "--max-kms-rps", "40"]
    fewer = {k: v for k, v in cli_env.items() if k != "ENCRYPTION_KEY_LEGACY"}
    first = cli.start(args)
    wait_until(first, "the run's workers committing", lambda: (
        scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= 10)
    joiner = cli.run(args, env=fewer)
    assert joiner.rc == 2, joiner.err
    assert "key 2" in joiner.err and "ENCRYPTION_KEY_LEGACY" in joiner.err
    assert joiner.err.count("\n") == 1 and "Traceback" not in joiner.err
    first.signal(signal.SIGINT)
    assert first.wait(timeout=60).rc == 130
    assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "interrupted")]
    res = cli.run(args, env=fewer)  # nor resume it
    assert res.rc == 2, res.err
    assert "key 2" in res.err and "Traceback" not in res.err
    assert scalar(eng, "SELECT count(*) FROM kms_migrate_failures") == 0
    ids = scalar(eng, "SELECT fernet_key_ids FROM kms_migrate_runs")
    assert ids and keys.current not in ids and keys.legacy not in ids
    done = cli.run(args, timeout=120)  # the same keys: it resumes and completes
    assert done.rc == 0, done.err
    changed, entries = check_invariant(eng, pg_url, before, truth, server_kms)
    assert changed == len(truth.plaintexts) == len(entries)


def test_status_after_crashes_shows_dead_machines_workers_lost_and_real_seconds(
    pg_url: str,
) -> None:
    """A ranged run's seconds come from its latest activity (its ranges and workers), not
    from its row, which batches do not touch; once the run completed, a worker of a
    machine that died is shown lost, not running forever."""
    from checkpoints import leases
    from checkpoints.lock import RunLock
    from checkpoints.store import BatchCounts
    from migration.ranged_start import RangedStart
    from migration.status import collect_status
    from migration.supervisor import _conclude
    from tests.test_workers import _claim, _register, _run_with_ranges

    eng, run_id = _run_with_ranges(pg_url, 1)
    with eng.begin() as conn:
        conn.execute(text("UPDATE kms_migrate_runs SET ranged = true, "
                          "started_at = now() - interval '5 minutes', "
                          "updated_at = now() - interval '5 minutes'"))
    dead = _register(eng, run_id)  # a worker of a machine that died 4 minutes ago
    with eng.begin() as conn:
        conn.execute(text("UPDATE kms_migrate_workers SET host = 'gone-machine', "
                          "heartbeat_at = now() - interval '4 minutes' WHERE id = :w"),
                     {"w": dead})
    live = _register(eng, run_id)
    lease = _claim(eng, run_id, live)
    assert lease is not None
    with eng.begin() as conn:
        leases.record_on_range(conn, lease, last_pk="9", counts=BatchCounts(migrated=9),
                               done=False)
    report = collect_status(eng)
    assert report is not None
    assert report.runs[0]["state"] == "running"
    assert report.runs[0]["seconds"] >= 290  # five minutes running, not 0.0

    with eng.begin() as conn:
        leases.record_on_range(conn, lease, last_pk=None, counts=BatchCounts(), done=True)
        leases.finish_worker(conn, live, "finished")
    run_lock = RunLock.acquire(eng, "migrate")
    with eng.connect() as conn:
        run = store_run(conn, run_id)
    _conclude(eng, RangedStart(run, run_lock, joined=False, resumed=False), [0])
    report = collect_status(eng)
    assert report is not None and report.runs[0]["state"] == "completed"
    assert {w["id"]: w["state"] for w in report.workers} == {dead: "lost", live: "finished"}


def store_run(conn: Any, run_id: int) -> Any:
    from checkpoints import store

    run = store.get_run(conn, run_id)
    assert run is not None
    return run


def test_a_rollback_with_workers_is_not_resumed_in_one_process(
    pg_url: str, keys: Keys, server_kms: KmsHandle,
    cli: Any,  # noqa: F811  (the fixture imported above)
    outputs: Outputs,  # noqa: F811
) -> None:
    """An interrupted `rollback --workers` resumed without --workers would leave its
    ranges waiting forever and report only the last invocation: it is refused, as
    migrate refuses the same mix, and resumed with --workers it completes."""
    make_db(pg_url, 100, keys.current, keys.legacy, bad_values=False)
    before = snapshot(pg_url)
    eng = poll_engine(pg_url)
    mig = cli.run(["migrate", "--db", pg_url, "--yes", "--batch-size", "50"], timeout=120)
    assert mig.rc == 0, mig.err
    args = ["rollback", "--db", pg_url, "--yes", "--batch-size", "1", "--workers", "2",
            "--rows-per-range", "20"]
    rb = cli.start(args)
    wait_until(rb, "a tenth restored", lambda: (scalar(
        eng, "SELECT count(*) FROM kms_migrate_journal WHERE status = 'rolled_back'")
        or 0) >= 40)
    rb.signal(signal.SIGINT)
    assert rb.wait(timeout=60).rc == 130
    one = cli.run(args[:-4])
    assert one.rc == 2, one.err
    assert "--workers" in one.err and one.err.count("\n") == 1
    assert [(k, s) for _, k, s in runs_of(eng)][-1] == ("rollback", "interrupted")
    done = cli.run(args, timeout=120)
    assert done.rc == 0, done.err
    assert snapshot(pg_url) == before
