"""The Celery application, configured from `celeryconfig` (itself from the environment).

Start-up validates the settings: a worker or beat with a missing provider, missing credentials or a
provider setting its client refuses (a sender name too long, say) stops at once with a message naming the
problem, instead of failing message by message later. It also compares this host's clock with the
database's (a warning past `CLOCK_WARN_S`) and checks that `SMS_MOBILGROUP_ID_PREFIX` is the one this
database's Mobilgroup sends were made with. A worker that is told to stop (SIGTERM) starts no new provider
call: what it still holds is handed back to wait in the database.
"""
import logging

from sqlalchemy.exc import SQLAlchemyError

from celery import Celery, signals

from settings import ConfigError, get_settings
from celery_ext.events import BatchedTaskEvents

app = Celery("tasks", include=["tasks.jobs"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(BatchedTaskEvents)


@signals.worker_init.connect
@signals.beat_init.connect
def _check_settings(**_):
    from tasks.runtime import build_client

    try:
        settings = get_settings()
        settings.require_sending()
        for provider in sorted(settings.providers_in_use):
            try:
                build_client(provider, settings).close()  # constructors validate; nothing is sent
            except ValueError as exc:
                raise ConfigError(f"{provider}: {exc}") from None
        _check_database(settings)
    except ConfigError as exc:
        logging.getLogger("tasks").critical("cannot start: %s", exc)
        raise SystemExit(f"cannot start: {exc}") from None
    for warning in settings.startup_warnings():
        logging.getLogger("tasks").warning("%s", warning)


CLOCK_WARN_S = 2.0


def _check_database(settings) -> None:
    """The clock comparison and the Mobilgroup id prefix; a database not reachable yet is only warned about
    (the process must come up and wait for it, not crash-loop)."""
    from db import store
    from db.engine import engine_for

    log = logging.getLogger("tasks")
    engine = engine_for(settings.database_url)
    try:
        offset = store.db_clock_offset_s(engine)
        if abs(offset) > CLOCK_WARN_S:
            log.warning("this host's clock is %+.1f s off the database's: due times, leases and retries follow "
                        "the database's clock, but logs and Flower show this host's; run NTP", offset)
        if "mobilgroup" in settings.providers_in_use:
            recorded = store.remember(engine, "mobilgroup_id_prefix", settings.mobilgroup_id_prefix)
            if recorded != settings.mobilgroup_id_prefix:
                raise ConfigError(
                    f"SMS_MOBILGROUP_ID_PREFIX is {settings.mobilgroup_id_prefix!r} but this database's Mobilgroup "
                    f"requests were sent with {recorded!r}: a change would make a retry look like a new message "
                    "and status polls ask for the wrong ids; set it back (or change sms_meta by hand when no "
                    "Mobilgroup row is in flight)")
    except SQLAlchemyError as exc:
        log.warning("could not check the database at start-up (%s); going on", type(exc).__name__)


@signals.celeryd_after_setup.connect
def _note_worker_shape(sender, instance, **_):
    """Each provider's share of the threads depends on the worker's size and on how many of the providers
    in use it serves (`Settings.threads_for`)."""
    from tasks.runtime import runtime

    rt = runtime()
    rt.concurrency = instance.concurrency
    queues = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    # Only the providers this deployment sends through: a queue no row is routed to takes no threads.
    in_use = {f"send.{provider}" for provider in rt.settings.providers_in_use}
    rt.providers_served = max(1, sum(1 for q in queues if str(q) in in_use))


@signals.worker_shutting_down.connect
def _stop_sending(**_):
    from tasks.runtime import runtime

    runtime().stopping.set()


@signals.worker_process_init.connect
def _warm_up(**_):
    """Build this pool process's provider clients, throttle and DB pool before its first task, so the
    first send's set-up cost does not land between its rate-limit slot and its arrival at the provider."""
    from tasks.runtime import runtime

    rt = runtime()
    try:
        for provider in sorted(rt.settings.providers_in_use):
            rt.client(provider)
        rt.throttle  # noqa: B018 - built on first access
        with rt.engine.connect():
            pass
    except Exception as exc:  # only an optimisation: the first task builds what is missing, or retries
        logging.getLogger("tasks").warning("warm-up incomplete: %s", type(exc).__name__)
