"""Alembic environment for kms-migrate's own bookkeeping tables.

The tool runs this itself (``checkpoints.schema.ensure_schema``) on a connection it
passes in ``config.attributes["connection"]``. It keeps its own version table,
``kms_migrate_alembic_version``, so the application's ``alembic_version`` is never touched,
and it only ever looks at tables named ``kms_migrate_*``.
"""

from __future__ import annotations

from alembic import context
from checkpoints.tables import VERSION_TABLE, metadata


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    return type_ != "table" or bool(name and name.startswith("kms_migrate_"))


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        from sqlalchemy import create_engine

        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit("set sqlalchemy.url (alembic -x) or run through kms-migrate")
        with create_engine(url).begin() as conn:
            _run(conn)
    else:
        _run(connection)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
