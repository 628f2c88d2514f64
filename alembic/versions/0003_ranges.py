"""Ranges and workers: one run spread over several processes and machines.

A ranged run's key space (per target column) is split into primary-key ranges; workers
claim a range under a lease (`lease_token`, `lease_until`) and record each batch on it.
Workers register themselves and heartbeat, so the live ones share the run's rate limit.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.add_column(sa.Column("ranged", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("max_kms_rps", sa.Float))
    op.create_table(
        "kms_migrate_ranges",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("lo", sa.Text),
        sa.Column("hi", sa.Text),
        sa.Column("last_pk", sa.Text),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("lease_token", sa.String(64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("worker_id", sa.String(64)),
        sa.Column("claims", sa.Integer, nullable=False),
        sa.Column("batches", sa.Integer, nullable=False),
        sa.Column("migrated", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("already", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("conflicts", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["kms_migrate_runs.id"],
                                name="fk_kms_migrate_ranges_run_id_kms_migrate_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_ranges"),
    )
    op.create_index("ix_kms_migrate_ranges_run_id_done", "kms_migrate_ranges",
                    ["run_id", "done"])
    op.create_table(
        "kms_migrate_workers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("range_id", sa.Integer),
        sa.Column("rate", sa.Float),
        sa.Column("kms_requests", sa.Integer, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("throttles", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("note", sa.Text),
        sa.ForeignKeyConstraint(["run_id"], ["kms_migrate_runs.id"],
                                name="fk_kms_migrate_workers_run_id_kms_migrate_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_workers"),
    )
    op.create_index("ix_kms_migrate_workers_run_id", "kms_migrate_workers", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_kms_migrate_workers_run_id", "kms_migrate_workers")
    op.drop_table("kms_migrate_workers")
    op.drop_index("ix_kms_migrate_ranges_run_id_done", "kms_migrate_ranges")
    op.drop_table("kms_migrate_ranges")
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.drop_column("max_kms_rps")
        batch.drop_column("ranged")
