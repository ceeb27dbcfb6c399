"""What every HTTP provider stand-in shares: a threaded server on 127.0.0.1, a journal of what it was
sent, and injected faults (latency, a share of HTTP 503 answers).

A simulator subclasses `SimulatorHandler`, implements `handle_api(method, path, query, body)` and returns
`(status, content_type, body_bytes)`. Every request it answers is recorded through `server.record(...)`;
tests and benchmarks read the journal in-process (`server.journal`) or, for a simulator running in another
process, as JSON from `GET /_sim/journal`. `POST /_sim/reset` empties it.

Simulators are for demos, tests and staging only: they bind to 127.0.0.1 by default and keep everything in
memory.
"""
from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Journal:
    """What a simulator was asked, in order: `record(kind=…, …)` adds an event stamped with its time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.journal: list[dict] = []
        self._recorded = threading.local()

    def record(self, **event) -> None:
        event.setdefault("time", time.time())
        with self.lock:
            self.journal.append(event)
        self._recorded.last = event

    def last_recorded(self) -> dict | None:
        """The event this thread recorded last (None after `forget_recorded`)."""
        return getattr(self._recorded, "last", None)

    def forget_recorded(self) -> None:
        self._recorded.last = None

    def events(self, kind: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.journal if kind is None or e.get("kind") == kind]


class SimulatorServer(Journal, ThreadingHTTPServer):
    """A provider stand-in. `fail_rate` (0..1) of API requests get HTTP 503 before any processing;
    `lost_rate` (0..1) of the others are processed, then answered HTTP 503 all the same (the answer lost on
    its way back; its `fault` event names the command and id it lost, as `of` and `id`); `latency_s` delays
    every API answer."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: two workers opening their 64 keep-alive connections at once
    # overflowed it (the kernel's ListenOverflows grew by hundreds in a benchmark run), and the sends whose
    # handshake the kernel dropped ended as unknown outcomes a real provider's server would never cause.
    request_queue_size = 1024

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0, *, fail_rate: float = 0.0,
                 lost_rate: float = 0.0, latency_s: float = 0.0, seed: int | None = None):
        Journal.__init__(self)
        ThreadingHTTPServer.__init__(self, (host, port), handler)
        self.fail_rate = fail_rate
        self.lost_rate = lost_rate
        self.latency_s = latency_s
        self.random = random.Random(seed)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def should_fail(self) -> bool:
        with self.lock:
            return self.random.random() < self.fail_rate

    def should_lose(self) -> bool:
        with self.lock:
            return self.random.random() < self.lost_rate

    def start(self) -> "SimulatorServer":
        """Serve in a daemon thread; returns self."""
        # A short poll interval makes stop() quick; tests start and stop many simulators.
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(timeout=5)


def run_until_interrupted(simulator, banner: str) -> None:
    """Start `simulator` (anything with `start()` and `stop()`), print `banner`, serve until Ctrl-C, stop
    it cleanly. What each simulator's `serve()` does for `smsctl simulate`."""
    simulator.start()
    try:
        # Inside the try: a Ctrl-C that comes while the banner is still being written (whoever read it may
        # interrupt at once) is a clean stop too.
        print(banner, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()


class SimulatorHandler(BaseHTTPRequestHandler):
    server: SimulatorServer
    protocol_version = "HTTP/1.1"
    # Keep-alive answers otherwise wait for the client's delayed ACK: 40 ms each, 25 requests/s a connection.
    disable_nagle_algorithm = True

    def handle_api(self, method: str, path: str, query: dict[str, list[str]], body: bytes):
        raise NotImplementedError

    def log_message(self, format, *args):  # noqa: A002 - keep the console quiet; the journal records
        pass

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if parts.path == "/_sim/journal":
            return self._reply(200, "application/json", json.dumps(self.server.events()).encode())
        if parts.path == "/_sim/reset" and method == "POST":
            with self.server.lock:
                self.server.journal.clear()
            return self._reply(200, "application/json", b"{}")
        if self.server.latency_s:
            time.sleep(self.server.latency_s)
        if self.server.should_fail():
            self.server.record(kind="fault", status=503, path=parts.path)
            return self._reply(503, "text/plain", b"Service Unavailable")
        self.server.forget_recorded()
        status, content_type, payload = self.handle_api(method, parts.path, parse_qs(parts.query), body)
        if self.server.should_lose():
            lost = self.server.last_recorded() or {}
            self.server.record(kind="fault", status=503, path=parts.path, processed=True, of=lost.get("kind"),
                               id=lost.get("id"))
            return self._reply(503, "text/plain", b"Service Unavailable")
        self._reply(status, content_type, payload)

    def _reply(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")
