"""A local stand-in for Accolades' `sms/send` (seed `002`), for demos, tests and staging.

`POST /<account>/sms/send` with the seed's form fields. Checks, in order: the path (404), POST only (400),
the client's IP blacklisted (403, code `403.6`), account number and password (401; `blacklist_after`
invalid requests from one IP blacklist it for `blacklist_s`), `phoneNumber` present and digits with an
optional `+` (400), `message` present (400) and at most `max_length` characters (413). Errors come as
`{"type": "Error", "message": …, "code": …}`; success as `{"type": "ok"}`.

After an accepted send with `sendResultTo`, the status notification is sent there after `report_delay_s`, as
a form POST (or the query of a GET with `report_method="GET"`: the seed names no method) (fields `apiName=sms`, `type=deliveryReport`, `status`, `id` = the `messageId` given, and `errorMessage`
with `status=error`): `error` for a number ending in `undeliverable_suffix`, `sent` otherwise.
`force(status, code, message)` makes the next request get that error answer (tests and demos of the
error paths); the base adds `fail_rate` (HTTP 503) and `latency_s`.

Journal: `kind="send"` (`account`, `phone`, `message`, `id`, `callback`), `kind="reject"` (`status`,
`code`), and `kind="report"` per callback attempt (`id`, `report_status`, `status` = the HTTP answer).
"""
from __future__ import annotations

import json
import re
import threading
import time
from urllib.parse import parse_qs

from simulators.base import SimulatorHandler, SimulatorServer, run_until_interrupted
from simulators.callbacks import ReportSender

DEFAULT_PORT = 8102
_PATH = re.compile(r"/([^/]+)/sms/send/?")
_PHONE = re.compile(r"\+?[0-9]{6,15}")


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or str(status)


def _json(status: int, payload: dict) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


class AccoladesHandler(SimulatorHandler):
    def handle_api(self, method, path, query, body):
        return self.server.answer(method, path, body, self.client_address[0])


class AccoladesSimulator(SimulatorServer):
    """Accolades on 127.0.0.1:`port` (0 picks a free one). Options: `account`, `password` (what it
    accepts), `undeliverable_suffix`, `report_delay_s`, `max_length`, `blacklist_after`, `blacklist_s`,
    `forbidden` (international numbers it refuses with HTTP 403, as for a destination the account may not
    send to), `report_method` (`POST` or `GET`), and the base's `fail_rate`, `latency_s`, `seed`."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", account: str = "1000",
                 password: str = "demo", undeliverable_suffix: str = "13", report_delay_s: float = 0.5,
                 max_length: int = 918, blacklist_after: int = 5, blacklist_s: float = 300.0,
                 forbidden: tuple[str, ...] = (), report_method: str = "POST", fail_rate: float = 0.0,
                 latency_s: float = 0.0, seed: int | None = None):
        super().__init__(AccoladesHandler, host, port, fail_rate=fail_rate, latency_s=latency_s, seed=seed)
        if report_method not in ("POST", "GET"):
            raise ValueError("report_method must be POST or GET")
        self.report_method = report_method
        self.account, self.password = str(account), password
        self.forbidden = set(forbidden)
        self.undeliverable_suffix = undeliverable_suffix
        self.max_length = max_length
        self.blacklist_after, self.blacklist_s = blacklist_after, blacklist_s
        self.reports = ReportSender(self.record, delay_s=report_delay_s)
        self._invalid: dict[str, int] = {}
        self._blacklisted_until: dict[str, float] = {}
        self._forced: list[_Refused] = []
        self._state = threading.Lock()

    def force(self, status: int, code: str | None = None, message: str = "Forced error") -> None:
        """Answer the next request with this error, whatever it asks."""
        with self._state:
            self._forced.append(_Refused(status, message, code))

    def answer(self, method: str, path: str, body: bytes, client_ip: str) -> tuple[int, str, bytes]:
        """Handle one API request; journal it; return (HTTP status, content type, body)."""
        try:
            event = self._accept(method, path, body, client_ip)
        except _Refused as refused:
            self.record(kind="reject", status=refused.status, code=refused.code)
            return _json(refused.status, {"type": "Error", "message": refused.message, "code": refused.code})
        self.record(kind="send", **event)
        if event["callback"]:
            failed = bool(self.undeliverable_suffix) and event["phone"].endswith(self.undeliverable_suffix)
            fields = {"apiName": "sms", "type": "deliveryReport", "status": "error" if failed else "sent",
                      "id": event["id"]}
            if failed:
                fields["errorMessage"] = "The destination number is not reachable"
            self.reports.schedule(event["callback"], fields, method=self.report_method, id=event["id"],
                                  report_status=fields["status"])
        return _json(200, {"type": "ok"})

    def _accept(self, method: str, path: str, body: bytes, client_ip: str) -> dict:
        with self._state:
            if self._forced:
                raise self._forced.pop(0)
        match = _PATH.fullmatch(path)
        if match is None:
            raise _Refused(404, "Not found")
        if method != "POST":
            raise _Refused(400, "This API accepts POST requests only")
        with self._state:
            if self._blacklisted_until.get(client_ip, 0) > time.monotonic():
                raise _Refused(403, "IP address temporarily blacklisted after too many invalid requests",
                               "403.6")
        form = {key: values[0] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}
        if match.group(1) != self.account or form.get("password") != self.password:
            self._count_invalid(client_ip)
            raise _Refused(401, "Invalid account or API password")
        phone, message = form.get("phoneNumber", ""), form.get("message", "")
        if not _PHONE.fullmatch(phone):
            raise _Refused(400, "Invalid phoneNumber")
        if phone.lstrip("+") in self.forbidden:
            raise _Refused(403, "Sending to this destination is not allowed for this account")
        if not message:
            raise _Refused(400, "The message is empty")
        if len(message) > self.max_length:
            raise _Refused(413, "The message is too long")
        return {"account": match.group(1), "phone": phone.lstrip("+"), "message": message,
                "id": form.get("messageId", ""), "callback": form.get("sendResultTo", "")}

    def _count_invalid(self, client_ip: str) -> None:
        with self._state:
            self._invalid[client_ip] = self._invalid.get(client_ip, 0) + 1
            if self.blacklist_after and self._invalid[client_ip] >= self.blacklist_after:
                self._blacklisted_until[client_ip] = time.monotonic() + self.blacklist_s
                self._invalid[client_ip] = 0

    def stop(self) -> None:
        self.reports.stop()
        super().stop()


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options) -> None:
    """Serve an Accolades stand-in until interrupted (Ctrl-C); `options` as for `AccoladesSimulator`."""
    simulator = AccoladesSimulator(port, host=host, **options)
    run_until_interrupted(simulator, f"Accolades simulator at {simulator.url} "
                                     f"(account {simulator.account}; set SMS_ACCOLADES_URL={simulator.url})")
