"""`kms-migrate pause`, `resume` and `set`: steer a run from any terminal, on any machine,
through its row in the bookkeeping tables (every process of the run reads it at each
heartbeat: `migration.steer`). Plain functions; cli_steer.py is their click face."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from checkpoints import control, store
from checkpoints.control import Control, Who
from checkpoints.schema import behind, upgrade_in
from checkpoints.store import Run
from checkpoints.tables import lock

from .errors import ConfigError
from .steer import MAX_HEARTBEAT, pause_line

__all__ = [
    "STEERABLE", "Steer", "live_limits", "pause_run", "resume_run", "run_to_steer", "set_run",
    "steerable_run",
]

STEERABLE = ("migrate", "retry", "rekey", "rollback")  # the kinds of run steering acts on



@dataclass(frozen=True)
class Steer:
    """What a steering command did: its one-line answer, and whether it changed anything."""

    line: str
    changed: bool


def run_to_steer(conn: Connection) -> Run | None:
    """The run a steering command acts on by default, and the one `status` shows steered:
    the run holding the run lock, else the newest unfinished migrate, retry, rekey or
    rollback run."""
    held = conn.execute(select(lock.c.run_id)).scalar()
    if held is not None:
        return store.get_run(conn, int(held))
    return next((r for r in store.list_runs(conn, 50)
                 if r.state in store.UNFINISHED and r.kind in STEERABLE), None)


def live_limits(run: Run, c: Control) -> dict[str, float | int | None]:
    """What the run goes by, as far as the database knows: the limits `set` gave, else the
    run's own (None: the command's own, which only its processes know)."""
    return {
        "max_kms_rps": c.max_kms_rps if c.max_kms_rps is not None else run.max_kms_rps,
        "batch_size": c.batch_size if c.batch_size is not None else run.batch_size,
        "batch_time": c.batch_time,
    }


def steerable_run(conn: Connection, run_id: int | None, what: str) -> Run:
    """The run a steering command acts on: `run_id`, else the run holding the run lock,
    else the newest unfinished one. Refused (one line) when there is none, or when it
    cannot be steered."""
    if not store.schema_present(conn):
        raise ConfigError(f"nothing to {what}: this database has no kms-migrate runs; check --db")
    if behind(conn) is not None:  # tables an older kms-migrate made: add what steering reads
        upgrade_in(conn)
    if run_id is None:
        current = run_to_steer(conn)
        if current is None:
            raise ConfigError(f"nothing to {what}: no migrate, rekey or rollback run is "
                              "running or unfinished here (`kms-migrate status` lists the "
                              "runs)")
        run_id = current.id
    run = store.get_run(conn, run_id)
    if run is None:
        raise ConfigError(f"there is no run {run_id} here: `kms-migrate status` lists the runs")
    if run.kind not in STEERABLE:
        raise ConfigError(f"run {run.id} is a {run.kind}, which cannot be steered: pause, "
                          "resume and set act on migrate, rekey and rollback runs")
    if run.state not in store.UNFINISHED:
        raise ConfigError(f"run {run.id} ({run.kind}) is {run.state}: there is nothing to "
                          f"{what}")
    return run


def _when(run: Run) -> str:
    if run.state == "running":
        return f"every process of it obeys within {MAX_HEARTBEAT:g} s"
    return f"it is {run.state} now, and will start that way when resumed"


def pause_run(engine: Engine, run_id: int | None, note: str | None = None) -> Steer:
    who = Who.me()
    with engine.begin() as conn:
        run = steerable_run(conn, run_id, "pause")
        if not control.pause(conn, run.id, who, note):
            c = control.read(conn, run.id)
            assert c is not None
            return Steer(f"run {run.id} ({run.kind}) was {pause_line(c)} already; nothing "
                         "changed", False)
    flight = ", once its batch in flight has committed" if run.state == "running" else ""
    return Steer(f"run {run.id} ({run.kind}) paused by {who}: {_when(run)}{flight}; "
                 "`kms-migrate resume` goes on", True)


def resume_run(engine: Engine, run_id: int | None) -> Steer:
    who = Who.me()
    with engine.begin() as conn:
        run = steerable_run(conn, run_id, "resume")
        resumed = control.resume(conn, run.id, who)
        c = control.read(conn, run.id)
    assert c is not None
    held = f"; it still holds while {c.held}" if c.held else ""
    if not resumed:
        return Steer(f"run {run.id} ({run.kind}) is not paused; nothing changed{held}", False)
    return Steer(f"run {run.id} ({run.kind}) resumed by {who}: {_when(run)}{held}", True)


def set_run(engine: Engine, run_id: int | None, limits: dict[str, float | int | None]) -> Steer:
    """Store live limits: max_kms_rps (0: no limit), batch_size, batch_time (0: fixed)."""
    limits = {k: v for k, v in limits.items() if v is not None}
    if not limits:
        raise ConfigError("set what? give --max-kms-rps R, --batch-size N and/or --batch-time "
                          "SECONDS")
    who = Who.me()
    with engine.begin() as conn:
        run = steerable_run(conn, run_id, "set")
        if run.kind == "rollback" and "max_kms_rps" in limits:
            raise ConfigError(f"run {run.id} is a rollback, which makes no KMS call: "
                              "--max-kms-rps would change nothing; leave it out")
        c = control.read(conn, run.id)
        assert c is not None
        if "batch_size" in limits and "batch_time" not in limits and c.batch_time:
            # A fixed size turns a live --batch-time off, in the row too: a process that
            # joins or restarts reads the row alone, and would follow the time again.
            limits["batch_time"] = 0.0
        lines = control.set_limits(conn, run.id, who, limits, live_limits(run, c))
    return Steer(f"run {run.id} ({run.kind}): {'; '.join(lines)}, set by {who}: {_when(run)}, "
                 "and processes that join it take these", True)

