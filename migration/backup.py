"""A copy of a SQLite database taken with SQLite's online backup API before the first write."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from .errors import ConfigError

__all__ = ["backup_sqlite"]


def backup_sqlite(db: Path) -> Path:
    """Copy `db` beside itself as `<name>.kms-migrate-backup-<UTC time>.db`; return the path.

    The online backup API copies a consistent snapshot even while the application writes.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = db.with_name(f"{db.name}.kms-migrate-backup-{stamp}.db")
    n = 1
    while target.exists():
        n += 1
        target = db.with_name(f"{db.name}.kms-migrate-backup-{stamp}-{n}.db")
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        target.unlink(missing_ok=True)
        raise ConfigError(
            f"could not back up {db} to {target} ({exc}): free some space or pass --no-backup "
            "if you have your own backup; nothing was written"
        ) from None
    target.chmod(0o600)
    return target
