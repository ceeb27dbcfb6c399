"""Failover and the operator's view: which provider a row was routed to first (`routed_provider`, set when
its rows were moved to a fallback), when a provider's unbroken streak of failed sends began
(`sms_breaker.failing_since`), and an index that lets the metrics read the last hour's sends without
scanning the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.add_column(sa.Column("routed_provider", sa.String(16)))
    with op.batch_alter_table("sms_breaker") as batch:
        batch.add_column(sa.Column("failing_since", sa.DateTime))
    # Covering: the sends of the last hour by provider, and their delay since due, from the index alone.
    op.create_index("ix_sms_dispatch_accepted", "sms_dispatch", ["accepted_at", "provider", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_sms_dispatch_accepted", "sms_dispatch")
    with op.batch_alter_table("sms_breaker") as batch:
        batch.drop_column("failing_since")
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.drop_column("routed_provider")
