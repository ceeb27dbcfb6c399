"""What a worker or beat checks before it starts: a provider and its credentials, settings each provider's
client refuses (a sender name too long, say), this host's clock against the database's, and the Mobilgroup
id prefix this database's requests were sent with. A bad one stops the process with a message naming it,
instead of failing message by message later."""
from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from db import store
from db.engine import engine_for
from settings import ConfigError, Settings
from workflow.runtime import build_client

log = logging.getLogger(__name__)

CLOCK_WARN_S = 2.0


def check(settings: Settings) -> Settings:
    """Raise `ConfigError` for what stops the start; returns `settings`."""
    settings.require_sending()
    for provider in sorted(settings.providers_in_use):
        try:
            build_client(provider, settings).close()  # constructors validate; nothing is sent
        except ValueError as exc:
            raise ConfigError(f"{provider}: {exc}") from None
    check_database(settings)
    return settings


def check_database(settings: Settings) -> None:
    """The clock comparison and the Mobilgroup id prefix; a database not reachable yet is only warned about
    (the process must come up and wait for it, not crash-loop)."""
    engine = engine_for(settings.database_url)
    try:
        offset = store.db_clock_offset_s(engine)
        if abs(offset) > CLOCK_WARN_S:
            log.warning("this host's clock is %+.1f s off the database's: due times, leases and retries follow "
                        "the database's clock, but logs and Flower show this host's; run NTP", offset)
        if settings.uses_id_prefix:
            recorded = store.remember(engine, "mobilgroup_id_prefix", settings.mobilgroup_id_prefix)
            if recorded != settings.mobilgroup_id_prefix:
                raise ConfigError(
                    f"SMS_MOBILGROUP_ID_PREFIX is {settings.mobilgroup_id_prefix!r} but this database's Mobilgroup "
                    f"requests were sent with {recorded!r}: a change would make a retry look like a new message "
                    "and status polls ask for the wrong ids; set it back (or change sms_meta by hand when no "
                    "Mobilgroup row is in flight)")
    except SQLAlchemyError as exc:
        log.warning("could not check the database at start-up (%s); going on", type(exc).__name__)
