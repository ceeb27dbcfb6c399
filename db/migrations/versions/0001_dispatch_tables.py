"""Our own tables: the dispatch record per asterCC row, and the provider's message ids.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE_OPTS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    op.create_table(
        "sms_dispatch",
        sa.Column("batchcontact_id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("claim_token", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(16)),
        sa.Column("recipient", sa.String(32)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("parts", sa.Integer, nullable=False),
        sa.Column("provider_message_id", sa.String(255)),
        sa.Column("last_error", sa.String(255)),
        sa.Column("first_attempt_at", sa.DateTime),
        sa.Column("next_attempt_at", sa.DateTime),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("accepted_at", sa.DateTime),
        sa.Column("poll_at", sa.DateTime),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        **TABLE_OPTS,
    )
    op.create_index("ix_sms_dispatch_claim_token", "sms_dispatch", ["claim_token"])
    op.create_index("ix_sms_dispatch_state_updated", "sms_dispatch", ["state", "updated_at"])
    op.create_index("ix_sms_dispatch_poll", "sms_dispatch", ["provider", "state", "poll_at"])
    op.create_index("ix_sms_dispatch_recipient", "sms_dispatch", ["provider", "recipient"])
    op.create_table(
        "sms_message_ids",
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("provider_message_id", sa.String(64), primary_key=True),
        sa.Column("batchcontact_id", sa.Integer, nullable=False),
        **TABLE_OPTS,
    )
    op.create_index("ix_sms_message_ids_batchcontact_id", "sms_message_ids", ["batchcontact_id"])


def downgrade() -> None:
    op.drop_table("sms_message_ids")
    op.drop_table("sms_dispatch")
