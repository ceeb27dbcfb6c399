"""Delayed HTTP callbacks for the simulators of providers that report by calling a URL (Accolades, Ozeki).

`ReportSender` calls each scheduled URL once its delay has passed, from a few background threads, the way
a provider's notifier does after the carrier answered. A callback that fails (connection refused, timeout,
HTTP 5xx) is tried again after 1, 2, 4 … seconds up to `attempts` times; a 4xx answer is final. Every
attempt is journalled through `record(kind="report", …)` with the HTTP status (0 when none came).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import requests


class ReportSender:
    """Sends callbacks after `delay_s` from `workers` daemon threads; `stop()` drops what is still due."""

    def __init__(self, record: Callable[..., None], *, delay_s: float = 0.5, attempts: int = 3,
                 timeout_s: float = 5.0, workers: int = 4):
        self.record = record
        self.delay_s = delay_s
        self.attempts = attempts
        self.timeout_s = timeout_s
        self._due: list[tuple[float, int, dict]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._session = requests.Session()
        self._threads = [threading.Thread(target=self._run, name=f"report-sender-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def schedule(self, url: str, fields: dict[str, str], *, method: str = "POST", **journal) -> None:
        """Call `url` with `fields` (a form body for POST, the query string for GET) after `delay_s`;
        `journal` is added to each journal entry."""
        self._push(time.monotonic() + self.delay_s,
                   {"url": url, "fields": fields, "method": method, "journal": journal, "attempt": 1})

    def pending(self) -> int:
        with self._wake:
            return len(self._due)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._due.clear()
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 1)
        self._session.close()

    def _push(self, when: float, job: dict) -> None:
        with self._wake:
            if not self._stopped:
                heapq.heappush(self._due, (when, next(self._order), job))
                self._wake.notify()

    def _next(self) -> dict | None:
        with self._wake:
            while not self._stopped:
                if self._due and self._due[0][0] <= time.monotonic():
                    return heapq.heappop(self._due)[2]
                timeout = self._due[0][0] - time.monotonic() if self._due else None
                self._wake.wait(timeout)
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            status = self._call(job)
            self.record(kind="report", status=status, attempt=job["attempt"], **job["journal"])
            if (status == 0 or status >= 500) and job["attempt"] < self.attempts:
                job["attempt"] += 1
                self._push(time.monotonic() + 2 ** (job["attempt"] - 2), job)

    def _call(self, job: dict) -> int:
        try:
            if job["method"] == "GET":
                response = self._session.get(job["url"], params=job["fields"], timeout=self.timeout_s)
            else:
                response = self._session.post(job["url"], data=job["fields"], timeout=self.timeout_s)
        except requests.RequestException:
            return 0
        response.close()
        return response.status_code
