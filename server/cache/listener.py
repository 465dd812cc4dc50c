"""Receives other nodes' bumps over Redis pub/sub and clears this node's in-memory copies.

It subscribes to `{cache}:bumps` (through `server.adapters.pubsub.ResilientSubscription`, which
survives Redis restarts) and calls `cache.on_remote_bump` for each bump made by another node.
After any reconnect it clears the whole local layer, since bumps published meanwhile were
lost. Even without that, no local entry outlives its freshness bound, so a lost message costs
at most that much staleness.
"""

from __future__ import annotations

from typing import Any, Protocol

from server.adapters.cache.keys import BUMP_CHANNEL
from server.adapters.cache.versions import decode_bump
from server.common.logs import get_logger
from server.adapters.pubsub import ResilientSubscription

_log = get_logger("finalmarket.cache")


class BumpTarget(Protocol):
    """What the listener drives (`CachedLoader` is one)."""

    node_id: str

    def on_remote_bump(self, ns: str, ident: str | None = None) -> None: ...

    def invalidate_all_local(self) -> None: ...


class CacheInvalidationListener:
    """Feeds bumps published by other nodes to `cache`; `start()` and `await stop()`."""

    def __init__(self, redis: Any, cache: BumpTarget, channel: str = BUMP_CHANNEL) -> None:
        self._cache = cache
        self._subscription = ResilientSubscription(
            redis, self._on_message, self._reconnected, "cache", channels=(channel,)
        )

    @property
    def reconnects(self) -> int:
        """How often the subscription had to be re-established."""
        return self._subscription.reconnects

    def start(self) -> None:
        """Start listening (the task is owned by the subscription; `stop` cancels it)."""
        self._subscription.start()

    async def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        """Wait until the subscription is active (bumps published from now on arrive)."""
        await self._subscription.wait_subscribed(timeout_s)

    async def stop(self) -> None:
        """Stop listening and release the pub/sub connection."""
        await self._subscription.stop()

    async def _reconnected(self) -> None:
        # Bumps published while disconnected are lost: drop every local copy.
        self._cache.invalidate_all_local()

    def _on_message(self, _channel: str, data: bytes) -> None:
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        try:
            ns, ident, origin = decode_bump(data)
        except Exception:
            _log.exception("cache_bad_bump_message")
            return
        if origin != self._cache.node_id:  # our own bumps were applied when made
            self._cache.on_remote_bump(ns, ident)
