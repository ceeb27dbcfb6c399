"""Campaigns: each dispatch record knows its batch (asterCC's archive row), who created it and whether it
is a campaign row; the recipient's time zone for quiet hours; the numbers that opted out by reply.

`ix_sms_dispatch_fair` lets the release read a provider's waiting rows batch by batch, oldest due first,
from the index alone; `ix_sms_dispatch_batch` the campaigns in progress; `ix_sms_dispatch_zone` the time
zones of the waiting rows (quiet hours). Rows claimed before this migration get batch 0 (one batch for
all of them: asterCC's tables are not read here, they need not exist yet) and count as single messages.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.add_column(sa.Column("batch_id", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("creby", sa.String(50), nullable=False, server_default=""))
        batch.add_column(sa.Column("campaign", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("recipient_tz", sa.String(40)))
    op.create_index("ix_sms_dispatch_fair", "sms_dispatch",
                    ["provider", "state", "batch_id", "due_at", "next_attempt_at"])
    op.create_index("ix_sms_dispatch_batch", "sms_dispatch", ["batch_id", "state"])
    op.create_index("ix_sms_dispatch_zone", "sms_dispatch", ["state", "recipient_tz"])
    op.create_table(
        "sms_optout",
        sa.Column("number", sa.String(32), primary_key=True),
        sa.Column("word", sa.String(32), nullable=False),
        sa.Column("opted_at", sa.DateTime, nullable=False),
        mysql_engine="InnoDB", mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("sms_optout")
    op.drop_index("ix_sms_dispatch_zone", "sms_dispatch")
    op.drop_index("ix_sms_dispatch_batch", "sms_dispatch")
    op.drop_index("ix_sms_dispatch_fair", "sms_dispatch")
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.drop_column("recipient_tz")
        batch.drop_column("campaign")
        batch.drop_column("creby")
        batch.drop_column("batch_id")
