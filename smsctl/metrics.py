"""`smsctl metrics`: Prometheus `/metrics`, read from the database and the rate limiter at scrape time.

A custom collector renders one `smsctl.overview.read()` per scrape, so the figures are the fleet's, not one
process's, and a metrics process can restart without losing anything. Metric names and labels:

| metric | labels | what |
| --- | --- | --- |
| `sms_messages` | provider, status | rows due within `SMS_RETENTION_DAYS`, by asterCC status |
| `sms_waiting` | provider, reason | rows not yet handed to the provider: `queued`, `sending`, or why they wait |
| `sms_oldest_waiting_seconds` | provider | how late the oldest waiting row is (since due) |
| `sms_provider_available` | provider | 1 while its circuit is closed, else 0 |
| `sms_last_hour` | provider, outcome | rows `sent`, `failed`, `error` in the last hour |
| `sms_due_to_sent_seconds` | provider | gauge histogram: due → accepted, rows sent in the last hour |
| `sms_report_delay_seconds` | provider | gauge histogram: accepted → delivery report, reports of the last hour |
| `sms_rate_limit` / `sms_sent_per_second` | provider | configured rate; sends per second over the last minute |
| `sms_throttled_total` | provider | sends the rate limiter told to wait |
| `sms_cost_total` | provider, window | gauge: what the reports of rows sent in the last `1h` / `1d` said they cost |
| `sms_parts_per_message` | provider, window | parts per row sent in the last `1h` / `1d` (the provider's count where it reported one) |
| `sms_campaign_rows` | batch, creby, progress | rows of each campaign in progress: `sent`, `waiting`, `failed`, `error` |
| `sms_optouts` | | numbers opted out of campaigns |
| `sms_dispatch_last_success_timestamp_seconds` | | when a dispatch tick last ran to its end |
"""
from __future__ import annotations

import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from db import stats
from smsctl import overview

log = logging.getLogger(__name__)


class DispatcherCollector(Collector):
    """Reads the dispatcher's state at every collect (scrape)."""

    def __init__(self, settings, engine, throttle=None):
        self.settings, self.engine, self.throttle = settings, engine, throttle

    def collect(self):
        started = time.monotonic()
        view = overview.read(self.settings, self.engine, self.throttle)
        yield from render(view)
        scrape = GaugeMetricFamily("sms_scrape_seconds", "How long reading these figures took.")
        scrape.add_metric([], time.monotonic() - started)
        yield scrape


def render(view: overview.Overview):
    """The metric families of one reading."""
    messages = GaugeMetricFamily("sms_messages", f"Rows due within the retention period "
                                 f"({view.retention_days:g} days), by provider and asterCC status.",
                                 labels=["provider", "status"])
    for (provider, status), n in sorted(view.messages.items()):
        messages.add_metric([provider, status], n)
    yield messages

    waiting, oldest, available, hour, rate, sent_rate = (GaugeMetricFamily(name, doc, labels=labels)
                                                         for name, doc, labels in (
        ("sms_waiting", "Rows not yet handed to their provider: queued, sending, or the reason they wait.",
         ["provider", "reason"]),
        ("sms_oldest_waiting_seconds", "How long ago the oldest waiting row was due.", ["provider"]),
        ("sms_provider_available", "1 while the provider's circuit is closed, else 0.", ["provider"]),
        ("sms_last_hour", "Rows sent (accepted by the provider), failed and error in the last hour.",
         ["provider", "outcome"]),
        ("sms_rate_limit", "The provider account's configured rate limit (messages/s).", ["provider"]),
        ("sms_sent_per_second", "Sends per second over the last minute.", ["provider"]),
    ))
    throttled = CounterMetricFamily("sms_throttled", "Sends the rate limiter told to wait.", labels=["provider"])
    for p in view.providers:
        for reason, n in sorted(p.waiting.items()):
            waiting.add_metric([p.name, reason], n)
        if p.oldest_waiting_s is not None:
            oldest.add_metric([p.name], p.oldest_waiting_s)
        available.add_metric([p.name], 1 if p.available else 0)
        for outcome, n in p.last_hour.items():
            hour.add_metric([p.name, outcome], n)
        if p.rate is not None:
            rate.add_metric([p.name], p.rate)
        sent_rate.add_metric([p.name], p.sent_per_s)
        if p.throttled is not None:
            throttled.add_metric([p.name], p.throttled)
    yield from (waiting, oldest, available, hour, rate, sent_rate, throttled)

    # A gauge: summed over a window of the table, it falls as rows leave the window, which a counter must not.
    cost = GaugeMetricFamily("sms_cost_total", "What the providers' reports said the rows sent in the window "
                             "cost, in the account's currency.", labels=["provider", "window"])
    parts = GaugeMetricFamily("sms_parts_per_message", "SMS parts per row sent in the window (the provider's "
                              "count where its report gave one, else ours).", labels=["provider", "window"])
    for p in view.providers:
        for window, spent in p.spend.items():
            cost.add_metric([p.name, window], float(spent.cost))
            if spent.messages:
                parts.add_metric([p.name, window], spent.parts / spent.messages)
    yield from (cost, parts)

    for name, delays, what in (("sms_due_to_sent_seconds", view.due_to_sent, "from due to accepted by the "
                                "provider, rows sent in the last hour"),
                               ("sms_report_delay_seconds", view.report_delay, "from accepted to the delivery "
                                "report, reports of the last hour")):
        family = GaugeHistogramMetricFamily(name, f"Seconds {what}.", labels=["provider"])
        for provider, d in sorted(delays.items()):
            buckets = [(f"{bound:g}", n) for bound, n in zip(stats.DELAY_BUCKETS_S, d.buckets)]
            family.add_metric([provider], buckets + [("+Inf", d.count)], gsum_value=d.sum_s)
        yield family

    campaigns = GaugeMetricFamily("sms_campaign_rows", "Rows of each campaign in progress (a batch of more than "
                                  "one row with rows still open), by how far they got.",
                                  labels=["batch", "creby", "progress"])
    for c in view.campaigns:
        for progress, n in c.rows.items():
            campaigns.add_metric([str(c.batch), c.creby, progress], n)
    optouts = GaugeMetricFamily("sms_optouts", "Numbers opted out of campaigns.")
    optouts.add_metric([], view.optouts)
    yield from (campaigns, optouts)

    tick = GaugeMetricFamily("sms_dispatch_last_success_timestamp_seconds",
                             "When a dispatch tick last ran to its end (Unix time).")
    if view.dispatch_age_s is not None:
        tick.add_metric([], view.read_at - view.dispatch_age_s)
    yield tick


def registry(settings, engine, throttle=None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DispatcherCollector(settings, engine, throttle))
    return reg


SCRAPE_DEADLINE_S = 60
"""A connection is closed this long after it opened unless a scrape of it is being answered: a scrape reads
the database (about a second on a million rows), and a client that trickles bytes or idles keeps no socket."""


def make_server(settings, host: str, port: int, *, deadline_s: float = SCRAPE_DEADLINE_S):
    """`/metrics` of `prometheus_client.make_wsgi_app` on waitress (the webhooks' server: requests read
    whole before a thread sees them, connections closed `deadline_s` after they opened unless being
    answered), bound on host:port (0: any free port), not yet running."""
    from prometheus_client import make_wsgi_app

    from db.engine import engine_for
    from webhooks.app import make_server as waitress_server
    from workflow.throttle import make_throttle

    app = make_wsgi_app(registry(settings, engine_for(settings.database_url), make_throttle(settings)))
    return waitress_server(app, host, port, deadline_s=deadline_s)


def serve(settings, host: str, port: int) -> None:
    """Serve `/metrics` on host:port until interrupted."""
    server = make_server(settings, host, port)
    log.info("serving Prometheus metrics at http://%s:%s/metrics", server.effective_host, server.effective_port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
