"""The delivery-report app: Accolades and Ozeki call the signed URL we gave them, and the row moves on.

Routes:

- `GET|POST /reports/accolades/<token>`, `GET|POST /reports/ozeki/<token>` (the methods each provider may
  use: any other, `HEAD` included, is 405 and changes nothing). The token (see `workflow.callbacks`) names the
  row and is signed for that provider. Answers: 403 for a forged, altered or expired token, another
  provider's token, or an Accolades report whose echoed `id` is not the token's row; 400 for a malformed
  report; 404 when no dispatch record of that provider exists for the row, or (Ozeki) when the report's
  `SmsId` is not the one Ozeki gave that row at sending; 200 once applied, and also
  for a duplicate or a stale report (forward-only: nothing changes, and the provider must not retry);
  503 when the database is unreachable, so that a provider that retries will.
- `GET /healthz`: 200 `ok` (process alive; it does not touch the database).

Fields are read from a form POST body and the query string alike: neither provider's documents fix
the method (see `providers.accolades`, `providers.ozeki`). The first genuine report (its token verified)
that carries fields its provider's parser does not know (`REPORT_FIELDS`) logs their names, once per
provider and process, so that the first real report shows what it carried. The app logs provider, row
id, result and those names only: never a value, a number, a text, or the token (a capability for its row).

`serve` (`smsctl webhooks`, also in docker-compose.yml) runs it under waitress, whose asynchronous I/O reads
each request whole before a thread handles it: clients that send slowly, or not at all, hold a socket but
no thread, and each connection is closed `CONNECTION_DEADLINE_S` after it opened unless a request of it is
being answered. waitress writes no access log, so no token reaches a log.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace

from flask import Flask, request
from waitress.server import TcpWSGIServer
from werkzeug.exceptions import HTTPException

from db.engine import engine_for
from providers import registry
from providers.base import DeliveryReport
from settings import Settings, get_settings
from workflow.callbacks import BadToken, verify_token
from workflow.reports import apply_report as apply_to_database

log = logging.getLogger(__name__)

ApplyReport = Callable[[str, DeliveryReport], str]

PARSERS: dict[str, Callable[[Mapping[str, str]], DeliveryReport]] = {
    name: registry.entry(name).parse_report for name in registry.reporting_by("webhook")}
METHODS = {name: registry.entry(name).webhook_methods for name in PARSERS}
"""The methods each provider may report with; only these change anything."""
KNOWN_FIELDS = {name: registry.entry(name).report_fields for name in PARSERS}
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,40}")
"""A field name shown in the log as it came; any other is shown as `?` (a name is the sender's choice)."""
MAX_REPORT_BYTES = 16 * 1024
"""A report is a handful of short fields; anything bigger is refused (413) before it is parsed."""
MAX_HEADER_BYTES = 16 * 1024
"""Request line and headers (Ozeki's GET report carries its fields in the query string)."""
CONNECTION_DEADLINE_S = 20
"""A connection is closed this long after it opened unless a request of it is being answered: time enough
for a provider to send a report, too little for a client trickling bytes to keep a socket."""


def create_app(settings: Settings | None = None, *, apply_report: ApplyReport | None = None) -> Flask:
    """The WSGI app. `settings` default to the environment's; `SMS_WEBHOOK_SECRET` must be set.
    `apply_report(provider, report) -> "applied" | "duplicate" | "stale" | "unknown"` defaults to
    `workflow.reports.apply_report` on these settings' database."""
    settings = settings or get_settings()
    settings.require("webhook_secret")
    if apply_report is None:
        apply_report = functools.partial(apply_to_database, engine_for(settings.database_url),
                                         optout_words=settings.optout_word_list)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REPORT_BYTES
    unknown_fields_logged: set[str] = set()

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        # Flask's own handler would log the path, and with it the token.
        if isinstance(exc, HTTPException):
            return exc
        log.error("report route failed: %s", type(exc).__name__)
        return _answer(500, "internal error")

    @app.get("/healthz")
    def healthz():
        return "ok\n", 200, {"Content-Type": "text/plain"}

    @app.route("/reports/<provider>/<token>", methods=["GET", "POST"])
    def report(provider: str, token: str):
        parse = PARSERS.get(provider)
        if parse is None:
            return _answer(404, "no such report route")
        if request.method not in METHODS[provider]:  # HEAD above all: Flask would run this view for it
            return _answer(405, "method not allowed", Allow=", ".join(METHODS[provider]))
        try:
            row, resends, attempt = verify_token(settings, provider, token)
        except BadToken:
            log.warning("%s report refused: bad token", provider)
            return _answer(403, "bad token")
        try:
            fields = _fields()
            _log_unknown_fields(provider, fields, unknown_fields_logged)
            parsed = parse(fields)
        except ValueError as exc:
            log.warning("%s report for row %d refused as malformed: %s", provider, row, exc)
            return _answer(400, "malformed report")
        if parsed.reference is not None and parsed.reference != row:
            log.warning("%s report refused: it names another row than its URL (%d)", provider, row)
            return _answer(403, "the report names another message")
        try:
            result = apply_report(provider, replace(parsed, reference=row, resends=resends, attempt=attempt))
        except Exception as exc:  # noqa: BLE001 - the provider gets a retryable answer, never a crash
            log.error("%s report for row %d not applied: %s", provider, row, type(exc).__name__)
            return _answer(503, "try again later")
        log.info("%s report for row %d: %s (%s)", provider, row, parsed.outcome, result)
        if result == "unknown":
            return _answer(404, "no such message")
        return _answer(200, result)

    return app


def _log_unknown_fields(provider: str, fields: Mapping[str, str], logged: set[str]) -> None:
    """Log the names (never the values) of the fields `provider`'s parser does not know, unless `provider`
    is in `logged` already; two reports at once may both log (no lock on every report for that)."""
    unknown = set(fields) - KNOWN_FIELDS[provider]
    if unknown and provider not in logged:
        logged.add(provider)
        names = sorted(name if _FIELD_NAME.fullmatch(name) else "?" for name in unknown)
        log.info("%s report carries fields we do not read: %s", provider, ", ".join(names[:30]))


def _fields() -> dict[str, str]:
    """The report's fields: query string, overlaid by a form body. Repeated fields keep their first value.
    A body we cannot read as a form is `ValueError` (400)."""
    if request.content_length and not request.mimetype.startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        raise ValueError("the body is not a form")
    fields = request.args.to_dict(flat=True)
    fields.update(request.form.to_dict(flat=True))
    return fields


def _answer(status: int, word: str, **headers: str):
    return word + "\n", status, {"Content-Type": "text/plain; charset=utf-8", **headers}


class Server(TcpWSGIServer):
    """waitress's server, closing every connection `channel_timeout` after it opened unless a request of it
    is being answered (waitress itself only closes connections that send nothing at all for that long)."""

    def run_until(self, stop: threading.Event) -> None:
        """Serve until `stop` is set (from another thread: `run()` cannot be stopped so), then close."""
        try:
            while not stop.is_set():
                self.asyncore.loop(timeout=0.05, map=self._map, use_poll=True, count=1)
        finally:
            self.close()

    def maintenance(self, now: float) -> None:
        cutoff = now - self.adj.channel_timeout
        for channel in self.active_channels.values():
            # Nothing being answered, nothing left to send: a request not yet whole, or none.
            if not channel.requests and not channel.total_outbufs_len and channel.creation_time < cutoff:
                channel.will_close = True


def make_server(app, host: str, port: int, *, deadline_s: float = CONNECTION_DEADLINE_S) -> Server:
    """`app` on `host`:`port` (0: any free port), bound, not yet running (`run()` serves until closed)."""
    return Server(app, host=host, port=port, threads=8, connection_limit=500, channel_timeout=deadline_s,
                   cleanup_interval=max(1, deadline_s / 10), max_request_header_size=MAX_HEADER_BYTES,
                   max_request_body_size=MAX_REPORT_BYTES, asyncore_use_poll=True, ident="")


def serve(host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the app until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    for warning in settings.startup_warnings():
        log.warning("%s", warning)
    server = make_server(create_app(settings), host, port)
    log.info("serving delivery reports on http://%s:%d", server.effective_host, server.effective_port)
    try:
        server.run()
    finally:
        server.close()
