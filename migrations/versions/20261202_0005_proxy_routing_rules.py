"""proxies.routing_rules: ordered routing rules per proxy; existing proxies keep the block list

Revision ID: 0005_proxy_routing_rules
Revises: 0004_audit_filters
Create Date: 2026-12-02 08:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_proxy_routing_rules"
down_revision: str | None = "0004_audit_filters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The block list every sidecar had before rules existed (frozen here: a migration must not
# change when the code's default does).
BACKGROUND_DOMAINS = [
    "domain:accounts.google.com",
    "domain:update.googleapis.com",
    "domain:clients1.google.com",
    "domain:clients2.google.com",
    "domain:clients4.google.com",
    "domain:clients2.googleusercontent.com",
    "domain:gvt1.com",
    "domain:gvt2.com",
    "domain:gstatic.com",
    "domain:safebrowsing.googleapis.com",
    "domain:safebrowsingohttpgateway.googleapis.com",
    "domain:optimizationguide-pa.googleapis.com",
    "domain:content-autofill.googleapis.com",
    "domain:clientservices.googleapis.com",
    "domain:passwordsleakcheck-pa.googleapis.com",
    "domain:chromewebstore.googleapis.com",
    "domain:android.clients.google.com",
]


def upgrade() -> None:
    with op.batch_alter_table("proxies") as batch:
        batch.add_column(sa.Column("routing_rules", sa.JSON(), nullable=True))
    proxies = sa.table("proxies", sa.column("routing_rules", sa.JSON()))
    rule = {
        "domains": BACKGROUND_DOMAINS,
        "ips": [],
        "ports": None,
        "network": None,
        "via_proxy_id": None,
    }
    op.execute(proxies.update().values(routing_rules=[{**rule, "action": "BLOCK"}]))
    with op.batch_alter_table("proxies") as batch:
        batch.alter_column("routing_rules", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("proxies") as batch:
        batch.drop_column("routing_rules")
