"""Waiting rows live in the database: a wait reason and the times the windows and the backlog order need;
the fencing count of unknown outcomes; each provider's account circuit; deployment facts.

Rows that were `retry` (a Celery countdown task held them) become `waiting` with reason `retry`: the next
dispatch tick releases them, and a task still in a worker's memory for one finds it not queued and does
nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE_OPTS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def upgrade() -> None:
    with op.batch_alter_table("sms_dispatch") as batch:
        batch.add_column(sa.Column("wait_reason", sa.String(16)))
        batch.add_column(sa.Column("due_at", sa.DateTime))
        batch.add_column(sa.Column("claimed_at", sa.DateTime))
        batch.add_column(sa.Column("queued_at", sa.DateTime))
        batch.add_column(sa.Column("unknowns", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_sms_dispatch_release", "sms_dispatch", ["provider", "state", "due_at"])
    op.execute("UPDATE sms_dispatch SET due_at = created_at, claimed_at = created_at, failures = attempts")
    op.execute("UPDATE sms_dispatch SET state = 'waiting', wait_reason = 'retry' WHERE state = 'retry'")
    op.create_table(
        "sms_breaker",
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(255)),
        sa.Column("opened_at", sa.DateTime),
        sa.Column("open_until", sa.DateTime),
        sa.Column("probe_row", sa.Integer),
        sa.Column("probe_until", sa.DateTime),
        sa.Column("trips", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        **TABLE_OPTS,
    )
    op.create_table(
        "sms_meta",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
        **TABLE_OPTS,
    )


def downgrade() -> None:
    op.drop_table("sms_meta")
    op.drop_table("sms_breaker")
    op.execute("UPDATE sms_dispatch SET state = 'retry' WHERE state = 'waiting'")
    op.drop_index("ix_sms_dispatch_release", "sms_dispatch")
    with op.batch_alter_table("sms_dispatch") as batch:
        for column in ("failures", "unknowns", "queued_at", "claimed_at", "due_at", "wait_reason"):
            batch.drop_column(column)
