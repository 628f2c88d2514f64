"""The bookkeeping schema: create or upgrade the `kms_migrate_*` tables with Alembic.

The revisions (`alembic/`) are found here, without asking any other package: inside
`checkpoints` as `_alembic` in a built wheel, at the repository root in a checkout or an
editable install.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, func, inspect, select

from .tables import VERSION_TABLE

__all__ = [
    "SCHEMA_LOCK_KEY", "alembic_dir", "behind", "ensure_schema", "head_revision",
    "schema_present", "upgrade_in",
]

SCHEMA_LOCK_KEY = 0x6B6D736D  # "kmsm": the advisory lock around schema upgrades


def alembic_dir() -> Path:
    """The revisions: packaged inside `checkpoints` in a wheel, at the repo root otherwise."""
    pkg = Path(__file__).resolve().parent
    for candidate in (pkg / "_alembic", pkg.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("kms-migrate is installed without its alembic/ revisions")


def ensure_schema(engine: Engine) -> None:
    """Create or upgrade the bookkeeping tables to the newest revision (idempotent).

    Commits: the upgrade runs in a transaction of its own."""
    with engine.begin() as conn:
        upgrade_in(conn)


def upgrade_in(conn: Connection) -> None:
    """`ensure_schema` inside the caller's transaction."""
    from alembic.config import Config

    from alembic import command

    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    if conn.dialect.name == "postgresql":
        # One upgrade at a time: the same command started on two machines at once would
        # otherwise both CREATE the tables and one fail on a duplicate type. Released at
        # commit; the second then finds the schema at head.
        conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def schema_present(conn: Connection) -> bool:
    """True once the tool has created its tables in this database."""
    return inspect(conn).has_table(VERSION_TABLE)


def head_revision() -> str:
    """The newest revision this version of the tool knows."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def behind(conn: Connection) -> str | None:
    """The revision of the tables here when it is older than this tool's (an older
    kms-migrate made them), else None."""
    if not schema_present(conn):
        return None
    from sqlalchemy import text

    found = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    head = head_revision()
    return None if found == head else str(found)
