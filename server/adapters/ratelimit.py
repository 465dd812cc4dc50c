"""Rate limiting with GCRA (the generic cell rate algorithm) in Redis: one Lua script per check.

GCRA is the algorithm of Redis Cell and throttled: a bucket is one number per key, its
*theoretical arrival time* (TAT), the moment the bucket would be empty again if nothing else
arrived. With an emission interval `T = 1 / rate` and a tolerance `tau = T * burst`, a request
costing `n` is allowed when `max(TAT, now) + n * T - now <= tau`, and then moves the TAT there.
That gives exactly `burst` requests at once and `rate` per second sustained, with no background
refill and no race: the script reads and writes the TAT atomically.

Design points:
- **Redis server time** (`redis.call('TIME')`) is the clock, so nodes with skewed clocks agree.
  Times are whole microseconds, kept exactly (Lua numbers are doubles: exact below 2^53).
- **The TAT key expires** (`PX`) when the bucket is full again, so idle keys cost nothing.
- **cost > 1** spends several units at once (GraphQL spends its query cost from the same
  bucket as REST); a refused request consumes nothing. A cost larger than the burst can never
  be allowed: it is refused with `retry_after_s = inf` (the caller answers "too expensive", not
  "try later").
- **Returned units**: a check may first give back units charged earlier and never used (a
  per-node lease's expired leftovers, `LeasedRateLimiter`), never past a full bucket.
- **Keys are hash-tagged** (`{rl:<name>:<key>}`): one key per script call, Cluster-safe.

Headers follow draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy: "name";q=<burst>;w=<s>`
(the window is the time a full burst takes to refill) and `RateLimit: "name";r=<left>;t=<s>`
(seconds until the bucket is full again), plus `Retry-After` on refusal.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any

_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local returned = tonumber(ARGV[4] or '0')
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if returned > 0 then tat = math.max(now, tat - interval * returned) end
local function store(value)
  if value <= now then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.0f', value),
               'PX', math.max(1, math.ceil((value - now) / 1000)))
  end
end
local increment = interval * cost
if increment > tau then
  if returned > 0 then store(tat) end
  return {0, math.max(0, math.floor((now + tau - tat) / interval + 1e-9)), -1, tat - now}
end
local new_tat = tat + increment
if new_tat - now > tau then
  if returned > 0 then store(tat) end
  local remaining = math.max(0, math.floor((now + tau - tat) / interval + 1e-9))
  return {0, remaining, math.ceil(new_tat - tau - now), math.ceil(tat - now)}
end
if cost > 0 or returned > 0 then store(new_tat) end
local remaining = math.max(0, math.floor((now + tau - new_tat) / interval + 1e-9))
return {1, remaining, 0, math.ceil(new_tat - now)}
"""

# Gives back `units` a request was charged but did not use (GraphQL charges its requested cost
# up front and refunds the difference to the actual cost, as Shopify does); never past full.
_REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = math.max(now, tat - interval * tonumber(ARGV[3]))
if new_tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
end
return {math.max(0, math.floor((now + tau - new_tat) / interval + 1e-9)), math.ceil(new_tat - now)}
"""

_US = 1_000_000
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_PLAIN_KEY = 128


@dataclass(frozen=True, slots=True)
class Limit:
    """A named policy: `rate_per_s` sustained, `burst` at once (also the most one call may cost).

    The name appears in the `RateLimit` headers and in the Redis key, so it is restricted to
    letters, digits and `_.:-`.
    """

    name: str
    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"rate limit name {self.name!r}: use 1-64 of [A-Za-z0-9_.:-]")
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"rate limit {self.name}: rate_per_s must be positive")
        if self.burst < 1:
            raise ValueError(f"rate limit {self.name}: burst must be at least 1")

    @property
    def window_s(self) -> int:
        """Seconds a full burst takes to refill (the policy's `w`), at least 1."""
        return max(1, math.ceil(self.burst / self.rate_per_s))

    def policy_header(self) -> str:
        """The `RateLimit-Policy` value of this limit."""
        return f'"{self.name}";q={self.burst};w={self.window_s}'


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check.

    `remaining`: units still available now (after this request, if allowed).
    `retry_after_s`: 0 when allowed; else the wait until this same request would be allowed
    (`inf` when its cost exceeds the burst: it never will be).
    `reset_after_s`: time until the bucket is full again.
    """

    limit: Limit
    allowed: bool
    remaining: int
    retry_after_s: float
    reset_after_s: float

    def headers(self) -> dict[str, str]:
        """Response headers: `RateLimit-Policy`, `RateLimit`, and `Retry-After` when refused
        with a finite wait (integer seconds, rounded up)."""
        name = self.limit.name
        values = {
            "RateLimit-Policy": self.limit.policy_header(),
            "RateLimit": f'"{name}";r={self.remaining};t={math.ceil(self.reset_after_s)}',
        }
        if not self.allowed and math.isfinite(self.retry_after_s):
            values["Retry-After"] = str(retry_after_whole_s(self.retry_after_s))
        return values


def retry_after_whole_s(wait_s: float) -> int:
    """The `Retry-After` of a finite wait: whole seconds, rounded up, at least 1 (sooner
    would be refused again). Messages that name the wait use it too, so they agree."""
    return max(1, math.ceil(wait_s))


def limit_key(limit: Limit, key: str) -> str:
    """The Redis key of `key`'s bucket under `limit`: one hash tag per bucket.

    Keys that could break the tag (braces) or are long are replaced by their SHA-256.
    """
    if "{" in key or "}" in key or len(key) > _MAX_PLAIN_KEY:
        key = "h:" + hashlib.sha256(key.encode()).hexdigest()
    return f"{{rl:{limit.name}:{key}}}"


class RateLimiter:
    """Checks requests against `Limit`s; each check is one EVALSHA of the GCRA script."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(_GCRA)
        self._refund = redis.register_script(_REFUND)

    async def check(self, limit: Limit, key: str, cost: int = 1, returned: int = 0) -> Decision:
        """Spend `cost` units of `key`'s bucket under `limit` if they are available.

        `key` names the client (an IP address, `user:42`); cost 0 only reports the state.
        `returned` units charged earlier but never used (a lease's leftovers) are given back
        first, in the same script call, whether or not the check is allowed.
        """
        if cost < 0 or returned < 0:
            raise ValueError("cost and returned must not be negative")
        interval_us = _US / limit.rate_per_s
        tau_us = interval_us * limit.burst
        allowed, remaining, retry_us, reset_us = await self._script(
            keys=[limit_key(limit, key)],
            args=[repr(interval_us), repr(tau_us), cost, returned],
        )
        retry = math.inf if int(retry_us) < 0 else int(retry_us) / _US
        return Decision(
            limit=limit,
            allowed=bool(allowed),
            remaining=int(remaining),
            retry_after_s=retry,
            reset_after_s=max(0, int(reset_us)) / _US,
        )

    async def refund(self, limit: Limit, key: str, units: int) -> Decision:
        """Give `units` back to `key`'s bucket (never beyond full); returns its new state."""
        if units < 0:
            raise ValueError("units must not be negative")
        interval_us = _US / limit.rate_per_s
        remaining, reset_us = await self._refund(
            keys=[limit_key(limit, key)],
            args=[repr(interval_us), repr(interval_us * limit.burst), units],
        )
        return Decision(limit, True, int(remaining), 0.0, max(0, int(reset_us)) / _US)


LEASE_FRACTION = 0.05  # of the burst, taken from Redis at once by a busy key
LEASE_TTL_S = 1.0  # a lease's units are spent within this, or given back at the next refill
_MAX_LEASES = 100_000


@dataclass(slots=True)
class _Lease:
    """Units of one bucket this node was charged in Redis and has not spent yet.

    `refill` is the one acquisition in flight for the bucket: concurrent requests that find
    the lease dry await it instead of each taking a lease of their own (which drained the
    shared bucket into this node's leases). It resolves to None, or to the error the
    acquisition raised, which its waiters raise too (one Redis timeout, not one each).
    `direct_until`: after a refused acquisition (less than a lease left in Redis), requests
    are checked against Redis one by one until then, so the last units are counted exactly.
    `refused`/`refused_until`: once such a check is refused, Redis would refuse the same cost
    (or more) until its `retry_after_s` has passed (buckets refill at their rate and other
    nodes only take from them), so until then the refusal is answered here, with no round
    trip: a flooding client costs Redis one check per refill interval, not one per request.
    """

    units: int = 0
    expires_at: float = 0.0
    last: Decision | None = None  # the acquisition that granted the units (for headers)
    refill: asyncio.Future[BaseException | None] | None = None
    direct_until: float = 0.0
    refused: Decision | None = None
    refused_cost: int = 0
    refused_until: float = 0.0


class LeasedRateLimiter:
    """`RateLimiter` with per-node leases: a busy key takes `LEASE_FRACTION` of its burst from
    Redis in one check and spends it locally, so most requests cost no Redis round trip.

    The bucket in Redis is still the one truth shared by all nodes: every unit spent locally
    was charged there first, so the limit is never exceeded, only reached slightly earlier, by
    at most one lease per node: a node holds one lease per key, and concurrent requests that
    find it dry share one acquisition (one refill at a time). Units a lease did not spend
    within `LEASE_TTL_S` are given back to Redis with the key's next acquisition on this node.
    Small bursts (lease of 1 unit) behave exactly like `RateLimiter`.
    """

    def __init__(self, limiter: RateLimiter, clock: Any = None) -> None:
        self._limiter = limiter
        self._clock = clock or time.monotonic
        self._leases: dict[tuple[str, str], _Lease] = {}

    @staticmethod
    def lease_size(limit: Limit) -> int:
        """Units one acquisition takes from Redis for a busy key of `limit`."""
        return max(1, int(limit.burst * LEASE_FRACTION))

    async def check(self, limit: Limit, key: str, cost: int = 1) -> Decision:
        """Allow or refuse a request of `key` costing `cost` units under `limit` (cost 0:
        only look). A cost the local lease covers costs no Redis round trip."""
        if cost < 0:
            raise ValueError("cost must not be negative")
        lease_key = (limit.name, key)
        size = self.lease_size(limit)
        while True:
            lease = self._leases.get(lease_key)
            now = self._clock()
            live = lease is not None and lease.expires_at > now
            if lease is not None and live and 0 < cost <= lease.units:
                lease.units -= cost
                return self._with_lease(limit, lease)
            if cost == 0:
                decision = await self._limiter.check(limit, key, cost=0)
                if lease is not None and live and lease.units:
                    remaining = decision.remaining + lease.units
                    return Decision(limit, True, remaining, 0.0, decision.reset_after_s)
                return decision
            if cost >= size or (lease is not None and lease.direct_until > now):
                return await self._direct(limit, key, cost, lease, now)
            if lease is not None and lease.refill is not None:
                failure = await asyncio.shield(lease.refill)
                if failure is not None:
                    raise failure
                continue  # draw from what it brought, or refill again if others took it
            if lease is None:
                if len(self._leases) >= _MAX_LEASES:
                    self._leases.clear()  # a bound, not a policy: busy keys lease again
                lease = self._leases[lease_key] = _Lease()
            await self._refill(limit, key, lease, size)

    async def _direct(
        self, limit: Limit, key: str, cost: int, lease: _Lease | None, now: float
    ) -> Decision:
        """One check of `cost` against Redis, unless a refusal of at most `cost` is still
        live here (then that refusal, with what is left of its wait)."""
        refused = lease.refused if lease is not None else None
        if (
            lease is not None
            and refused is not None
            and now < lease.refused_until
            and cost >= lease.refused_cost
        ):
            elapsed = lease.refused_until - refused.retry_after_s
            return Decision(
                limit,
                False,
                0,
                lease.refused_until - now,
                max(0.0, refused.reset_after_s - (now - elapsed)),
            )
        decision = await self._limiter.check(limit, key, cost=cost)
        if not decision.allowed and math.isfinite(decision.retry_after_s):
            if lease is None:  # small bursts and large costs hold no lease until refused
                if len(self._leases) >= _MAX_LEASES:
                    self._leases.clear()
                lease = self._leases.setdefault((limit.name, key), _Lease())
            lease.refused, lease.refused_cost = decision, cost
            lease.refused_until = self._clock() + decision.retry_after_s
        return decision

    async def _refill(self, limit: Limit, key: str, lease: _Lease, size: int) -> None:
        """Take `size` more units from Redis into `lease`, giving back leftovers that
        expired; the only acquisition in flight for this bucket on this node."""
        refill = lease.refill = asyncio.get_running_loop().create_future()
        returned = 0
        if lease.expires_at <= self._clock():
            returned, lease.units = lease.units, 0
        # On a failure it is unknown whether the script ran, so the returned units are not
        # kept for another try (which could give them back twice): stricter, never looser.
        outcome: BaseException | None = None
        try:
            decision = await self._limiter.check(limit, key, cost=size, returned=returned)
        except Exception as exc:
            outcome = exc
            raise
        finally:  # cancelled: waiters see None, and one of them acquires instead
            lease.refill = None
            refill.set_result(outcome)
        now = self._clock()
        lease.last = decision
        if decision.allowed:
            lease.units += size
            lease.expires_at = now + LEASE_TTL_S
            self._leases.setdefault((limit.name, key), lease)  # even if the bound cleared it
        else:
            lease.direct_until = now + min(decision.retry_after_s, LEASE_TTL_S)

    async def refund(self, limit: Limit, key: str, units: int) -> Decision:
        """Give back `units` charged but not used: to this node's lease when it holds one
        (they were taken from Redis with it), else to the bucket in Redis."""
        lease = self._leases.get((limit.name, key))
        if lease is not None:
            lease.refused_until = 0.0  # the bucket may allow sooner now: ask Redis again
        if lease is not None and lease.last is not None and lease.expires_at > self._clock():
            lease.units += units
            return self._with_lease(limit, lease)
        return await self._limiter.refund(limit, key, units)

    @staticmethod
    def _with_lease(limit: Limit, lease: _Lease) -> Decision:
        last = lease.last
        assert last is not None  # a live lease was granted by an acquisition
        return Decision(limit, True, max(0, last.remaining + lease.units), 0.0, last.reset_after_s)
