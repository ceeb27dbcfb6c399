"""The Celery application, configured from `celeryconfig` (itself from the environment).

Start-up validates the settings: a worker or beat with a missing provider or credentials stops at once
with a message naming the variable, instead of failing message by message later.
"""
import logging

from celery import Celery, signals

from settings import ConfigError, get_settings

app = Celery("tasks", include=["tasks.jobs"])
app.config_from_object("celeryconfig")


@signals.worker_init.connect
@signals.beat_init.connect
def _check_settings(**_):
    try:
        get_settings().require_sending()
    except ConfigError as exc:
        logging.getLogger("tasks").critical("cannot start: %s", exc)
        raise SystemExit(f"cannot start: {exc}") from None
