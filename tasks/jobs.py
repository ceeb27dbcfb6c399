"""The Celery tasks: each one a thin wrapper over `tasks.workflow`, taking and passing row ids only.

| task            | started by          | does                                                        |
| --------------- | ------------------- | ----------------------------------------------------------- |
| `sms.dispatch`  | beat                | claims due rows, enqueues one `sms.send` per row            |
| `sms.send`      | dispatch, reaper    | sends one row through its provider                          |
| `sms.poll_due`  | beat                | enqueues `sms.poll` for Mobilgroup rows past their lifetime |
| `sms.poll`      | poll_due            | asks Mobilgroup for one row's status                        |
| `sms.reap`      | beat                | re-enqueues rows whose task was lost                        |
"""
from __future__ import annotations

from celery.utils.log import get_task_logger

from celeryconfig import SEND_QUEUES
from tasks import workflow
from tasks.app import app
from tasks.runtime import runtime

log = get_task_logger(__name__)


class RetryLater(Exception):
    """Why a send waits; Flower shows it as the retry reason (never a number, a text or a secret)."""


def enqueue_sends(ids: list[int], provider: str) -> None:
    """One `sms.send` per row id on the provider's queue."""
    _enqueue_each(send, ids, SEND_QUEUES[provider])


def _enqueue_each(task, ids: list[int], queue: str | None = None) -> None:
    """One `task` per row id (on `queue`, else its route), over one broker connection. On Redis they go
    out in pipelined batches (kombu's `Producer.batch`), not a round trip each: about half the CPU and
    wall time of each publish. If publishing fails part-way, the rows are already claimed: the reaper
    (sends) or the next poll lease (polls) takes them up again, and a task that did arrive twice is a no-op."""
    with app.producer_or_acquire() as producer, producer.batch():
        for row_id in ids:
            # The arguments as Flower shows them, written out: Celery's own rendering (`saferepr`) took about
            # a fifth of each publish's CPU (a one-thread loop of 20,000 publishes).
            task.apply_async((row_id,), queue=queue, producer=producer, argsrepr=f"({row_id},)", kwargsrepr="{}")


@app.task(name="sms.dispatch", ignore_result=True)
def dispatch() -> int:
    return workflow.dispatch_due(runtime(), enqueue_sends)


@app.task(name="sms.send", bind=True, ignore_result=True, max_retries=None)
def send(self, row_id: int) -> str:
    outcome = workflow.send(runtime(), row_id)
    if isinstance(outcome, workflow.Retry):
        raise self.retry(countdown=outcome.delay_s, exc=RetryLater(outcome.reason))
    return outcome


@app.task(name="sms.poll_due", ignore_result=True)
def poll_due() -> int:
    ids = workflow.claim_polls(runtime())
    _enqueue_each(poll, ids)
    return len(ids)


@app.task(name="sms.poll", ignore_result=True)
def poll(row_id: int) -> str:
    return workflow.poll(runtime(), row_id)


@app.task(name="sms.reap", ignore_result=True)
def reap() -> int:
    return workflow.reap(runtime(), enqueue_sends)
