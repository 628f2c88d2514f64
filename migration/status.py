"""What `status` reports: runs with state and timings, progress per column, failures, and
the latest key census `verify` recorded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from checkpoints import control, leases, store
from checkpoints.census import latest_census
from checkpoints.leases import RangeRow, WorkerRow
from checkpoints.schema import behind, head_revision
from checkpoints.store import BatchCounts
from checkpoints.tables import ranges, workers

from .census import census_json
from .config import Target
from .errors import ConfigError
from .reader import bind_target
from .steer import state_line
from .steer_run import live_limits, run_to_steer

__all__ = ["ColumnProgress", "StatusReport", "collect_status"]

SILENT_AFTER = 60.0  # seconds without heartbeat: a worker of a run that is over is lost


@dataclass
class ColumnProgress:
    table: str
    column: str
    done: bool
    last_pk: str | None
    batches: int
    migrated: int
    skipped: int
    already: int
    failed: int
    conflicts: int
    remaining: int | None


@dataclass
class StatusReport:
    runs: list[dict[str, Any]] = field(default_factory=list)
    run_id: int | None = None  # the latest migrate or rekey run, whose columns follow
    run_kind: str | None = None
    progress: list[ColumnProgress] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    failures_total: int = 0
    journal: dict[str, int] = field(default_factory=dict)
    ranged_run_id: int | None = None  # the newest run spread over workers (--workers)
    workers: list[dict[str, Any]] = field(default_factory=list)
    ranges: list[dict[str, Any]] = field(default_factory=list)
    # The latest verify's values by format and key (`census.census_json`); None when verify
    # never recorded one here.
    census: dict[str, Any] | None = None
    # The run that `pause`, `resume` and `set` act on (the one running, else the newest
    # unfinished one): paused or held and by whom, its live limits, its changes.
    steering: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_status(engine: Engine, failure_limit: int = 50) -> StatusReport | None:
    """Gather the report, or None when the tool never wrote to this database."""
    with engine.connect() as conn:
        if not store.schema_present(conn):
            return None
        old = behind(conn)
        if old is not None:
            raise ConfigError(
                f"the bookkeeping tables here are at revision {old} and this kms-migrate reads "
                f"revision {head_revision()}: run status with the kms-migrate that made them; "
                "a command of this one that writes (migrate, rollback, pause, resume, set) "
                "upgrades them first")
        report = StatusReport()
        all_runs = store.list_runs(conn)
        for r in all_runs:
            report.runs.append({
                "id": r.id, "kind": r.kind, "state": r.state, "key_id": r.key_id,
                **({"to_key_id": r.to_key_id, "to_key_arn": r.to_key_arn}
                   if r.kind == "rekey" else {}),
                **({"undoes_run_id": r.undoes_run_id} if r.undoes_run_id is not None else {}),
                "started_at": r.started_at.isoformat() if r.started_at else None,
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                "seconds": (
                    round(_last_activity(conn, r).timestamp()
                          - r.started_at.timestamp(), 3)
                    if r.started_at else None
                ),
                "note": r.note,
            })
        latest = next((r for r in all_runs if r.kind in ("migrate", "rekey")), None)
        if latest is not None:
            report.run_id, report.run_kind = latest.id, latest.kind
            pks = {t["table"]: t.get("primary_key") for t in latest.targets}
            in_ranges = leases.range_totals(conn, latest.id) if latest.ranged else {}
            rows = leases.list_ranges(conn, latest.id) if latest.ranged else []
            for (table, column), ck in sorted(store.load_checkpoints(conn, latest.id).items()):
                rc = in_ranges.get((table, column), BatchCounts())
                spans = [(x.last_pk if x.last_pk is not None else x.lo, x.hi) for x in rows
                         if not x.done and (x.table_name, x.column_name) == (table, column)]
                remaining = 0 if ck.done else _remaining(
                    conn, table, pks.get(table), column,
                    spans if latest.ranged else [(ck.last_pk, None)])
                report.progress.append(ColumnProgress(
                    table, column, ck.done, None if latest.ranged else ck.last_pk,
                    ck.batches + sum(x.batches for x in rows
                                     if (x.table_name, x.column_name) == (table, column)),
                    remaining=remaining, **asdict(ck.counts + rc),
                ))
            report.failures = [
                asdict(f) for f in store.failures_of(conn, latest.id, limit=failure_limit)
            ]
            report.failures_total = store.count_failures(conn, latest.id)
        ranged = next((r for r in all_runs if r.ranged), None)
        if ranged is not None:
            report.ranged_run_id = ranged.id
            at = leases.db_now(conn)
            over = ranged.state not in store.UNFINISHED
            report.workers = [_worker(w, at, over)
                              for w in leases.list_workers(conn, ranged.id)]
            report.ranges = [_range(x) for x in leases.list_ranges(conn, ranged.id)]
        report.journal = {
            f"{t}.{c}:{s}": n for (t, c, s), n in sorted(store.journal_counts(conn).items())
        }
        report.census = census_json(latest_census(conn))
        report.steering = _steering(conn)
        return report


def _steering(conn: Any) -> dict[str, Any] | None:
    run = run_to_steer(conn)
    c = control.read(conn, run.id) if run is not None else None
    if run is None or c is None:
        return None
    now = state_line(c, f"{c.held} (since {c.held_at:%H:%M:%S}, seen by {c.held_by})"
                     if c.held else None) or "going"
    return {
        "run_id": run.id, "kind": run.kind, "state": run.state, "now": now,
        "paused": c.paused, "paused_by": c.paused_by,
        "paused_at": c.paused_at.isoformat() if c.paused_at else None,
        "pause_note": c.pause_note, "held": c.held,
        "limits": live_limits(run, c),
        "changes": [ch.as_dict() for ch in control.changes_of(conn, run.id)],
    }


def _last_activity(conn: Any, run: store.Run) -> datetime:
    """When the run last did something: its end, or, while it is unfinished (running, or
    left by a crash), the latest of its row, its ranges' batches and its workers'
    heartbeats (the batches of a ranged run do not touch its row)."""
    if run.finished_at is not None:
        return run.finished_at
    latest = run.updated_at
    if run.ranged:
        r, w = ranges.c, workers.c
        for q in (select(func.max(r.updated_at)).where(r.run_id == run.id),
                  select(func.max(w.heartbeat_at)).where(w.run_id == run.id)):
            at = leases.aware(conn.execute(q).scalar())
            if at is not None and at > (leases.aware(latest) or at):
                latest = at
    return latest


def _remaining(conn: Any, table: str, pk: str | None, column: str,
               spans: list[tuple[str | None, str | None]]) -> int | None:
    """Rows of one column still ahead of its checkpoints: `spans` are (after, upto] key
    spans, one per unfinished range, or (last_pk, None) for a single-process run."""
    if not pk:
        return None
    try:
        bt = bind_target(conn, Target(table, pk, (column,)))
    except Exception:  # status reports what it can
        return None
    total = 0
    for after, upto in spans:
        q = select(func.count()).select_from(bt.table)
        if after is not None:
            q = q.where(bt.pk > bt.pk_value(after))
        if upto is not None:
            q = q.where(bt.pk <= bt.pk_value(upto))
        total += int(conn.execute(q).scalar_one())
    return total


def _worker(w: WorkerRow, at: datetime, run_over: bool) -> dict[str, Any]:
    beat = leases.aware(w.heartbeat_at)
    age = (at - beat).total_seconds() if beat else None
    state = w.state
    if run_over and state == "running" and age is not None and age > SILENT_AFTER:
        state = "lost"  # its machine died: it cannot be running a run that is over
    return {
        "id": w.id, "host": w.host, "pid": w.pid, "state": state, "range_id": w.range_id,
        "rate_share": round(w.rate, 1) if w.rate is not None else None,
        "kms_requests": w.kms_requests, "retries": w.retries, "throttles": w.throttles,
        "started_at": w.started_at.isoformat(),
        "heartbeat_age_s": round(age, 1) if age is not None else None,
        "finished_at": w.finished_at.isoformat() if w.finished_at else None,
        "note": w.note,
    }


def _range(r: RangeRow) -> dict[str, Any]:
    until = leases.aware(r.lease_until)
    if r.done:
        lease = "done"
    elif r.worker_id is None or until is None:
        lease = "waiting"
    else:
        lease = "held" if until > store.now() else "expired"
    return {
        "id": r.id, "table": r.table_name, "column": r.column_name, "after": r.lo,
        "upto": r.hi, "last_pk": r.last_pk, "state": lease, "worker_id": r.worker_id,
        "claims": r.claims, "batches": r.batches, "migrated": r.migrated,
        "skipped": r.skipped, "already": r.already, "failed": r.failed,
        "conflicts": r.conflicts,
    }
