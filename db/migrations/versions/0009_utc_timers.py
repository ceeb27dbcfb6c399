"""Our own times move to UTC (`UTC_TIMESTAMP()`), asterCC's stay local: the records written before, in the
server's local time, are shifted by the offset the server keeps now. On a server that keeps UTC (the offset
is zero) nothing changes. Records emptied by retention keep their mark (1970-01-02).

Revision ID: 0009
Revises: 0005
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = {
    "sms_dispatch": ("first_attempt_at", "next_attempt_at", "lease_until", "accepted_at", "poll_at", "due_at",
                     "claimed_at", "queued_at", "created_at", "updated_at"),
    "sms_breaker": ("opened_at", "open_until", "probe_until", "failing_since", "updated_at"),
}
EMPTIED_MARK = "1970-01-02 00:00:00"


def _local_minus_utc_s(bind) -> int:
    if bind.dialect.name == "sqlite":
        return bind.scalar(sa.text("SELECT CAST(strftime('%s', 'now', 'localtime') AS INTEGER)"
                                   " - CAST(strftime('%s', 'now') AS INTEGER)"))
    return bind.scalar(sa.text("SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())"))


def _shift(seconds: int) -> None:
    bind = op.get_bind()
    if not seconds:
        return
    for table, columns in COLUMNS.items():
        for column in columns:
            if bind.dialect.name == "sqlite":
                moved = f"datetime({column}, '{seconds:+d} seconds')"
            else:
                moved = f"{column} + INTERVAL {seconds:d} SECOND"
            op.execute(f"UPDATE {table} SET {column} = {moved}"
                       f" WHERE {column} IS NOT NULL AND {column} > '{EMPTIED_MARK}'")


def upgrade() -> None:
    _shift(-_local_minus_utc_s(op.get_bind()))


def downgrade() -> None:
    _shift(_local_minus_utc_s(op.get_bind()))
