"""The cost bucket of GraphQL callers: Shopify's leaky bucket as GCRA in Redis.

Every caller (a user, or an address when anonymous) has a bucket of `maximum` cost units
that refills at `restore_per_second`; buckets live in Redis (`server.adapters.ratelimit`), so all nodes
share them (each node leases a small part of a busy bucket, as the REST limiter does). An
operation is charged its requested cost before it runs (refused with `THROTTLED` when the
bucket holds less), then refunded the difference to its actual cost.
"""

from __future__ import annotations

import math
from typing import Any

from server.adapters.ratelimit import Decision, LeasedRateLimiter, Limit


class CostThrottle:
    """Charges and refunds query cost; reports `throttleStatus`."""

    def __init__(self, limiter: LeasedRateLimiter, maximum: int, restore_per_second: float) -> None:
        """`limiter` is the node's: a busy caller's charges come from a lease of 5% of the
        bucket taken from Redis at once, so most operations make no Redis round trip."""
        self.limit = Limit("graphql", restore_per_second, maximum)
        self._limiter = limiter

    async def charge(self, caller: str, cost: int) -> Decision:
        """Take `cost` units from `caller`'s bucket if it holds them (cost 0: only look)."""
        return await self._limiter.check(self.limit, caller, cost)

    async def refund(self, caller: str, units: int) -> Decision:
        """Give back units charged but not used."""
        return await self._limiter.refund(self.limit, caller, units)

    def retry_after_s(self, decision: Decision) -> float:
        """Seconds until a refused operation could run (a cost above the bucket size never
        can: then the time a full bucket takes to refill)."""
        if math.isfinite(decision.retry_after_s):
            return decision.retry_after_s
        return self.limit.burst / self.limit.rate_per_s

    def status(self, remaining: int) -> dict[str, Any]:
        """`throttleStatus` of a bucket with `remaining` units."""
        return {
            "maximumAvailable": self.limit.burst,
            "currentlyAvailable": remaining,
            "restoreRate": self.limit.rate_per_s,
        }
