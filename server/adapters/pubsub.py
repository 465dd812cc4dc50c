"""A Redis pub/sub subscription that survives Redis restarts, shared by the realtime broker
and the cache invalidation listener.

It keeps the set of channels itself. When the connection breaks it reconnects with backoff on
a fresh pub/sub connection, subscribes every channel again and calls `on_reconnect`, since
messages published meanwhile were lost. redis-py may also reconnect a broken pub/sub
connection by itself (resubscribing) inside `get_message`, without raising; a connect
callback on the subscription's connection reports those reconnections too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.common.logs import get_logger

_log = get_logger("finalmarket.pubsub")

RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# RuntimeError: redis-py's "pubsub connection not set" after a failed (re)subscribe.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, RuntimeError)

FIRST_SUBSCRIBE_WAIT_S = 2.0

OnMessage = Callable[[str, bytes], None]
OnReconnect = Callable[[], Awaitable[None]]


def deliver(on_message: OnMessage, channel: str, data: bytes, name: str) -> None:
    """Hand one message to `on_message`; a failure there is logged, and reading goes on (the
    reading task dying would leave the node deaf to every channel)."""
    try:
        on_message(channel, data)
    except Exception:
        _log.exception("pubsub_message_failed", name=name, channel=channel)


class Subscription:
    """What every kind of subscription shares: the channel set, the task that reads (and
    reconnects), `start()` / `await stop()`, and the events callers wait on."""

    def __init__(
        self,
        redis: Any,
        on_message: OnMessage,
        on_reconnect: OnReconnect,
        name: str,
        channels: tuple[str, ...] = (),
    ) -> None:
        self._redis = redis
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._name = name
        self._channels: dict[str, None] = dict.fromkeys(channels)
        self._task: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()
        if self._channels:
            self._has_channels.set()
        self._subscribed = asyncio.Event()
        self._late_first_subscribe = False
        self.reconnects = 0

    def start(self) -> None:
        """Start the reading task (owned here; `stop` cancels it)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop reading and release the pub/sub connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()

    async def wait_subscribed(self, timeout_s: float = 5.0) -> None:
        """Wait until the subscription is active (messages published from now on arrive)."""
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def _wait_first_subscribe(self) -> None:
        """Wait (briefly) for the reader to subscribe a channel just added. A caller that
        stops waiting goes on as if it had (a cable subscriber is confirmed with Redis
        slow or down); what was published meanwhile is then found by the gap check the
        reader runs once it is subscribed, as after a reconnect."""
        try:
            await self.wait_subscribed(FIRST_SUBSCRIBE_WAIT_S)
        except TimeoutError:
            self._late_first_subscribe = True

    def __contains__(self, channel: str) -> bool:
        return channel in self._channels

    def __len__(self) -> int:
        return len(self._channels)

    async def subscribe(self, channel: str) -> None:
        """Receive `channel` from now on (a no-op if already subscribed)."""
        raise NotImplementedError

    async def _run(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _reconnected(self) -> None:
        self.reconnects += 1
        _log.info("pubsub_reconnected", name=self._name, channels=len(self._channels))
        await self._on_reconnect()


class ResilientSubscription(Subscription):
    """Delivers messages of a changing set of channels of one Redis server."""

    def __init__(
        self,
        redis: Any,
        on_message: OnMessage,
        on_reconnect: OnReconnect,
        name: str,
        channels: tuple[str, ...] = (),
    ) -> None:
        super().__init__(redis, on_message, on_reconnect, name, channels)
        self._pubsub: Any = None
        self._sending = asyncio.Lock()  # one subscribe command at a time on the connection
        self._silently_reconnected = False

    async def subscribe(self, channel: str) -> None:
        """Receive `channel` from now on (a no-op if already subscribed)."""
        if channel in self._channels:
            return
        self._channels[channel] = None
        if self._pubsub is None:
            # The reader connects and subscribes every channel; return once it has, so a
            # caller that reads a stream's position next cannot miss what follows it.
            self._has_channels.set()
            await self._wait_first_subscribe()
            return
        try:
            async with self._sending:
                await self._pubsub.subscribe(channel)
        except Exception as exc:  # a broken connection (redis-py may raise anything)
            # The reader notices the same breakage and subscribes every channel again.
            _log.info("pubsub_subscribe_deferred", name=self._name, error=repr(exc))
        self._has_channels.set()

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel`."""
        if self._channels.pop(channel, 0) is None and self._pubsub is not None:
            with contextlib.suppress(Exception):
                async with self._sending:
                    await self._pubsub.unsubscribe(channel)

    async def _close(self) -> None:
        self._subscribed.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    async def _connect(self) -> None:
        # A Redis Cluster client learns the slot map on its first command, but its pub/sub
        # does not ask for it (redis-py raises KeyError on the channel's slot): ask first.
        initialize = getattr(self._redis, "initialize", None)
        if initialize is not None:
            await initialize()
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        # redis-py opens a second connection when two subscribes race a fresh pub/sub (and
        # forgets the first, with its channels): callers use `_pubsub` only once this has
        # subscribed every channel, those added meanwhile too.
        sent: set[str] = set()
        try:
            while missing := [channel for channel in self._channels if channel not in sent]:
                await pubsub.subscribe(*missing)
                sent.update(missing)
        except BaseException:
            with contextlib.suppress(Exception):  # not ours yet: `_close` would not see it
                await pubsub.aclose()
            raise
        connection = getattr(pubsub, "connection", None)
        if connection is not None:  # any later connect of it is a silent reconnect
            connection.register_connect_callback(self._on_silent_reconnect)
        self._pubsub = pubsub
        self._subscribed.set()

    def _on_silent_reconnect(self, _connection: Any) -> None:
        self._silently_reconnected = True

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._channels:
                self._has_channels.clear()
                await self._has_channels.wait()
            try:
                if self._pubsub is None:
                    await self._connect()
                    if failures or self._late_first_subscribe:
                        self._late_first_subscribe = False
                        await self._reconnected()
                    failures = 0
                message = await self._pubsub.get_message(timeout=1.0)
                if self._silently_reconnected:
                    self._silently_reconnected = False
                    await self._reconnected()
            except Exception as exc:  # this task must outlive any failure
                if failures == 0:
                    unexpected = not isinstance(exc, REDIS_DOWN)
                    _log.warning(
                        "pubsub_disconnected", name=self._name, error=repr(exc), exc_info=unexpected
                    )
                await self._close()
                await asyncio.sleep(
                    RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                )
                failures += 1
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            deliver(
                self._on_message,
                channel.decode() if isinstance(channel, bytes) else channel,
                message["data"],
                self._name,
            )
