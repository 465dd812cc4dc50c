"""Presence: how many shoppers view each product, across nodes, healing when a node dies.

Each node counts its own viewers per product and, at most once per `PRESENCE_PERIOD_S`,
writes its count for the products that changed (and refreshes the rest before they expire)
into `{inventory:product:42}:presence` — a hash of node -> count beside a sorted set of
node -> expiry time. The total counts only nodes whose entry has not expired, so a node that
dies stops counting within its TTL (`FM_PRESENCE_TTL_S`, 15 s) plus a third of the surviving
nodes' TTL, how often they refresh. When a product's total changes, the node that
noticed publishes `{event: "presence", product_id, viewers}` on the product's stream; so does
a node where a viewer joined since its last flush even if the total did not change (one left
as another came, as when a shopper goes from a product's card to its page), since the
newcomer's first message is the stock and it would otherwise show no count at all. A crowd
arriving at once thus costs one message per period, not one per shopper.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from server.common.logs import get_logger
from server.domain.events import Publish, ViewersChanged

PRESENCE_PERIOD_S = 1.0
PRESENCE_TTL_S = 15.0
_log = get_logger("finalmarket.presence")

# KEYS: counts hash, expiry zset. ARGV: node, count, now, expires_at.
# Returns the total viewers over live nodes.
_UPDATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local live = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, node in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('ZSCORE', KEYS[2], node) == false and node ~= ARGV[1] then
    redis.call('HDEL', KEYS[1], node)
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local total = 0
for _, count in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(count) end
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[5]) * 1000))
redis.call('PEXPIRE', KEYS[2], math.floor(tonumber(ARGV[5]) * 1000))
return total
"""


def presence_keys(product_id: int) -> tuple[str, str]:
    """(counts hash, expiry sorted set) of a product, in its stream's hash tag."""
    tag = "{inventory:product:" + str(product_id) + "}"
    return f"{tag}:presence", f"{tag}:presence-expiry"


class Presence:
    """Local viewer counts of one node, flushed to Redis and published when totals change."""

    def __init__(
        self, redis: Any, node_id: str, publish: Publish, ttl_s: float = PRESENCE_TTL_S
    ) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._node_id = node_id
        self._publish = publish
        self._update = redis.register_script(_UPDATE)
        self._local: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._joined: set[int] = set()  # a viewer arrived since the last flush: announce
        self._published: dict[int, int] = {}
        self._refreshed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def viewer_joined(self, product_id: int) -> None:
        """A connection on this node started viewing `product_id`."""
        self._local[product_id] = self._local.get(product_id, 0) + 1
        self._dirty.add(product_id)
        self._joined.add(product_id)

    def viewer_left(self, product_id: int) -> None:
        """A connection on this node stopped viewing `product_id`."""
        count = self._local.get(product_id, 0) - 1
        if count > 0:
            self._local[product_id] = count
        else:
            self._local.pop(product_id, None)
        self._dirty.add(product_id)

    def start(self) -> None:
        """Start the periodic flush (owned; `stop` cancels it)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop flushing and withdraw this node's counts."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        withdrawn = set(self._local) | self._dirty
        self._local.clear()
        self._dirty = withdrawn
        try:
            await asyncio.wait_for(self.flush(), 2.0)
        except Exception as exc:  # Redis away at shutdown: the entries expire by themselves
            _log.warning("presence_withdraw_failed", error=repr(exc))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_PERIOD_S)
            try:
                await self.flush()
            except Exception as exc:
                _log.warning("presence_flush_failed", error=repr(exc))

    async def flush(self) -> None:
        """Write changed counts (and refresh all before they expire); publish changed totals,
        and the total of products a viewer joined."""
        now = time.time()
        products = set(self._dirty)
        if now - self._refreshed_at > self._ttl_s / 3:
            products |= set(self._local)
            self._refreshed_at = now
        self._dirty.clear()
        joined, self._joined = self._joined, set()
        for product_id in products:
            count = self._local.get(product_id, 0)
            total = int(
                await self._update(
                    keys=list(presence_keys(product_id)),
                    args=[self._node_id, count, now, now + self._ttl_s, self._ttl_s * 2],
                )
            )
            if self._published.get(product_id) != total or (count and product_id in joined):
                self._published[product_id] = total
                if count == 0 and total == 0:
                    self._published.pop(product_id, None)
                event = ViewersChanged(product_id, total)
                await self._publish(event.stream, event.to_message())
