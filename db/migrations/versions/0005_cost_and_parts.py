"""What a provider says a message cost and how many parts it counted (smsc.ru's receipts carry both), and
an index that lets the metrics add up the last day's costs and parts without scanning the table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.add_column(sa.Column("cost", sa.Numeric(10, 4)))
        batch.add_column(sa.Column("parts_reported", sa.Integer))
    # Covering: the last hour's and day's cost and parts by provider, from the index alone.
    op.create_index("ix_sms_dispatch_spend", "sms_dispatch",
                    ["accepted_at", "provider", "cost", "parts", "parts_reported"])


def downgrade() -> None:
    op.drop_index("ix_sms_dispatch_spend", "sms_dispatch")
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.drop_column("parts_reported")
        batch.drop_column("cost")
