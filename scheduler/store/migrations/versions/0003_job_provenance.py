"""A job's provenance: the version and content hash of its service.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("service_version", "service_hash")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.add_column(
                sa.Column(column, sa.String(length=64), nullable=False, server_default="")
            )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.drop_column(column)
