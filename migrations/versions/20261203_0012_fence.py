"""commands.fence: the attempt's fence token, raised by every claim and recovery (issue 14)

A runner's writes for an attempt (lines, command values, events, lease renewals) carry the
token it claimed the attempt with, and are refused once the row holds another.

Revision ID: 0012_fence
Revises: 0011_drain
Create Date: 2026-12-03 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_fence"
down_revision: str | None = "0011_drain"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(sa.Column("fence", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("fence")
