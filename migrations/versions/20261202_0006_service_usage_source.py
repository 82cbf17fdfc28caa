"""service_usage.source/detail (where an observation came from, the provider's answer) and
services.next_probe_at (when the scheduled probe is due; taken by one runner at a time)

Revision ID: 0006_service_usage_source
Revises: 0008_proxy_checks
Create Date: 2026-12-02 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.models

revision: str = "0006_service_usage_source"
down_revision: str | None = "0008_proxy_checks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("service_usage") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("detail", sa.Text(), nullable=True))
    # Every observation before probes existed came from a run's usage event.
    usage = sa.table("service_usage", sa.column("source", sa.String(16)))
    op.execute(usage.update().values(source="event"))
    with op.batch_alter_table("service_usage") as batch:
        batch.alter_column("source", existing_type=sa.String(length=16), nullable=False)
    with op.batch_alter_table("services") as batch:
        batch.add_column(
            sa.Column("next_probe_at", server.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.drop_column("next_probe_at")
    with op.batch_alter_table("service_usage") as batch:
        batch.drop_column("detail")
        batch.drop_column("source")
