"""Whether a node can serve: Redis (on a cluster: every slot) and every database primary answer
in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from server.adapters.cluster_health import ClusterHealth
from server.adapters.db.router import ShardRouter


async def _reason(name: str, check: Awaitable[Any], timeout_s: float) -> str | None:
    try:
        await asyncio.wait_for(check, timeout_s)
    except TimeoutError:
        return f"{name}: no answer within {timeout_s:g}s"
    except Exception as exc:  # any failure means "not ready"; the reason says which
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{name}: {detail}"
    return None


async def _cluster_reasons(cluster: ClusterHealth, timeout_s: float) -> list[str]:
    try:
        return await asyncio.wait_for(cluster.unready_reasons(), timeout_s * 2)
    except TimeoutError:
        return [f"redis cluster: no probe answer within {timeout_s * 2:g}s"]


async def unready_reasons(
    router: ShardRouter, redis: Any, timeout_s: float, cluster: ClusterHealth | None = None
) -> list[str]:
    """Why the node is not ready (empty when it is): one line per unreachable dependency.

    With `cluster` (a Redis Cluster), Redis is ready when every slot's master answers (see
    `cluster_health`); else when the one server answers PING. All dependencies are probed at
    once, so the answer takes at most `timeout_s` (a cluster probe: the slot map, then the
    masters' PINGs, so twice that).
    """
    if cluster is not None:
        redis_reasons = _cluster_reasons(cluster, timeout_s)
    else:
        redis_reasons = _single(_reason("redis", redis.ping(), timeout_s))
    checks = [
        _reason(f"postgres {database.name} primary", router.ping_primary(database), timeout_s)
        for database in router.db.all_databases()
    ]
    found, databases = await asyncio.gather(redis_reasons, asyncio.gather(*checks))
    return found + [reason for reason in databases if reason is not None]


async def _single(reason: Awaitable[str | None]) -> list[str]:
    found = await reason
    return [] if found is None else [found]
