"""The cable server of one node: connections, subscriptions, delivery, pings and drain.

Ties the pieces together: connections (`realtime.connection`) send commands here; channels
(`realtime.channels`) authorise and give first messages; the hub (`realtime.hub`) fans out;
the broker (`realtime.broker`) carries messages between nodes with offsets and history.

Delivery order per stream: the node remembers the last offset it handed to the hub. A new
subscriber is sent its snapshot or replay up to that offset and joins the hub in the same
loop step, so it neither misses nor repeats a message. An envelope that skips offsets (lost
while Redis was away) is preceded by the missing ones from history; when history cannot
supply them, or the epoch changed, subscribers are sent a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram

from realtime import cable_codec
from realtime.broker import Envelope, RedisBroker
from realtime.cable_codec import CableCodec, CommandError
from realtime.channels import Channel, Reject, Subscription, build_channels
from realtime.connection import CLOSE_GOING_AWAY, CableConnection, parse_identifier
from realtime.hub import Hub
from realtime.presence import PRESENCE_TTL_S, Presence
from realtime.watch import DEFAULT_MAX_PENDING, StreamWatch, WatchOverflow
from realtime.wsframe import encode_frame
from server.common import jsontext
from server.adapters.db.router import ShardRouter
from server.common.logs import get_logger
from server.adapters.sessions import Session

__all__ = ["CableLimits", "CableServer", "StreamWatch", "WatchOverflow"]

_log = get_logger("finalmarket.cable")
_SHARED_SUBSCRIPTIONS_MAX = 100_000
SLOW_CONSUMER_SWEEP_S = 0.25
FANOUT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class CableLimits:
    """Inbound and outbound bounds of every connection."""

    max_frame_bytes: int = 64 * 1024
    max_subscriptions: int = 100
    commands_per_second: float = 50.0
    command_burst: int = 100
    slow_consumer_bytes: int = 1024 * 1024
    slow_consumer_grace_s: float = 5.0
    max_connections_per_ip: int = 2000
    ping_interval_s: float = 3.0

    @property
    def slow_consumer_hard_bytes(self) -> int:
        """Unsent bytes past which a connection is cut off without grace."""
        return 4 * self.slow_consumer_bytes


@dataclass(slots=True)
class _Position:
    offset: int
    epoch: str


class CableServer:
    """Everything `/cable` needs on one node; built by the app factory, owned by the node."""

    def __init__(
        self,
        router: ShardRouter,
        redis: Any,
        node_id: str,
        *,
        limits: CableLimits | None = None,
        benchmark_channel: bool = False,
        history_maxlen: int = 1000,
        sharded_pubsub: bool = False,
        presence_ttl_s: float = PRESENCE_TTL_S,
    ) -> None:
        self.limits = limits or CableLimits()
        self.full_allowance = float(self.limits.command_burst)
        self.hard_bytes = self.limits.slow_consumer_hard_bytes
        self.hub = Hub()
        self.fanout_seconds = Histogram(
            "fm_cable_fanout_seconds",
            "Time from a stream message reaching this node's hub to its being written to every "
            "local subscriber (coalescing wait included).",
            buckets=FANOUT_BUCKETS_S,
            registry=None,  # exported by realtime.metrics.CableStatsCollector
        )
        self.hub.observe_fanout = self.fanout_seconds.observe
        self.broker = RedisBroker(
            redis,
            node_id,
            self._on_envelope,
            self._on_reconnect,
            history_maxlen,
            sharded=sharded_pubsub,
        )
        self.presence = Presence(redis, node_id, self.publish, presence_ttl_s)
        self.channels: dict[str, Channel] = build_channels(
            router, self.presence, benchmark=benchmark_channel
        )
        self.connections: dict[CableConnection, None] = {}
        self._per_ip: dict[str, int] = {}
        self._positions: dict[str, _Position] = {}
        self._catching_up: dict[str, list[Envelope]] = {}
        self._following: dict[str, asyncio.Future[None]] = {}
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinger: asyncio.Task[None] | None = None
        self.slow_consumers = 0
        # backlogged connection -> [cut-off deadline, unsent bytes at the previous sweep]
        self._paused: dict[CableConnection, list[float]] = {}
        self.refusals = 0
        self.commands = 0  # client frames carrying commands, refused or not (for metrics)
        self.received = 0  # stream messages that arrived from Redis (for metrics)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker reader and the ping timer."""
        self.broker.start()
        self.presence.start()
        self._pinger = asyncio.get_running_loop().create_task(self._ping_forever())

    async def drain(self) -> None:
        """Tell every client to reconnect elsewhere (`reconnect: true`) and close them."""
        frames = {
            codec: codec.frame(cable_codec.disconnect("server_restart", reconnect=True))
            for codec in cable_codec.CODECS.values()
        }
        connections = list(self.connections)
        for conn in connections:
            conn.send(frames[conn.codec])
            conn.close(CLOSE_GOING_AWAY, "server restart")
        _log.info("cable_drained", connections=len(connections))

    async def stop(self) -> None:
        """Cancel owned tasks and stop the broker."""
        if self._pinger is not None:
            self._pinger.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.presence.stop()
        await self.broker.stop()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("cable_task_failed", error=repr(task.exception()))

    # --- connections --------------------------------------------------------------------------

    def may_accept(self, remote_ip: str) -> bool:
        """Whether another connection from `remote_ip` fits the per-IP bound."""
        return self._per_ip.get(remote_ip, 0) < self.limits.max_connections_per_ip

    async def adopt(
        self,
        sock: socket.socket,
        codec: CableCodec,
        user: Session | None,
        remote_ip: str,
        handshake: bytes,
        unauthorized: bool,
    ) -> None:
        """Take over an upgraded socket: write the 101 response and `welcome` in one send.

        Credentials that name no live session get `disconnect {reason: "unauthorized",
        reconnect: false}` instead of `welcome`, as from Rails, so the official client never
        reports the connection as connected."""
        loop = asyncio.get_running_loop()
        conn = CableConnection(self, codec, user, remote_ip)
        await loop.connect_accepted_socket(lambda: conn, sock=sock)
        self.connections[conn] = None
        self._per_ip[remote_ip] = self._per_ip.get(remote_ip, 0) + 1
        if unauthorized:
            conn.send(handshake)
            self.log_refusal(conn, "unauthorized", "token unknown, expired or revoked")
            conn.disconnect("unauthorized", reconnect=False)
        else:
            conn.send(handshake + codec.frame(cable_codec.welcome()))

    def forget(self, conn: CableConnection) -> None:
        """A connection is gone: drop its subscriptions (called from connection_lost)."""
        self._paused.pop(conn, None)
        if self.connections.pop(conn, 0) is None:
            left = self._per_ip.get(conn.remote_ip, 1) - 1
            if left:
                self._per_ip[conn.remote_ip] = left
            else:
                self._per_ip.pop(conn.remote_ip, None)
        for identifier in list(conn.subscriptions):
            self.unsubscribe(conn, identifier)

    def log_refusal(self, conn: CableConnection, kind: str, reason: str) -> None:
        """Log a refused frame or command with who sent it."""
        self.refusals += 1
        user_id = conn.user.user_id if conn.user else None
        _log.warning(
            "cable_refused", kind=kind, reason=reason, remote=conn.remote_ip, user_id=user_id
        )

    def writer_paused(self, conn: CableConnection) -> None:
        """`conn` holds more unsent bytes than the soft bound: start its grace period."""
        self._paused[conn] = [time.monotonic() + self.limits.slow_consumer_grace_s, 0.0]

    def writer_resumed(self, conn: CableConnection) -> None:
        """`conn` caught up."""
        self._paused.pop(conn, None)

    def _cut_off_slow_consumers(self) -> None:
        """Cut off backlogged connections that are past the hard bound and not draining
        (no smaller than at the previous sweep), or past the soft bound for longer than the
        grace period. Runs every `SLOW_CONSUMER_SWEEP_S`, so the fan-out path checks nothing,
        and a reader working through a big burst is never mistaken for a stuck one."""
        now = time.monotonic()
        for conn, watch in list(self._paused.items()):
            deadline, previous = watch
            transport = conn.transport
            unsent = transport.get_write_buffer_size() if transport is not None else 0
            if unsent > self.hard_bytes and unsent >= previous:
                reason = "unsent bytes over the hard bound and not draining"
            elif deadline <= now:
                reason = "over the soft bound for longer than the grace period"
            else:
                watch[1] = float(unsent)
                continue
            del self._paused[conn]
            conn.cut_off_slow(reason)

    def metrics_slow_consumer(self) -> None:
        """Count a connection cut off as a slow consumer."""
        self.slow_consumers += 1

    # --- commands -----------------------------------------------------------------------------

    def subscribe(self, conn: CableConnection, identifier: str) -> None:
        """Handle a `subscribe` command (authorisation and first messages run as a task)."""
        if identifier in conn.subscriptions:
            # The official client re-sends `subscribe` every 500 ms until it is answered
            # (SubscriptionGuarantor): a no-op, like Rails, neither an error nor a second confirm.
            _log.debug("cable_duplicate_subscribe", identifier=identifier, remote=conn.remote_ip)
            return
        if len(conn.subscriptions) >= self.limits.max_subscriptions:
            self.log_refusal(conn, "too_many_subscriptions", identifier)
            conn.send_message(cable_codec.reject(identifier))
            return
        try:
            params = parse_identifier(identifier)
        except CommandError as exc:
            conn.refuse(str(exc), identifier)
            return
        channel = self.channels.get(params["channel"])
        if channel is None:
            self.log_refusal(conn, "unknown_channel", params["channel"])
            conn.send_message(cable_codec.reject(identifier))
            return
        conn.subscriptions[identifier] = None
        self._spawn(self._subscribe(conn, identifier, channel, params))

    async def _subscribe(
        self, conn: CableConnection, identifier: str, channel: Channel, params: dict[str, Any]
    ) -> None:
        try:
            await self._subscribe_now(conn, identifier, channel, params)
        except Exception as exc:  # Redis or PostgreSQL unavailable: the client may retry
            _log.warning("subscribe_failed", identifier=identifier, error=repr(exc), exc_info=True)
            if conn.subscriptions.get(identifier, 0) is None:
                del conn.subscriptions[identifier]
                conn.send_message(cable_codec.error("temporarily unavailable, retry", identifier))

    async def _subscribe_now(
        self, conn: CableConnection, identifier: str, channel: Channel, params: dict[str, Any]
    ) -> None:
        try:
            stream = await channel.stream_for(params, conn.user)
        except Reject as exc:
            self.log_refusal(conn, "subscription_rejected", str(exc))
            if conn.subscriptions.pop(identifier, 0) is None:
                conn.send_message(cable_codec.reject(identifier))
            return
        await self._follow(stream)
        first = await self._first_messages(channel, stream, params, conn.user)
        if conn.closing or identifier not in conn.subscriptions:
            self._release_stream_if_unused(stream)
            return  # unsubscribed or gone while we were waiting
        subscription = self._shared_subscription(channel, identifier, stream, params)
        del conn.subscriptions[identifier]  # re-keyed by the shared identifier string
        conn.subscriptions[subscription.identifier] = subscription
        self.hub.add(stream, identifier, conn.codec, conn)
        channel.joined(params)
        conn.send_message(cable_codec.confirm(identifier))
        for message in first:
            self.hub.send_to(conn, identifier, conn.codec, message)

    def _shared_subscription(
        self, channel: Channel, identifier: str, stream: str, params: dict[str, Any]
    ) -> Subscription:
        """One Subscription object for every connection with the same identifier and stream.

        Thousands of shoppers watching one product send the same identifier; sharing the
        object (and its identifier string and params) keeps idle connections small.
        """
        key = (identifier, stream)
        shared = self._subscriptions.get(key)
        if shared is None:
            if len(self._subscriptions) >= _SHARED_SUBSCRIPTIONS_MAX:
                self._subscriptions.clear()  # a bound, not a cache policy: rebuilt on demand
            shared = self._subscriptions[key] = Subscription(channel, identifier, stream, params)
        return shared

    async def _follow(self, stream: str) -> None:
        """Make this node receive `stream` and know its position; concurrent first
        subscribers of one stream share one Redis round trip."""
        if stream in self._positions:
            return
        pending = self._following.get(stream)
        if pending is None:
            pending = self._following[stream] = asyncio.ensure_future(self._start_following(stream))
            pending.add_done_callback(lambda _f: self._following.pop(stream, None))
        await asyncio.shield(pending)

    async def _start_following(self, stream: str) -> None:
        await self.broker.subscribe(stream)
        offset, epoch = await self.broker.position(stream)
        self._positions.setdefault(stream, _Position(offset, epoch))

    async def _first_messages(
        self, channel: Channel, stream: str, params: dict[str, Any], user: Session | None
    ) -> list[dict[str, Any]]:
        """Replay since the client's offset, or a snapshot; up to the node's position."""
        since, client_epoch = params.get("since"), params.get("epoch")
        while True:
            position = self._positions.get(stream)
            if position is None:  # the stream was released meanwhile; start over
                offset, epoch = await self.broker.position(stream)
                position = _Position(offset, epoch)
            target, epoch = position.offset, position.epoch
            messages: list[dict[str, Any]] | None = None
            recoverable = (
                isinstance(since, int)
                and not isinstance(since, bool)
                and 0 <= since <= target
                and client_epoch in (None, epoch)
            )
            if recoverable:
                assert isinstance(since, int)
                replay = await self.broker.history_after(stream, since, target)
                if replay is not None:
                    messages = [_stamped(payload, offset, epoch) for offset, payload in replay]
            if messages is None:
                snapshot = await channel.snapshot(params, user)
                messages = [] if snapshot is None else [_stamped(snapshot, target, epoch)]
            now = self._positions.get(stream)
            if now is None or (now.offset == target and now.epoch == epoch):
                return messages
            # The stream moved while we read: recompute so nothing between is lost.

    def unsubscribe(self, conn: CableConnection, identifier: str) -> None:
        """Handle `unsubscribe` (also used when a connection goes away)."""
        subscription = conn.subscriptions.pop(identifier, None)
        if subscription is None:
            return
        subscription.channel.left(subscription.params)
        if self.hub.remove(subscription.stream, identifier, conn.codec, conn):
            self._release_stream_if_unused(subscription.stream)

    @asynccontextmanager
    async def watch(
        self, stream: str, *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> AsyncIterator[StreamWatch]:
        """Follow `stream` from any node while the context is open: `async for message in
        watch` yields each message delivered from now on (as published, plus `offset` and
        `epoch`), in order. Snapshots are the caller's business (read current state after
        entering); a consumer more than `max_pending` behind gets `WatchOverflow`."""
        watcher = StreamWatch(stream, max_pending)
        self.hub.listen(stream, watcher.push)
        try:
            await self._follow(stream)
            yield watcher
        finally:
            watcher.close()
            if self.hub.unlisten(stream, watcher.push):
                self._release_stream_if_unused(stream)

    def _release_stream_if_unused(self, stream: str) -> None:
        if self.hub.subscriber_count(stream) == 0 and stream in self._positions:
            del self._positions[stream]
            self._catching_up.pop(stream, None)
            self._spawn(self.broker.unsubscribe(stream))

    def perform(self, conn: CableConnection, identifier: str, data: str) -> None:
        """Handle a `message` command: an action on one of the connection's subscriptions."""
        subscription = conn.subscriptions.get(identifier)
        if subscription is None:
            conn.refuse("not subscribed to this identifier", identifier)
            return
        try:
            payload = jsontext.loads(data)
        except jsontext.LoneSurrogate as exc:
            conn.refuse(f"data is not valid JSON text: {exc}", identifier)
            return
        except ValueError:
            conn.refuse("data is not JSON", identifier)
            return
        action = payload.get("action") if isinstance(payload, dict) else None
        if action not in subscription.channel.actions():
            conn.refuse(f"unknown action {action!r}", identifier)
            return
        if action == "echo":
            self.hub.send_to(conn, identifier, conn.codec, payload)
        elif action == "broadcast":
            # Tasks start in creation order and the broker sends publishes in call order,
            # so one connection's broadcasts keep their order.
            self._spawn(self._broadcast(conn, subscription, payload))

    async def _broadcast(
        self,
        conn: CableConnection,
        sub: Subscription,
        payload: dict[str, Any],
    ) -> None:
        await self.broker.publish(sub.stream, payload, history=sub.channel.keeps_history)
        if not conn.closing:
            result = {**payload, "action": "broadcastResult"}
            self.hub.send_to(conn, sub.identifier, conn.codec, result)

    async def publish(self, stream: str, message: dict[str, Any]) -> tuple[int, str]:
        """Publish a domain event (stock change, cart change) to every node's subscribers."""
        return await self.broker.publish(stream, message)

    # --- delivery -----------------------------------------------------------------------------

    def _on_envelope(self, envelope: Envelope) -> None:
        self.received += 1
        stream = envelope.stream
        position = self._positions.get(stream)
        if position is None:
            return  # no local subscribers any more
        waiting = self._catching_up.get(stream)
        if waiting is not None:
            waiting.append(envelope)
            return
        if envelope.epoch == position.epoch:
            if envelope.offset <= position.offset:
                return  # already delivered (replayed from history)
            if envelope.offset == position.offset + 1:
                position.offset = envelope.offset
                self.hub.broadcast(
                    stream, _stamped(envelope.payload, envelope.offset, envelope.epoch)
                )
                return
        self._catching_up[stream] = [envelope]
        self._spawn(self._catch_up(stream))

    async def _catch_up(self, stream: str) -> None:
        """Fill a gap from history, or resynchronise subscribers with fresh snapshots."""
        try:
            while (waiting := self._catching_up.get(stream)) and (
                position := self._positions.get(stream)
            ):
                envelope = waiting[0]
                if envelope.epoch == position.epoch and envelope.offset <= position.offset:
                    waiting.pop(0)
                    if not waiting:
                        break
                    continue
                missed = None
                if envelope.epoch == position.epoch:
                    missed = await self.broker.history_after(
                        stream, position.offset, envelope.offset - 1
                    )
                if missed is None:
                    await self._resync(stream, envelope.offset, envelope.epoch)
                else:
                    for offset, payload in missed:
                        self.hub.broadcast(stream, _stamped(payload, offset, position.epoch))
                    position.offset = envelope.offset - 1
                if (
                    current := self._positions.get(stream)
                ) is not None and envelope.offset > current.offset:
                    current.offset, current.epoch = envelope.offset, envelope.epoch
                    self.hub.broadcast(
                        stream, _stamped(envelope.payload, envelope.offset, envelope.epoch)
                    )
                waiting.pop(0)
                if not waiting:
                    break
        finally:
            self._catching_up.pop(stream, None)

    async def _resync(self, stream: str, offset: int, epoch: str) -> None:
        """History cannot fill the gap: send every subscriber a fresh snapshot."""
        position = self._positions.get(stream)
        if position is None:
            return
        position.offset, position.epoch = offset - 1, epoch
        _log.info("stream_resync", stream=stream, epoch=epoch, offset=offset - 1)
        for identifier, codec, members in self.hub.each_group(stream):
            subscription = next(
                (
                    conn.subscriptions.get(identifier)
                    for conn in members
                    if isinstance(conn, CableConnection)
                ),
                None,
            )
            if subscription is None:
                continue
            # Snapshots of user streams depend only on the stream, so one per group serves all.
            user = next((c.user for c in members if isinstance(c, CableConnection)), None)
            snapshot = await subscription.channel.snapshot(subscription.params, user)
            if snapshot is None:
                continue
            frame = encode_frame(
                codec.opcode,
                codec.broadcast_prefix(identifier)
                + codec.encode_body(_stamped(snapshot, offset - 1, epoch)),
            )
            for member in members:
                member.send(frame)

    async def _on_reconnect(self) -> None:
        """Redis came back: compare every stream's position with what this node delivered."""
        for stream in list(self._positions):
            position = self._positions.get(stream)
            if position is None:
                continue
            offset, epoch = await self.broker.position(stream)
            if epoch != position.epoch or offset != position.offset:
                if epoch != position.epoch:
                    await self._resync(stream, offset + 1, epoch)
                else:
                    missed = await self.broker.history_after(stream, position.offset, offset)
                    if missed is None:
                        await self._resync(stream, offset + 1, epoch)
                    else:
                        for missed_offset, payload in missed:
                            self.hub.broadcast(stream, _stamped(payload, missed_offset, epoch))
                        position.offset = offset

    async def _ping_forever(self) -> None:
        next_ping = time.monotonic() + self.limits.ping_interval_s
        while True:
            await asyncio.sleep(min(SLOW_CONSUMER_SWEEP_S, self.limits.ping_interval_s))
            self._cut_off_slow_consumers()
            if time.monotonic() < next_ping:
                continue
            next_ping += self.limits.ping_interval_s
            frames = {
                codec: codec.frame(cable_codec.ping(int(time.time())))
                for codec in cable_codec.CODECS.values()
            }
            for conn in list(self.connections):
                conn.send(frames[conn.codec])


def _stamped(payload: Any, offset: int, epoch: str) -> dict[str, Any]:
    """A stream message as clients see it: the payload with its offset and epoch."""
    if isinstance(payload, dict):
        return {**payload, "offset": offset, "epoch": epoch}
    return {"data": payload, "offset": offset, "epoch": epoch}
