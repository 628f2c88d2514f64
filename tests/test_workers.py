"""Ranged runs in-process: leases, fencing, rate shares, joining, and whole runs whose
workers are threads (the subprocess version, with a SIGKILL, is test_workers_e2e.py)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from datetime import timedelta
from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import MetaData, Table, create_engine, inspect, select, text, update

from checkpoints import leases, store
from checkpoints.leases import LeaseLost
from checkpoints.lock import LockLost, RunLock
from checkpoints.store import BatchCounts
from checkpoints.tables import failures, journal, lock, ranges, workers
from migration.db import make_engine
from migration.errors import ResumeMismatchError
from migration.kms import RateLimiter
from migration.migrator import Mode, migrate
from migration.ranged_start import Split, start_ranged_migrate
from migration.sizing import BatchSizer
from migration.steer import Steering
from migration.supervisor import Here, migrate_ranged, rollback_ranged
from migration.worker import Heartbeat, work
from migration.worker_spec import WorkerSpec, settings_to_dict
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    interrupted_migrate,
    journal_cells,
    make_db,
    make_kms,
    run_main,
    settings_for,
    snapshot,
)


def _run_with_ranges(url: str, n: int) -> tuple[Any, int]:
    """A bare migrate run with `n` ranges of users.encrypted_secret (no rows needed)."""
    eng = create_engine(url)
    store.ensure_schema(eng)
    with eng.begin() as conn:
        run = store.create_run(conn, store.NewRun(
            "migrate", 10, targets=[("users", "encrypted_secret")], fingerprint="f"))
        leases.create_ranges(conn, run.id, "users", "encrypted_secret", None,
                             [str(10 * i) for i in range(1, n)])
    return eng, run.id


def _register(eng: Any, run_id: int) -> str:
    with eng.begin() as conn:
        return leases.register_worker(conn, run_id)


def _claim(eng: Any, run_id: int, worker: str, seconds: float = 60) -> leases.Lease | None:
    with eng.begin() as conn:
        return leases.claim(conn, run_id, worker, seconds)


def test_each_range_goes_to_one_worker_and_an_expired_lease_moves(db_url: str) -> None:
    eng, run_id = _run_with_ranges(db_url, 3)
    a, b = _register(eng, run_id), _register(eng, run_id)
    got = [_claim(eng, run_id, w) for w in (a, b, a)]
    assert all(g is not None for g in got)
    assert len({g.range_id for g in got if g}) == 3
    assert _claim(eng, run_id, b) is None  # all three held
    first = got[0]
    assert first is not None and (first.lo, first.hi) == (None, "10")
    # Its lease expires (its worker went silent): another worker takes it over...
    with eng.begin() as conn:
        conn.execute(update(ranges).where(ranges.c.id == first.range_id)
                     .values(lease_until=store.now() - timedelta(seconds=1)))
    again = _claim(eng, run_id, b)
    assert again is not None and again.range_id == first.range_id
    assert again.token != first.token
    # ...and the old holder can no longer commit a batch on it; the new one can.
    with pytest.raises(LeaseLost), eng.begin() as conn:
        leases.record_on_range(conn, first, last_pk="5", counts=BatchCounts(migrated=5),
                               done=False)
    with eng.begin() as conn:
        leases.record_on_range(conn, again, last_pk="5", counts=BatchCounts(migrated=5),
                               done=False)
        row = conn.execute(select(ranges).where(ranges.c.id == first.range_id)).one()
    assert (row.last_pk, row.migrated, row.claims) == ("5", 5, 2)


@pytest.mark.postgres
def test_concurrent_claims_skip_locked_ranges_instead_of_waiting(pg_url: str) -> None:
    eng, run_id = _run_with_ranges(pg_url, 2)
    a, b = _register(eng, run_id), _register(eng, run_id)
    with eng.connect() as held:
        tx = held.begin()
        first = leases.claim(held, run_id, a, 60)  # not committed: its row stays locked
        assert first is not None
        with eng.connect() as other:
            other.execute(text("SET lock_timeout = '2s'"))  # would fail if claim waited
            second = leases.claim(other, run_id, b, 60)
            other.commit()
        tx.commit()
    assert second is not None and second.range_id != first.range_id


@pytest.mark.postgres
def test_workers_share_the_lock_and_a_takeover_fences_them_all(pg_url: str) -> None:
    eng = make_engine(pg_url)
    store.ensure_schema(eng)
    run_lock = RunLock.acquire(eng, "migrate")
    with eng.connect() as c1, eng.connect() as c2:
        c1.begin()
        run_lock.shared_fence(c1)
        c2.begin()
        c2.execute(text("SET lock_timeout = '2s'"))
        run_lock.shared_fence(c2)  # a second worker's batch does not wait on the first
        c2.commit()
        c1.commit()
    with eng.begin() as conn:  # taken over (as RunLock.acquire does from a dead holder)
        conn.execute(update(lock).values(token="someone-else"))
    with pytest.raises(LockLost), eng.begin() as conn:
        run_lock.shared_fence(conn)


def test_a_dead_workers_range_on_this_host_is_reclaimed_at_once(db_url: str) -> None:
    eng, run_id = _run_with_ranges(db_url, 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = _register(eng, run_id)
    with eng.begin() as conn:
        conn.execute(update(workers).where(workers.c.id == ghost).values(pid=dead.pid))
    assert _claim(eng, run_id, ghost, seconds=3600) is not None  # a lease for an hour
    alive = _register(eng, run_id)
    took = _claim(eng, run_id, alive)
    assert took is not None and took.range_id is not None


def test_live_workers_share_the_rate_limit(db_url: str, kms: KmsHandle, keys: Keys) -> None:
    eng, run_id = _run_with_ranges(db_url, 1)
    run_lock = RunLock("t", "migrate")
    settings = settings_for(db_url, keys.current, max_kms_rps=1000)
    spec = WorkerSpec("migrate", run_id, "t", 60, settings_to_dict(settings))
    me = _register(eng, run_id)
    other = _register(eng, run_id)  # another live worker (this pid, a fresh heartbeat)
    k = make_kms(kms.client, settings)
    k.limiter = RateLimiter(1000)
    steering = Steering(eng, run_id, BatchSizer(10), kms=k, max_kms_rps=1000)
    beat = Heartbeat(eng, spec, me, run_lock, steering, watch_parent=False)
    beat.beat()
    assert k.limiter.max_rate == pytest.approx(500)
    with eng.begin() as conn:
        leases.finish_worker(conn, other, "finished")
    beat.beat()
    assert k.limiter.max_rate == pytest.approx(1000)


# -- whole ranged runs, workers as threads --------------------------------------------------

class ThreadWorker:
    """A worker run in a thread of this process, looking like a process to the supervisor."""

    def __init__(self, spec: WorkerSpec, settings: Any, client: Any) -> None:
        self.pid = os.getpid()
        self.rc: int | None = None
        self.error: Exception | None = None
        self.stop = threading.Event()

        def run() -> None:
            try:
                work(spec, settings, engine=make_engine(settings.db_url),
                     kms=make_kms(client, settings), should_stop=self.stop.is_set)
                self.rc = 0
            except KeyboardInterrupt:
                self.rc = 130
            except Exception as exc:  # as a worker process would: exit 2, its line printed
                self.rc, self.error = 2, exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.rc

    def send_signal(self, sig: int) -> None:
        self.stop.set()

    def wait(self, timeout: float | None = None) -> int:
        self.thread.join(timeout)
        return self.rc or 0


def thread_spawn(settings: Any, client: Any) -> Any:
    def spawn(spec: WorkerSpec, n: int) -> Sequence[ThreadWorker]:
        return [ThreadWorker(spec, settings, client) for _ in range(n)]
    return spawn


class Recorder:
    def __init__(self) -> None:
        self.started: list[tuple[str, int | None]] = []
        self.advanced = 0
        self.finished = False

    def start(self, table: str, column: str, total: int | None) -> None:
        self.started.append((table, total))

    def advance(self, table: str, column: str, rows: int) -> None:
        assert (table, column) == (self.started[-1][0], "")
        self.advanced += rows

    def finish(self) -> None:
        self.finished = True


def test_ranged_run_resumes_a_single_process_run_and_migrates_each_value_once(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    truth = make_db(db_url, 60, keys.current, keys.legacy, bad_values=True)
    before = snapshot(db_url)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=7)
    interrupted_migrate(db_url, settings, kms.client, after_batches=2)
    n = 3 if db_url.startswith("postgresql") else 1
    progress = Recorder()
    result = migrate_ranged(settings, engine=make_engine(db_url),
                            kms=make_kms(kms.client, settings),
                            here=Here(n, rows_per_range=11,
                                      spawn=thread_spawn(settings, kms.client), progress=progress))
    assert result.resumed
    # One count over all columns: the rows left after the interrupted run's checkpoint,
    # all of them seen by the end.
    [(name, total)] = progress.started
    assert "4 column(s)" in name and 0 < total < 4 * 60
    assert progress.advanced == total and progress.finished
    per_cell = journal_cells(db_url)
    assert set(per_cell) == set(truth.plaintexts) and max(per_cell.values()) == 1
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert result.failed == len(truth.bad)
    after = snapshot(db_url)
    for cell, plaintext in truth.plaintexts.items():
        assert kms.decrypt_text(after[cell]) == plaintext
    eng = make_engine(db_url)
    with eng.connect() as conn:
        assert leases.undone(conn, result.run_id or 0) == 0
        run = store.get_run(conn, result.run_id or 0)
        assert run is not None and run.state == "completed" and run.ranged
        assert conn.execute(select(lock)).first() is None  # released
    # A plain migrate afterwards finds nothing left; rollback with workers restores all.
    rb = rollback_ranged(eng, settings=settings,
                         here=Here(n, rows_per_range=13, spawn=thread_spawn(settings, kms.client)))
    assert rb.restored == len(truth.plaintexts) and not rb.failures
    assert snapshot(db_url) == before


def test_a_single_process_migrate_will_not_resume_a_ranged_run(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    make_db(db_url, 30, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=5)
    eng = make_engine(db_url)
    k = make_kms(kms.client, settings)
    k.describe()
    start = start_ranged_migrate(settings, eng, k, Split(10))
    start.lock.release(eng)  # as if its workers were interrupted
    with pytest.raises(ResumeMismatchError, match="started with --workers"):
        migrate(settings, engine=eng, kms=k)


def test_the_same_command_elsewhere_joins_the_running_ranged_run(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    make_db(db_url, 30, keys.current, keys.legacy)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=5)
    eng = make_engine(db_url)
    k = make_kms(kms.client, settings)
    k.describe()  # the run's key, as the command describes it before starting the run
    first = start_ranged_migrate(settings, eng, k, Split(10))
    assert not first.joined
    other = subprocess.Popen(["sleep", "30"])  # the lock now looks held by a live process
    try:
        with eng.begin() as conn:
            conn.execute(update(lock).values(pid=other.pid))
        slower = settings_for(db_url, keys.current, keys.legacy, batch_size=5, max_kms_rps=123)
        second = start_ranged_migrate(slower, eng, k, Split(10))
        assert second.joined and second.run.id == first.run.id
        assert second.run.max_kms_rps == settings.max_kms_rps  # one limit for the whole run
        assert second.lock.token == first.lock.token
        with eng.connect() as conn:  # joining planned nothing twice
            # 4 columns of 30 rows: 3 ranges of 10, or 4 for the one worker (each >= 5 rows)
            assert conn.execute(text("SELECT count(*) FROM kms_migrate_ranges")).scalar() == 16
        changed = settings_for(db_url, keys.current, keys.legacy, batch_size=5,
                               encryption_context=True)
        with pytest.raises(ResumeMismatchError, match="encryption context"):
            start_ranged_migrate(changed, eng, k, Split(10))
    finally:
        other.kill()
        other.wait()


# -- the command line ------------------------------------------------------------------------

def test_workers_above_one_are_refused_on_sqlite(
    sqlite_url: str, env_keys: Keys, capsys: pytest.CaptureFixture[str],
) -> None:
    make_db(sqlite_url, 10, env_keys.current)
    before = snapshot(sqlite_url)
    code, _, err = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--workers", "2")
    assert code == 2
    assert err.count("\n") == 1 and "--workers 2 needs PostgreSQL" in err
    assert snapshot(sqlite_url) == before
    eng = create_engine(sqlite_url)
    assert not [t for t in inspect(eng).get_table_names() if t.startswith("kms_migrate")]
    code, _, err = run_main(capsys, "rollback", "--db", sqlite_url, "--yes", "--workers", "3")
    assert code == 2 and "needs PostgreSQL" in err


@pytest.mark.parametrize("extra", [["--dry-run"], ["--retry-failed"]])
def test_workers_with_a_single_process_mode_are_refused(
    sqlite_url: str, env_keys: Keys, capsys: pytest.CaptureFixture[str], extra: list[str],
) -> None:
    make_db(sqlite_url, 10, env_keys.current)
    code, _, err = run_main(capsys, "migrate", "--db", sqlite_url, "--yes", "--workers", "1",
                            *extra)
    assert code == 2 and err.count("\n") == 1 and "--workers" in err


def test_a_fatal_kms_error_in_one_worker_stops_the_run_resumably(
    pg_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    from migration.errors import WorkersFailed
    from migration.kms import make_client
    from tests.test_kms import Injector, inject

    truth = make_db(pg_url, 40, keys.current, keys.legacy, bad_values=False)
    before = snapshot(pg_url)
    settings = settings_for(pg_url, keys.current, keys.legacy, batch_size=5)
    # The key is disabled once the command's checks passed: the workers' Encrypt calls
    # get KMS's DisabledException (moto itself keeps serving a disabled key).
    disabled = make_client("us-east-1", 4)
    inject(disabled, Injector(forever="DisabledException"), "Encrypt")
    spawn_after_disabling = thread_spawn(settings, disabled)

    eng = make_engine(pg_url)
    with pytest.raises(WorkersFailed, match="disabled") as excinfo:
        migrate_ranged(settings, engine=eng, kms=make_kms(kms.client, settings),
                       here=Here(2, rows_per_range=10, spawn=spawn_after_disabling))
    assert "re-run the same command to resume" in str(excinfo.value)
    assert snapshot(pg_url) == before  # nothing was written
    with eng.connect() as conn:
        run = store.list_runs(conn)[0]
        states = {w.state for w in leases.list_workers(conn, run.id)}
        assert conn.execute(select(lock)).first() is None
    assert run.state == "stopped" and "failed" in states
    result = migrate_ranged(settings, engine=eng, kms=make_kms(kms.client, settings),
                            here=Here(2, rows_per_range=10,
                                      spawn=thread_spawn(settings, kms.client)))
    assert result.resumed and result.run_id == run.id
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)


def test_ranges_follow_rows_per_range_and_give_every_worker_some(db_url: str, keys: Keys) -> None:
    make_db(db_url, 100, keys.current, bad_values=False)
    eng = create_engine(db_url)
    users = Table("users", MetaData(), autoload_with=eng)
    with eng.connect() as conn:
        def sizes(**kw: int) -> list[int]:
            bounds = leases.boundaries(conn, users, users.c.user_id, [], leases.Sizing(**kw))
            edges = [0, *bounds, 100]
            return [b - a for a, b in pairwise(edges)]

        assert sizes(rows_per_range=25) == [25, 25, 25, 25]
        assert sizes(rows_per_range=1000) == [100]  # one open range
        assert sizes(rows_per_range=1000, min_ranges=8, min_rows=10) == [13] * 4 + [12] * 4
        assert len(sizes(rows_per_range=1000, min_ranges=50, min_rows=10)) == 10  # >= a batch
        after_40 = leases.boundaries(conn, users, users.c.user_id, [users.c.user_id > 40],
                                     leases.Sizing(20))
        assert after_40 == [60, 80]  # (40, 60], (60, 80], (80, end)


def test_the_internal_worker_command_run_by_hand_says_what_to_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("not json"))
    code, _, err = run_main(capsys, "worker")
    assert code == 2 and err.count("\n") == 1 and "migrate or rollback --workers" in err


@pytest.mark.e2e
def test_one_worker_process_on_sqlite_migrates_and_rolls_back(
    sqlite_url: str, keys: Keys, server_kms: KmsHandle, cli_env: dict[str, str],
) -> None:
    from tests.conftest import kms_migrate_bin

    truth = make_db(sqlite_url, 40, keys.current, keys.legacy, bad_values=False)
    before = snapshot(sqlite_url)
    common = ["--db", sqlite_url, "--yes", "--batch-size", "7", "--workers", "1",
              "--no-backup"]
    mig = subprocess.run([kms_migrate_bin(), "migrate", *common], env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert mig.returncode == 0, mig.stderr
    after = snapshot(sqlite_url)
    assert all(server_kms.decrypt_text(after[c]) == p for c, p in truth.plaintexts.items())
    assert set(journal_cells(sqlite_url)) == set(truth.plaintexts)
    rb = subprocess.run([kms_migrate_bin(), "rollback", *common], env=cli_env,
                        capture_output=True, text=True, timeout=120)
    assert rb.returncode == 0, rb.stderr
    assert snapshot(sqlite_url) == before


def test_a_validation_exception_in_a_worker_fails_that_value_not_the_run(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    # Issue 11, defect 1, in the workers: they take the run's described key, so KMS's
    # ValidationException about one value is that value's failure there too.
    from migration.kms import make_client
    from tests.test_kms import Injector, inject

    truth = make_db(db_url, 30, keys.current, bad_values=False)
    settings = settings_for(db_url, keys.current, batch_size=5)
    client = make_client("us-east-1", 4)
    inject(client, Injector("ValidationException"), "Encrypt")
    n = 2 if db_url.startswith("postgresql") else 1
    result = migrate_ranged(settings, engine=make_engine(db_url),
                            kms=make_kms(kms.client, settings),
                            here=Here(n, rows_per_range=10, spawn=thread_spawn(settings, client)))
    assert result.failed == 1
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts) - 1


def test_a_ranged_run_names_a_fernet_token_written_behind_it_and_retry_takes_it(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    # The state machine's second regression (tests/test_stateful_regressions.py), ranged:
    # a token the application writes into a row the run has already passed is named as
    # left (exit 1), never passed over under an exit 0; --retry-failed migrates it.
    from cryptography.fernet import Fernet

    from migration.migrator import REASON_BEHIND

    make_db(db_url, 40, keys.current, bad_values=False)
    settings = settings_for(db_url, keys.current, batch_size=7)
    interrupted_migrate(db_url, settings, kms.client, after_batches=1)
    eng = make_engine(db_url)
    with eng.begin() as conn:  # the first value the run migrated, written again as Fernet
        j = journal.c
        table, column, pk = conn.execute(
            select(j.table_name, j.column_name, j.pk).order_by(j.id).limit(1)).one()
        key_col = "user_id" if table == "users" else "wager_id"
        token = Fernet(keys.current.encode()).encrypt(b"written again").decode()
        conn.execute(text(f"UPDATE {table} SET {column} = :v WHERE {key_col} = :pk"),
                     {"v": token, "pk": int(pk)})
    n = 2 if db_url.startswith("postgresql") else 1
    result = migrate_ranged(settings, engine=eng, kms=make_kms(kms.client, settings),
                            here=Here(n, rows_per_range=9,
                                      spawn=thread_spawn(settings, kms.client)))
    assert result.resumed and result.failed == 1
    assert [(f.table_name, f.column_name, f.pk, f.reason) for f in result.failures] == [
        (table, column, pk, REASON_BEHIND)]
    assert snapshot(db_url)[(table, pk, column)] == token  # named, left as written
    retry = migrate(settings, engine=eng, kms=make_kms(kms.client, settings),
                    mode=Mode(retry_failed=True))
    assert retry.failed == 0 and sum(c.migrated for c in retry.columns) == 1
    assert kms.decrypt_text(snapshot(db_url)[(table, pk, column)]) == "written again"


def test_a_ranged_run_drops_a_failure_whose_row_was_deleted_before_it_resumed(
    db_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    # The state machine's stale failure (tests/test_stateful_regressions.py), ranged: the
    # single-process pass recorded failures, the application deleted those rows, and the
    # ranged run that completes the column counts and names only values that exist.
    truth = make_db(db_url, 60, keys.current, keys.legacy, bad_values=True)
    settings = settings_for(db_url, keys.current, keys.legacy, batch_size=7)
    interrupted_migrate(db_url, settings, kms.client, after_batches=12)
    eng = make_engine(db_url)
    with eng.begin() as conn:
        f = failures.c
        recorded = conn.execute(select(f.table_name, f.pk)).all()
        assert recorded, "the interrupted pass recorded no failure: the test proves nothing"
        for table, pk in recorded:
            key_col = "user_id" if table == "users" else "wager_id"
            conn.execute(text(f"DELETE FROM {table} WHERE {key_col} = :pk"), {"pk": int(pk)})
    gone = {(t, int(pk)) for t, pk in recorded}
    n = 2 if db_url.startswith("postgresql") else 1
    result = migrate_ranged(settings, engine=eng, kms=make_kms(kms.client, settings),
                            here=Here(n, rows_per_range=9,
                                      spawn=thread_spawn(settings, kms.client)))
    left_bad = {cell for cell in truth.bad if (cell[0], int(cell[1])) not in gone}
    assert result.resumed
    assert {(x.table_name, int(x.pk)) for x in result.failures} & gone == set()
    assert result.failed == len(result.failures) == len(left_bad), (result.failures, left_bad)


def test_a_claim_whose_session_was_cut_is_claimed_again_not_a_worker_exit(
    db_url: str, keys: Keys, kms: KmsHandle, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 16's chaos run: two workers exited 2 when the server cut their session during a
    # range claim. The claim rolls back whole, so the worker claims again (boundedly, as
    # after a batch lost with its session).
    from sqlalchemy.exc import DBAPIError

    truth = make_db(db_url, 30, keys.current, bad_values=False)
    settings = settings_for(db_url, keys.current, batch_size=5)
    real = leases.claim
    cut = [0]

    def claim_cut_once(*a: Any, **kw: Any) -> Any:
        if cut[0] < 2:
            cut[0] += 1
            raise DBAPIError("SELECT … FOR UPDATE SKIP LOCKED", None,
                             Exception("server closed the connection"),
                             connection_invalidated=True)
        return real(*a, **kw)

    monkeypatch.setattr(leases, "claim", claim_cut_once)
    result = migrate_ranged(settings, engine=make_engine(db_url),
                            kms=make_kms(kms.client, settings),
                            here=Here(1, rows_per_range=10,
                                      spawn=thread_spawn(settings, kms.client)))
    assert cut[0] == 2
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert result.failed == 0
