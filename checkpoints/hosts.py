"""Where a process runs and whether it still does, and which clock to trust.

A pid can be asked of this kernel only by a process on the same host *and* the same boot;
everywhere else a holder is judged by its heartbeat, on the database's clock. Used by the
run lock, the leases and the worker registry; imports nothing of the package but `base`.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from .base import aware, now

__all__ = ["BOOT_ID_PATH", "boot_id", "clock", "db_now", "on_this_host", "pid_alive"]

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This kernel's boot id (Linux), or None where there is none to read.

    Hostnames repeat (containers on different machines), so a pid can be checked only by
    a process on the same host *and* the same boot. None never matches: a holder whose
    boot cannot be told apart is presumed elsewhere, and waits for its heartbeat to age.
    """
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            value = f.read().strip()
    except (OSError, ValueError):
        return None
    return value[:64] or None


def on_this_host(host: str | None, boot: str | None) -> bool:
    """Whether a process recorded with `host` and `boot` runs on this very machine and
    boot, so that its pid can be asked of this kernel."""
    here = boot_id()
    return host == socket.gethostname() and here is not None and boot == here


def clock(conn: Connection) -> Any:
    """The time to write and compare leases and heartbeats against: the database's own
    `now()` on PostgreSQL, where hosts whose clocks disagree meet (a skewed host must
    neither take a live worker's range nor count live workers out); this process's clock
    on SQLite, which one host uses. A value or SQL expression for a statement."""
    return func.now() if conn.dialect.name == "postgresql" else now()


def db_now(conn: Connection) -> datetime:
    """`clock` as a value, for ages computed here."""
    if conn.dialect.name == "postgresql":
        return aware(conn.execute(select(func.now())).scalar_one()) or now()
    return now()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs: a zombie (dead, not reaped yet by its parent)
    answers signal 0 but runs nothing, and holds no lease."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """State Z in /proc/<pid>/stat (Linux); False where there is no /proc to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the last ")" ends it.
    fields = stat[stat.rfind(b")") + 1:].split()
    return bool(fields) and fields[0] == b"Z"
