"""The Celery application, configured from `celeryconfig` (itself from the environment).

Start-up validates the settings: a worker or beat with a missing provider, missing credentials or a
provider setting its client refuses (a sender name too long, say) stops at once with a message naming the
problem, instead of failing message by message later.
"""
import logging

from celery import Celery, signals

from settings import ConfigError, get_settings
from worker_events import BatchedTaskEvents

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
    except ConfigError as exc:
        logging.getLogger("tasks").critical("cannot start: %s", exc)
        raise SystemExit(f"cannot start: {exc}") from None
    for warning in settings.startup_warnings():
        logging.getLogger("tasks").warning("%s", warning)


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
