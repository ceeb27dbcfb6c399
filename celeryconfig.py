"""Every Celery setting of the dispatcher: broker, queues and routes, beat schedule, acks, prefetch, events.

Values come from `settings` (the environment) and the provider registry (each provider's queue); the
overrides of Celery's internals are named from `celery_ext`. Queues: `dispatch` for the housekeeping beat tasks, and one `send.<provider>`
queue per provider so that a slow or paused provider never holds up the others and each can get its own
workers (`celery -A tasks worker -Q send.smsc`).
"""
from celery.schedules import schedule
from kombu import Queue

from celery_ext.redis_transport import transport_for
from providers.registry import POLLED, REGISTRY
from settings import VAR_DIR, get_settings

_s = get_settings()

DISPATCH_QUEUE = "dispatch"
SEND_QUEUES = {name: entry.queue for name, entry in REGISTRY.items()}

broker_url = _s.broker_url
if broker_url.startswith("filesystem://"):
    _folder = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_folder / _sub).mkdir(parents=True, exist_ok=True)
    broker_transport_options = {
        "data_folder_in": str(_folder / "queue"),
        "data_folder_out": str(_folder / "queue"),
        "control_folder": str(_folder / "control"),
        "processed_folder": str(_folder / "processed"),
        "store_processed": False,
    }
    broker_transport = "celery_ext.filesystem_transport:Transport"  # kombu's, without its torn reads
else:
    # No copy of each delivered message in Redis until it is acknowledged (kombu's ack emulation): it cost
    # two Redis round trips per message, about a fifth of a busy worker's CPU (bench/e2e.py), and duplicates
    # what the database already knows. A worker that stops cleanly still puts back what it held; what a killed
    # worker held is taken up again from the database: sends by the reaper (`SMS_REQUEUE_AFTER_S`), status
    # polls when their lease ends, beat's tasks at their next tick.
    #
    # Timeouts: a Redis that stops answering (a dropped link, a host that swallows packets) must not hold the
    # worker for minutes; 10 s is well above the consumer's 1 s blocking pop.
    broker_transport_options = {"ack_emulation": False, "global_keyprefix": _s.redis_prefix,
                                "socket_timeout": 10, "socket_connect_timeout": 5, "socket_keepalive": True,
                                "health_check_interval": 25}
    broker_transport = transport_for(broker_url)
broker_connection_retry_on_startup = True
# Reconnect for as long as it takes (Celery's default gives up after 100 tries and stops the worker): what
# the broker lost meanwhile is enqueued again from the database (`SMS_LOST_TASK_S`).
broker_connection_max_retries = None

task_queues = [Queue(DISPATCH_QUEUE)] + [Queue(q) for q in SEND_QUEUES.values()]
task_default_queue = DISPATCH_QUEUE
task_routes = {
    "sms.dispatch": {"queue": DISPATCH_QUEUE},
    "sms.poll_due": {"queue": DISPATCH_QUEUE},
    "sms.reap": {"queue": DISPATCH_QUEUE},
    "sms.poll": {"queue": SEND_QUEUES[POLLED]},
    # sms.send is routed per message to its provider's queue by the dispatcher.
}

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# A task is acknowledged only after it ran, and given back if the pool process running it dies (the worker
# itself killed: see broker_transport_options above); the send task's compare-and-set on the dispatch record
# makes the redelivery harmless.
task_acks_late = True
task_reject_on_worker_lost = True
# The plain `celery -A tasks worker` is the deployment that serves the providers well: a send mostly waits for
# the provider's answer, so threads (64 sends in flight in one process; the database and HTTP pools are sized
# for it, and smsc.ru's SMPP session is shared by a process's threads). Prefork with a process per core sent
# 16 msg/s to a provider answering in 200 ms. Each provider may hold only its share of the threads
# (`SMS_<PROVIDER>_THREADS`), so one that hangs cannot take the whole worker. `celery_ext.pool` runs the beat tasks
# on threads of their own, never behind the sends, and lets only as many sends run at once as the providers'
# answers call for: against a provider that answers at once, 64 running threads cost more CPU than 16.
# Celery reads `-P prefork` as no choice and runs this pool instead: ask for prefork with `-P processes`.
worker_pool = "celery_ext.pool:TaskPool"
worker_concurrency = 64
# A worker holds at most two messages per pool slot, and asks for more once it holds one or fewer per slot
# (`celery_ext.redis_transport`: the refill then comes in one batch): every slot stays busy while a backlog lasts, and a
# backlog still spreads over every worker instead of piling up in one worker's prefetch.
worker_prefetch_multiplier = 2
worker_max_tasks_per_child = 10_000

# Events on, so Flower shows every task by its readable name (arguments are row ids only).
# Flower follows each task from its task-received event on. The task-sent event would add a "pending" state
# before that, at the cost of a second publish per message in the dispatch task (0.2–0.3 ms of CPU per
# message, about as much as publishing the task itself: bench/celery_floor.py). A worker sends its task events
# in batches, every quarter of a second (`celery_ext.events`).
worker_send_task_events = True
task_send_sent_event = False

timezone = "UTC"
enable_utc = True
worker_hijack_root_logger = True
worker_redirect_stdouts = False

beat_schedule_filename = str(VAR_DIR / "celerybeat-schedule")
beat_schedule = {
    # Relative: dispatch ticks fall on whole seconds of the clock, right after asterCC's rows fall due
    # (their times have one-second resolution). A tick at an arbitrary phase made a due row wait up to that
    # fraction of a second longer, every time (bench/e2e.py, light load).
    # No `expires` on any of them: beat would stamp it by its own clock and the worker check it by its own,
    # and a worker whose clock ran a few seconds ahead discarded every tick. A backlog of ticks (a worker
    # that was down) costs little: `tasks.jobs` runs one per half interval and drops the rest.
    "dispatch-due-rows": {"task": "sms.dispatch",
                          "schedule": schedule(_s.dispatch_interval_s, relative=_s.dispatch_interval_s >= 1)},
    "poll-mobilgroup-status": {"task": "sms.poll_due", "schedule": _s.mobilgroup_poll_interval_s},
    "reap-stuck-rows": {"task": "sms.reap", "schedule": _s.reap_interval_s},
}
