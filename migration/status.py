"""What `status` reports: runs with state and timings, progress per column, failures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from checkpoints import store

from .config import Target
from .reader import bind_target

__all__ = ["ColumnProgress", "StatusReport", "collect_status"]


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
    run_id: int | None = None
    progress: list[ColumnProgress] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    failures_total: int = 0
    journal: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_status(engine: Engine, failure_limit: int = 50) -> StatusReport | None:
    """Gather the report, or None when the tool never wrote to this database."""
    with engine.connect() as conn:
        if not store.schema_present(conn):
            return None
        report = StatusReport()
        all_runs = store.list_runs(conn)
        for r in all_runs:
            report.runs.append({
                "id": r.id, "kind": r.kind, "state": r.state, "key_id": r.key_id,
                "started_at": r.started_at.isoformat() if r.started_at else None,
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                "seconds": (
                    round((r.finished_at or r.updated_at).timestamp()
                          - r.started_at.timestamp(), 3)
                    if r.started_at else None
                ),
                "note": r.note,
            })
        latest = next((r for r in all_runs if r.kind == "migrate"), None)
        if latest is not None:
            report.run_id = latest.id
            pks = {t["table"]: t.get("primary_key") for t in latest.targets}
            for (table, column), ck in sorted(store.load_checkpoints(conn, latest.id).items()):
                report.progress.append(ColumnProgress(
                    table, column, ck.done, ck.last_pk, ck.batches, ck.migrated, ck.skipped,
                    ck.already, ck.failed, ck.conflicts,
                    0 if ck.done else _remaining(conn, table, pks.get(table), column, ck.last_pk),
                ))
            report.failures = [
                asdict(f) for f in store.failures_of(conn, latest.id, limit=failure_limit)
            ]
            report.failures_total = store.count_failures(conn, latest.id)
        report.journal = {
            f"{t}.{c}:{s}": n for (t, c, s), n in sorted(store.journal_counts(conn).items())
        }
        return report


def _remaining(conn: Any, table: str, pk: str | None, column: str, last: str | None) -> int | None:
    if not pk:
        return None
    try:
        bt = bind_target(conn, Target(table, pk, (column,)))
    except Exception:  # status reports what it can
        return None
    q = select(func.count()).select_from(bt.table)
    if last is not None:
        q = q.where(bt.pk > bt.pk_value(last))
    return int(conn.execute(q).scalar_one())
