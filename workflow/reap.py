"""The sweeps (`sms.reap`): rows whose dispatch was interrupted, accepted rows whose report never came,
and our records of rows final for longer than `SMS_RETENTION_DAYS` (emptied).
"""
from __future__ import annotations

import logging

from db import retention, store
from workflow.dispatch import route_claimed
from workflow.runtime import Runtime

log = logging.getLogger(__name__)


def reap_rows(rt: Runtime, limit: int = 1000) -> int:
    """Route rows whose dispatch was interrupted between claiming and routing them (the next tick releases
    them), close rows whose report never came, and prune our records of rows final for longer than
    `SMS_RETENTION_DAYS`. Returns how many rows were routed."""
    s = rt.settings
    unrouted = store.find_unrouted(rt.engine, UNROUTED_AFTER_S, limit)
    if unrouted:
        log.warning("reaper: %d claimed rows were never routed (their dispatch was interrupted); routing them now",
                    len(unrouted))
    routed = sum(map(len, route_claimed(rt, unrouted).values())) if unrouted else 0
    expired = store.expire_unreported(rt.engine, s.report_timeout_s)
    if expired:
        log.info("reaper: %d accepted rows got no delivery report in time; left as success", expired)
    pruned = retention.prune(rt.engine, s.retention_days, batch=1000, max_batches=10)
    if pruned:
        log.info("reaper: %d records of rows final for over %d days emptied", pruned, s.retention_days)
    return routed


UNROUTED_AFTER_S = 60
"""A claim routes its rows within the same tick; one whose rows are unrouted this long later died."""
