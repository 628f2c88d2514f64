"""A copy of a SQLite database taken with SQLite's online backup API before the first write."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import click
from sqlalchemy import Engine

from checkpoints import store

from .db import sqlite_path
from .errors import ConfigError

__all__ = ["backup_sqlite"]

BACKUP_MODE = 0o600  # the copy holds every Fernet token: owner only, from its first byte


def _create_private(path: Path) -> None:
    """Create `path` empty, owner-only, failing if anything already exists there.

    O_EXCL: never write into a file (or follow a symlink) someone else prepared. The mode is
    set on the empty file (fchmod: a umask cannot leave it wider, nor 0o000), before SQLite
    writes a page into it; SQLite gives its journal files the database file's mode.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 BACKUP_MODE)
    try:
        os.fchmod(fd, BACKUP_MODE)
    finally:
        os.close(fd)


def backup_sqlite(db: Path, *, without_bookkeeping: bool = False) -> Path:
    """Copy `db` beside itself as `<name>.kms-migrate-backup-<UTC time>.db`; return the path.

    The online backup API copies a consistent snapshot even while the application writes.
    The copy is created 0600 before its first byte is written. It is taken once the run
    lock is held, so the lock's bookkeeping tables exist by then; `without_bookkeeping`
    (the database had none before this command) drops them from the copy, which is then
    the database as it was before kms-migrate touched it.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    n = 1
    while True:
        suffix = "" if n == 1 else f"-{n}"
        target = db.with_name(f"{db.name}.kms-migrate-backup-{stamp}{suffix}.db")
        try:
            _create_private(target)
            break
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise ConfigError(
                f"could not create the backup file {target} ({exc.strerror or type(exc).__name__}"
                "): check the folder's permissions and free space, or pass --no-backup if you "
                "have your own backup; nothing was written"
            ) from None
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
                if without_bookkeeping:
                    names = [r[0] for r in dst.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND "
                        "name LIKE 'kms\\_migrate\\_%' ESCAPE '\\'")]
                    for name in names:
                        dst.execute(f'DROP TABLE "{name}"')
                    dst.commit()
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
    return target


def had_bookkeeping(engine: Engine) -> bool:
    with engine.connect() as conn:
        return store.schema_present(conn)


def backup_before_first_write(engine: Engine, url: str, kind: str, skip: bool,
                               had_bookkeeping: bool = True) -> None:
    """Back a SQLite database up before a new run's first write (not when resuming one:
    its backup was taken when it started). Called once the run lock is held, so a
    refused command writes no copy."""
    path = sqlite_path(url)
    if path is None or skip:
        return
    with engine.connect() as conn:
        if store.schema_present(conn) and store.unfinished_run(conn, kind) is not None:
            return
    copy = backup_sqlite(path, without_bookkeeping=not had_bookkeeping)
    click.echo(f"backup of {path} (SQLite online backup): {copy}")
