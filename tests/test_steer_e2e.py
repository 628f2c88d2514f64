"""Steering a live run from another process, on the suite's real PostgreSQL: `pause`,
`resume` and `set` against a one-process run and a `--workers 3` run of the real CLI.

KMS calls are counted by the fault proxy in front of moto (every Encrypt, Decrypt and
ReEncrypt the run makes goes through it), commits by the journal and the checkpoints. A
paused run must make no KMS call and commit nothing once it obeyed (within one heartbeat
and the batch in flight), keep its lock and leases alive, survive a SIGKILL (the restart
stays paused) and let a joining worker stay paused too.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from migration.sample import SampleSecrets
from tests.conftest import Keys, KmsHandle, MotoServer
from tests.helpers import make_db, snapshot
from tests.kms_proxy import ProxyState, kms_proxy
from tests.pgserver import Replica
from tests.test_e2e import (  # noqa: F401  (cli and outputs are fixtures)
    Outputs,
    check_invariant,
    cli,
    outputs,
    poll_engine,
    runs_of,
    scalar,
    wait_until,
)
from tests.test_guard import replay_paused, writing

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROWS = 150  # users and wagers each: 600 target cells
WORK = ("Encrypt", "Decrypt", "ReEncrypt")  # the calls a batch makes (not DescribeKey)
OBEY = 5.0  # one heartbeat, at most
QUIET = 3.0  # the window in which a paused run must do nothing


def calls(state: ProxyState) -> int:
    with state.lock:
        return sum(state.forwarded[t] for t in WORK)


def commits(eng: Engine) -> tuple[int, int]:
    """(journal rows, batches recorded by checkpoints and ranges): what a commit moves."""
    return (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0,
            (scalar(eng, "SELECT coalesce(sum(batches), 0) FROM kms_migrate_checkpoints") or 0)
            + (scalar(eng, "SELECT coalesce(sum(batches), 0) FROM kms_migrate_ranges") or 0))


def quiet_within(state: ProxyState, eng: Engine, seconds: float) -> float:
    """Wait until neither KMS calls nor commits move for 1 s; how long that took to begin.
    Fails if they still move after `seconds`."""
    start = time.monotonic()
    last = (calls(state), commits(eng))
    still_since = time.monotonic()
    while time.monotonic() - start < seconds + 1.0:
        time.sleep(0.1)
        now = (calls(state), commits(eng))
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return still_since - start
    pytest.fail(f"the run still made KMS calls or commits {seconds} s after the pause")


def assert_idle(state: ProxyState, eng: Engine, seconds: float = QUIET) -> None:
    before = (calls(state), commits(eng))
    time.sleep(seconds)
    assert (calls(state), commits(eng)) == before, "a paused run made a KMS call or committed"


@contextmanager
def proxied(moto_server: MotoServer, cli_env: dict[str, str],
            ) -> Iterator[tuple[dict[str, str], ProxyState]]:
    with kms_proxy(moto_server.url) as (url, state):
        yield {**cli_env, "AWS_ENDPOINT_URL_KMS": url}, state


def steer(runner: Any, *args: str) -> str:
    done = runner.run(list(args))
    assert done.rc == 0, done.err
    return str(done.out)


def _journal_at_least(eng: Engine, n: int) -> Callable[[], bool]:
    return lambda: (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0) >= n


@dataclass
class Sample:
    """A sample database on PostgreSQL: its truth, its bytes before, an engine to poll."""

    url: str
    truth: SampleSecrets
    before: dict[Any, Any]
    eng: Engine

    @classmethod
    def make(cls, url: str, keys: Keys, rows: int = ROWS) -> Sample:
        truth = make_db(url, rows, keys.current, keys.legacy, bad_values=False)
        return cls(url, truth, snapshot(url), poll_engine(url))

    def all_migrated_once(self, kms: KmsHandle) -> None:
        changed, entries = check_invariant(self.eng, self.url, self.before, self.truth, kms)
        assert changed == len(self.truth.plaintexts) == len(entries)


ONE_PROCESS = ["--batch-size", "10", "--max-kms-rps", "150", "--concurrency", "4"]


def started_then_paused(runner: Any, db: Sample, env: dict[str, str], state: ProxyState,
                        args: list[str], *pause: str) -> Any:
    """`migrate args` started, paused once some batches committed, and quiet: the Running."""
    mig = runner.start(["migrate", "--db", db.url, "--yes", *args], env=env)
    wait_until(mig, "some batches committed", _journal_at_least(db.eng, 30))
    out = steer(runner, "pause", "--db", db.url, *pause)
    assert "paused by" in out
    assert quiet_within(state, db.eng, OBEY) <= OBEY
    return mig


def test_pause_and_resume_a_one_process_run(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str],  # noqa: F811
) -> None:
    db = Sample.make(pg_url, keys)
    with proxied(moto_server, cli_env) as (env, state):
        mig = started_then_paused(cli, db, env, state, ONE_PROCESS, "--note", "ticket 42")
        eng = db.eng
        assert_idle(state, eng)
        assert commits(eng)[0] < len(db.truth.plaintexts), "finished before the pause"

        # status works while paused, and says who paused it, and why
        st = cli.run(["status", "--db", pg_url, "--json"])
        assert st.rc == 0, st.err
        steering = json.loads(st.out)["steering"]
        assert steering["paused"] and steering["pause_note"] == "ticket 42"
        assert steering["run_id"] == 1 and "paused by" in steering["now"]
        text = cli.run(["status", "--db", pg_url]).out
        assert "paused by" in text and "ticket 42" in text
        # the lock's heartbeat stays fresh: nobody may take a paused run over as dead
        age = scalar(eng, "SELECT extract(epoch FROM now() - heartbeat_at) FROM "
                          "kms_migrate_lock")
        assert age is not None and float(age) < 3.0
        # pausing again changes nothing
        assert "already" in steer(cli, "pause", "--db", pg_url)

        assert "resumed by" in steer(cli, "resume", "--db", pg_url)
        done = mig.wait(timeout=120)
    assert done.rc == 0, done.err
    assert "migrate: paused by" in done.err and "migrate: running again" in done.err
    assert "held 1 time(s)" in done.out
    assert "pause by" in done.out and "ticket 42" in done.out and "resume by" in done.out
    db.all_migrated_once(server_kms)


def test_pause_and_resume_three_workers_keeps_their_leases(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str],  # noqa: F811
) -> None:
    db = Sample.make(pg_url, keys)
    eng = db.eng
    with proxied(moto_server, cli_env) as (env, state):
        # lease 8 s: heartbeats every 2 s; the pause below outlasts a lease
        mig = started_then_paused(cli, db, env, state, [
            "--batch-size", "5", "--workers", "3", "--rows-per-range", "20",
            "--lease-seconds", "8", "--max-kms-rps", "150", "--concurrency", "2"])
        assert scalar(eng, "SELECT count(*) FROM kms_migrate_workers") == 3
        claims = scalar(eng, "SELECT sum(claims) FROM kms_migrate_ranges")
        assert_idle(state, eng, 9.0)  # longer than a lease
        assert commits(eng)[0] < len(db.truth.plaintexts), "finished before the pause"
        # nobody took a range over: the leases and the workers' heartbeats went on
        assert scalar(eng, "SELECT sum(claims) FROM kms_migrate_ranges") == claims
        assert scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = "
                           "'running'") == 3
        assert scalar(eng, "SELECT count(*) FROM kms_migrate_ranges WHERE lease_token IS "
                           "NOT NULL AND lease_until < now()") == 0
        steer(cli, "resume", "--db", pg_url)
        done = mig.wait(timeout=180)
    assert done.rc == 0, done.err
    assert "pause by" in done.out and "resume by" in done.out
    assert scalar(eng, "SELECT max(claims) FROM kms_migrate_ranges") == 1
    db.all_migrated_once(server_kms)


def _rate(state: ProxyState, seconds: float) -> float:
    n = calls(state)
    time.sleep(seconds)
    return (calls(state) - n) / seconds


@pytest.mark.parametrize("workers", [None, 3])
def test_set_max_kms_rps_takes_effect_within_a_heartbeat(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str], workers: int | None,  # noqa: F811
) -> None:
    make_db(pg_url, 400, keys.current, keys.legacy, bad_values=False)
    eng = poll_engine(pg_url)
    ranged = ["--workers", str(workers), "--rows-per-range", "50"] if workers else []
    with proxied(moto_server, cli_env) as (env, state):
        mig = cli.start(["migrate", "--db", pg_url, "--yes", "--batch-size", "10",
                         "--max-kms-rps", "120", "--concurrency", "4", *ranged], env=env)
        wait_until(mig, "the run going", _journal_at_least(eng, 20))
        fast = _rate(state, 2.0)
        out = steer(cli, "set", "--db", pg_url, "--max-kms-rps", "15")
        assert "max_kms_rps 120 -> 15" in out if workers else "max_kms_rps" in out
        time.sleep(OBEY + 0.5)  # one heartbeat (and the token bucket's burst spent)
        slow = _rate(state, 4.0)
        assert not mig.finished(), "the run finished: the window measured nothing"
        # the rate limit holds to within its burst, whatever the machine's speed
        assert slow <= 15 * 1.5 + 2, (fast, slow)
        assert fast > 2 * slow, (fast, slow)
        st = json.loads(cli.run(["status", "--db", pg_url, "--json"]).out)["steering"]
        assert st["limits"]["max_kms_rps"] == 15
        steer(cli, "set", "--db", pg_url, "--max-kms-rps", "0")  # no limit: finish fast
        done = mig.wait(timeout=180)
    assert done.rc == 0, done.err
    assert "max_kms_rps 15 -> 0" in done.out


def test_sigkill_while_paused_then_restart_stays_paused(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str],  # noqa: F811
) -> None:
    db = Sample.make(pg_url, keys)
    eng = db.eng
    with proxied(moto_server, cli_env) as (env, state):
        mig = started_then_paused(cli, db, env, state, ONE_PROCESS)
        mig.signal(signal.SIGKILL)
        assert mig.wait().rc == -signal.SIGKILL
        again = cli.start(["migrate", "--db", pg_url, "--yes", *ONE_PROCESS], env=env)
        wait_until(again, "the restart holding the lock", lambda: (
            scalar(eng, "SELECT count(*) FROM kms_migrate_lock WHERE pid <> :p",
                   p=mig.proc.pid) or 0) == 1)
        assert_idle(state, eng)
        assert not again.finished()
        assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "running")]
        steer(cli, "resume", "--db", pg_url)
        done = again.wait(timeout=120)
    assert done.rc == 0, done.err
    assert "(resumed)" in done.out
    db.all_migrated_once(server_kms)


def test_a_worker_joining_a_paused_run_stays_paused(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str],  # noqa: F811
) -> None:
    db = Sample.make(pg_url, keys)
    args = ["--batch-size", "5", "--rows-per-range", "20", "--max-kms-rps", "100",
            "--concurrency", "2", "--lease-seconds", "8"]
    with proxied(moto_server, cli_env) as (env, state):
        first = started_then_paused(cli, db, env, state, [*args, "--workers", "2"])
        joiner = cli.start(["migrate", "--db", pg_url, "--yes", *args, "--workers", "1"],
                           env=env)
        wait_until(joiner, "the third worker registered", lambda: (
            scalar(db.eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = "
                           "'running'") or 0) == 3)
        assert_idle(state, db.eng)
        steer(cli, "resume", "--db", pg_url)
        a, b = first.wait(timeout=180), joiner.wait(timeout=180)
    assert {a.rc, b.rc} == {0}, (a.err, b.err)
    db.all_migrated_once(server_kms)


def test_ctrl_c_stops_a_paused_run_and_rollback_works_after(
    pg_url: str, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str], tmp_path: Path,  # noqa: F811
) -> None:
    """An operator who paused because something looks wrong can stop and roll back: the
    paused run takes Ctrl-C at once (no batch to wait for), and a rollback, itself paused
    and resumed, puts every original byte back."""
    db = Sample.make(pg_url, keys)
    eng = db.eng
    with proxied(moto_server, cli_env) as (env, state):
        mig = started_then_paused(cli, db, env, state, ONE_PROCESS)
        t = time.monotonic()
        mig.signal(signal.SIGINT)
        stopped = mig.wait(timeout=30)
        assert time.monotonic() - t < 5
        assert stopped.rc == 130, stopped.err
        assert runs_of(eng)[0][2] == "interrupted"
        # The rollback starts held by its pause file, is paused, loses the file, and
        # still holds until resumed.
        hold = tmp_path / "hold"
        hold.touch()
        rb = cli.start(["rollback", "--db", pg_url, "--yes", "--batch-size", "3",
                        "--pause-file", str(hold)], env=env)
        wait_until(rb, "the rollback held by its pause file", lambda: (scalar(
            eng, "SELECT count(*) FROM kms_migrate_runs WHERE kind = 'rollback' AND held "
                 "LIKE 'pause file %'") or 0) == 1)
        status = json.loads(cli.run(["status", "--db", pg_url, "--json"]).out)["steering"]
        assert status["kind"] == "rollback" and status["now"].startswith("held: pause file")
        steer(cli, "pause", "--db", pg_url)  # the rollback run is the one running now
        hold.unlink()
        time.sleep(OBEY)
        restored = "SELECT count(*) FROM kms_migrate_journal WHERE status = 'rolled_back'"
        assert scalar(eng, restored) == 0
        assert scalar(eng, "SELECT held FROM kms_migrate_runs WHERE kind = 'rollback'") is None
        steer(cli, "resume", "--db", pg_url)
        done = rb.wait(timeout=120)
    assert done.rc == 0, done.err
    assert snapshot(pg_url) == db.before
    assert "hold by guard@" in done.out and "release by guard@" in done.out
    assert "pause by" in done.out and "resume by" in done.out


@pytest.mark.parametrize("mode", ["primary", "replica"])
def test_a_run_holds_while_a_replica_lags_and_completes_once_it_caught_up(
    pg_replica: Replica, keys: Keys, server_kms: KmsHandle, moto_server: MotoServer,
    cli: Any, cli_env: dict[str, str], mode: str,  # noqa: F811
) -> None:
    """A real streaming replica: replay paused with pg_wal_replay_pause() while the
    application goes on writing; the run holds for the lag (no KMS call, no commit), and
    once replay resumes it goes on and completes. The lag is read on the primary
    (pg_stat_replication), or with --replica on the replica itself."""
    url = pg_replica.primary.new_database()
    db = Sample.make(url, keys)
    eng = db.eng
    app = create_engine(url, isolation_level="AUTOCOMMIT")
    watch = ["--replica", pg_replica.url_for(url)] if mode == "replica" else []
    with proxied(moto_server, cli_env) as (env, state), writing(app):
        mig = cli.start(["migrate", "--db", url, "--yes", "--batch-size", "10",
                         "--max-kms-rps", "150", "--concurrency", "4",
                         "--max-replica-lag", "1", *watch], env=env)
        wait_until(mig, "some batches committed", _journal_at_least(eng, 30))
        with replay_paused(pg_replica.url_for(url)) as resume_replay:
            wait_until(mig, "the run held for the replica's lag", lambda: str(scalar(
                eng, "SELECT held FROM kms_migrate_runs") or "").startswith("replica lag"))
            quiet_within(state, eng, OBEY)
            assert_idle(state, eng)
            assert commits(eng)[0] < len(db.truth.plaintexts), "finished before the lag"
            status = json.loads(cli.run(["status", "--db", url, "--json"]).out)["steering"]
            assert status["now"].startswith("held: replica lag")
            resume_replay()
            done = mig.wait(timeout=120)
    app.dispose()
    assert done.rc == 0, done.err
    assert "hold by guard@" in done.out and "replica lag" in done.out
    assert "release by guard@" in done.out
    db.all_migrated_once(server_kms)
