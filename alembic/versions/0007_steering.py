"""Steering a live run: pause, resume, live limits, holds, and the log of changes.

- `kms_migrate_runs.paused_at` / `paused_by` / `pause_note`: set by `kms-migrate pause`,
  cleared by `resume`; every process of the run holds between batches while set (a
  restart of a paused run starts paused).
- `kms_migrate_runs.set_max_kms_rps` / `set_batch_size` / `set_batch_time`: the limits
  `kms-migrate set` gave, which replace the command's own for every process of the run,
  joining and resuming ones included (NULL: the command's own).
- `kms_migrate_runs.held` / `held_at` / `held_by`: why the run holds by itself (the
  database guard, a pause file), for `status`; written by the process that saw it.
- `kms_migrate_changes`: who changed what, when (user, host, time, action, detail).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUN_COLUMNS = (
    ("paused_at", sa.DateTime(timezone=True)),
    ("paused_by", sa.String(255)),
    ("pause_note", sa.Text),
    ("set_max_kms_rps", sa.Float),
    ("set_batch_size", sa.Integer),
    ("set_batch_time", sa.Float),
    ("held", sa.Text),
    ("held_at", sa.DateTime(timezone=True)),
    ("held_by", sa.String(255)),
)


def upgrade() -> None:
    with op.batch_alter_table("kms_migrate_runs") as batch:
        for name, type_ in _RUN_COLUMNS:
            batch.add_column(sa.Column(name, type_))
    op.create_table(
        "kms_migrate_changes",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_changes"),
        sa.ForeignKeyConstraint(["run_id"], ["kms_migrate_runs.id"],
                                name="fk_kms_migrate_changes_run_id_kms_migrate_runs"),
    )
    op.create_index("ix_kms_migrate_changes_run_id", "kms_migrate_changes", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_kms_migrate_changes_run_id", "kms_migrate_changes")
    op.drop_table("kms_migrate_changes")
    with op.batch_alter_table("kms_migrate_runs") as batch:
        for name, _ in reversed(_RUN_COLUMNS):
            batch.drop_column(name)
