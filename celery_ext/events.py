"""Task events (what Flower shows) leave a worker in one batch every `FLUSH_EVERY_S`, not one by one.

Celery's worker already buffers task events and publishes a buffer as one `task.multi` message, but it
flushes on the event loop's next turn, so under load nearly every event (three per task: received, started,
succeeded) still costs its own publish: about a sixth of a busy worker's CPU in `bench/e2e.py`. This
consumer step turns that flush into a timer. Celery also flushes at once when `buffer_limit` events are
waiting: 24 of them, a publish every 40 ms at 200 messages/s, three times the timer's publishes; the step
raises it to `BUFFER_LIMIT`, which only bounds the buffer should the loop stall. Flower sees each event up
to `FLUSH_EVERY_S` later, in the same order, with the same content.
"""
from __future__ import annotations

from celery import bootsteps

FLUSH_EVERY_S = 0.25
BUFFER_LIMIT = 1000


class BatchedTaskEvents(bootsteps.StartStopStep):
    """Consumer step: flush the worker's buffered task events on a timer of the event loop."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c, **kwargs):
        self._timer = None
        self._dispatcher = None
        super().__init__(c, **kwargs)

    def start(self, c):
        dispatcher = c.event_dispatcher
        # Without an event loop (eventlet, gevent) Celery buffers nothing, so there is nothing to batch.
        if c.hub is None or dispatcher is None or dispatcher.on_send_buffered is None:
            return
        dispatcher.on_send_buffered = None
        dispatcher.buffer_limit = BUFFER_LIMIT
        self._dispatcher = dispatcher
        self._timer = c.timer.call_repeatedly(FLUSH_EVERY_S, dispatcher.flush)

    def stop(self, c):
        """Runs before Celery's `Events` step closes the dispatcher (steps stop in reverse), so the events
        buffered so far still go out."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.shutdown(c)

    def shutdown(self, c):
        if self._dispatcher is not None:
            self._dispatcher.flush()
