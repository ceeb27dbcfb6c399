"""The dispatch workflow, without Celery: what a beat tick, a send, a status poll and a sweep do.

| module          | holds                                                                              |
| --------------- | ---------------------------------------------------------------------------------- |
| `dispatch`      | a beat tick: claim due rows, route them, release each provider's ready rows, failover |
| `send`          | one send: lease, checks, rate-limit slot, the provider call, its outcome            |
| `poll`          | the status poll of the provider that is polled (`providers.registry.POLLED`)        |
| `reap`          | the sweeps: interrupted claims, reports that never came, retention                  |
| `runtime`       | per-process resources: settings, engine, provider clients, throttle, thread shares  |
| `routing`       | phone numbers read and checked, and the provider each goes to                      |
| `reports`       | the one way a delivery report changes a row                                        |
| `throttle`      | the fleet-wide rate limit and identical-request rule (Redis, or a local file)      |
| `callbacks`     | signed callback URLs for the providers that report by webhook                      |
| `smpp_receiver` | the long-running SMPP receiver of receipts and replies                             |
| `campaigns`     | campaign rows: quiet hours at the recipient's, opt-outs by reply                   |
| `logins`        | refused logins: the fleet's circuit, probe spacing, credentials' fingerprints      |
| `startup`       | what a worker or beat checks before it starts                                      |
| `wording`       | how durations read in what operators see                                           |

The Celery tasks in `tasks.jobs` are thin wrappers over the functions exported here; they take a `Runtime`
(settings, DB engine, provider clients, throttle) and return plain values saying what happened, so the
whole flow can be read, tested and reasoned about here. The rules it keeps are in `../shared/DESIGN.md`:
row ids only in the broker, no DB connection held across a provider call, the provider's typed errors
decide `failed` / wait / `error`, nothing final is ever overwritten.

Where a row is, and who moves it (`db.models.DispatchState`):

    asterCC `new` ─claim─► waiting ─release─► queued ─task─► sending ─► accepted / failed / error
                              ▲                  │ lost: again   │
                              └──── wait_again ◄─┴───────────────┘  (throttled, paused, retry, unknown, busy)

Only `queued` rows have a task in the broker, at most `SMS_<PROVIDER>_MAX_INFLIGHT` per provider with the
`sending` ones, so one provider's backlog or outage never takes another's room. Every tick releases, per
provider, the waiting rows that are due, in turns between batches (each batch oldest due first, see
`db.store.release_waiting`); it re-enqueues queued rows whose task has not
started within `SMS_LOST_TASK_S` (lost with a Redis restart or a killed worker), and settles sends whose
lease ran out (their outcome is unknown). A send holds its lease under a fencing token: what it writes
after losing the lease changes nothing.
"""
from db.store import lease_owner
from workflow.dispatch import dispatch_due, fail_over
from workflow.poll import claim_polls, poll_row
from workflow.reap import reap_rows
from workflow.send import RECONNECT_RETRY_S, Retry, send_row

__all__ = ["RECONNECT_RETRY_S", "Retry", "claim_polls", "dispatch_due", "fail_over", "lease_owner", "poll_row",
           "reap_rows", "send_row"]
