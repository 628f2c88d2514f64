"""Rekey runs and the key census.

- `kms_migrate_runs.to_key_id` / `to_key_arn`: a rekey run's destination key (its source
  is `key_id` / `key_arn`), so that a resume or a joining worker with another destination
  is refused.
- `kms_migrate_runs.undoes_run_id`: the rekey run a rollback run restores (NULL: the
  migrate layer), so that a rollback after a rekey undoes the rekey only.
- `kms_migrate_census`: the values by format and key that `verify` counted, one `taken`
  number per verify, for `status --json`. Counts and key ARNs only, never a value.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.add_column(sa.Column("to_key_id", sa.String(2048)))
        batch.add_column(sa.Column("to_key_arn", sa.String(2048)))
        batch.add_column(sa.Column("undoes_run_id", sa.Integer))
    op.create_table(
        "kms_migrate_census",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("taken", sa.Integer, nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("key", sa.String(2048), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_census"),
    )
    op.create_index("ix_kms_migrate_census_taken", "kms_migrate_census", ["taken"])


def downgrade() -> None:
    op.drop_index("ix_kms_migrate_census_taken", "kms_migrate_census")
    op.drop_table("kms_migrate_census")
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.drop_column("undoes_run_id")
        batch.drop_column("to_key_arn")
        batch.drop_column("to_key_id")
