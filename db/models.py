"""SQLAlchemy models: asterCC's two tables (as asterCC has them) and our own dispatch tables.

asterCC owns `cc10_batchcontacts` and `cc10_batchcontact_archives`; we read them and write only `status`,
`contacttime`, `error_msg` and `responsenote`. They may be MyISAM (no transactions, no row locks), hold zero
dates (`0000-00-00 00:00:00`, which mysqlclient returns as None) and empty strings rather than NULLs, so
nothing here relies on their indexes, keys or transactions.

Our own tables live in the same database, are InnoDB where the server has it, and are created by Alembic
(`smsctl db upgrade`): `sms_dispatch`, one record per asterCC row we took, whose primary key on the row id
is what makes a claim unique; `sms_message_ids`, the provider's ids of each message (one per SMPP part),
for delivery reports that name only those.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# asterCC's columns are varchar(255) in its sibling asterCRM; longer values are cut to fit.
ERROR_MSG_MAX = 255
RESPONSENOTE_MAX = 255


class AsterccBase(DeclarativeBase):
    """asterCC's tables: never created by migrations, only by `smsctl db create-astercc` for development."""


class Base(DeclarativeBase):
    """Our own tables, managed by Alembic."""


class BatchContactArchive(AsterccBase):
    __tablename__ = "cc10_batchcontact_archives"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    archivetype: Mapped[str] = mapped_column(String(30), default="sms")
    content: Mapped[str] = mapped_column(Text, default="")


class BatchContact(AsterccBase):
    __tablename__ = "cc10_batchcontacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batchcontact_archive_id: Mapped[int] = mapped_column(Integer, default=0)
    target: Mapped[str] = mapped_column(String(50), default="")
    status: Mapped[str] = mapped_column(String(30), default="new")
    schedulertime: Mapped[datetime | None] = mapped_column(DateTime)
    contacttime: Mapped[datetime | None] = mapped_column(DateTime)
    creby: Mapped[str] = mapped_column(String(50), default="")
    created: Mapped[datetime | None] = mapped_column(DateTime)
    error_msg: Mapped[str] = mapped_column(String(ERROR_MSG_MAX), default="")
    responsenote: Mapped[str] = mapped_column(String(RESPONSENOTE_MAX), default="")


class DispatchState:
    """States of `sms_dispatch.state`. FINAL ones are never left except by an operator's resend."""

    QUEUED = "queued"            # claimed, a send task is (or should be) in the broker
    SENDING = "sending"          # a worker holds the lease until lease_until
    RETRY = "retry"              # waiting until next_attempt_at (backoff, throttle, paused account)
    ACCEPTED = "accepted"        # the provider took it; asterCC shows success; a report may follow
    DELIVERED = "delivered"      # a report said delivered
    FAILED = "failed"            # cannot be delivered; asterCC failed
    ERROR = "error"              # gave up on a technical failure; asterCC error
    UNCONFIRMED = "unconfirmed"  # accepted, but no report came in time; asterCC keeps success

    FINAL = (DELIVERED, FAILED, ERROR, UNCONFIRMED)
    SENDABLE = (QUEUED, RETRY)


class Dispatch(Base):
    __tablename__ = "sms_dispatch"

    batchcontact_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    claim_token: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str | None] = mapped_column(String(16))
    recipient: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=DispatchState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    parts: Mapped[int] = mapped_column(Integer, default=1)
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    last_error: Mapped[str | None] = mapped_column(String(255))
    first_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime)
    poll_at: Mapped[datetime | None] = mapped_column(DateTime)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How often an operator sent this row again (set it back to `new` after it was final)."""
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_sms_dispatch_claim_token", "claim_token"),
        Index("ix_sms_dispatch_state_updated", "state", "updated_at"),
        Index("ix_sms_dispatch_poll", "provider", "state", "poll_at"),
        Index("ix_sms_dispatch_recipient", "provider", "recipient"),
        {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},
    )


class MessageId(Base):
    __tablename__ = "sms_message_ids"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider_message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batchcontact_id: Mapped[int] = mapped_column(Integer, index=True)

    __table_args__ = ({"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},)
