"""Sharded pub/sub (`SSUBSCRIBE`) on a Redis Cluster that survives failovers and slot moves.

A sharded channel lives on the master owning its hash slot: a message crosses that shard only,
where a classic `PUBLISH` is copied to every node of the cluster. A node following many
streams therefore holds one pub/sub connection per master that owns any of them, each read by
a task of its own. (redis-py's `ClusterPubSub` polls its per-node connections one after the
other with a timeout, so a message on one shard waits while it listens to another.)

Any failure rebuilds every subscription from a fresh slot map and then calls `on_reconnect`,
since messages sent meanwhile were lost, as
`server.adapters.pubsub.ResilientSubscription` does for one
server: a lost connection, a failed-over master, a slot moved to another master (the server
ends its subscriptions with an unrequested `sunsubscribe`), or an `SSUBSCRIBE` refused with
`MOVED` because the slot map was stale.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.adapters.pubsub import (
    RECONNECT_BACKOFF_S,
    REDIS_DOWN,
    OnMessage,
    OnReconnect,
    Subscription,
    deliver,
)
from server.common.logs import get_logger

_log = get_logger("finalmarket.pubsub")


@dataclass(eq=False)
class _Shard:
    """The pub/sub connection to one master and the task reading it."""

    node: str
    client: Redis
    pubsub: PubSub
    reader: asyncio.Task[None] | None = None
    leaving: dict[str, int] = field(default_factory=dict)  # channels we asked to leave
    # redis-py opens a second connection when two subscribes race a fresh pub/sub, and
    # forgets the first with its channels: one command at a time.
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)


class ShardedSubscription(Subscription):
    """Delivers the messages of a changing set of sharded channels; `start()`, `await stop()`.

    Same interface as `ResilientSubscription`; `cluster` is a `redis.asyncio.RedisCluster`.
    """

    def __init__(
        self,
        cluster: Any,
        on_message: OnMessage,
        on_reconnect: OnReconnect,
        name: str,
        channels: tuple[str, ...] = (),
    ) -> None:
        super().__init__(cluster, on_message, on_reconnect, name, channels)
        self._cluster = cluster
        self._owner: dict[str, _Shard] = {}
        self._shards: dict[str, _Shard] = {}
        self._broken = asyncio.Event()
        self._broken_because = ""

    async def subscribe(self, channel: str) -> None:
        """Receive `channel` from now on (a no-op if already subscribed)."""
        if channel in self._channels:
            return
        self._channels[channel] = None
        self._has_channels.set()
        if not self._subscribed.is_set():
            # The task subscribes every channel once connected; return when it has, so a
            # caller that reads a stream's position next cannot miss what follows it.
            await self._wait_first_subscribe()
            return
        try:
            await self._ssubscribe(channel)
        except Exception as exc:  # the rebuild subscribes it with every other channel
            self._break(f"subscribing {channel}: {exc!r}")

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel`."""
        if self._channels.pop(channel, 0) is not None:
            return
        shard = self._owner.pop(channel, None)
        if shard is not None:
            shard.leaving[channel] = shard.leaving.get(channel, 0) + 1
            with contextlib.suppress(Exception):
                async with shard.sending:
                    await shard.pubsub.sunsubscribe(channel)

    # --- connecting -----------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._channels:
                self._has_channels.clear()
                await self._has_channels.wait()
            try:
                await self._connect_all(fresh_slot_map=failures > 0)
                if failures or self._late_first_subscribe:
                    self._late_first_subscribe = False
                    await self._reconnected()
                failures = 0
                await self._broken.wait()
                raise ConnectionError(self._broken_because)
            except Exception as exc:  # this task must outlive any failure
                if failures == 0:
                    _log.warning(
                        "pubsub_disconnected",
                        name=self._name,
                        error=repr(exc),
                        exc_info=not isinstance(exc, REDIS_DOWN),
                    )
                await self._close()
                await asyncio.sleep(
                    RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                )
                failures += 1

    async def _connect_all(self, *, fresh_slot_map: bool) -> None:
        self._broken.clear()
        if fresh_slot_map:
            await self._cluster.nodes_manager.initialize()
        else:
            await self._cluster.initialize()
        # Channels added while this runs are picked up before it reports success.
        while missing := [channel for channel in self._channels if channel not in self._owner]:
            for channel in missing:
                await self._ssubscribe(channel)
                if self._broken.is_set():
                    raise ConnectionError(self._broken_because)
        self._subscribed.set()

    async def _ssubscribe(self, channel: str) -> None:
        node = self._cluster.get_node_from_key(channel)
        shard = self._shards.get(node.name)
        if shard is None:
            client = Redis(
                host=node.host,
                port=node.port,
                socket_timeout=self._cluster.connection_kwargs.get("socket_timeout"),
                socket_connect_timeout=self._cluster.connection_kwargs.get(
                    "socket_connect_timeout"
                ),
                health_check_interval=30,
                retry=Retry(NoBackoff(), 0),  # failures surface here and rebuild everything
            )
            shard = _Shard(node.name, client, client.pubsub())
            self._shards[node.name] = shard
        async with shard.sending:
            await shard.pubsub.ssubscribe(channel)
        if channel in self._channels:
            self._owner[channel] = shard
        if shard.reader is None:
            shard.reader = asyncio.get_running_loop().create_task(self._read(shard))

    async def _close(self) -> None:
        self._subscribed.clear()
        shards, self._shards, self._owner = self._shards, {}, {}
        for shard in shards.values():
            if shard.reader is not None:
                shard.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await shard.reader
            with contextlib.suppress(Exception):
                await shard.pubsub.aclose()
            with contextlib.suppress(Exception):
                await shard.client.aclose()

    def _break(self, because: str) -> None:
        if not self._broken.is_set():
            self._broken_because = because
            self._broken.set()

    # --- reading --------------------------------------------------------------------------

    async def _read(self, shard: _Shard) -> None:
        try:
            while True:
                message = await shard.pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                channel = message["channel"]
                if isinstance(channel, bytes):
                    channel = channel.decode()
                if kind == "smessage":
                    deliver(self._on_message, channel, message["data"], self._name)
                elif kind == "sunsubscribe":
                    if shard.leaving.get(channel):
                        shard.leaving[channel] -= 1
                        if not shard.leaving[channel]:
                            del shard.leaving[channel]
                    elif self._owner.get(channel) is shard:
                        self._break(f"{channel} left {shard.node} (its slot moved)")
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._break(f"{shard.node}: {exc!r}")
