"""The Celery application, configured from `celeryconfig` (itself from the environment).

A worker or beat runs `workflow.startup.check` before it starts (a missing provider, missing credentials, a
setting a client refuses, the Mobilgroup id prefix, the clock) and stops with its message. A worker that is told to stop (SIGTERM) starts no new provider
call: what it still holds is handed back to wait in the database.
"""
import logging

from celery import Celery, signals

from celery_ext import pool
from celery_ext.events import BatchedTaskEvents
from providers import registry
from settings import ConfigError, get_settings
from workflow import startup
from workflow.runtime import runtime

log = logging.getLogger("tasks")

app = Celery("tasks", include=["tasks.jobs"])
app.config_from_object("celeryconfig")
app.steps["consumer"].add(BatchedTaskEvents)


@signals.worker_init.connect
@signals.beat_init.connect
def _check_settings(**_):
    try:
        settings = startup.check(get_settings())
    except ConfigError as exc:
        log.critical("cannot start: %s", exc)
        raise SystemExit(f"cannot start: {exc}") from None
    for warning in settings.startup_warnings():
        log.warning("%s", warning)


@signals.celeryd_after_setup.connect
def _note_worker_shape(sender, instance, **_):
    """Each provider's share of the threads depends on the worker's size and on how many of the providers
    in use it serves (`Settings.threads_for`)."""
    rt = runtime()
    rt.concurrency = instance.concurrency
    rt.waiting = pool.waiting
    queues = set(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    # Only the providers this deployment sends through: a queue no row is routed to takes no threads.
    in_use = {registry.entry(provider).queue for provider in rt.settings.providers_in_use}
    rt.providers_served = max(1, sum(1 for q in queues if str(q) in in_use))


@signals.worker_shutting_down.connect
def _stop_sending(**_):
    runtime().stopping.set()


@signals.worker_process_init.connect
def _warm_up(**_):
    """Build this pool process's provider clients, throttle and DB pool before its first task, so the
    first send's set-up cost does not land between its rate-limit slot and its arrival at the provider."""
    rt = runtime()
    try:
        for provider in sorted(rt.settings.providers_in_use):
            rt.client(provider)
        rt.throttle  # noqa: B018 - built on first access
        with rt.engine.connect():
            pass
    except Exception as exc:  # only an optimisation: the first task builds what is missing, or retries
        logging.getLogger("tasks").warning("warm-up incomplete: %s", type(exc).__name__)
