"""Receives other nodes' bumps over Redis pub/sub and clears this node's in-memory copies.

A small task of its own: it subscribes to `{cache}:bumps` and calls `cache.on_remote_bump` for
each bump made by another node. When the subscription breaks (Redis restart, network) it
reconnects with backoff on a fresh pub/sub connection and then clears the whole local layer,
since bumps published meanwhile were lost. Even without that, no local entry outlives its
freshness bound, so a lost message costs at most that much staleness.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.cache.keys import BUMP_CHANNEL
from server.cache.versions import decode_bump
from server.logs import get_logger

_log = get_logger("finalmarket.cache")

_RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, RuntimeError)


class BumpTarget(Protocol):
    """What the listener drives (`CachedLoader` is one)."""

    node_id: str

    def on_remote_bump(self, ns: str, ident: str | None = None) -> None: ...

    def invalidate_all_local(self) -> None: ...


class CacheInvalidationListener:
    """Feeds bumps published by other nodes to `cache`; `start()` and `await stop()`."""

    def __init__(self, redis: Any, cache: BumpTarget, channel: str = BUMP_CHANNEL) -> None:
        self._redis = redis
        self._cache = cache
        self._channel = channel
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._subscribed = asyncio.Event()
        self.reconnects = 0

    def start(self) -> None:
        """Start the listening task (owned by the listener; `stop` cancels it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    async def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        """Wait until the subscription is active (bumps published from now on arrive)."""
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def stop(self) -> None:
        """Stop listening and release the pub/sub connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_pubsub()

    async def _close_pubsub(self) -> None:
        self._subscribed.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    await self._pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    if failures:
                        self.reconnects += 1
                        self._cache.invalidate_all_local()
                        _log.info("cache_listener_reconnected")
                    failures = 0
                message = await self._pubsub.get_message(timeout=1.0)
            except _REDIS_DOWN as exc:
                if failures == 0:
                    _log.warning("cache_listener_disconnected", error=repr(exc))
                await self._close_pubsub()
                await asyncio.sleep(
                    _RECONNECT_BACKOFF_S[min(failures, len(_RECONNECT_BACKOFF_S) - 1)]
                )
                failures += 1
                continue
            if message is None or message.get("type") != "message":
                continue
            self._handle(message["data"])

    def _handle(self, data: bytes) -> None:
        try:
            ns, ident, origin = decode_bump(data)
        except Exception:
            _log.exception("cache_bad_bump_message")
            return
        if origin != self._cache.node_id:  # our own bumps were applied when made
            self._cache.on_remote_bump(ns, ident)
