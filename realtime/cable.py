"""The cable server of one node: connections, subscriptions, delivery, pings and drain.

Ties the pieces together: connections (`realtime.connection`) send commands here; channels
(`realtime.channels`) authorise and give first messages; the hub (`realtime.hub`) fans out;
the broker (`realtime.broker`) carries messages between nodes with offsets and history.

Delivery per stream (positions, first messages, gap filling and resync) is
`realtime.delivery`'s, finding stuck connections `realtime.liveness`'s; this module adds the
connections, subscriptions, sessions and pings.

Connections speaking AnyCable's extended protocol (`realtime.cable_sessions`) also get a
session id, can come back with it (their subscriptions restored, not joined to the hub until
their `history` command says where the client stands), ask for history on `subscribe`, and
may opt in to pongs.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import Histogram

from realtime import cable_codec
from realtime.broker import DEFAULT_HISTORY_TTL_S, RedisBroker
from realtime.cable_codec import CableCodec, CommandError, HistoryRequest, StreamMessage
from realtime.cable_sessions import CableSession, CableSessions, new_sid
from realtime.channels import Channel, Reject, StateReaders, Subscription, build_channels
from realtime.connection import (
    CLOSE_GOING_AWAY,
    CableConnection,
    ExtendedState,
    parse_identifier,
)
from realtime.delivery import StreamDelivery
from realtime.framed_socket import Reservation, SocketRegistry, open_on
from realtime.hub import Hub, Subscriber
from realtime.limits import CableLimits
from realtime.liveness import SLOW_CONSUMER_SWEEP_S, Liveness
from realtime.presence import PRESENCE_TTL_S, Presence
from realtime.recovery import HISTORY_CONFIRMED, HISTORY_REJECTED
from realtime.watch import DEFAULT_MAX_PENDING, StreamWatch, WatchOverflow
from server.adapters.sessions import Session
from server.common import jsontext
from server.common.logs import get_logger

__all__ = ["CableLimits", "CableServer", "StreamWatch", "WatchOverflow"]

_log = get_logger("finalmarket.cable")
_SHARED_SUBSCRIPTIONS_MAX = 100_000
FANOUT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# How long restored subscriptions wait for the client's `history` command before they join
# their streams with a fresh snapshot (the AnyCable client sends it right after `welcome`).
RESTORE_HISTORY_WAIT_S = 5.0
SESSION_LOAD_TIMEOUT_S = 2.0
DEFAULT_SESSION_TTL_S = 300
DEFAULT_PONG_TIMEOUT_S = 6.0


class CableServer:
    """Everything `/cable` needs on one node; built by the app factory, owned by the node."""

    def __init__(
        self,
        readers: StateReaders,
        redis: Any,
        node_id: str,
        *,
        limits: CableLimits | None = None,
        benchmark_channel: bool = False,
        history_maxlen: int = 100,
        sharded_pubsub: bool = False,
        presence_ttl_s: float = PRESENCE_TTL_S,
        history_ttl_s: int = DEFAULT_HISTORY_TTL_S,
        session_ttl_s: int = DEFAULT_SESSION_TTL_S,
        pong_timeout_s: float = DEFAULT_PONG_TIMEOUT_S,
    ) -> None:
        self.limits = limits or CableLimits()
        self.full_allowance = float(self.limits.command_burst)
        self.hub = Hub()
        self.fanout_seconds = Histogram(
            "fm_cable_fanout_seconds",
            "Time from a stream message reaching this node's hub to its being written to every "
            "local subscriber (coalescing wait included).",
            buckets=FANOUT_BUCKETS_S,
            registry=None,  # exported by realtime.metrics.CableStatsCollector
        )
        self.hub.observe_fanout = self.fanout_seconds.observe
        self.delivery = StreamDelivery(self.hub, self._spawn, self._snapshot_of_group)
        self.broker = RedisBroker(
            redis,
            node_id,
            self.delivery.on_envelope,
            self.delivery.on_reconnect,
            history_maxlen,
            sharded=sharded_pubsub,
            history_ttl_s=history_ttl_s,
        )
        self.delivery.attach(self.broker)
        self.sessions = CableSessions(redis, session_ttl_s)
        self.pong_timeout_s = pong_timeout_s
        self.liveness = Liveness(self.limits, pong_timeout_s, self.log_refusal)
        self.presence = Presence(redis, node_id, self.publish, presence_ttl_s)
        self.channels: dict[str, Channel] = build_channels(
            readers, self.presence, benchmark=benchmark_channel
        )
        self.registry: SocketRegistry[CableConnection] = SocketRegistry(
            self.limits.max_connections_per_ip
        )
        self.connections = self.registry.sockets
        self._subscriptions: dict[tuple[str, str], Subscription] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinger: asyncio.Task[None] | None = None
        self.slow_consumers = 0
        # extended connections whose session must be written (or, once gone, its last state)
        self._dirty_sessions: dict[str, CableConnection | CableSession] = {}
        self._sessions_flush_scheduled = False
        self.restored_sessions = 0
        self.history_confirmed = 0
        self.history_rejected = 0
        self.refusals = 0
        self.commands = 0  # client frames carrying commands, refused or not (for metrics)

    @property
    def gaps_filled(self) -> int:
        """Live gaps filled from history (a lost message, a reconnect)."""
        return self.delivery.gaps_filled

    @property
    def resyncs(self) -> int:
        """Live gaps history could not fill: fresh snapshots sent."""
        return self.delivery.resyncs

    @property
    def epochs_rotated(self) -> int:
        """Streams given a new epoch after Redis lost writes of them."""
        return self.delivery.epochs_rotated

    @property
    def received(self) -> int:
        """Stream messages that arrived from Redis."""
        return self.delivery.received

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

    def reserve(self, remote_ip: str) -> Reservation | None:
        """A place for one more connection from `remote_ip` (None: at the per-IP bound);
        `adopt` takes it, and the caller releases it if the handshake fails before."""
        return self.registry.reserve(remote_ip)

    async def adopt(
        self,
        sock: socket.socket,
        codec: CableCodec,
        user: Session | None,
        place: Reservation,
        handshake: bytes,
        unauthorized: bool,
        restore_sid: str | None = None,
    ) -> None:
        """Take over an upgraded socket: write the 101 response and `welcome` in one send.

        Credentials that name no live session get `disconnect {reason: "unauthorized",
        reconnect: false}` instead of `welcome`, as from Rails, so the official client never
        reports the connection as connected. On the extended protocol `welcome` carries a new
        `sid`, and with `restore_sid` naming a session of the same user, the subscriptions
        it held (`restored: true, restored_ids`)."""
        conn = CableConnection(self, codec, user, place.remote_ip)
        await open_on(sock, conn)
        self.registry.add(conn, place)
        if user is not None and user.digest:
            self.registry.bind_session(conn, user.digest)
        if unauthorized:
            conn.send(handshake)
            self.log_refusal(conn, "unauthorized", "token unknown, expired or revoked")
            conn.disconnect("unauthorized", reconnect=False)
        elif not codec.extended:
            conn.send(handshake + codec.frame(cable_codec.welcome()))
        else:
            session = await self._load_session(restore_sid, user) if restore_sid else None
            if conn.closing:
                return  # gone while the session was read
            ext = conn.ext = ExtendedState(new_sid())
            restored = self._restore(conn, session) if session is not None else None
            conn.send(handshake + codec.frame(cable_codec.welcome(ext.sid, restored)))
            self._session_changed(conn)

    async def _load_session(self, sid: str, user: Session | None) -> CableSession | None:
        try:
            session = await asyncio.wait_for(self.sessions.load(sid), SESSION_LOAD_TIMEOUT_S)
        except Exception as exc:  # Redis away: a plain welcome; the client resubscribes
            _log.warning("cable_session_load_failed", error=repr(exc))
            return None
        if session is not None and session.user_id != (user.user_id if user else None):
            _log.warning("cable_session_other_user", user_id=user.user_id if user else None)
            return None
        return session

    def _restore(self, conn: CableConnection, session: CableSession) -> list[str]:
        """Give `conn` the subscriptions of `session` without authorising them again; they
        join their streams when the client's `history` command says where it stands (or
        after `RESTORE_HISTORY_WAIT_S`, with a fresh snapshot)."""
        assert conn.ext is not None
        awaiting: dict[str, None] = {}
        for identifier, stream in session.subscriptions:
            if identifier in conn.subscriptions:
                continue
            if len(conn.subscriptions) >= self.limits.max_subscriptions:
                break
            try:
                params = parse_identifier(identifier)
            except CommandError:
                continue
            channel = self.channels.get(params["channel"])
            if channel is None:
                continue  # e.g. a channel this node does not serve
            subscription = self._shared_subscription(channel, identifier, stream, params)
            conn.subscriptions[subscription.identifier] = subscription
            awaiting[subscription.identifier] = None
        conn.ext.awaiting_history = awaiting
        if awaiting:
            asyncio.get_running_loop().call_later(
                RESTORE_HISTORY_WAIT_S, self._resume_unclaimed, conn
            )
        self.restored_sessions += 1
        return list(awaiting)

    def _resume_unclaimed(self, conn: CableConnection) -> None:
        ext = conn.ext
        if conn.closing or ext is None or not ext.awaiting_history:
            return
        for identifier in list(ext.awaiting_history):
            self.history(conn, identifier, None, asked=False)

    def _session_changed(self, conn: CableConnection) -> None:
        """Write `conn`'s session soon (coalesced: one pipeline per loop iteration)."""
        if conn.ext is None or conn.closing or self.sessions.ttl_s <= 0:
            return
        self._dirty_sessions[conn.ext.sid] = conn
        self._schedule_sessions_flush()

    def _schedule_sessions_flush(self) -> None:
        if not self._sessions_flush_scheduled:
            self._sessions_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_sessions)

    def _flush_sessions(self) -> None:
        self._sessions_flush_scheduled = False
        dirty, self._dirty_sessions = self._dirty_sessions, {}
        sessions = {
            sid: item if isinstance(item, CableSession) else _session_of(item)
            for sid, item in dirty.items()
        }
        self._spawn(self._save_sessions(sessions))

    async def _save_sessions(self, sessions: dict[str, CableSession]) -> None:
        try:
            await self.sessions.save(sessions)
        except Exception as exc:  # not restorable then; the clients recover by history
            _log.warning("cable_session_save_failed", sessions=len(sessions), error=repr(exc))

    def forget(self, conn: CableConnection) -> None:
        """A connection is gone: drop its subscriptions (called from connection_lost)."""
        self.liveness.forget(conn)
        if conn.ext is not None and self.sessions.ttl_s > 0:
            # Its last state, with the TTL counted from now, before the subscriptions go.
            self._dirty_sessions[conn.ext.sid] = _session_of(conn)
            self._schedule_sessions_flush()
        self.registry.remove(conn)
        for identifier in list(conn.subscriptions):
            self.unsubscribe(conn, identifier)

    def close_session(self, digest: str) -> int:
        """Disconnect the connections acting for the revoked session `digest` (reason
        `unauthorized`, no reconnect: the official client then stays disconnected)."""
        conns = self.registry.of_session(digest)
        for conn in conns:
            _log.info("cable_session_revoked", user_id=conn.user.user_id if conn.user else None)
            conn.disconnect("unauthorized", reconnect=False)
        return len(conns)

    def session_digests(self) -> set[str]:
        """The sessions the open connections act for."""
        return self.registry.session_digests()

    def log_refusal(self, conn: CableConnection, kind: str, reason: str) -> None:
        """Log a refused frame or command with who sent it."""
        self.refusals += 1
        user_id = conn.user.user_id if conn.user else None
        _log.warning(
            "cable_refused", kind=kind, reason=reason, remote=conn.remote_ip, user_id=user_id
        )

    def writer_paused(self, conn: CableConnection) -> None:
        """`conn` holds more unsent bytes than the soft bound (see `realtime.liveness`)."""
        self.liveness.writer_paused(conn)

    def writer_resumed(self, conn: CableConnection) -> None:
        """`conn` caught up."""
        self.liveness.writer_resumed(conn)

    def metrics_slow_consumer(self) -> None:
        """Count a connection cut off as a slow consumer."""
        self.slow_consumers += 1

    # --- commands -----------------------------------------------------------------------------

    def subscribe(
        self, conn: CableConnection, identifier: str, history: HistoryRequest | None = None
    ) -> None:
        """Handle a `subscribe` command (authorisation and first messages run as a task);
        `history` is an extended client's replay request."""
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
        self._spawn(self._subscribe(conn, identifier, channel, params, history))

    async def _subscribe(
        self,
        conn: CableConnection,
        identifier: str,
        channel: Channel,
        params: dict[str, Any],
        history: HistoryRequest | None,
    ) -> None:
        try:
            await self._subscribe_now(conn, identifier, channel, params, history)
        except Exception as exc:  # Redis or PostgreSQL unavailable: the client may retry
            _log.warning("subscribe_failed", identifier=identifier, error=repr(exc), exc_info=True)
            if conn.subscriptions.get(identifier, 0) is None:
                del conn.subscriptions[identifier]
                conn.send_message(cable_codec.error("temporarily unavailable, retry", identifier))

    async def _subscribe_now(
        self,
        conn: CableConnection,
        identifier: str,
        channel: Channel,
        params: dict[str, Any],
        history: HistoryRequest | None,
    ) -> None:
        try:
            stream = await channel.stream_for(params, conn.user)
        except Reject as exc:
            self.log_refusal(conn, "subscription_rejected", str(exc))
            if conn.subscriptions.pop(identifier, 0) is None:
                conn.send_message(cable_codec.reject(identifier))
            return
        await self._follow(stream)
        first, outcome = await self._first_messages(channel, stream, params, conn.user, history)
        if conn.closing or identifier not in conn.subscriptions:
            self._release_stream_if_unused(stream)
            return  # unsubscribed or gone while we were waiting
        subscription = self._shared_subscription(channel, identifier, stream, params)
        del conn.subscriptions[identifier]  # re-keyed by the shared identifier string
        conn.subscriptions[subscription.identifier] = subscription
        self._join(conn, subscription, first, outcome, restored=False)
        self._session_changed(conn)

    def _join(
        self,
        conn: CableConnection,
        subscription: Subscription,
        first: list[StreamMessage],
        outcome: str | None,
        *,
        restored: bool,
    ) -> None:
        """Add `conn` to the subscription's stream and send what precedes the live messages:
        the confirmation (not for a subscription restored from a session), then the snapshot
        or replay (with the history answer around it). All in one loop step with the position
        check, so nothing is missed or repeated. The channel hears of it through `joined`, or
        for a restored subscription `restored`."""
        identifier, codec = subscription.identifier, conn.codec
        self.hub.add(subscription.stream, identifier, codec, conn)
        if restored:
            subscription.channel.restored(subscription.params)
        else:
            subscription.channel.joined(subscription.params)
            conn.send_message(cable_codec.confirm(identifier))
        if outcome == HISTORY_REJECTED:
            self.history_rejected += 1
            conn.send_message(cable_codec.reject_history(identifier))
        for message in first:
            self.hub.send_stream_message(conn, identifier, codec, message)
        if outcome == HISTORY_CONFIRMED:
            self.history_confirmed += 1
            conn.send_message(cable_codec.confirm_history(identifier))

    def history(
        self,
        conn: CableConnection,
        identifier: str,
        request: HistoryRequest | None,
        *,
        asked: bool = True,
    ) -> None:
        """Handle an extended client's `history` command. A restored subscription joins its
        stream now, after the replay (or `reject_history` and a snapshot); any other has been
        sent everything since it began on this connection, so the answer is `confirm_history`
        alone. `asked=False`: the client never asked; the subscription joins with a snapshot."""
        subscription = conn.subscriptions.get(identifier)
        if subscription is None:
            conn.refuse("not subscribed to this identifier", identifier)
            return
        ext = conn.ext
        awaiting = ext.awaiting_history if ext is not None else None
        if awaiting is None or identifier not in awaiting:
            conn.send_message(cable_codec.confirm_history(identifier))
            return
        del awaiting[identifier]
        if asked and request is None:
            request = HistoryRequest(None, {})  # asked without saying from where: rejected
        self._spawn(self._resume(conn, subscription, request))

    async def _resume(
        self, conn: CableConnection, subscription: Subscription, request: HistoryRequest | None
    ) -> None:
        stream = subscription.stream
        try:
            await self._follow(stream)
            first, outcome = await self._first_messages(
                subscription.channel, stream, subscription.params, conn.user, request
            )
        except Exception as exc:  # Redis or PostgreSQL unavailable: the client resubscribes
            _log.warning("resume_failed", identifier=subscription.identifier, error=repr(exc))
            if conn.subscriptions.get(subscription.identifier) is subscription:
                conn.disconnect("server_restart", reconnect=True)
            self._release_stream_if_unused(stream)
            return
        if conn.closing or conn.subscriptions.get(subscription.identifier) is not subscription:
            self._release_stream_if_unused(stream)
            return
        self._join(conn, subscription, first, outcome, restored=True)

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
        await self.delivery.follow(stream)

    async def _first_messages(
        self,
        channel: Channel,
        stream: str,
        params: dict[str, Any],
        user: Session | None,
        history: HistoryRequest | None = None,
    ) -> tuple[list[StreamMessage], str | None]:
        """What a subscriber gets before live messages, and the answer to its `history`
        request (`StreamDelivery.first_messages`, with the channel's snapshot)."""
        return await self.delivery.first_messages(
            channel.recovery, stream, params, lambda: channel.snapshot(params, user), history
        )

    async def _snapshot_of_group(self, identifier: str, members: list[Subscriber]) -> Any:
        """The current state for subscribers sharing `identifier` (for a resync)."""
        for member in members:
            if isinstance(member, CableConnection):
                subscription = member.subscriptions.get(identifier)
                if subscription is not None:
                    return await subscription.channel.snapshot(subscription.params, member.user)
        return None

    def unsubscribe(self, conn: CableConnection, identifier: str) -> None:
        """Handle `unsubscribe` (also used when a connection goes away)."""
        subscription = conn.subscriptions.pop(identifier, None)
        if subscription is None:
            return
        ext = conn.ext
        if ext is not None:
            self._session_changed(conn)
            if ext.awaiting_history and identifier in ext.awaiting_history:
                del ext.awaiting_history[identifier]
                return  # restored but never joined its stream
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
        self.delivery.release_if_unused(stream)

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

    async def redis_lost_writes(self, lost: Mapping[int, str]) -> None:
        """Redis lost the last writes of the slots in `lost` (their master failed over
        unplanned; slot -> the failover); see `StreamDelivery.redis_lost_writes`."""
        await self.delivery.redis_lost_writes(lost)

    # --- liveness -----------------------------------------------------------------------------

    def pong_received(self, conn: CableConnection) -> None:
        """An extended client sent `pong` (see `realtime.liveness`)."""
        self.liveness.pong_received(conn)

    def _refresh_sessions(self) -> None:
        """Rewrite every extended connection's session before its TTL runs out."""
        for conn in self.connections:
            self._session_changed(conn)

    async def _ping_forever(self) -> None:
        next_ping = time.monotonic() + self.limits.ping_interval_s
        session_refresh_s = max(1.0, self.sessions.ttl_s / 3)
        next_session_refresh = time.monotonic() + session_refresh_s
        while True:
            await asyncio.sleep(min(SLOW_CONSUMER_SWEEP_S, self.limits.ping_interval_s))
            self.liveness.sweep()
            if time.monotonic() >= next_session_refresh:
                next_session_refresh += session_refresh_s
                self._refresh_sessions()
            if time.monotonic() < next_ping:
                continue
            next_ping += self.limits.ping_interval_s
            frames = {
                codec: codec.frame(cable_codec.ping(int(time.time())))
                for codec in cable_codec.CODECS.values()
            }
            for conn in list(self.connections):
                conn.send(frames[conn.codec])


def _session_of(conn: CableConnection) -> CableSession:
    """What `conn` would need to be restored: its user and subscriptions (pending ones not)."""
    return CableSession(
        conn.user.user_id if conn.user else None,
        [(identifier, sub.stream) for identifier, sub in conn.subscriptions.items() if sub],
    )
