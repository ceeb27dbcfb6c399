"""The credentials a provider refused, as a keyed hash, in its circuit: while it is set, only one probe of
the fleet tries a login, at the slow pace of refused logins, unless a process has other credentials.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sms_breaker") as batch:
        batch.add_column(sa.Column("refused_login", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("sms_breaker") as batch:
        batch.drop_column("refused_login")
