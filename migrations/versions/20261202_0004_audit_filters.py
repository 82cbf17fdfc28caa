"""audit_events: indexes for reading the log by actor, action or outcome, newest first

Revision ID: 0004_audit_filters
Revises: 0003_access_control
Create Date: 2026-12-02 07:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_audit_filters"
down_revision: str | None = "0003_access_control"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # (actor, id) serves what (actor) did, and the newest-first order too.
    op.drop_index("ix_audit_events_actor", table_name="audit_events")
    op.create_index("ix_audit_events_actor_id", "audit_events", ["actor", "id"])
    op.create_index("ix_audit_events_action_id", "audit_events", ["action", "id"])
    op.create_index("ix_audit_events_outcome_id", "audit_events", ["outcome", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_outcome_id", table_name="audit_events")
    op.drop_index("ix_audit_events_action_id", table_name="audit_events")
    op.drop_index("ix_audit_events_actor_id", table_name="audit_events")
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])
