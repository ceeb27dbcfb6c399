"""One rate limit and one identical-request rule per provider account, for the whole fleet.

Celery's `rate_limit` is per worker process, so it cannot keep ten workers on three hosts under a provider's
limit. Every send asks `Throttle.acquire()` first; the answer is a `Permit`:

* `reserved=True`: a slot is held for the caller `wait_s` seconds from now. Call `permit.wait()`: it sleeps
  until the slot and returns the permit to act on at once, reserved (send now) or not (as below). A send
  must start within `SEND_WITHIN_S` of its slot: a caller that wakes later gives the slot back and asks
  again, so no send starts late however busy the host is. Do not call `acquire()` again for this send.
* `reserved=False`: nothing is held (`reason` says why: `"rate"`, `"identical"` or `"paused"`); reschedule
  the task `wait_s` seconds later instead of holding a worker slot.

Rules, all decided in one atomic step against one shared store:

1. Identical requests: two grants for the same account and `identity` (see `identity_of`) are at least
   `identical_s` apart, measured between their slot times. A request that would break this is refused
   with the remaining time and uses no rate slot. smsc.ru rejects a second identical request within a
   minute; the rule covers retries of one message too.
2. Pause: after `pause(account, seconds)` (an account-level error) nothing is granted on that account.
3. Rate: at most `rate` messages in any window of one second, a message of `cost` parts counting `cost`
   times (each SMPP part is one message to the provider). Grants are evenly spaced (virtual scheduling,
   as in GCRA: each grant reserves the next free slot in the future), because providers count per second
   and a burst that is exactly at the limit on our side goes over it at the provider once the network adds
   a few milliseconds of jitter. For the same reason the window is `MARGIN_S` longer than a second: a
   send starts at most `SEND_WITHIN_S` after its slot (`Permit.wait()` sees to it: only the sender knows
   when it sends, so the bound is kept where the lateness happens), and `GUARD_S` covers the way from the
   start of the send to the provider, so the provider sees no more than `rate` in any second. Multi-part
   messages are also checked against the window, since even spacing alone lets a burst of parts follow a
   full second of single messages.

`RedisThrottle` keeps the state in Redis (keys under `sms:throttle:`, all with expiry) and decides in one
Lua script that reads Redis's own clock (`TIME`), so skewed worker clocks do not matter. `LocalThrottle`
keeps the same rules across the worker processes of one host in a SQLite file (embedded mode, no Redis).

Why our own script rather than a library (measured with 8 processes against one Redis): `limits`'
moving window never overshot but lets bursts through, and its `[redis]` extra pins redis-py below 8;
`pyrate-limiter` overshot (13-15 grants in 0.95 s for a limit of 10); `redis-rate-limiters` was exact and
even, but is a 0.x beta. All three use the client's clock, and none has the identical-request rule, which
must be decided atomically with the rate slot.

If the store cannot be reached, `ThrottleUnavailable` is raised: the caller must not send, and retries later.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

KEY_PREFIX = "sms:throttle:"
SEND_WITHIN_S = 0.04
"""How late after its slot a send may still start; a caller that wakes later gives the slot back and asks again
(`Permit.wait()`). A fixed margin for all lateness (60 ms) was not enough: a sleeping worker wakes late by as
much as the host is busy, without bound, and four workers at 20/s put 21 requests into one second at the
provider. So wake-up lateness is refused, not absorbed. Beside bench/e2e.py, 40 ms let through all but 0-3
of 400 wake-ups (see the README)."""
GUARD_S = 0.04
"""From the start of a send to the provider reading it (building the request, connecting, the network): the
part of the arrival jitter that the sender cannot see, absorbed by the window. Not enforced: on a very busy
host a process can also be held up between the check and its request, or the provider in reading it."""
MARGIN_S = SEND_WITHIN_S + GUARD_S
"""How much longer than one second the rate window is, and than `identical_s` the identical-request interval:
a request reaches the provider at most this long after its slot begins. The rate reached is 1 / (1 + MARGIN_S)
of the limit, about 93% for 80 ms."""
LATE_TRIES = 3
"""How many late wake-ups in a row `Permit.wait()` takes before it gives up and reschedules (reason "late")."""
LATE_RETRY_S = 1.0
"""When a sender that was late `LATE_TRIES` times comes back: the host is overloaded, the send is rescheduled."""
LATENESS_SAMPLES = 1000
"""How many recent wake-up lateness figures each account keeps (see `Throttle.lateness`)."""

_COUNTER_TTL_S = 7 * 86_400
_MICRO = 1_000_000


@dataclass(frozen=True)
class _Slot:
    """What a reserved permit needs to keep the send within its slot, in this process's `time.monotonic()`."""

    start_at: float
    """Not before: the slot's beginning, as late as the store's answer can put it."""
    start_by: float
    """Not after: the slot's beginning plus `SEND_WITHIN_S`, as early as the store's question can put it (the
    round trip to the store counts as lateness, so no clock needs to agree with the store's)."""
    started: Callable[[int], None]
    """Keeps how late (µs) the send started, reported to the store with the next `acquire()` (no round trip)."""
    give_back: Callable[[int], None]
    """Releases the slot (and its identical-request mark), counting how late (µs) the caller woke."""
    again: Callable[[], "Permit"]
    """`acquire()` again with the same arguments."""


@dataclass(frozen=True)
class Permit:
    """The limiter's answer to one `acquire()`.

    `wait_s`: 0.0 means go now. `reserved`: True if a slot is held at now + `wait_s` (call `wait()`, then
    send); False if nothing is held (come back after `wait_s`). `reason`: "ok", "rate", "identical", "paused",
    or "late" and "withdrawn" (from `wait()` only).
    """

    wait_s: float
    reserved: bool
    reason: str
    _slot: _Slot | None = field(default=None, repr=False, compare=False)

    def wait(self, sleep: Callable[[float], None] = time.sleep, *,
             unless: Callable[[], bool] | None = None) -> "Permit":
        """Sleep until the reserved slot and return the permit to act on at once: reserved (`wait_s` 0), start
        the send now; not reserved, send nothing and come back after its `wait_s`, as for a refused `acquire()`.

        A send starts no later than `SEND_WITHIN_S` after its slot: a caller that wakes later gives the slot
        back (see `given_back_count`) and asks again with the same arguments, which may be refused (a pause
        began, the next slot is too far); after `LATE_TRIES` late wake-ups it gets reason "late". A permit
        that is not reserved, or was already waited for, is returned as it is. `sleep` lets a test make the
        caller late. Raises `ThrottleUnavailable` if the store cannot be reached to give a slot back or to ask
        again: nothing may be sent then. When `unless()` is true on waking (the worker is stopping, say), the
        slot and its identical-request mark are given back and the permit says "withdrawn": a send that never
        left must not hold the recipient's next identical request back.
        """
        permit, late_wakeups = self, 0
        while permit.reserved and permit._slot is not None:
            slot = permit._slot
            while (ahead := slot.start_at - time.monotonic()) > 0:
                sleep(ahead)
            woke = time.monotonic()
            late_us = round((woke - slot.start_at) * _MICRO)
            if unless is not None and unless():
                slot.give_back(late_us)
                return Permit(0.0, False, "withdrawn")
            if woke <= slot.start_by:
                slot.started(late_us)
                return Permit(0.0, True, "ok")
            slot.give_back(late_us)
            late_wakeups += 1
            if late_wakeups == LATE_TRIES:
                return Permit(LATE_RETRY_S, False, "late")
            permit = slot.again()
        return permit


class ThrottleUnavailable(Exception):
    """The shared store cannot be reached or answered an error: do not send, retry later."""


def identity_of(recipient: str, text: str, key: bytes) -> str:
    """A stable digest of (recipient, text) for the identical-request rule; neither is stored in clear.

    Keyed (HMAC with `key`, the account's password, which every worker of the fleet has): a plain hash
    would let whoever reads the broker's Redis try every number against a known template text."""
    return hmac.new(key, f"{recipient}\x00{text}".encode(), hashlib.sha256).hexdigest()


class Throttle(Protocol):
    def acquire(self, account: str, rate: float, *, cost: int = 1, identity: str | None = None,
                identical_s: float = 60.0, max_wait_s: float = 2.0) -> Permit:
        """Ask for a slot to send `cost` messages on `account` (limit: `rate` per second).

        `identity` (from `identity_of`) with `identical_s > 0` applies the identical-request rule.
        A slot up to `max_wait_s` ahead is reserved; a later one is not, and `wait_s` is the time until it.
        Raises `ThrottleUnavailable` if the shared store cannot be reached.
        """

    def pause(self, account: str, seconds: float) -> None:
        """Grant nothing on `account` for `seconds` (an earlier, longer pause is kept)."""

    def throttled_count(self, account: str) -> int:
        """How many `acquire()` calls on `account` were told to wait (`wait_s > 0`), for logs and ops."""

    def given_back_count(self, account: str) -> int:
        """How many slots on `account` were given back because their sender woke too late (`Permit.wait()`)."""

    def lateness(self, account: str) -> list[float]:
        """How late (s) after their slots the last `LATENESS_SAMPLES` wake-ups on `account` were, given back or
        not, newest first; a process reports its wake-ups with its next `acquire()` on the account."""

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class _Schedule:
    """`rate` turned into integer microseconds, the unit both backends compute in (exact in a double)."""

    interval_us: int
    window_us: int
    capacity: int
    weight: int

    @classmethod
    def of(cls, rate: float, cost: int, margin_s: float) -> "_Schedule":
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if cost < 1:
            raise ValueError(f"cost must be at least 1, got {cost!r}")
        window_us = round((1 + margin_s) * _MICRO)
        # Fewer than one message per second still allows one per window; spacing then does the limiting.
        capacity = max(1, math.floor(rate))
        # A message longer than the whole window's capacity can only ever go alone in its window.
        return cls(math.ceil(window_us / rate), window_us, capacity, min(cost, capacity))

    @property
    def spacing_suffices(self) -> bool:
        """Whether even spacing alone keeps every window within `capacity` once this message is granted, so
        that the grants in its window need not be counted: true for one part at a whole-number rate, the
        common case, which then costs one read instead of a read of the whole window (at 500/s, 500 grants).

        Each grant is at least `weight · interval` after the previous one, so the grants before this one
        in any window weigh less than window / interval: with it, at most ceil(window / interval) - 1 +
        `weight`. That holds only if every grant in the window was spaced at this interval: after a change
        of rate (workers restarted with another `SMS_<P>_RATE`, or old and new side by side during a rolling
        restart), grants made at a higher rate are still in the window for a second. So each store also
        keeps its account's current *run*, the interval of the latest grants and the slot from which they
        cover the window (the first grant's, or a window earlier if there was no grant before it), and takes
        the shortcut only once the run covers the whole window."""
        return math.ceil(self.window_us / self.interval_us) - 1 + self.weight <= self.capacity

    @property
    def horizon_us(self) -> int:
        """How far back a grant can still constrain a new one (by spacing or by the window)."""
        return max(self.window_us, self.capacity * self.interval_us)


def _identical_us(identity: str | None, identical_s: float, margin_s: float) -> int:
    """The identical-request interval between slot times, with the same margin as the rate window so that
    arrival jitter cannot bring two identical requests closer than `identical_s` at the provider."""
    return round((identical_s + margin_s) * _MICRO) if identity and identical_s > 0 else 0


def _permit(wait_us: int, reserved: bool, reason: str) -> Permit:
    return Permit(max(0, wait_us) / _MICRO, reserved, reason)


class _Wakeups:
    """Wake-up lateness (µs) this process has seen but not yet reported, per account; the next `acquire()` on the
    account takes them to the store. Thread-safe (a thread pool shares one throttle)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {}

    def add(self, account: str, late_us: int) -> None:
        with self._lock:
            pending = self._pending.setdefault(account, [])
            if len(pending) < LATENESS_SAMPLES:
                pending.append(late_us)

    def take(self, account: str) -> list[int]:
        with self._lock:
            return self._pending.pop(account, [])


def _reserved(wait_s: float, start_at: float, start_by: float, started, give_back, again) -> Permit:
    return Permit(wait_s, True, "ok", _Slot(start_at, start_by, started, give_back, again))


# Keeps the lateness figures ARGV[first..] in the list `key`, the newest `kept` of them, for `ttl` seconds.
_RECORD_LATENESS_LUA = """
local function record_lateness(key, kept, ttl, first)
  if #ARGV >= first then
    redis.call('LPUSH', key, unpack(ARGV, first))
    redis.call('LTRIM', key, 0, tonumber(kept) - 1)
    redis.call('EXPIRE', key, ttl)
  end
end
"""

# KEYS: 1 slots (zset: member "slot:weight", score slot), 2 pause, 3 identical mark (read only with an identity),
#       4 throttled counter, 5 run (hash: interval of the latest grants, start = from when they cover the window),
#       6 lateness (list of µs, newest first).
# ARGV: 1 interval_us, 2 window_us, 3 capacity, 4 weight, 5 identical_us, 6 max_wait_us, 7 horizon_us,
#       8 counter ttl s, 9 whether spacing suffices (1/0; see `_Schedule.spacing_suffices`), 10 lateness figures
#       kept, 11... this process's wake-up lateness since its last call (µs).
# Returns {wait_us, reserved (0/1), reason, slot_us}. Numbers are written with %d: tostring() would round them.
_ACQUIRE_LUA = _RECORD_LATENESS_LUA + """
record_lateness(KEYS[6], ARGV[10], ARGV[8], 11)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, window, capacity, weight = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local identical, max_wait, horizon = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local function refuse(wait, reason)
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  return {string.format('%d', wait), 0, reason, '0'}
end

if identical > 0 then
  local last = redis.call('GET', KEYS[3])
  if last and tonumber(last) + identical > now then
    return refuse(tonumber(last) + identical - now, 'identical')
  end
end

local paused_until = redis.call('GET', KEYS[2])
if paused_until and tonumber(paused_until) > now then
  return refuse(tonumber(paused_until) - now, 'paused')
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%d', now - horizon))
local slot = now
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local run = redis.call('HMGET', KEYS[5], 'interval', 'start')
local same_run = tonumber(run[1]) == interval
if #last > 0 then
  slot = math.max(slot, tonumber(last[2]) + tonumber(string.match(last[1], ':(%d+)$')) * interval)
  if ARGV[9] == '0' or not same_run or tonumber(run[2]) > slot - window then
    -- Slots only grow, so each grant that still counts moves the slot to where it leaves the window.
    local grants = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', slot - window), '+inf',
                              'WITHSCORES')
    local scores, weights, in_window = {}, {}, 0
    for i = 1, #grants / 2 do
      scores[i] = tonumber(grants[2 * i])
      weights[i] = tonumber(string.match(grants[2 * i - 1], ':(%d+)$'))
      in_window = in_window + weights[i]
    end
    local i = 1
    while in_window + weight > capacity do
      slot = scores[i] + window
      in_window = in_window - weights[i]
      i = i + 1
    end
  end
end

local wait = slot - now
if wait > max_wait then
  return refuse(wait, 'rate')
end
local slot_s = string.format('%d', slot)
redis.call('ZADD', KEYS[1], slot_s, slot_s .. ':' .. weight)
redis.call('PEXPIRE', KEYS[1], math.ceil((wait + horizon) / 1000) + 1)
if not same_run then
  -- A new run covers the window at once if nothing else is in it; else once the older grants have left it.
  local start = slot_s
  if #last == 0 then start = string.format('%d', slot - window) end
  redis.call('HSET', KEYS[5], 'interval', ARGV[1], 'start', start)
end
redis.call('PEXPIRE', KEYS[5], math.ceil((wait + horizon) / 1000) + 1)
if identical > 0 then
  redis.call('SET', KEYS[3], slot_s, 'PX', math.ceil((wait + identical) / 1000) + 1)
end
if wait > 0 then
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
return {string.format('%d', wait), 1, 'ok', slot_s}
"""

# KEYS: 1 slots, 2 identical mark (or a key that is never set), 3 given-back counter, 4 lateness.
# ARGV: 1 slot_us, 2 weight, 3 counter ttl s, 4 lateness figures kept, 5... wake-up lateness (µs), this one last.
# Releases a slot whose sender woke too late: it was never used, so neither its rate slot nor its identical mark
# (if still its own) holds anything back. Later grants keep their slots: taking a grant out of a spaced
# sequence leaves it spaced, so every rule still holds.
_GIVE_BACK_LUA = _RECORD_LATENESS_LUA + """
redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
record_lateness(KEYS[4], ARGV[4], ARGV[3], 5)
return 1
"""

# KEYS: 1 pause. ARGV: 1 seconds (µs). Extends, never shortens, a pause.
_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new_until = now + tonumber(ARGV[1])
local old = redis.call('GET', KEYS[1])
if old and tonumber(old) >= new_until then return 0 end
redis.call('SET', KEYS[1], string.format('%d', new_until), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1)
return 1
"""


class RedisThrottle:
    """The fleet-wide throttle: state in Redis, decisions in one Lua script on Redis's clock."""

    def __init__(self, url: str, *, prefix: str = KEY_PREFIX, guard_s: float = GUARD_S,
                 send_within_s: float = SEND_WITHIN_S, timeout_s: float = 2.0) -> None:
        # No silent retries inside redis-py: a timed-out script may have run, and a blind retry would reserve
        # a second slot (and trip the identical rule on itself). The caller's task retries instead.
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=30)
        parts = urlsplit(url)
        # Never the whole URL: it may carry a password.
        self._where = f"Redis at {parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"
        self._prefix = prefix
        self._send_within_s = send_within_s
        self._margin_s = send_within_s + guard_s
        self._wakeups = _Wakeups()
        self._acquire = self._client.register_script(_ACQUIRE_LUA)
        self._give_back = self._client.register_script(_GIVE_BACK_LUA)
        self._pause = self._client.register_script(_PAUSE_LUA)

    def _key(self, account: str, name: str) -> str:
        # The hash tag keeps one account's keys in one slot, so the script also runs on Redis Cluster.
        return f"{self._prefix}{{{account}}}:{name}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise ThrottleUnavailable(
                f"cannot {what}: {self._where} failed ({type(exc).__name__}: {exc}); not sending, will retry"
            ) from exc

    def acquire(self, account: str, rate: float, *, cost: int = 1, identity: str | None = None,
                identical_s: float = 60.0, max_wait_s: float = 2.0) -> Permit:
        schedule = _Schedule.of(rate, cost, self._margin_s)
        identical_us = _identical_us(identity, identical_s, self._margin_s)
        keys = [self._key(account, "slots"), self._key(account, "pause"),
                self._key(account, f"same:{identity}") if identity else self._key(account, "same"),
                self._key(account, "throttled"), self._key(account, "run"), self._key(account, "lateness")]
        args = [schedule.interval_us, schedule.window_us, schedule.capacity, schedule.weight,
                identical_us, round(max_wait_s * _MICRO), schedule.horizon_us, _COUNTER_TTL_S,
                int(schedule.spacing_suffices), LATENESS_SAMPLES, *self._wakeups.take(account)]
        asked = time.monotonic()
        wait_us, reserved, reason, slot_us = self._call("check the rate limit", self._acquire, keys=keys, args=args)
        answered = time.monotonic()
        reason = reason.decode() if isinstance(reason, bytes) else reason
        if not reserved:
            return _permit(int(wait_us), False, reason)
        wait_s = int(wait_us) / _MICRO
        # Redis read its clock after `asked` and before `answered`: the slot is no earlier than `asked + wait_s`
        # and no later than `answered + wait_s` here, whatever the two clocks say.
        return _reserved(
            wait_s, answered + wait_s, asked + wait_s + self._send_within_s, partial(self._wakeups.add, account),
            partial(self._release, account, [keys[0], keys[2], self._key(account, "given_back"), keys[5]],
                    [int(slot_us), schedule.weight]),
            partial(self.acquire, account, rate, cost=cost, identity=identity, identical_s=identical_s,
                    max_wait_s=max_wait_s))

    def _release(self, account: str, keys: list[str], slot: list[int], late_us: int) -> None:
        args = [*slot, _COUNTER_TTL_S, LATENESS_SAMPLES, *self._wakeups.take(account), late_us]
        self._call("give a late slot back", self._give_back, keys=keys, args=args)

    def pause(self, account: str, seconds: float) -> None:
        self._call("pause the account", self._pause, keys=[self._key(account, "pause")],
                   args=[round(seconds * _MICRO)])

    def throttled_count(self, account: str) -> int:
        return int(self._call("read the throttle counter", self._client.get, self._key(account, "throttled")) or 0)

    def given_back_count(self, account: str) -> int:
        return int(self._call("read the given-back counter", self._client.get,
                              self._key(account, "given_back")) or 0)

    def lateness(self, account: str) -> list[float]:
        figures = self._call("read the lateness figures", self._client.lrange, self._key(account, "lateness"), 0, -1)
        return [int(us) / _MICRO for us in figures]

    def close(self) -> None:
        self._client.close()


class LocalThrottle:
    """The same rules for the worker processes of one host, in a SQLite file, on this host's clock.

    SQLite's own file locking (`BEGIN IMMEDIATE`) makes each decision atomic across processes and threads (each
    thread of each process has its own connection); the file is `path`, with `path.lock` beside it for setting
    it up.
    """

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS grants (account TEXT NOT NULL, slot_us INTEGER NOT NULL, weight INTEGER NOT NULL,
                                       PRIMARY KEY (account, slot_us));
    CREATE TABLE IF NOT EXISTS marks (account TEXT NOT NULL, identity TEXT NOT NULL, slot_us INTEGER NOT NULL,
                                      expires_us INTEGER NOT NULL, PRIMARY KEY (account, identity));
    CREATE INDEX IF NOT EXISTS marks_expiry ON marks (expires_us);
    CREATE TABLE IF NOT EXISTS pauses (account TEXT PRIMARY KEY, until_us INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS counters (account TEXT PRIMARY KEY, throttled INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS runs (account TEXT PRIMARY KEY, interval_us INTEGER NOT NULL, start_us INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS given_back (account TEXT PRIMARY KEY, n INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS lateness (id INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL,
                                         late_us INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS lateness_account ON lateness (account, id);
    """

    def __init__(self, path: str | os.PathLike, *, guard_s: float = GUARD_S, send_within_s: float = SEND_WITHIN_S,
                 timeout_s: float = 5.0) -> None:
        self._path = Path(path)
        self._send_within_s = send_within_s
        self._margin_s = send_within_s + guard_s
        self._wakeups = _Wakeups()
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[sqlite3.Connection] = []  # by this process's threads, for close()
        self._pid = os.getpid()

    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross a fork (Celery's prefork pool) nor be used by two threads at once (the
        # threads pool): each thread of each process opens its own.
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, timeout=self._timeout_s, isolation_level=None, check_same_thread=False)
            # Switching to WAL fails at once ("database is locked", no busy wait) while another process uses
            # the file, so processes set up one at a time and only the first one switches.
            with open(self._path.with_name(self._path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(self._SCHEMA)
            # Losing the last grants in a power cut costs nothing; an fsync per grant costs arrival jitter.
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db, self._local.pid = db, os.getpid()
            with self._lock:
                if self._pid != os.getpid():  # the parent's connections are the parent's to close
                    self._opened, self._pid = [], os.getpid()
                self._opened.append(db)
        return db

    def _transaction(self, what: str, fn):
        try:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db, time.time_ns() // 1000)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except (sqlite3.Error, OSError) as exc:
            raise ThrottleUnavailable(
                f"cannot {what}: the throttle file {self._path} failed ({exc}); not sending, will retry"
            ) from exc

    @staticmethod
    def _count_throttled(db: sqlite3.Connection, account: str) -> None:
        db.execute("INSERT INTO counters VALUES (?, 1) ON CONFLICT (account) DO UPDATE SET throttled = throttled + 1",
                   (account,))

    def _refuse(self, db: sqlite3.Connection, account: str, until_us: int, reason: str) -> tuple[int, bool, str]:
        self._count_throttled(db, account)
        return until_us, False, reason

    def acquire(self, account: str, rate: float, *, cost: int = 1, identity: str | None = None,
                identical_s: float = 60.0, max_wait_s: float = 2.0) -> Permit:
        schedule = _Schedule.of(rate, cost, self._margin_s)
        identical_us = _identical_us(identity, identical_s, self._margin_s)
        wakeups = self._wakeups.take(account)

        def decide(db: sqlite3.Connection, now: int) -> tuple[int, bool, str]:
            self._record_lateness(db, account, wakeups)
            return self._decide(db, now, account, schedule, identity, identical_us, round(max_wait_s * _MICRO))

        until_us, reserved, reason = self._transaction("check the rate limit", decide)
        # The wait counts from when the caller gets it, not from before the commit: same clock, less jitter.
        wait_us, answered = until_us - time.time_ns() // 1000, time.monotonic()
        if not reserved:
            return _permit(wait_us, False, reason)
        start_at = answered + wait_us / _MICRO  # in the past if the commit took long: that counts as lateness
        return _reserved(
            max(0, wait_us) / _MICRO, start_at, start_at + self._send_within_s, partial(self._wakeups.add, account),
            partial(self._release, account, identity, until_us),
            partial(self.acquire, account, rate, cost=cost, identity=identity, identical_s=identical_s,
                    max_wait_s=max_wait_s))

    def _release(self, account: str, identity: str | None, slot_us: int, late_us: int) -> None:
        """The Redis give-back script's work (see `_GIVE_BACK_LUA`)."""
        wakeups = [*self._wakeups.take(account), late_us]

        def release(db: sqlite3.Connection, now: int) -> None:
            db.execute("DELETE FROM grants WHERE account = ? AND slot_us = ?", (account, slot_us))
            db.execute("DELETE FROM marks WHERE account = ? AND identity = ? AND slot_us = ?",
                       (account, identity or "", slot_us))
            db.execute("INSERT INTO given_back VALUES (?, 1) ON CONFLICT (account) DO UPDATE SET n = n + 1",
                       (account,))
            self._record_lateness(db, account, wakeups)

        self._transaction("give a late slot back", release)

    @staticmethod
    def _record_lateness(db: sqlite3.Connection, account: str, wakeups: list[int]) -> None:
        if wakeups:
            db.executemany("INSERT INTO lateness (account, late_us) VALUES (?, ?)",
                           [(account, late_us) for late_us in wakeups])
            db.execute("DELETE FROM lateness WHERE account = ? AND id <= (SELECT id FROM lateness WHERE account = ? "
                       "ORDER BY id DESC LIMIT 1 OFFSET ?)", (account, account, LATENESS_SAMPLES))

    def _decide(self, db: sqlite3.Connection, now: int, account: str, schedule: _Schedule,
                identity: str | None, identical_us: int, max_wait_us: int) -> tuple[int, bool, str]:
        """The Redis script's decision, step for step (see `_ACQUIRE_LUA`), as (until when, reserved, reason)."""
        db.execute("DELETE FROM marks WHERE expires_us <= ?", (now,))
        if identical_us:
            row = db.execute("SELECT slot_us FROM marks WHERE account = ? AND identity = ?",
                             (account, identity)).fetchone()
            if row and row[0] + identical_us > now:
                return self._refuse(db, account, row[0] + identical_us, "identical")

        row = db.execute("SELECT until_us FROM pauses WHERE account = ?", (account,)).fetchone()
        if row and row[0] > now:
            return self._refuse(db, account, row[0], "paused")

        db.execute("DELETE FROM grants WHERE account = ? AND slot_us < ?", (account, now - schedule.horizon_us))
        slot = now
        last = db.execute("SELECT slot_us, weight FROM grants WHERE account = ? ORDER BY slot_us DESC LIMIT 1",
                          (account,)).fetchone()
        run = db.execute("SELECT interval_us, start_us FROM runs WHERE account = ?", (account,)).fetchone()
        same_run = run is not None and run[0] == schedule.interval_us
        if last:
            slot = max(slot, last[0] + last[1] * schedule.interval_us)
            if not (schedule.spacing_suffices and same_run and run[1] <= slot - schedule.window_us):
                grants = db.execute("SELECT slot_us, weight FROM grants WHERE account = ? AND slot_us > ? "
                                    "ORDER BY slot_us", (account, slot - schedule.window_us)).fetchall()
                in_window = sum(weight for _, weight in grants)
                for at, weight in grants:
                    if in_window + schedule.weight <= schedule.capacity:
                        break
                    slot = at + schedule.window_us
                    in_window -= weight

        wait = slot - now
        if wait > max_wait_us:
            return self._refuse(db, account, slot, "rate")
        db.execute("INSERT INTO grants VALUES (?, ?, ?)", (account, slot, schedule.weight))
        if not same_run:
            start = slot if last else slot - schedule.window_us  # as in the Redis script
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", (account, schedule.interval_us, start))
        if identical_us:
            db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?, ?, ?)",
                       (account, identity, slot, slot + identical_us))
        if wait > 0:
            self._count_throttled(db, account)
        return slot, True, "ok"

    def pause(self, account: str, seconds: float) -> None:
        def pause(db: sqlite3.Connection, now: int) -> None:
            db.execute("INSERT INTO pauses VALUES (?, ?) ON CONFLICT (account) DO UPDATE "
                       "SET until_us = max(until_us, excluded.until_us)", (account, now + round(seconds * _MICRO)))
        self._transaction("pause the account", pause)

    def throttled_count(self, account: str) -> int:
        row = self._transaction("read the throttle counter", lambda db, now: db.execute(
            "SELECT throttled FROM counters WHERE account = ?", (account,)).fetchone())
        return row[0] if row else 0

    def given_back_count(self, account: str) -> int:
        row = self._transaction("read the given-back counter", lambda db, now: db.execute(
            "SELECT n FROM given_back WHERE account = ?", (account,)).fetchone())
        return row[0] if row else 0

    def lateness(self, account: str) -> list[float]:
        rows = self._transaction("read the lateness figures", lambda db, now: db.execute(
            "SELECT late_us FROM lateness WHERE account = ? ORDER BY id DESC", (account,)).fetchall())
        return [late_us / _MICRO for late_us, in rows]

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for db in self._opened:
                    db.close()
            self._opened, self._pid = [], os.getpid()
            self._local = threading.local()


def make_throttle(settings) -> Throttle:
    """The fleet-wide `RedisThrottle` when `settings.redis_url` is set, else a `LocalThrottle` under var/."""
    if settings.redis_url:
        # Per provider account, not per deployment (`SMS_REDIS_PREFIX`): deployments on one account share its limits.
        return RedisThrottle(settings.redis_url, prefix=settings.throttle_prefix + KEY_PREFIX)
    from settings import VAR_DIR

    return LocalThrottle(VAR_DIR / "throttle.sqlite3")
