"""commands.uncounted_attempts, runner_losses: attempts not held against maxAttempts

A runner shutdown used to raise a command's max_attempts by one to give the interrupted
attempt back, which changed what the user had asked for; now the attempt is counted apart.

Revision ID: 0009_command_uncounted_attempts
Revises: 0007_service_policies
Create Date: 2026-12-02 10:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_command_uncounted_attempts"
down_revision: str | None = "0007_service_policies"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.add_column(
            sa.Column("uncounted_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("runner_losses", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("runner_losses")
        batch.drop_column("uncounted_attempts")
