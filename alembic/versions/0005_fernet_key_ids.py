"""The identifiers of a migrate run's Fernet keys, so that a command with fewer keys
neither joins nor resumes it (it would record every value of the missing key as a
failure). Each identifier is an HMAC-SHA256 under the key of a fixed label, truncated:
it tells keys apart and reveals nothing about them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.add_column(sa.Column("fernet_key_ids", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("kms_migrate_runs") as batch:
        batch.drop_column("fernet_key_ids")
