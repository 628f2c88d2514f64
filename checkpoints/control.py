"""Steering a run from any terminal: the pause, the live limits, the holds, and the log of
who changed what (`kms_migrate_changes`).

`kms-migrate pause`, `resume` and `set` write here; every process of the run reads
`read` at each heartbeat and obeys. A hold (the run holding by itself: the database
guard, a pause file) is recorded by the process that saw it begin, and released by the
same process: the record is for `status`; each process obeys its own checks.
"""

from __future__ import annotations

import getpass
import os
import socket
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from .base import aware
from .hosts import clock
from .tables import changes, runs

__all__ = [
    "NOTE_LIMIT", "Change", "Control", "Who", "changes_of", "hold", "one_line", "pause", "read",
    "release", "resume", "set_limits",
]

NOTE_LIMIT = 500  # characters of a pause note kept (it goes on every progress line)


def one_line(text: str, limit: int = 255) -> str:
    """`text` as one printable line of at most `limit` characters: each control, format
    or unpaired surrogate character escaped (a newline would forge a line of output, an
    escape sequence would drive another operator's terminal, and a lone surrogate, from
    an argv that is not UTF-8, cannot be stored), and the end cut with "..."."""
    shown = "".join(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                    if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


@dataclass(frozen=True)
class Who:
    """Who gives a command: the operating-system user and the host."""

    user: str
    host: str

    @classmethod
    def me(cls) -> Who:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):  # no name for this uid (a bare container)
            user = f"uid {os.getuid()}"
        return cls(one_line(user), one_line(socket.gethostname()))

    def __str__(self) -> str:
        return f"{self.user}@{self.host}"


@dataclass(frozen=True)
class Control:
    """What a run's row says about steering, as one process reads it at a heartbeat."""

    run_id: int
    state: str
    paused_at: datetime | None
    paused_by: str | None
    pause_note: str | None
    max_kms_rps: float | None  # set by `set` (None: the command's own)
    batch_size: int | None
    batch_time: float | None
    held: str | None
    held_at: datetime | None
    held_by: str | None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


@dataclass(frozen=True)
class Change:
    at: datetime
    user: str
    host: str
    action: str  # pause | resume | set | hold | release
    detail: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "user": self.user, "host": self.host,
                "action": self.action, "detail": self.detail}


def read(conn: Connection, run_id: int) -> Control | None:
    r = runs.c
    row = conn.execute(select(
        r.state, r.paused_at, r.paused_by, r.pause_note, r.set_max_kms_rps, r.set_batch_size,
        r.set_batch_time, r.held, r.held_at, r.held_by).where(r.id == run_id)).first()
    if row is None:
        return None
    return Control(run_id, row.state, aware(row.paused_at), row.paused_by, row.pause_note,
                   row.set_max_kms_rps, row.set_batch_size, row.set_batch_time, row.held,
                   aware(row.held_at), row.held_by)


def _log(conn: Connection, run_id: int, who: Who, action: str, detail: str | None) -> None:
    conn.execute(insert(changes).values(run_id=run_id, at=clock(conn), user_name=who.user,
                                        host=who.host, action=action, detail=detail))


def pause(conn: Connection, run_id: int, who: Who, note: str | None = None) -> bool:
    """Pause the run; False when it was paused already (then nothing changes)."""
    note = one_line(note, NOTE_LIMIT) if note is not None else None
    moved = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.paused_at.is_(None))
                         .values(paused_at=clock(conn), paused_by=one_line(str(who)),
                                 pause_note=note)).rowcount
    if moved:
        _log(conn, run_id, who, "pause", note)
    return bool(moved)


def resume(conn: Connection, run_id: int, who: Who) -> bool:
    """Resume a paused run; False when it was not paused."""
    moved = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.paused_at.isnot(None))
                         .values(paused_at=None, paused_by=None, pause_note=None)).rowcount
    if moved:
        _log(conn, run_id, who, "resume", None)
    return bool(moved)


def set_limits(conn: Connection, run_id: int, who: Who, limits: dict[str, float | int | None],
               before: dict[str, float | int | None]) -> list[str]:
    """Store the live limits given (`max_kms_rps`, `batch_size`, `batch_time`), one change
    row each, "name old -> new" (`before`: what the run went by until now); the lines."""
    lines: list[str] = []
    for name, value in limits.items():
        conn.execute(update(runs).where(runs.c.id == run_id).values({f"set_{name}": value}))
        line = f"{name} {_shown(before.get(name))} -> {_shown(value)}"
        _log(conn, run_id, who, "set", line)
        lines.append(line)
    return lines


def _shown(value: float | int | None) -> str:
    if value is None:
        return "as started"
    return f"{value:g}" if isinstance(value, float) else str(value)


def hold(conn: Connection, run_id: int, by: str, reason: str) -> bool:
    """Record that the run holds by itself, unless a hold is recorded already; whether this
    call recorded it (and logged the change)."""
    reason = one_line(reason, NOTE_LIMIT)
    moved = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.held.is_(None))
                         .values(held=reason, held_at=clock(conn), held_by=by[:255])).rowcount
    if moved:
        _log(conn, run_id, Who("guard", by[:255]), "hold", reason)
    return bool(moved)


def reword(conn: Connection, run_id: int, by: str, reason: str) -> None:
    """The hold this process recorded goes on for a new reason (the lag grew, say): the
    row says it now, for `status`; no change is logged (the hold is the same)."""
    conn.execute(update(runs).where(runs.c.id == run_id, runs.c.held_by == by[:255])
                 .values(held=one_line(reason, NOTE_LIMIT)))


def release(conn: Connection, run_id: int, by: str, why: str | None = None) -> bool:
    """Clear the hold the process `by` recorded (this one, or one that is gone: `why`);
    whether it did."""
    moved = conn.execute(update(runs).where(runs.c.id == run_id, runs.c.held_by == by[:255])
                         .values(held=None, held_at=None, held_by=None)).rowcount
    if moved:
        _log(conn, run_id, Who("guard", by[:255]), "release", why)
    return bool(moved)


def changes_of(conn: Connection, run_id: int) -> list[Change]:
    c = changes.c
    rows = conn.execute(select(c.at, c.user_name, c.host, c.action, c.detail)
                        .where(c.run_id == run_id).order_by(c.id)).all()
    return [Change(aware(r.at) or r.at, r.user_name, r.host, r.action, r.detail) for r in rows]
