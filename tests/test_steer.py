"""Steering, in-process: the run's control row against a model (any sequence of pause,
resume, set, hold and release), which run a command acts on and what it refuses, how a
process applies what it reads (`Steering.poll`), the batch sizer, the pause file, and the
flags SQLite refuses. The live runs steered from another process are in
tests/test_steer_e2e.py."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text

from checkpoints import control, store
from checkpoints.lock import RunLock
from migration.errors import ConfigError
from migration.pipeline import Hooks
from migration.sizing import BatchSizer
from migration.steer import Steering
from migration.steer_run import pause_run, resume_run, set_run, steerable_run
from tests.conftest import Keys, KmsHandle
from tests.helpers import (
    WHO,
    assert_refused,
    make_db,
    make_kms,
    make_run,
    run_main,
    settings_for,
)

# -- the control row against a model ---------------------------------------------------------

@dataclass
class Model:
    paused: bool = False
    note: str | None = None
    limits: dict[str, float | int | None] = field(default_factory=dict)
    held_by: str | None = None
    held: str | None = None
    log: list[tuple[str, str | None]] = field(default_factory=list)


OPS = st.one_of(
    st.tuples(st.just("pause"), st.one_of(st.none(), st.text(max_size=12))),
    st.tuples(st.just("resume"), st.none()),
    st.tuples(st.just("set"), st.fixed_dictionaries({}, optional={
        "max_kms_rps": st.floats(0, 5000, allow_nan=False),
        "batch_size": st.integers(1, 100_000),
        "batch_time": st.floats(0, 60, allow_nan=False)})),
    st.tuples(st.just("hold"), st.tuples(st.sampled_from(["p1", "p2"]),
                                         st.sampled_from(["lag", "file"]))),
    st.tuples(st.just("release"), st.sampled_from(["p1", "p2"])),
)


def _apply(conn: Any, run_id: int, model: Model, op: str, arg: Any) -> None:
    if op == "pause":
        assert control.pause(conn, run_id, WHO, arg) == (not model.paused)
        if not model.paused:  # a note is kept as one printable line
            note = control.one_line(arg, control.NOTE_LIMIT) if arg is not None else None
            model.paused, model.note = True, note
            model.log.append(("pause", note))
    elif op == "resume":
        assert control.resume(conn, run_id, WHO) == model.paused
        if model.paused:
            model.paused, model.note = False, None
            model.log.append(("resume", None))
    elif op == "set":
        before = dict(model.limits)
        lines = control.set_limits(conn, run_id, WHO, arg, before)
        assert len(lines) == len(arg)
        model.limits.update(arg)
        model.log += [("set", line) for line in lines]
    elif op == "hold":
        by, reason = arg
        assert control.hold(conn, run_id, by, reason) == (model.held is None)
        if model.held is None:
            model.held, model.held_by = reason, by
            model.log.append(("hold", reason))
    else:
        assert control.release(conn, run_id, arg) == (model.held_by == arg)
        if model.held_by == arg:
            model.held = model.held_by = None
            model.log.append(("release", None))


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(OPS, max_size=12))
def test_the_control_row_follows_any_sequence_of_commands(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, Any]],
) -> None:
    eng = create_engine(f"sqlite:///{tmp_path_factory.mktemp('c') / 'c.db'}")
    run_id = make_run(eng)
    model = Model()
    for op, arg in ops:
        with eng.begin() as conn:
            _apply(conn, run_id, model, op, arg)
        with eng.connect() as conn:
            c = control.read(conn, run_id)
            log = [(x.action, x.detail) for x in control.changes_of(conn, run_id)]
        assert c is not None
        assert c.paused == model.paused and c.pause_note == (model.note if c.paused else None)
        assert (c.paused_by == str(WHO)) == model.paused
        assert (c.max_kms_rps, c.batch_size, c.batch_time) == tuple(
            model.limits.get(k) for k in ("max_kms_rps", "batch_size", "batch_time"))
        assert (c.held, c.held_by) == (model.held, model.held_by)
        assert log == model.log
    eng.dispose()


# -- which run a command acts on, and what it refuses -----------------------------------------

def test_steering_commands_refuse_what_they_cannot_act_on(engine: Engine) -> None:
    with engine.connect() as conn, pytest.raises(ConfigError, match="no kms-migrate runs"):
        steerable_run(conn, None, "pause")
    done = make_run(engine, state="completed")
    fin = make_run(engine, kind="finalize")
    with engine.connect() as conn:
        with pytest.raises(ConfigError, match="nothing to pause: no migrate"):
            steerable_run(conn, None, "pause")
        with pytest.raises(ConfigError, match=f"run {done} .* is completed"):
            steerable_run(conn, done, "pause")
        with pytest.raises(ConfigError, match="is a finalize"):
            steerable_run(conn, fin, "pause")
        with pytest.raises(ConfigError, match="there is no run 99"):
            steerable_run(conn, 99, "pause")
    rb = make_run(engine, kind="rollback", state="interrupted")
    mig = make_run(engine)
    with engine.connect() as conn:
        assert steerable_run(conn, None, "pause").id == mig  # the newest unfinished
    lock = RunLock.acquire(engine, "rollback")
    with engine.begin() as conn:
        lock.bind_run(conn, rb)
    with engine.connect() as conn:
        assert steerable_run(conn, None, "pause").id == rb  # the lock's run first
    with pytest.raises(ConfigError, match="makes no KMS call"):
        set_run(engine, rb, {"max_kms_rps": 10.0})
    with pytest.raises(ConfigError, match="set what"):
        set_run(engine, rb, {"max_kms_rps": None, "batch_size": None, "batch_time": None})
    # an interrupted run can be paused: it starts paused when resumed
    assert "will start that way" in pause_run(engine, rb).line
    assert not pause_run(engine, rb).changed
    assert resume_run(engine, rb).changed and not resume_run(engine, rb).changed
    line = set_run(engine, mig, {"batch_size": 50, "batch_time": 0.0}).line
    assert "batch_size 100 -> 50" in line and "batch_time as started -> 0" in line


def test_the_cli_refuses_in_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "x.db"
    url = f"sqlite:///{db}"
    db.touch()  # an empty database
    cases = [
        (["migrate", "--db", url, "--max-replica-lag", "5"], "--max-replica-lag watch"),
        (["rollback", "--db", url, "--max-active-sessions", "5"], "--max-active-sessions"),
        (["rekey", "--db", url, "--to-key", "alias/x", "--replica", "postgresql://u:pw@h/d",
          "--max-replica-lag", "1"], "SQLite has no replicas"),
        (["migrate", "--db", "postgresql+psycopg://u@127.0.0.1:1/d", "--replica",
          "postgresql://u:s3cret@h/d"], "--replica names a replica"),
        (["pause", "--db", url], "no kms-migrate runs"),
        (["set", "--db", url, "--batch-size", "5"], "no kms-migrate runs"),
    ]
    for argv, expected in cases:
        code, out, err = run_main(capsys, *argv)
        line = assert_refused(code, out, err, expected)
        assert "s3cret" not in line
    with create_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar() == 0


# -- one process applying what it reads -------------------------------------------------------

def test_poll_applies_the_live_limits_and_the_pause(engine: Engine, kms: KmsHandle,
                                                    keys: Keys) -> None:
    run_id = make_run(engine)
    k = make_kms(kms.client, settings_for("sqlite://", keys.current))
    sizer = BatchSizer(100, 2.0)
    s = Steering(engine, run_id, sizer, kms=k, max_kms_rps=400)
    s.share = 2
    s.poll()
    assert k.limiter is not None and k.limiter.max_rate == pytest.approx(200)
    assert not s.blocked() and sizer.target == 2.0
    with engine.begin() as conn:
        control.set_limits(conn, run_id, WHO, {"max_kms_rps": 0.0, "batch_size": 7}, {})
        control.pause(conn, run_id, WHO, "why")
    s.poll()
    assert k.limiter is None  # 0: no limit
    assert sizer() == 7 and sizer.target is None  # a set size is fixed
    assert s.blocked() and s.holds == 1
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # a stop request ends the wait
        Hooks(should_stop=stop.is_set, steering=s).hold()
    assert 0.25 < time.monotonic() - t < 3
    with engine.begin() as conn:
        control.resume(conn, run_id, WHO)
        control.set_limits(conn, run_id, WHO, {"max_kms_rps": 30.0}, {})
    s.poll()
    assert not s.blocked() and k.limiter is not None and k.limiter.max_rate == 15
    assert not Hooks(steering=s).hold()
    s.poll()  # the same limits again: the sizer keeps what it learnt
    engine.dispose()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE kms_migrate_changes"))
        conn.execute(text("ALTER TABLE kms_migrate_runs RENAME TO gone"))
    s.poll()  # a database that cannot be read keeps the last state, never raises
    assert not s.blocked()


def test_a_pause_file_holds_a_run_until_it_is_gone(sqlite_url: str, keys: Keys,
                                                   kms: KmsHandle, tmp_path: Path) -> None:
    from migration.db import make_engine
    from migration.migrator import migrate

    truth = make_db(sqlite_url, 30, keys.current, bad_values=False)
    hold = tmp_path / "hold"
    hold.touch()
    s = settings_for(sqlite_url, keys.current, batch_size=10, pause_file=str(hold))
    eng = make_engine(sqlite_url)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(
        migrate(s, engine=eng, kms=make_kms(kms.client, s))))
    t.start()
    time.sleep(2.5)
    with eng.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM kms_migrate_journal")).scalar() == 0
        assert conn.execute(text("SELECT held FROM kms_migrate_runs")).scalar() == (
            f"pause file {hold} exists")
    hold.unlink()
    t.join(30)
    assert not t.is_alive()
    result = out[0]
    assert sum(c.migrated for c in result.columns) == len(truth.plaintexts)
    assert result.steered.holds == 1 and result.steered.held_seconds > 2
    assert [c.action for c in result.steered.changes] == ["hold", "release"]
    eng.dispose()


def test_steering_upgrades_tables_an_older_version_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A run started by an older kms-migrate (tables at revision 0006): status says so in
    one line; pause upgrades the tables in its own transaction and pauses the run."""
    from alembic.config import Config

    from alembic import command
    from checkpoints.schema import alembic_dir, behind

    url = f"sqlite:///{tmp_path / 'old.db'}"
    eng = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.execute(text(
            "INSERT INTO kms_migrate_runs (kind, state, targets_json, targets_fingerprint, "
            "batch_size, started_at, updated_at, ranged) VALUES ('migrate', 'running', '[]', "
            "'x', 10, '2026-01-01', '2026-01-01', 0)"))
    code, out, err = run_main(capsys, "status", "--db", url)
    assert_refused(code, out, err, "revision 0006", "upgrades them first")
    code, out, err = run_main(capsys, "pause", "--db", url)
    assert code == 0 and "paused by" in out, err
    with eng.connect() as conn:
        assert behind(conn) is None
    code, out, err = run_main(capsys, "status", "--db", url)
    assert code == 0 and "paused by" in out, err
    eng.dispose()


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_revisions_make_the_tables_the_code_declares(
    db: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """Alembic's own comparison of the upgraded schema with checkpoints/tables.py: a column
    declared in one and not the other (revision 0007's, say) shows here, not mid-run."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from checkpoints.tables import VERSION_TABLE, metadata

    url = (f"sqlite:///{tmp_path / 'm.db'}" if db == "sqlite"
           else request.getfixturevalue("pg_server").new_database())
    eng = create_engine(url)
    store.ensure_schema(eng)
    with eng.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = [d for d in compare_metadata(mc, metadata)
                if not (isinstance(d, tuple) and d[0] == "remove_table"
                        and d[1].name == VERSION_TABLE)]
    eng.dispose()
    assert diff == []


def test_a_command_refused_by_a_paused_runs_lock_is_told_it_is_paused(engine: Engine) -> None:
    from checkpoints.lock import LockHeld

    run_id = make_run(engine)
    held = RunLock.acquire(engine, "migrate")
    with engine.begin() as conn:
        held.bind_run(conn, run_id)
        control.pause(conn, run_id, WHO)
        # held by a live process of this host that is not this one
        conn.execute(text("UPDATE kms_migrate_lock SET pid = :p"), {"p": os.getppid()})
    with pytest.raises(LockHeld, match=r"paused by alice@ops-1: `kms-migrate resume`"):
        RunLock.acquire(engine, "rollback")


@pytest.mark.parametrize(("argv", "expected"), [
    ([], 1.0),  # no size given: batches follow the default target
    (["--batch-size", "500"], None),  # a size given stays fixed, even the default's value
    (["--batch-time", "2.5"], 2.5),
    (["--batch-size", "50", "--batch-time", "3"], 3.0),
    (["--batch-time", "0"], None),
])
def test_batch_time_defaults_on_only_when_no_size_is_given(
    tmp_path: Path, argv: list[str], expected: float | None,
) -> None:
    import click
    from click.testing import CliRunner

    from migration.options import settings_from, steer_options, target_options

    seen: list[float | None] = []

    @click.command()
    @target_options
    @steer_options
    def probe(**opts: Any) -> None:
        seen.append(settings_from(opts).batch_time)

    res = CliRunner().invoke(probe, ["--db", f"sqlite:///{tmp_path / 'x.db'}", *argv])
    assert res.exit_code == 0, res.output
    assert seen == [expected]


def test_a_stretch_of_null_rows_does_not_grow_the_batch_size(
    sqlite_url: str, keys: Keys, kms: KmsHandle,
) -> None:
    """1,000 NULL rows, then Fernet tokens: the NULL batches take milliseconds, and learning
    from them would double the size batch after batch, leaving the tokens one huge batch.
    The sizer learns only from values that needed KMS work."""
    from cryptography.fernet import Fernet

    from migration.config import Target
    from migration.db import make_engine
    from migration.migrator import migrate

    Path(sqlite_url.removeprefix("sqlite:///")).touch()
    eng = make_engine(sqlite_url)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE vault (id INTEGER PRIMARY KEY, secret TEXT)"))
        conn.execute(text("INSERT INTO vault (id, secret) VALUES (:i, NULL)"),
                     [{"i": i} for i in range(1, 1001)])
        f = Fernet(keys.current)
        conn.execute(text("INSERT INTO vault (id, secret) VALUES (:i, :s)"),
                     [{"i": i, "s": f.encrypt(b"k" * 32).decode()} for i in range(1001, 1101)])
    s = settings_for(sqlite_url, keys.current, batch_size=20, batch_time=1.0,
                     targets=(Target("vault", "id", ("secret",)),))
    sizer = BatchSizer(s.batch_size, s.batch_time)
    batches: list[int] = []
    hooks = Hooks(on_batch=lambda t, c, counts: batches.append(
        counts.migrated + counts.skipped), sizer=sizer)
    result = migrate(s, engine=eng, kms=make_kms(kms.client, s), hooks=hooks)
    assert result.columns[0].migrated == 100
    assert batches[:50] == [20] * 50  # the NULL stretch, at the size it started with
    eng.dispose()


def test_a_dry_run_obeys_its_pause_file(sqlite_url: str, keys: Keys, kms: KmsHandle,
                                        tmp_path: Path) -> None:
    """A rehearsal uses the KMS quota too: its pause file holds it (it has no run row, so
    nothing is recorded, and the database is left as it was)."""
    from migration.db import make_engine
    from migration.migrator import Mode, migrate

    make_db(sqlite_url, 20, keys.current, bad_values=False)
    hold = tmp_path / "hold"
    hold.touch()
    s = settings_for(sqlite_url, keys.current, batch_size=10, pause_file=str(hold))
    eng = make_engine(sqlite_url, read_only=True)
    k = make_kms(kms.client, s)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(
        migrate(s, engine=eng, kms=k, mode=Mode(dry_run=True))))
    t.start()
    time.sleep(2.0)
    assert k.requests == 1  # its DescribeKey, then nothing while the file exists
    hold.unlink()
    t.join(30)
    assert not t.is_alive() and out[0].dry_run
    assert sum(c.migrated for c in out[0].columns) > 0 and k.requests > 1
    assert out[0].steered.holds == 1
    eng.dispose()


def test_a_hold_whose_reason_changes_shows_the_newest_reason(engine: Engine) -> None:
    """The lag grows while the run holds: status shows the lag now, and the change log
    has one hold, not one per poll."""
    run_id = make_run(engine)

    class Lag:
        def __init__(self) -> None:
            self.now: str | None = "replica lag 2.0 s > 1 s (r1)"

        def reason(self) -> str | None:
            return self.now

        def close(self) -> None:
            pass

    lag = Lag()
    s = Steering(engine, run_id, BatchSizer(10), guards=[lag])
    try:
        s.poll()
        lag.now = "replica lag 9.0 s > 1 s (r1)"
        deadline = time.monotonic() + 10
        held = None
        while held != lag.now and time.monotonic() < deadline:
            time.sleep(0.3)
            s.poll()
            with engine.connect() as conn:
                c = control.read(conn, run_id)
                held = c.held if c else None
        assert held == lag.now
        with engine.connect() as conn:
            assert [x.action for x in control.changes_of(conn, run_id)] == ["hold"]
    finally:
        s.close()
    with engine.connect() as conn:
        assert [x.action for x in control.changes_of(conn, run_id)] == ["hold", "release"]
