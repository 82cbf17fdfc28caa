"""runners.drain_requested_at: an admin (`corral runner --drain`) or a signal asked the
runner to drain: stop claiming, let its commands finish up to its deadline, then stop.

Revision ID: 0011_drain
Revises: 0010_runners
Create Date: 2026-12-02 14:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.models import UTCDateTime

revision: str = "0011_drain"
down_revision: str | None = "0010_runners"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.add_column(sa.Column("drain_requested_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runners") as batch:
        batch.drop_column("drain_requested_at")
