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
from decimal import Decimal

from sqlalchemy import Boolean, DateTime, Index, Integer, Numeric, String, Text
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
    """States of `sms_dispatch.state`. FINAL ones are never left except by an operator's resend, and an
    `error` the lease sweep set by the send it gave up on, should the provider's acceptance come after all
    (`store.record_accepted`).

    Only `queued` rows have a task in the broker. A row that waits (for its provider's room, a paused
    account, a throttle, a backoff) is `waiting` with a `wait_reason` and a `next_attempt_at`: the dispatch
    tick releases it to the broker when it may be sent, so worker memory and the broker hold at most each
    provider's `SMS_<PROVIDER>_MAX_INFLIGHT` rows whatever the backlog."""

    QUEUED = "queued"            # a send task is in the broker; next_attempt_at: when it counts as lost
    SENDING = "sending"          # a worker holds the lease (token: attempts) until lease_until
    WAITING = "waiting"          # in the database until next_attempt_at, for wait_reason
    ACCEPTED = "accepted"        # the provider took it; asterCC shows success; a report may follow
    DELIVERED = "delivered"      # a report said delivered
    FAILED = "failed"            # cannot be delivered; asterCC failed
    ERROR = "error"              # gave up on a technical failure; asterCC error
    UNCONFIRMED = "unconfirmed"  # accepted, but no report came in time; asterCC keeps success

    FINAL = (DELIVERED, FAILED, ERROR, UNCONFIRMED)
    OPEN = (QUEUED, SENDING, WAITING)
    """Claimed and not yet handed to a provider."""


class WaitReason:
    """Why a `waiting` row waits (`sms_dispatch.wait_reason`); `smsctl status` and the metrics group by it."""

    ROOM = "room"                # its provider already has SMS_<PROVIDER>_MAX_INFLIGHT rows in flight
    PAUSED = "paused"            # its provider's account circuit is open (an account error)
    THROTTLED = "throttled"      # the rate limit, the identical-request rule, or the provider's own 429
    RETRY = "retry"              # backoff after a failure that left the provider without the message
    UNKNOWN = "unknown"          # the last request's answer never came: it may have arrived
    BUSY = "busy"                # the worker had no thread to spare for this provider, or was stopping
    PROBE = "probe"              # (on a queued row) the one send that tests a paused account again
    QUIET = "quiet"              # a campaign row: quiet hours at the recipient's (SMS_QUIET_HOURS) until they end


class Dispatch(Base):
    __tablename__ = "sms_dispatch"

    batchcontact_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    claim_token: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str | None] = mapped_column(String(16))
    recipient: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=DispatchState.WAITING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Sends started; also the lease's fencing token: an outcome is written only by the holder of the
    attempt that is current."""
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
    wait_reason: Mapped[str | None] = mapped_column(String(16))
    due_at: Mapped[datetime | None] = mapped_column(DateTime)
    """When asterCC wanted it sent (its `schedulertime`; the claim time for a zero date)."""
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    """When this send of the row was claimed: the retry windows count from here."""
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    """When the row was last put in the broker after waiting (kept while it is enqueued again)."""
    unknowns: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Sends of this row whose answer never came (the request may have reached the provider)."""
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Sends that failed (the backoff's exponent, and what `error_msg` counts); `attempts` also counts sends
    given back unsent (throttled, paused), and never goes down, because it is the lease's fencing token."""
    routed_provider: Mapped[str | None] = mapped_column(String(16))
    """Where the row was routed first, when its provider was unavailable and it was moved to `provider`, a
    fallback (`SMS_FAILOVER`); NULL when it never moved."""
    cost: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    """What the provider's report said the message cost (smsc.ru's receipts), in the account's currency."""
    parts_reported: Mapped[int | None] = mapped_column(Integer)
    """How many parts the provider's report counted; `parts` is our own count at sending."""
    batch_id: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """asterCC's archive row of this row (`batchcontact_archive_id`): the rows sharing it are one batch, and
    the release takes turns between batches."""
    creby: Mapped[str] = mapped_column(String(50), default="", server_default="")
    """Who created the row in asterCC (`creby`), for the operator's view of campaigns."""
    campaign: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    """Its batch has more than one row (`store.claim_due` decides): quiet hours and opt-outs apply to it."""
    recipient_tz: Mapped[str | None] = mapped_column(String(40))
    """The recipient's time zone (a zoneinfo key) of a campaign row while quiet hours are set, else NULL."""
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_sms_dispatch_claim_token", "claim_token"),
        Index("ix_sms_dispatch_state_updated", "state", "updated_at"),
        Index("ix_sms_dispatch_poll", "provider", "state", "poll_at"),
        Index("ix_sms_dispatch_recipient", "provider", "recipient"),
        Index("ix_sms_dispatch_release", "provider", "state", "due_at"),
        Index("ix_sms_dispatch_accepted", "accepted_at", "provider", "due_at"),
        Index("ix_sms_dispatch_spend", "accepted_at", "provider", "cost", "parts", "parts_reported"),
        Index("ix_sms_dispatch_fair", "provider", "state", "batch_id", "due_at", "next_attempt_at"),
        Index("ix_sms_dispatch_batch", "batch_id", "state"),
        Index("ix_sms_dispatch_zone", "state", "recipient_tz"),
        {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},
    )


class Breaker(Base):
    """One provider's circuit: closed (sending), or open after an account error (or every send failing for
    `SMS_FAILOVER_AFTER_S`) until `open_until`,
    then one probe send (`probe_row`, until `probe_until`) decides whether its waiting rows are released.
    In the database, on its clock, like every other decision of the fleet: a Redis restart does not close
    an open circuit and let a backlog rush at a refusing provider."""

    __tablename__ = "sms_breaker"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(8))           # "open" or "closed"
    reason: Mapped[str | None] = mapped_column(String(255))
    opened_at: Mapped[datetime | None] = mapped_column(DateTime)
    open_until: Mapped[datetime | None] = mapped_column(DateTime)
    probe_row: Mapped[int | None] = mapped_column(Integer)
    probe_until: Mapped[datetime | None] = mapped_column(DateTime)
    trips: Mapped[int] = mapped_column(Integer, default=0)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime)
    """When the provider's current unbroken streak of sends failing on the way there (refused, timeouts,
    5xx) began; NULL after any success. A streak older than `SMS_FAILOVER_AFTER_S` opens the circuit."""
    refused_login: Mapped[str | None] = mapped_column(String(64))
    """While the circuit is open because the provider refused our login: a keyed hash of the credentials it
    refused (`workflow.logins.fingerprint`), never the secret; NULL otherwise. Only the fleet's one probe
    logs in again, or a process whose credentials hash otherwise (changed and restarted)."""
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = ({"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},)


class Meta(Base):
    """Facts about this deployment that must not change silently between starts (name → value)."""

    __tablename__ = "sms_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))

    __table_args__ = ({"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},)


class OptOut(Base):
    """A number that opted out of campaigns by replying one of `SMS_OPTOUT_WORDS` (or an operator added it):
    campaign rows to it end `failed`; single messages still go."""

    __tablename__ = "sms_optout"

    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    """International digits without `+`, as `workflow.routing.normalise` gives them."""
    word: Mapped[str] = mapped_column(String(32))
    """The opt-out word replied (as `SMS_OPTOUT_WORDS` spells it), or `smsctl` when an operator added it."""
    opted_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = ({"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},)


class MessageId(Base):
    __tablename__ = "sms_message_ids"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider_message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batchcontact_id: Mapped[int] = mapped_column(Integer, index=True)

    __table_args__ = ({"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"},)
