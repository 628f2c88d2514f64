"""Adversarial review of issue 14 (steering a live run): what a hostile operator or
environment does to `pause`, `resume`, `set` and the guards, and what must still hold.

Each test here failed before its fix: non-finite numbers taken as limits, a later
`set --batch-size` read differently by a process that joins, KMS calls asleep at a rate
that was raised meanwhile, a hold left on the run by a process that died, control
characters from a note or $USER reaching another operator's terminal, times labelled UTC
that were not, and a guard whose answer went stale.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text

from checkpoints import control, store
from migration.errors import ConfigError
from migration.ratelimit import RateLimiter
from migration.sizing import BatchSizer
from migration.steer import Steering
from tests.helpers import WHO, assert_refused, make_run, run_main
from tests.test_e2e import cli, outputs  # noqa: F401  (fixtures)


def _row(engine: Engine, run_id: int) -> tuple[Any, ...]:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT paused_at, pause_note, set_max_kms_rps, set_batch_size, set_batch_time "
            "FROM kms_migrate_runs WHERE id = :i"), {"i": run_id}).one()
        n = conn.execute(text("SELECT count(*) FROM kms_migrate_changes")).scalar()
    return (*row, n)


# -- 1. numbers that are not numbers ----------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["set", "--batch-time", "nan"],
    ["set", "--batch-time", "inf"],
    ["set", "--max-kms-rps", "nan"],
    ["set", "--max-kms-rps", "inf"],
    ["set", "--max-kms-rps", "NaN", "--batch-size", "10"],
])
def test_set_refuses_a_limit_that_is_no_finite_number(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
) -> None:
    """`set --batch-time nan` was stored and taken: the sizer's next batch raised
    ValueError (round(nan)), stopping every process of the run with an unexpected error,
    and every restart after it too (the row kept the NaN). `--max-kms-rps nan` lifted the
    rate limit silently. Refused in one line now, and nothing is written."""
    run_id = make_run(engine)
    before = _row(engine, run_id)
    url = str(engine.url)
    code, out, err = run_main(capsys, *argv, "--db", url)
    assert_refused(code, out, err, "finite")
    assert _row(engine, run_id) == before


@pytest.mark.parametrize("flag", ["--batch-time", "--max-kms-rps", "--max-replica-lag",
                                  "--lease-seconds"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_run_commands_refuse_non_finite_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str,
) -> None:
    """`migrate --max-replica-lag nan` made a guard that never holds (no lag is > NaN);
    `--batch-time nan` stopped the run after its first batch; `--lease-seconds nan` broke
    the leases. Refused before anything is written."""
    db = tmp_path / "x.db"
    db.touch()
    code, out, err = run_main(capsys, "migrate", "--db", f"sqlite:///{db}", flag, value)
    # (an infinite lease is out of --lease-seconds' range already)
    assert_refused(code, out, err, flag,
                   *(() if (flag, value) == ("--lease-seconds", "inf") else ("finite",)))
    with create_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar() == 0


def test_a_nan_in_the_row_never_stops_a_process(db_url: str, kms: Any, keys: Any) -> None:
    """Defence in depth: a NaN already in a run's row (written before this fix, or by
    hand; PostgreSQL keeps it, SQLite makes it NULL) is taken as unset by the processes
    reading it, never raised mid-column nor taken as a rate."""
    from tests.helpers import make_kms, settings_for

    engine = create_engine(db_url)
    run_id = make_run(engine)
    sizer = BatchSizer(100, None)
    k = make_kms(kms.client, settings_for("sqlite://", keys.current))
    s = Steering(engine, run_id, sizer, kms=k, max_kms_rps=50.0)
    with engine.begin() as conn:
        control.set_limits(conn, run_id, WHO, {"batch_time": float("nan"),
                                               "max_kms_rps": float("nan")}, {})
    s.poll()
    assert sizer.observe(100, 1.0) == 100
    assert k.limiter is not None and k.limiter.max_rate == 50.0  # the command's own
    engine.dispose()


# -- 2. a later --batch-size, as every process reads it --------------------------------------

def test_set_batch_size_after_batch_time_is_read_alike_by_a_joining_process(
    engine: Engine,
) -> None:
    """`set --batch-time 2`, then `set --batch-size 50` ("fixed: turns --batch-time
    off"): the process that saw both fixed its size at 50, but the row still held
    set_batch_time 2, so a worker that joined (or the run restarted) went adaptive
    again: two processes of one run sizing their batches two ways, and status showing a
    batch time nobody asked for any more."""
    from migration.steer_run import set_run

    run_id = make_run(engine)
    running = Steering(engine, run_id, BatchSizer(100, None))
    running.poll()
    set_run(engine, run_id, {"batch_time": 2.0})
    running.poll()
    assert running.sizer.target == 2.0
    set_run(engine, run_id, {"batch_size": 50})
    running.poll()
    joiner = Steering(engine, run_id, BatchSizer(100, None))
    joiner.poll()
    assert (running.sizer(), running.sizer.target) == (50, None)
    assert (joiner.sizer(), joiner.sizer.target) == (50, None)


# -- 3. a rate raised while calls wait at the old one ----------------------------------------

def test_raising_the_rate_wakes_the_calls_waiting_at_the_old_one() -> None:
    """`set --max-kms-rps 0.05` (a typo for 5), then `set --max-kms-rps 1000`: the KMS
    threads that had reserved a token at 0.05/s slept out their 20, 40, 60, 80 s, so
    the run crawled on, a pause waited for that batch, and a Ctrl-C'd process could not
    exit before the last sleeper woke (its pool's threads are joined at exit)."""
    r = RateLimiter(10.0)
    for _ in range(int(r.burst)):
        r.acquire()
    r.set_max_rate(0.05)
    done: list[float] = []

    def call() -> None:
        r.acquire()
        done.append(time.monotonic())

    threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    raised = time.monotonic()
    r.set_max_rate(1000.0)
    for t in threads:
        t.join(5)
    assert len(done) == 4, "calls still asleep at the old rate"
    assert max(done) - raised < 2.5


# -- 4. a hold left on the run by a process that died -----------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _held(engine: Engine, run_id: int) -> tuple[Any, Any]:
    with engine.connect() as conn:
        c = control.read(conn, run_id)
    assert c is not None
    return c.held, c.held_by


def test_a_hold_recorded_by_a_process_killed_while_held_is_cleared(
    engine: Engine, tmp_path: Path,
) -> None:
    """A process SIGKILLed while a guard held it (its pause file there) left `held` on
    the run's row. Only the process that recorded a hold releases it, so the restarted
    run went on with status saying "held: pause file ... exists" and `resume` saying
    "it still holds while ...", for the rest of the run; nor could the new process
    record a hold of its own while that one stood. A one-process run's new holder of the
    lock is the run's only process: a hold it did not record is gone with its recorder."""
    import socket

    from migration.guard import PauseFile

    run_id = make_run(engine)
    flag = tmp_path / "hold"
    flag.touch()
    old = Steering(engine, run_id, BatchSizer(10), guards=[PauseFile(flag)])
    old.by = f"{socket.gethostname()} pid {_dead_pid()}"
    old.poll()  # recorded, then the process is killed: nothing releases it
    assert _held(engine, run_id) == (f"pause file {flag} exists", old.by)
    flag.unlink()
    new = Steering(engine, run_id, BatchSizer(10), guards=[PauseFile(flag)])
    new.poll()
    assert _held(engine, run_id) == (None, None)
    assert not new.blocked()
    flag.touch()  # and a hold of its own is recorded again
    time.sleep(1.2)  # the guard's next look
    new.poll()
    assert _held(engine, run_id) == (f"pause file {flag} exists", new.by)
    new.close()
    old.close()
    assert _held(engine, run_id) == (None, None)


def test_a_live_workers_hold_is_kept_by_the_others(engine: Engine) -> None:
    """In a ranged run the other workers' holds are theirs: a worker clears only a hold
    whose recorder is not among the run's live workers."""
    run_id = make_run(engine)
    other = "elsewhere pid 4242"
    with engine.begin() as conn:
        control.hold(conn, run_id, other, "3 active sessions > 2")
    me = Steering(engine, run_id, BatchSizer(10))
    me.peers = {other, me.by}
    me.poll()
    assert _held(engine, run_id) == ("3 active sessions > 2", other)
    me.peers = {me.by}  # it stopped beating
    me.poll()
    assert _held(engine, run_id) == (None, None)


# -- 5. what an operator types reaches another operator's terminal ----------------------------

HOSTILE_NOTE = "ticket 42\nkms-migrate: error: fake line\x1b[2J\x1b]0;pwned\x07\r\u202eevil\udcff"


def _controls(text: str) -> list[str]:
    import unicodedata

    return [ch for line in text.split("\n") for ch in line
            if unicodedata.category(ch).startswith("C")]


def test_a_note_and_a_user_name_cannot_write_to_another_operators_terminal(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`pause --note` and $USER went verbatim into the run's row and from there to every
    `status`, summary and progress line: a newline forged a line of output, an escape
    sequence cleared another operator's screen or set its title, U+202E turned text
    around, and a note that is not UTF-8 (a lone surrogate from argv) stopped `pause`
    with an unexpected UnicodeEncodeError. Now each is shown escaped, and `pause`
    answers in one line."""
    run_id = make_run(engine)
    url = str(engine.url)
    monkeypatch.setenv("USER", "mallory\n\x1b[31mroot")
    monkeypatch.setenv("LOGNAME", "mallory\n\x1b[31mroot")
    code, out, err = run_main(capsys, "pause", "--db", url, "--note", HOSTILE_NOTE)
    assert code == 0, err
    assert out.count("\n") == 1 and not _controls(out)
    code, out, err = run_main(capsys, "pause", "--db", url)  # "already": the note again
    assert code == 0 and out.count("\n") == 1 and not _controls(out), out
    code, out, err = run_main(capsys, "status", "--db", url)
    assert code == 0, err
    assert not _controls(out)
    assert "\\x1b" in out and "ticket 42\\nkms-migrate: error: fake line" in out
    assert not any(line.startswith("kms-migrate: error") for line in out.splitlines())
    with engine.connect() as conn:
        c = control.read(conn, run_id)
        log = control.changes_of(conn, run_id)
    assert c is not None and c.pause_note is not None and c.paused_by is not None
    for stored in (c.pause_note, c.paused_by, log[0].user, log[0].detail or ""):
        assert not _controls(stored), stored


def test_a_10_kb_note_is_kept_to_a_readable_length(
    engine: Engine, capsys: pytest.CaptureFixture[str],
) -> None:
    """A 10 KB note went whole onto every progress line of the run and every status."""
    run_id = make_run(engine)
    code, out, err = run_main(capsys, "pause", "--db", str(engine.url), "--note", "x" * 10_000)
    assert code == 0, err
    with engine.connect() as conn:
        c = control.read(conn, run_id)
    assert c is not None and c.pause_note is not None
    assert 100 <= len(c.pause_note) <= 600 and c.pause_note.startswith("xxx")
    assert len(out) < 1000


# -- 6. times labelled UTC ----------------------------------------------------------------------

@pytest.mark.postgres
def test_times_shown_as_utc_are_utc_on_a_server_in_another_time_zone(
    pg_server: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    """psycopg hands timestamptz back in the session's TimeZone: on a server set to
    Asia/Kolkata, `paused by ... at 17:30:00 UTC` was the local time labelled UTC (5 h 30
    off), and the changes' times were local with no zone at all."""
    import json
    from datetime import UTC, datetime

    url = pg_server.new_database()
    eng = create_engine(url)
    with eng.connect() as conn:
        db = conn.execute(text("SELECT current_database()")).scalar()
        conn.execute(text(f'ALTER DATABASE "{db}" SET timezone TO \'Asia/Kolkata\''))
        conn.commit()
    eng.dispose()
    eng = create_engine(url)
    run_id = make_run(eng)
    code, out, err = run_main(capsys, "pause", "--db", url, "--run", str(run_id))
    assert code == 0, err
    now = datetime.now(UTC)
    code, out, err = run_main(capsys, "status", "--db", url, "--json")
    steering = json.loads(out)["steering"]
    at = datetime.fromisoformat(steering["paused_at"])
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0
    assert abs((at - now).total_seconds()) < 60
    assert f"at {at:%Y-%m-%d %H:%M}" in steering["now"]
    assert steering["changes"][0]["at"].endswith("+00:00")
    eng.dispose()


# -- 7. a guard that stops answering ------------------------------------------------------------

class _Stuck:
    """A guard that answers "go" once, then hangs (a replica whose network went dark
    after the connection was made: no statement timeout reaches the client)."""

    def __init__(self) -> None:
        self.asked = 0
        self.freed = threading.Event()

    def reason(self) -> str | None:
        self.asked += 1
        if self.asked > 1:
            self.freed.wait(30)
        return None

    def close(self) -> None:
        self.freed.set()


def test_a_guard_that_stops_answering_holds_the_run() -> None:
    """The guards are asked on a thread of their own, and the steering took its latest
    answer however old: a guard stuck in a query kept saying "go" (its last answer) for
    as long as it hung, while the lag it watches was unknown. An answer overdue is a
    reason to hold, as a failed query is."""
    from migration.steer import GuardWatch

    stuck = _Stuck()
    watch = GuardWatch([stuck], every=0.1, overdue=0.5)
    try:
        assert watch.latest() is None
        time.sleep(1.0)
        assert stuck.asked == 2
        late = watch.latest()
        assert late is not None and "not answered" in late
        stuck.freed.set()
        time.sleep(0.3)
        assert watch.latest() is None
    finally:
        stuck.close()
        watch.close()


# -- 8. a paused ranged run, a worker SIGKILLed, the command SIGTERMed --------------------------

@pytest.mark.e2e
@pytest.mark.postgres
def test_a_paused_ranged_run_loses_a_worker_then_its_command_and_still_ends_whole(
    pg_url: str, keys: Any, server_kms: Any, moto_server: Any,
    cli: Any, cli_env: dict[str, str],  # noqa: F811
) -> None:
    """Paused with two workers; one worker SIGKILLed (its lease runs out while paused:
    nobody may take its range over while the run is paused); then the command SIGTERMed:
    it must answer at once (nothing in flight), leave the run resumable and no hold on
    it; the restart starts paused; once resumed it completes, every value whole."""
    import os
    import signal

    from tests.helpers import make_db, snapshot
    from tests.test_e2e import check_invariant, poll_engine, runs_of, scalar, scalar_rows
    from tests.test_steer_e2e import (
        OBEY,
        _journal_at_least,
        assert_idle,
        proxied,
        quiet_within,
        steer,
    )
    from tests.test_steer_e2e import commits as committed

    truth = make_db(pg_url, 150, keys.current, keys.legacy, bad_values=False)
    before = snapshot(pg_url)
    eng = poll_engine(pg_url)
    args = ["migrate", "--db", pg_url, "--yes", "--batch-size", "5", "--workers", "2",
            "--rows-per-range", "20", "--lease-seconds", "6", "--max-kms-rps", "120",
            "--concurrency", "2"]
    with proxied(moto_server, cli_env) as (env, state):
        mig = cli.start(args, env=env)
        from tests.test_e2e import wait_until
        wait_until(mig, "two workers and some batches", lambda: (
            (scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = 'running'")
             or 0) == 2 and _journal_at_least(eng, 20)()))
        steer(cli, "pause", "--db", pg_url)
        assert quiet_within(state, eng, OBEY) <= OBEY
        pid = scalar_rows(eng, "SELECT pid FROM kms_migrate_workers WHERE state = 'running' "
                               "ORDER BY pid LIMIT 1")[0][0]
        claims = scalar(eng, "SELECT sum(claims) FROM kms_migrate_ranges")
        os.kill(pid, signal.SIGKILL)
        assert_idle(state, eng, 8.0)  # longer than a lease: still nothing moves
        assert scalar(eng, "SELECT sum(claims) FROM kms_migrate_ranges") == claims
        t = time.monotonic()
        mig.signal(signal.SIGTERM)
        stopped = mig.wait(timeout=30)
        took = time.monotonic() - t
        assert took < 8, f"a paused ranged run took {took:.1f} s to stop"
        assert stopped.rc in (2, 130), stopped.err
        assert len(stopped.err.strip().splitlines()[-1:]) == 1
        assert [(k, s) for _, k, s in runs_of(eng)] == [("migrate", "interrupted")]
        assert scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = "
                           "'running'") == 0
        assert scalar(eng, "SELECT held FROM kms_migrate_runs") is None
        left = len(truth.plaintexts) - committed(eng)[0]
        assert left > 0
        again = cli.start(args, env=env)
        wait_until(again, "the restarted workers", lambda: (
            scalar(eng, "SELECT count(*) FROM kms_migrate_workers WHERE state = 'running'")
            or 0) == 2)
        assert_idle(state, eng)  # restarted paused
        steer(cli, "resume", "--db", pg_url)
        done = again.wait(timeout=180)
    assert done.rc == 0, done.err
    changed, _ = check_invariant(eng, pg_url, before, truth, server_kms)
    assert changed == len(truth.plaintexts)


# -- 9. every process of a run reads the same limits from the row ------------------------------

_SHARED: dict[str, Engine] = {}
SETS = st.lists(st.tuples(
    st.fixed_dictionaries({}, optional={
        "max_kms_rps": st.sampled_from([0.0, 5.0, 40.0, 1000.0]),
        "batch_size": st.sampled_from([1, 50, 80, 3000]),
        "batch_time": st.sampled_from([0.0, 0.5, 2.0])}).filter(bool),
    st.floats(0.01, 10)), min_size=1, max_size=8)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=SETS)
def test_a_process_that_saw_every_set_and_one_that_joins_now_agree(
    tmp_path_factory: pytest.TempPathFactory, kms: Any, keys: Any,
    sets: list[tuple[dict[str, Any], float]],
) -> None:
    """Any sequence of `set` commands on a live run (a batch adapting between them): the
    process that applied each as it came and a worker that joins (or a restart) now,
    reading the row alone, follow the same batch time, the same rate, and, once the
    size is fixed by --batch-size, the same size. `set --batch-size 80` on a run that
    had both a size and a time fixed the running process at 80 and left a joiner
    adapting; `set --batch-size 50` after the size had adapted away from a set 50 changed
    nothing in the running process."""
    from migration.steer_run import set_run
    from tests.helpers import make_kms, settings_for

    if "engine" not in _SHARED:  # one database for every example: a run each
        _SHARED["engine"] = create_engine(
            f"sqlite:///{tmp_path_factory.mktemp('s') / 's.db'}")
    eng = _SHARED["engine"]
    run_id = make_run(eng)
    own = settings_for("sqlite://", keys.current)

    def process() -> Steering:
        return Steering(eng, run_id, BatchSizer(100, 2.0), kms=make_kms(kms.client, own),
                        max_kms_rps=100.0)

    running = process()
    running.poll()
    for limits, seconds in sets:
        running.sizer.observe(running.sizer(), seconds)  # a batch went by
        set_run(eng, run_id, dict(limits))
        running.poll()
    joiner = process()
    joiner.poll()
    for s in (running, joiner):
        assert s.kms is not None
    assert running.sizer.target == joiner.sizer.target
    rates = [s.kms.limiter.max_rate if s.kms and s.kms.limiter else 0 for s in (running, joiner)]
    assert rates[0] == rates[1]
    with eng.connect() as conn:
        c = control.read(conn, run_id)
    assert c is not None
    if c.batch_size is not None and not c.batch_time:
        assert running.sizer() == joiner.sizer() == c.batch_size


# -- 10. a pause file it may not look for ------------------------------------------------------

def test_a_pause_file_in_a_folder_it_may_not_search_is_refused_up_front() -> None:
    """--pause-file in a folder this user cannot search (mode 700, another owner) was
    accepted: the folder exists. Then every look for the file failed, and the run held
    from its first batch on, for good ("cannot look for pause file"). It is refused
    before anything is written, as a pause file in a missing folder is; one whose folder
    it could not even stat raised an unexpected PermissionError. (Run as nobody in a child
    process: root searches any folder.)"""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    top = Path(tempfile.mkdtemp(prefix="kms-migrate-adv-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "locked").mkdir(mode=0o700)
        # the folder exists but may not be searched; its parent may not be searched
        for hold in (top / "locked" / "hold", top / "locked" / "sub" / "hold"):
            _refused_as_nobody(hold)
    finally:
        shutil.rmtree(top)


def _refused_as_nobody(hold: Path) -> None:
    import subprocess
    import sys

    code = (
        "import os, pwd, sys\n"
        "from pathlib import Path\n"
        "from migration.guard import PauseFile\n"
        "from migration.errors import ConfigError\n"
        "nb = pwd.getpwnam('nobody')\n"
        "os.setgid(nb.pw_gid); os.setuid(nb.pw_uid)\n"
        "try:\n"
        f"    PauseFile(Path({str(hold)!r})).check()\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc); sys.exit(0)\n"
        "print('accepted'); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PermissionError" in done.stdout and "nothing was written" in done.stdout


# -- 11. any interleaving of steering, application writes and stops ----------------------------

STEPS = st.lists(st.one_of(
    st.tuples(st.just("pause"), st.none()),
    st.tuples(st.just("resume"), st.none()),
    st.tuples(st.just("set"), st.fixed_dictionaries({}, optional={
        "batch_size": st.sampled_from([1, 3, 7, 40]),
        "batch_time": st.sampled_from([0.0, 0.01, 0.2]),
        "max_kms_rps": st.sampled_from([0.0, 300.0])}).filter(bool)),
    st.tuples(st.just("app"), st.integers(1, 6)),
    st.tuples(st.just("wait"), st.sampled_from([0.02, 0.1, 0.3])),
    st.tuples(st.just("stop"), st.none()),
), min_size=1, max_size=10)


class _Live:
    """One migrate command running in a thread (Ctrl-C: `stop`), restarted at will."""

    def __init__(self, url: str, keys: Any, kms: Any) -> None:
        from tests.helpers import settings_for

        self.url, self.kms = url, kms
        self.settings = settings_for(url, keys.current, keys.legacy, batch_size=5,
                                     concurrency=2)
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.outcome: list[Any] = []

    def start(self) -> None:
        from migration.db import make_engine
        from migration.migrator import migrate
        from migration.pipeline import Hooks
        from tests.helpers import make_kms

        self.stop.clear()
        self.outcome = []

        def go() -> None:
            engine = make_engine(self.url)
            try:
                self.outcome.append(migrate(
                    self.settings, engine=engine,
                    kms=make_kms(self.kms.client, self.settings),
                    hooks=Hooks(should_stop=self.stop.is_set)))
            except BaseException as exc:
                self.outcome.append(exc)
            finally:
                engine.dispose()

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def halt(self) -> None:
        assert self.thread is not None
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "a stopped run did not stop"
        assert self.outcome, "the run thread ended without an outcome"
        out = self.outcome[0]
        assert not isinstance(out, BaseException) or isinstance(out, KeyboardInterrupt), out


def _commits(url: str) -> tuple[int, int]:
    from tests.test_e2e import poll_engine, scalar

    eng = poll_engine(url)
    try:
        return (scalar(eng, "SELECT count(*) FROM kms_migrate_journal") or 0,
                scalar(eng, "SELECT coalesce(sum(batches), 0) FROM kms_migrate_checkpoints")
                or 0)
    finally:
        eng.dispose()


def _quiet(url: str, live: _Live) -> None:
    """A paused run commits nothing once the batch in flight is in (within its poll)."""
    deadline = time.monotonic() + 5
    last, since = _commits(url), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.03)
        now = _commits(url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 0.4:
            return
    pytest.fail("a paused run kept committing")


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=STEPS)
def test_any_interleaving_of_pause_resume_set_stop_and_app_writes_keeps_every_value(
    tmp_path_factory: pytest.TempPathFactory, keys: Any, kms: Any,
    monkeypatch: pytest.MonkeyPatch, steps: list[tuple[str, Any]],
) -> None:
    """A live migrate (SQLite, moto) steered by any sequence of pause, resume and set,
    stopped and restarted, while the application rewrites values (a paused run re-reads
    its page once resumed): once resumed to its end, every value is its token of the
    moment or a KMS ciphertext of that token's plaintext, each rewrite journalled with
    the token it replaced, and a paused run commits nothing."""
    import random

    from cryptography.fernet import Fernet

    from migration.steer import SteeringThread
    from migration.steer_run import pause_run, resume_run, set_run
    from tests.helpers import make_db

    monkeypatch.setattr(SteeringThread.__init__, "__defaults__", (None, 0.05))
    url = f"sqlite:///{tmp_path_factory.mktemp('i') / 'i.db'}"
    truth = make_db(url, 25, keys.current, keys.legacy, bad_values=False)
    plain = dict(truth.plaintexts)
    fernet = Fernet(keys.current.encode())
    rng = random.Random(len(steps))
    eng = create_engine(url)
    store.ensure_schema(eng)  # (a steering command racing the tables' creation: see report)
    live = _Live(url, keys, kms)
    live.start()
    paused = False
    time.sleep(0.05)
    for op, arg in steps:
        if live.thread is not None and not live.thread.is_alive() and op != "stop":
            live.halt()
            live.start()
        try:
            if op == "pause":
                paused = pause_run(eng, None).changed or paused
                _quiet(url, live)
            elif op == "resume":
                resume_run(eng, None)
                paused = False
            elif op == "set":
                set_run(eng, None, dict(arg))
            elif op == "app":
                for cell in rng.sample(sorted(plain), arg):
                    table, pk, column = cell
                    key = "user_id" if table == "users" else "wager_id"
                    secret = f"new-{rng.random()}"
                    with eng.begin() as conn:
                        conn.execute(text(f"UPDATE {table} SET {column} = :v WHERE {key} = :k"),
                                     {"v": fernet.encrypt(secret.encode()).decode(),
                                      "k": pk})
                    plain[cell] = secret
            elif op == "wait":
                time.sleep(arg)
            else:
                live.halt()
                live.start()
        except ConfigError:  # a refusal: nothing to steer (the run is over)
            pass
        if paused and op in ("app", "wait", "set"):
            _quiet(url, live)
    with contextlib.suppress(ConfigError):  # nothing unfinished: fine
        resume_run(eng, None)
    assert live.thread is not None
    live.thread.join(60)
    assert not live.thread.is_alive(), "the resumed run never ended"
    out = live.outcome[0] if live.outcome else None
    migrated = _check_values(eng, kms, plain)
    if out is not None and not isinstance(out, BaseException):  # it ran to its end
        assert migrated > 0
    eng.dispose()


def _check_values(eng: Engine, kms: Any, plain: dict[tuple[str, str, str], str]) -> int:
    from cryptography.fernet import Fernet  # noqa: F401  (tokens checked by their text)

    from tests.helpers import snapshot

    now = snapshot(str(eng.url))
    with eng.connect() as conn:
        journal = conn.execute(text(
            "SELECT table_name, pk, column_name, original, migrated FROM "
            "kms_migrate_journal")).all()
    written = {(t, str(p), c): (o, m) for t, p, c, o, m in journal}
    migrated = 0
    for cell, value in now.items():
        if cell not in plain:
            continue
        if value.startswith("gAAAAA"):
            continue  # a token: the application's own, untouched (or left as a conflict)
        assert kms.decrypt_text(value) == plain[cell], f"{cell} holds another plaintext"
        assert cell in written and written[cell][1] == value, f"{cell} not journalled"
        migrated += 1
    return migrated



def test_a_stuck_guard_does_not_delay_the_end_of_a_stopped_run() -> None:
    """Closing the steering joined the guards' thread for up to 15 s: a Ctrl-C'd run
    whose guard hung in a query took that long to exit, though nothing it does matters
    any more (the thread is a daemon: it dies with the process)."""
    from migration.steer import GuardWatch

    stuck = _Stuck()
    watch = GuardWatch([stuck], every=0.05)
    watch.latest()
    time.sleep(0.2)  # now stuck in its second look
    t = time.monotonic()
    watch.close()
    assert time.monotonic() - t < 2.0
    stuck.close()


def test_lifting_the_rate_limit_wakes_the_calls_waiting_at_the_old_one(
    engine: Engine, kms: Any, keys: Any,
) -> None:
    """`set --max-kms-rps 0.05`, then `set --max-kms-rps 0` (no limit): the process
    dropped its limiter, but the calls already asleep in it slept out the old rate."""
    from tests.helpers import make_kms, settings_for

    run_id = make_run(engine)
    k = make_kms(kms.client, settings_for("sqlite://", keys.current))
    s = Steering(engine, run_id, BatchSizer(10), kms=k, max_kms_rps=10.0)
    s.poll()
    limiter = k.limiter
    assert limiter is not None
    for _ in range(int(limiter.burst)):
        limiter.acquire()
    set_limits = control.set_limits
    with engine.begin() as conn:
        set_limits(conn, run_id, WHO, {"max_kms_rps": 0.05}, {})
    s.poll()
    done: list[float] = []
    threads = [threading.Thread(target=lambda: (limiter.acquire(), done.append(1)),
                                daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    with engine.begin() as conn:
        set_limits(conn, run_id, WHO, {"max_kms_rps": 0.0}, {})
    s.poll()
    assert k.limiter is None
    for t in threads:
        t.join(3)
    assert len(done) == 3, "calls still asleep in the limiter that was lifted"


def test_pausing_a_run_that_is_not_running_says_no_batch_is_in_flight(engine: Engine) -> None:
    """`pause` of an interrupted run said "it is interrupted now, and will start that
    way when resumed, once its batch in flight has committed": it has none."""
    from migration.steer_run import pause_run

    run_id = make_run(engine, state="interrupted")
    line = pause_run(engine, run_id).line
    assert "will start that way" in line and "in flight" not in line
    running = make_run(engine)
    assert "once its batch in flight has committed" in pause_run(engine, running).line


def test_a_flapping_guard_does_not_flood_the_summary() -> None:
    """A replica lag hovering at its limit holds and releases the run every few seconds:
    each is a change of the run, and the summary printed every one of them (thousands of
    lines after a night's run). It prints the latest, as status does, and says how to
    see all."""
    from datetime import UTC, datetime

    from migration.render import steered_lines
    from migration.steer import Steered

    at = datetime(2026, 1, 1, tzinfo=UTC)
    changes = [control.Change(at, "guard", "h pid 1", "hold" if i % 2 == 0 else "release",
                              "replica lag 1.1 s > 1 s" if i % 2 == 0 else None)
               for i in range(5000)]
    lines = steered_lines(Steered(2500, 3600.0, changes))
    assert len(lines) < 40
    assert any("5000" in line for line in lines)
    assert any("kms_migrate_changes" in line for line in lines)


@pytest.mark.parametrize("db", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_a_run_id_past_any_run_is_refused_as_such(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    """`pause --run 99999999999999999999` was an "unexpected OverflowError ... report it"
    on SQLite and a "database error: integer out of range ... re-run to resume" on
    PostgreSQL: an id no run can have is a usage error."""
    url = (f"sqlite:///{tmp_path / 'x.db'}" if db == "sqlite"
           else request.getfixturevalue("pg_server").new_database())
    eng = create_engine(url)
    make_run(eng)
    for argv in (["pause", "--run", "99999999999999999999"],
                 ["set", "--run", "3000000000", "--batch-size", "5"],
                 ["resume", "--run", "2147483648"]):
        code, out, err = run_main(capsys, *argv, "--db", url)
        assert_refused(code, out, err, "--run")
        assert "unexpected" not in err and "database error" not in err
    eng.dispose()
