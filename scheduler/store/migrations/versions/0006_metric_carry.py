"""What prune deleted, carried as metric samples so counters never drop.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 17:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "metric_carry",
        sa.Column("sample", sa.String(length=128), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("sample", "labels"),
    )


def downgrade() -> None:
    op.drop_table("metric_carry")
