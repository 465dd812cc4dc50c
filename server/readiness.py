"""Whether a node can serve: Redis and every database primary answer in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

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


async def unready_reasons(router: ShardRouter, redis: Any, timeout_s: float) -> list[str]:
    """Why the node is not ready (empty when it is): one line per unreachable dependency.

    All dependencies are probed at once, so the answer takes at most `timeout_s`.
    """
    checks = [_reason("redis", redis.ping(), timeout_s)]
    checks += [
        _reason(f"postgres {database.name} primary", router.ping_primary(database), timeout_s)
        for database in router.db.all_databases()
    ]
    return [reason for reason in await asyncio.gather(*checks) if reason is not None]
