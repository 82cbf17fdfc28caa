"""proxy_checks: health check history; proxies.health_failures and next_check_at (issue 13)

Revision ID: 0008_proxy_checks
Revises: 0009_command_uncounted_attempts
Create Date: 2026-12-03 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.models import UTCDateTime

revision: str = "0008_proxy_checks"
down_revision: str | None = "0009_command_uncounted_attempts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("proxies") as batch:
        batch.add_column(
            sa.Column("health_failures", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("next_check_at", UTCDateTime(), nullable=True))
        batch.create_index("ix_proxies_next_check_at", ["next_check_at"])
    # A proxy whose last check failed starts with one failure: flagged only by new ones.
    op.execute(
        "UPDATE proxies SET health_failures = 1 WHERE health_ok IS NOT NULL AND NOT health_ok"
    )
    op.create_table(
        "proxy_checks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "proxy_id",
            sa.Integer(),
            sa.ForeignKey(
                "proxies.id", ondelete="CASCADE", name="fk_proxy_checks_proxy_id_proxies"
            ),
            nullable=False,
        ),
        sa.Column("checked_at", UTCDateTime(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("exit_ip", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_proxy_checks"),
    )
    op.create_index("ix_proxy_checks_history", "proxy_checks", ["proxy_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_proxy_checks_history", table_name="proxy_checks")
    op.drop_table("proxy_checks")
    with op.batch_alter_table("proxies") as batch:
        batch.drop_index("ix_proxies_next_check_at")
        batch.drop_column("next_check_at")
        batch.drop_column("health_failures")
