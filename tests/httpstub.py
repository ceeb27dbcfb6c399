"""A canned HTTP server on 127.0.0.1 for client tests: answers every request with one fixed reply and
keeps what it was sent. For answers no simulator gives (unreadable bodies, hostile XML, odd statuses)."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body, self.status, self.headers = body, status, headers or {}
        self.requests: list[tuple[str, str, bytes]] = []
        self.request_headers: list[dict[str, str]] = []
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: StubServer

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.requests.append((self.command, self.path, self.rfile.read(length) if length else b""))
        self.server.request_headers.append(dict(self.headers.items()))
        self.send_response(self.server.status)
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    do_GET = do_POST = _reply

    def log_message(self, format, *args):  # noqa: A002
        pass
