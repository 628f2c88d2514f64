"""Boot id next to host and pid: a holder is "on this host" only on this very boot.

Containers on different machines can share a hostname; a pid checked on the wrong
kernel says nothing. The lock and worker rows record the kernel's boot id
(/proc/sys/kernel/random/boot_id); NULL (rows written before this revision, or a system
without one) is never taken for this host.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kms_migrate_lock") as batch:
        batch.add_column(sa.Column("boot_id", sa.String(64)))
    with op.batch_alter_table("kms_migrate_workers") as batch:
        batch.add_column(sa.Column("boot_id", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("kms_migrate_workers") as batch:
        batch.drop_column("boot_id")
    with op.batch_alter_table("kms_migrate_lock") as batch:
        batch.drop_column("boot_id")
