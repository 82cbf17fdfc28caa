"""profile_services.rate_limit_policy (a link's override of its service's policy) and
service_spend (runs started per service and token: the gate's own count, issue 13)

Revision ID: 0007_service_policies
Revises: 0005_proxy_routing_rules
Create Date: 2026-12-03 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import server.models

revision: str = "0007_service_policies"
down_revision: str | None = "0005_proxy_routing_rules"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("profile_services") as batch:
        batch.add_column(
            sa.Column(
                "rate_limit_policy", sa.JSON(), nullable=False, server_default=sa.text("'{}'")
            )
        )
    op.create_table(
        "service_spend",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("command_id", sa.Integer(), nullable=True),
        sa.Column("started_at", server.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["service_id"],
            ["services.id"],
            name=op.f("fk_service_spend_service_id_services"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["profiles.id"],
            name=op.f("fk_service_spend_profile_id_profiles"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["command_id"],
            ["commands.id"],
            name=op.f("fk_service_spend_command_id_commands"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_spend")),
    )
    op.create_index(
        "ix_service_spend_lookup",
        "service_spend",
        ["service_id", "profile_id", "started_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_service_spend_profile_id"), "service_spend", ["profile_id"], unique=False
    )
    op.create_index(
        op.f("ix_service_spend_command_id"), "service_spend", ["command_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_service_spend_command_id"), table_name="service_spend")
    op.drop_index(op.f("ix_service_spend_profile_id"), table_name="service_spend")
    op.drop_index("ix_service_spend_lookup", table_name="service_spend")
    op.drop_table("service_spend")
    with op.batch_alter_table("profile_services") as batch:
        batch.drop_column("rate_limit_policy")
