"""The node's Redis client, chosen by setting: a single server or a Redis Cluster."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot

# Commands are retried a few times on connection errors so a Redis restart costs latency,
# not errors, for idempotent reads; the broker handles resubscription itself.
_RETRY_ATTEMPTS = 2


class RedisSettings(Protocol):
    """What opening the client reads (`server.wiring.settings.Settings` has all of it)."""

    @property
    def redis_url(self) -> str: ...
    @property
    def redis_cluster(self) -> bool: ...
    @property
    def redis_timeout_s(self) -> float: ...
    @property
    def redis_max_connections(self) -> int: ...


def open_redis(settings: RedisSettings) -> Any:
    """A `redis.asyncio` client for `settings.redis_url` (cluster-aware when configured).

    No connection is made here: the first command connects, so a node starts while Redis is
    down and reports it on /readyz.
    """
    common: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), _RETRY_ATTEMPTS),
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **common)
    # A blocking pool makes a burst of commands (thousands of clients subscribing at once)
    # wait for a connection instead of failing; pub/sub takes one connection of its own.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        health_check_interval=30,
        **common,
    )
    return Redis(connection_pool=pool)


async def keys_in_slots(
    cluster: RedisCluster, slots: Collection[int], match: str, key_type: str
) -> list[bytes]:
    """Every key of type `key_type` matching `match` in `slots` of a Redis Cluster: one SCAN
    pass of each master now serving them (after a failover, what they still hold)."""
    if not slots:
        return []
    serving = map(cluster.nodes_manager.get_node_from_slot, slots)
    nodes = list({node.name: node for node in serving}.values())
    return [
        key
        async for key in cluster.scan_iter(
            match=match, count=1000, _type=key_type, target_nodes=nodes
        )
        if key_slot(key if isinstance(key, bytes) else str(key).encode()) in slots
    ]
