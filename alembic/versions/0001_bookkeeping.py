"""Bookkeeping tables: runs, checkpoints, journal, failures.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kms_migrate_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(2048)),
        sa.Column("key_arn", sa.String(2048)),
        sa.Column("region", sa.String(64)),
        sa.Column("targets_json", sa.Text, nullable=False),
        sa.Column("targets_fingerprint", sa.String(64), nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("tool_version", sa.String(32)),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("note", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_runs"),
    )
    op.create_table(
        "kms_migrate_checkpoints",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("last_pk", sa.Text),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("batches", sa.Integer, nullable=False),
        sa.Column("migrated", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("already", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("conflicts", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "run_id", "table_name", "column_name", name="pk_kms_migrate_checkpoints"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["kms_migrate_runs.id"],
            name="fk_kms_migrate_checkpoints_run_id_kms_migrate_runs",
        ),
    )
    op.create_table(
        "kms_migrate_journal",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("pk", sa.Text, nullable=False),
        sa.Column("original", sa.Text, nullable=False),
        sa.Column("migrated", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("migrated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rollback_run_id", sa.Integer),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_journal"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["kms_migrate_runs.id"],
            name="fk_kms_migrate_journal_run_id_kms_migrate_runs",
        ),
        sa.ForeignKeyConstraint(
            ["rollback_run_id"], ["kms_migrate_runs.id"],
            name="fk_kms_migrate_journal_rollback_run_id_kms_migrate_runs",
        ),
    )
    op.create_index(
        "ix_kms_migrate_journal_table_name_column_name_status_id",
        "kms_migrate_journal",
        ["table_name", "column_name", "status", "id"],
    )
    op.create_table(
        "kms_migrate_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        sa.Column("pk", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_kms_migrate_failures"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["kms_migrate_runs.id"],
            name="fk_kms_migrate_failures_run_id_kms_migrate_runs",
        ),
    )
    op.create_index("ix_kms_migrate_failures_run_id", "kms_migrate_failures", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_kms_migrate_failures_run_id", "kms_migrate_failures")
    op.drop_table("kms_migrate_failures")
    op.drop_index("ix_kms_migrate_journal_table_name_column_name_status_id", "kms_migrate_journal")
    op.drop_table("kms_migrate_journal")
    op.drop_table("kms_migrate_checkpoints")
    op.drop_table("kms_migrate_runs")
