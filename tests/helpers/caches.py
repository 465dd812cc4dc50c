"""The Redis cache tests' helpers: a counting loader, and cache "nodes" with their own Redis
clients."""

from __future__ import annotations

import asyncio
from typing import Any

from server.adapters.cache import CachedLoader, CacheInvalidationListener
from server.adapters.redis_client import open_redis
from server.wiring.settings import Settings


class CountingLoader:
    """A loader returning `{"id": key, "n": <call number>}` after `delay_s`, counting calls."""

    def __init__(self, key: int | str = 1, delay_s: float = 0.0) -> None:
        self.key = key
        self.delay_s = delay_s
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        number = self.calls
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return {"id": self.key, "n": number, "tags": ["a", "b"], "price": {"cents": 1999}}


class Nodes:
    """Cache instances ("nodes") with their own Redis clients; `close()` releases them all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: list[Any] = []
        self.caches: list[CachedLoader] = []
        self.listeners: list[CacheInvalidationListener] = []

    def cache(self, **options: Any) -> CachedLoader:
        redis = open_redis(self.settings)
        self.clients.append(redis)
        cache = CachedLoader(redis, **options)
        self.caches.append(cache)
        return cache

    async def listen(self, cache: CachedLoader) -> CacheInvalidationListener:
        listener = CacheInvalidationListener(self.clients[self.caches.index(cache)], cache)
        listener.start()
        await listener.wait_subscribed()
        self.listeners.append(listener)
        return listener

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.stop()
        for cache in self.caches:
            await cache.aclose()
        for redis in self.clients:
            await redis.aclose()
