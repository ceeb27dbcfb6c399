"""Every override of Celery's and kombu's internals, and nothing else.

Each module here subclasses or hooks a part of Celery or kombu that is not a public API, so each is written
against one version, pinned in `pyproject.toml` (`celery>=5.7,<5.8`, `kombu[redis]>=5.7,<5.8`), and has a
test of its premises that fails if the pinned library changes what it relies on. `celeryconfig` names them
(as strings, the way Celery loads pools and transports); nothing else of ours imports them but `tasks/`.

| module                  | overrides                                     | why                                                          | written against | premise test |
| ----------------------- | --------------------------------------------- | ------------------------------------------------------------ | --------------- | ------------ |
| `pool`                  | `celery.concurrency.thread.TaskPool.on_apply` | beat tasks on threads of their own; a gate sizes the sends    | Celery 5.7.0    | `tests/test_celery_ext_pool.py`, `tests/test_celery_ext_premises.py` |
| `events`                | the consumer's `EventDispatcher` flush        | task events leave in one batch every 0.25 s                   | Celery 5.7.0    | `tests/test_celery_ext_events.py`, `tests/test_celery_ext_premises.py` |
| `redis_transport`       | `kombu.transport.redis.Channel` client, QoS, `BRPOP` | one command client per channel; batched `BLMPOP` refills | kombu 5.7.0     | `tests/test_celery_ext_redis_transport.py`, `tests/test_celery_ext_premises.py` |
| `filesystem_transport`  | `kombu.transport.filesystem.Channel._put`     | the demo's broker writes each message whole (no torn reads)   | kombu 5.7.0     | `tests/test_celery_ext_filesystem_transport.py`, `tests/test_celery_ext_premises.py` |
"""

WRITTEN_AGAINST = {"celery": "5.7", "kombu": "5.7"}
"""The minor versions these overrides were written against; `tests/test_celery_ext_premises.py` checks that
the installed ones match."""
