"""The node's Redis client, chosen by setting: a single server or a Redis Cluster."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from server.wiring.settings import Settings

# Commands are retried a few times on connection errors so a Redis restart costs latency,
# not errors, for idempotent reads; the broker handles resubscription itself.
_RETRY_ATTEMPTS = 2


def open_redis(settings: Settings) -> Any:
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
