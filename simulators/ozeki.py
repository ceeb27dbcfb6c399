"""A local stand-in for Ozeki's HTTP API `SendSms` command (seed `004`), for demos, tests and staging.

`GET /api?command=SendSms&Username=…&Password=…&Sender=…&Recipient=…&Message=…&DeliveryReportURL=…`
(POST with the same fields as a form is taken too; the seed table's spelling `DelivaryReportURL` is
honoured). Every answer is HTTP 200 with the seed's XML, printed exactly as the seed prints it, closing
tag mismatch included (`</OzApi_CommandResult_SencdSms>`). Codes, in the order the checks run: a path
other than `/api` is HTTP 404; 304 no credentials, 305 wrong credentials, 301 a command other than
`SendSms`, 302 a missing or unusable `Recipient` (not `+` and digits) or an empty `Message`, 307 a
recipient starting with one of `forbidden_prefixes`, 501 one starting with one of `unroutable_prefixes`;
else 200 with a fresh `SmsId` (a UUID).

After `report_delay_s` an accepted message with a delivery-report URL gets an `SMSDeliveryReport`
notification there, as a form POST (or the query of a GET with `report_method="GET"`): `NotificationName`,
`SmsId`, `Sender`, `Recipient`, `Delivered` (`True`/`False`) and `DeliveryStatus`
(`Delivered`/`Undelivered`) — `False` for a recipient ending in `undeliverable_suffix`. Ozeki's public
pages name the notification but not all its fields; this is our reading (see `providers.ozeki`).
`force(code)` makes the next request get that code (e.g. 303, 306, 401, 701).

Journal: `kind="send"` (`sms_id`, `recipient`, `sender`, `message`, `callback`, `report_url_params`: which
spellings of the report URL the request carried), `kind="reject"` (`code`),
`kind="report"` per callback attempt (`sms_id`, `delivered`, `status` = the HTTP answer).
"""
from __future__ import annotations

import re
import threading
import uuid
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from simulators.base import SimulatorHandler, SimulatorServer, run_until_interrupted
from simulators.callbacks import ReportSender

DEFAULT_PORT = 8103
API_PATH = "/api"
MESSAGES = {
    200: "Command successfully executed",
    300: "Parse error",
    301: "Not implemented command",
    302: "Invalid parameter",
    303: "Inappropriate command",
    304: "Authentication required",
    305: "Authentication failed",
    306: "Forbidden user",
    307: "Forbidden address",
    401: "Api extension unavailable",
    501: "Sms destination not found",
    701: "Configuration error",
    702: "Configuration error",
    703: "Configuration error",
}
_RECIPIENT = re.compile(r"\+?[0-9]{3,20}")


def render(code: int, sms_id: str | None = None) -> bytes:
    """The seed's answer, byte for byte in its shape, mismatched closing tag included."""
    sms = f" <SmsId>{escape(sms_id)}</SmsId>" if sms_id else ""
    return (
        '<?xml version="1.0"?> <OzApi_CommandResult_SendSms xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"> '
        f"<Code>{code}</Code> <Message>{escape(MESSAGES.get(code, 'Error'))}</Message>{sms} "
        "</OzApi_CommandResult_SencdSms>"
    ).encode()


class OzekiHandler(SimulatorHandler):
    def handle_api(self, method, path, query, body):
        if path.rstrip("/") != API_PATH:
            return 404, "text/plain", b"Not Found"
        fields = {key: values[0] for key, values in query.items()}
        if method == "POST":
            fields.update((k, v[0]) for k, v in parse_qs(body.decode("utf-8", "replace")).items())
        return 200, "text/xml; charset=utf-8", self.server.answer(fields)


class OzekiSimulator(SimulatorServer):
    """Ozeki on 127.0.0.1:`port` (0 picks a free one). Options: `username`, `password` (what it accepts),
    `undeliverable_suffix`, `forbidden_prefixes`, `unroutable_prefixes`, `report_delay_s`,
    `report_method` (`POST` or `GET`), and the base's `fail_rate`, `latency_s`, `seed`."""

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", username: str = "http_user",
                 password: str = "demo", undeliverable_suffix: str = "13",
                 forbidden_prefixes: tuple[str, ...] = (), unroutable_prefixes: tuple[str, ...] = (),
                 report_delay_s: float = 0.5, report_method: str = "POST", fail_rate: float = 0.0,
                 latency_s: float = 0.0, seed: int | None = None):
        super().__init__(OzekiHandler, host, port, fail_rate=fail_rate, latency_s=latency_s, seed=seed)
        if report_method not in ("POST", "GET"):
            raise ValueError("report_method must be POST or GET")
        self.username, self.password = username, password
        self.undeliverable_suffix = undeliverable_suffix
        self.forbidden_prefixes = tuple(forbidden_prefixes)
        self.unroutable_prefixes = tuple(unroutable_prefixes)
        self.report_method = report_method
        self.reports = ReportSender(self.record, delay_s=report_delay_s)
        self._forced: list[int] = []
        self._state = threading.Lock()

    @property
    def api_url(self) -> str:
        return self.url + API_PATH

    def force(self, code: int) -> None:
        """Answer the next request with `code`, whatever it asks."""
        with self._state:
            self._forced.append(code)

    def answer(self, fields: dict[str, str]) -> bytes:
        """Handle one API request's fields; journal it; return the answer's bytes."""
        code = self._check(fields)
        if code != 200:
            self.record(kind="reject", code=code)
            return render(code)
        sms_id = str(uuid.uuid4())
        recipient = fields["Recipient"].lstrip("+")
        callback = fields.get("DeliveryReportURL") or fields.get("DelivaryReportURL") or ""
        self.record(kind="send", sms_id=sms_id, recipient=recipient, sender=fields.get("Sender", ""),
                    message=fields["Message"], callback=callback,
                    report_url_params=sorted(set(fields) & {"DeliveryReportURL", "DelivaryReportURL"}))
        if callback:
            delivered = not (self.undeliverable_suffix and recipient.endswith(self.undeliverable_suffix))
            report = {"NotificationName": "SMSDeliveryReport", "SmsId": sms_id,
                      "Sender": fields.get("Sender") or self.username, "Recipient": fields["Recipient"],
                      "Delivered": "True" if delivered else "False",
                      "DeliveryStatus": "Delivered" if delivered else "Undelivered"}
            self.reports.schedule(callback, report, method=self.report_method, sms_id=sms_id,
                                  delivered=delivered)
        return render(200, sms_id)

    def _check(self, fields: dict[str, str]) -> int:
        with self._state:
            if self._forced:
                return self._forced.pop(0)
        if not fields.get("Username") or not fields.get("Password"):
            return 304
        if (fields["Username"], fields["Password"]) != (self.username, self.password):
            return 305
        if fields.get("command") != "SendSms":
            return 301
        recipient = fields.get("Recipient", "")
        if not _RECIPIENT.fullmatch(recipient) or not fields.get("Message"):
            return 302
        digits = recipient.lstrip("+")
        if digits.startswith(self.forbidden_prefixes):
            return 307
        if digits.startswith(self.unroutable_prefixes):
            return 501
        return 200

    def stop(self) -> None:
        self.reports.stop()
        super().stop()


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options) -> None:
    """Serve an Ozeki stand-in until interrupted (Ctrl-C); `options` as for `OzekiSimulator`."""
    simulator = OzekiSimulator(port, host=host, **options)
    run_until_interrupted(simulator, f"Ozeki simulator at {simulator.api_url} "
                                     f"(username {simulator.username}; set SMS_OZEKI_URL={simulator.api_url})")
