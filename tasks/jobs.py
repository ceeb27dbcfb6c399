"""The Celery tasks: each one a thin wrapper over `workflow`, taking and passing row ids only.

| task            | started by          | does                                                        |
| --------------- | ------------------- | ----------------------------------------------------------- |
| `sms.dispatch`  | beat                | claims due rows, releases each provider's ready rows        |
| `sms.send`      | dispatch            | sends one row through its provider                          |
| `sms.poll_due`  | beat                | enqueues `sms.poll` for Mobilgroup rows past their lifetime |
| `sms.poll`      | poll_due            | asks Mobilgroup for one row's status                        |
| `sms.reap`      | beat                | routes rows of interrupted claims, closes unreported ones   |
"""
from __future__ import annotations

import time

from celery.utils import uuid
from celery.utils.log import get_task_logger

import workflow
from providers import registry
from tasks.app import app
from workflow.runtime import runtime

log = get_task_logger(__name__)


class RetryLater(Exception):
    """Why a send runs again (the database could not be reached); Flower shows it as the retry reason
    (never a number, a text or a secret). Every other wait is a row waiting in the database."""


def enqueue_sends(ids: list[int], provider: str) -> None:
    """One `sms.send` per row id on the provider's queue."""
    _enqueue_each(send, ids, registry.entry(provider).queue)


def _enqueue_each(task, ids: list[int], queue: str | None = None) -> None:
    """One `task` per row id (on `queue`, else its route), over one broker connection. On Redis they go
    out in pipelined batches (kombu's `Producer.batch`), not a round trip each. If publishing fails
    part-way, the rows are already claimed: the reaper (sends) or the next poll lease (polls) takes them up
    again, and a task that did arrive twice is a no-op.

    Each message is made and sent by Celery's message layer (`app.amqp`), the two calls `apply_async` ends
    in, with what `apply_async` would work out again for every row worked out once: the route (its queue
    bound to the channel), the parent and root task, the configuration. A publish takes a third of the CPU
    it took through `apply_async` (a one-thread loop of 20,000), and the dispatch task no longer keeps an
    `AsyncResult` for every task it sent. Not retried one by one: in a batch, a publish only adds to the
    pipeline; the batch's flush is what reaches Redis."""
    amqp = app.amqp
    route = amqp.router.route({"queue": queue} if queue else {}, task.name)
    parent = app.current_worker_task
    parent_id = parent.request.id if parent else None
    root_id = (parent.request.root_id or parent_id) if parent else None
    sent_event = app.conf.task_send_sent_event
    with app.producer_or_acquire() as producer, producer.batch():
        # Bound once: kombu binds an unbound queue anew, a copy, for every message it declares the queue for.
        route = {**route, "queue": route["queue"].bind(producer.channel)}
        for row_id in ids:
            message = amqp.create_task_message(
                uuid(), task.name, (row_id,), {}, reply_to=app.thread_oid, root_id=root_id, parent_id=parent_id,
                create_sent_event=sent_event, ignore_result=task.ignore_result,
                # The arguments as Flower shows them, written out: Celery's own rendering (`saferepr`) took
                # about a fifth of each publish's CPU.
                argsrepr=f"({row_id},)", kwargsrepr="{}",
            )
            amqp.send_task_message(producer, task.name, message, retry=False, **route)


_last_tick = {"sms.dispatch": -1e9, "sms.poll_due": -1e9, "sms.reap": -1e9}


def _too_soon(task: str, interval_s: float) -> bool:
    """A beat tick that comes less than half an interval after the last one this process ran is a backlog
    (ticks queued while no worker ran): it is dropped."""
    now = time.monotonic()
    if now - _last_tick[task] < interval_s / 2:
        return True
    _last_tick[task] = now
    return False


@app.task(name="sms.dispatch", ignore_result=True)
def dispatch() -> int:
    rt = runtime()
    if _too_soon("sms.dispatch", rt.settings.dispatch_interval_s):
        return 0
    return workflow.dispatch_due(rt, enqueue_sends)


@app.task(name="sms.send", bind=True, ignore_result=True, max_retries=None)
def send(self, row_id: int) -> str:
    # One execution (the task's id and its retry number) owns the lease: a redelivery of this message while
    # this run is in its provider call finds the row held and does nothing; only the retries below, after a
    # lost database answer, take back the lease an earlier execution may have taken.
    owner = workflow.lease_owner(self.request.id, self.request.retries or 0) if self.request.id else None
    outcome = workflow.send_row(runtime(), row_id, owner=owner)
    if isinstance(outcome, workflow.Retry):
        raise self.retry(countdown=outcome.delay_s, exc=RetryLater(outcome.reason))
    return outcome


@app.task(name="sms.poll_due", ignore_result=True)
def poll_due() -> int:
    rt = runtime()
    if _too_soon("sms.poll_due", rt.settings.mobilgroup_poll_interval_s):
        return 0
    ids = workflow.claim_polls(rt)
    _enqueue_each(poll, ids)
    return len(ids)


@app.task(name="sms.poll", ignore_result=True)
def poll(row_id: int) -> str:
    return workflow.poll_row(runtime(), row_id)


@app.task(name="sms.reap", ignore_result=True)
def reap() -> int:
    rt = runtime()
    if _too_soon("sms.reap", rt.settings.reap_interval_s):
        return 0
    return workflow.reap_rows(rt)
