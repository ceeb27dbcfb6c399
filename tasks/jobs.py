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
    """One `sms.send` per row id on the provider's queue, over one broker connection."""
    with app.producer_or_acquire() as producer:
        for row_id in ids:
            send.apply_async((row_id,), queue=SEND_QUEUES[provider], producer=producer)


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
    with app.producer_or_acquire() as producer:
        for row_id in ids:
            poll.apply_async((row_id,), producer=producer)
    return len(ids)


@app.task(name="sms.poll", ignore_result=True)
def poll(row_id: int) -> str:
    return workflow.poll(runtime(), row_id)


@app.task(name="sms.reap", ignore_result=True)
def reap() -> int:
    return workflow.reap(runtime(), enqueue_sends)
