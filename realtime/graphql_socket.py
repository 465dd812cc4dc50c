"""GraphQL WebSockets: one lean `asyncio.Protocol` per socket, like the cable's connections.

`handlers.graphql` checks the upgrade and hands the detached socket to `GraphQLWsServer`,
which owns its connections from then on: framing (`realtime.wsframe`, inbound messages bounded
by `max_message_bytes`), the subprotocol's state machine (`realtime.graphql_ws`), one task per
running operation, a message bucket per socket, the `connection_init` timer, keep-alives for
the legacy protocol, and the bound on unsent bytes. What an operation *is* (parse, cost,
execute, subscribe) is the `Operations` object's business (`server.graphql.GraphQLService`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from realtime.framed_socket import FramedSocket, Reservation, SocketRegistry, open_on
from realtime.graphql_ws import (
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_INVALID_MESSAGE,
    LEGACY_WS,
    Action,
    Authenticate,
    Close,
    OperationRefused,
    Send,
    Start,
    Stop,
    encode,
    machine_for,
)
from realtime.wsframe import (
    OP_CLOSE,
    OP_TEXT,
    FrameDecoder,
    ProtocolError,
    encode_close,
    encode_frame,
)
from server.adapters.sessions import Session
from server.common.logs import get_logger

_log = get_logger("finalmarket.graphql_ws")
LEGACY_KEEPALIVE_S = 10.0  # `ka` period for subscriptions-transport-ws clients
# After sending a close frame, how long to wait for the client's before closing the socket.
# Closing at once while the client still sends would make the kernel answer with a reset,
# which can destroy the close frame (and its code) before the client reads it.
CLOSE_HANDSHAKE_S = 1.0
_INTERNAL_ERROR = [{"message": "internal error", "extensions": {"code": "INTERNAL_SERVER_ERROR"}}]


class Operations(Protocol):
    """What the sockets need from the GraphQL service."""

    async def authenticate(self, token: str) -> Session | None:
        """The session of a token from `connection_init`, or None if it is not valid."""

    async def open_operation(
        self, payload: Any, session: Session | None, remote_ip: str
    ) -> AsyncIterator[dict[str, Any]]:
        """An operation's results; raises `OperationRefused` before running it."""


@dataclass(frozen=True, slots=True)
class GraphQLWsLimits:
    """Bounds of every GraphQL WebSocket."""

    max_message_bytes: int = 64 * 1024
    max_operations: int = 50
    init_timeout_s: float = 3.0
    messages_per_second: float = 20.0
    message_burst: int = 50
    max_connections_per_ip: int = 2000
    max_unsent_bytes: int = 4 * 1024 * 1024


def token_of(payload: dict[str, Any] | None) -> str | None:
    """The credentials of a `connection_init` payload: `token`, or `authorization` /
    `Authorization` (with or without `Bearer `), also inside `headers`."""
    if not payload:
        return None
    sources = [payload]
    if isinstance(payload.get("headers"), dict):
        sources.append(payload["headers"])
    for source in sources:
        for name in ("token", "authorization", "Authorization"):
            value = source.get(name)
            if isinstance(value, str) and value.strip():
                value = value.strip()
                if value[:7].lower() == "bearer ":
                    value = value[7:].strip()
                return value
    return None


class GraphQLWsConnection(FramedSocket):
    """One GraphQL WebSocket after the upgrade (its frame loop, bucket and closing are
    `realtime.framed_socket`'s, shared with the cable)."""

    __slots__ = (
        "_close_timer",
        "_init_timer",
        "_pending",
        "_preparing",
        "machine",
        "server",
        "session",
        "tasks",
        "url_session_invalid",
    )

    def __init__(
        self,
        server: GraphQLWsServer,
        subprotocol: str,
        session: Session | None,
        url_session_invalid: bool,
        remote_ip: str,
    ) -> None:
        super().__init__(remote_ip, float(server.limits.message_burst))
        self.server = server
        self.machine = machine_for(subprotocol, server.limits.max_operations)
        self.session = session
        self.url_session_invalid = url_session_invalid
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._pending: list[bytes] | None = None  # messages held while authenticating
        self._init_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._preparing: set[asyncio.Task[Any]] = set()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._init_timer = asyncio.get_running_loop().call_later(
            self.server.limits.init_timeout_s, self._init_timed_out
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closing = True
        for timer in (self._init_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        for task in self.tasks.values():
            self._cancel(task)
        self.server.forget(self)

    # --- framed socket ------------------------------------------------------------------------

    def frame_limit(self) -> int:
        return self.server.limits.max_message_bytes

    def refused(self, kind: str, reason: str) -> None:
        self.server.refused(self, kind, reason)

    def close_received(self, code: int | None) -> None:
        self.close(code or 1000, "")
        if self.transport is not None:
            self.transport.close()  # the client began the handshake: it is complete

    def data_while_closing(self, data: bytes) -> None:
        self._drain_until_close(data)

    def message_received(self, opcode: int, payload: bytes) -> None:
        limits = self.server.limits
        if opcode != OP_TEXT:
            self.server.refused(self, "binary_message", "")
            self.close(CLOSE_INVALID_MESSAGE, "Messages must be text")
        elif not self.take_allowance(limits.messages_per_second, limits.message_burst):
            self.server.refused(self, "message_flood", "")
            self._apply(self.machine.too_many_messages())
        elif self._pending is not None:
            self._pending.append(payload)  # bounded by the message bucket
        else:
            self._apply(self.machine.receive(payload))

    # --- protocol actions ---------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if self.closing:
                return
            if isinstance(action, Send):
                self.send_message(action.message)
            elif isinstance(action, Start):
                self.tasks[action.id] = self.server.spawn(self._run(action.id, action.payload))
            elif isinstance(action, Stop):
                task = self.tasks.pop(action.id, None)
                if task is not None:
                    self._cancel(task)
            elif isinstance(action, Authenticate):
                self._pending = []
                self.server.spawn(self._authenticate(action.payload))
            elif isinstance(action, Close):
                self.close(action.code, action.reason)

    def _init_timed_out(self) -> None:
        self._init_timer = None
        if not self.closing:
            self._apply(self.machine.init_timed_out())

    async def _authenticate(self, payload: dict[str, Any] | None) -> None:
        if self._init_timer is not None:
            self._init_timer.cancel()
            self._init_timer = None
        try:
            token = token_of(payload)
            if token is not None:
                self.session = await self.server.operations.authenticate(token)
                accepted = self.session is not None
            else:
                accepted = not self.url_session_invalid
        except Exception as exc:  # Redis unavailable: the client may retry
            _log.warning("graphql_ws_auth_failed", error=repr(exc))
            self.close(CLOSE_INTERNAL, "Internal server error")
            return
        if self.closing:
            return
        if not accepted:
            self.server.refused(self, "unauthorized", "token unknown, expired or revoked")
            self._apply(self.machine.rejected("the token is unknown, expired or revoked"))
            return
        if self.session is not None and self.session.digest:
            self.server.registry.bind_session(self, self.session.digest)
        self._apply(self.machine.accepted())
        pending, self._pending = self._pending or [], None
        for message in pending:
            if self.closing:
                return
            self._apply(self.machine.receive(message))

    async def _run(self, op_id: str, payload: dict[str, Any]) -> None:
        """One operation: prepare it, then send its results, then `complete` (or `error`).

        A task still preparing is not cancelled when its operation is stopped or its socket
        closes (cancelling it mid-command would leave Redis or database calls half-sent); it
        notices when preparing ends and sends nothing.
        """
        machine, this = self.machine, asyncio.current_task()
        assert this is not None
        self._preparing.add(this)
        try:
            results = await self.server.operations.open_operation(
                payload, self.session, self.remote_ip
            )
        except OperationRefused as refused:
            self._end(op_id, this, machine.error(op_id, refused.errors))
            return
        except Exception as exc:
            _log.error("graphql_ws_operation_failed", error=repr(exc), exc_info=exc)
            self._end(op_id, this, machine.error(op_id, _INTERNAL_ERROR))
            return
        finally:
            self._preparing.discard(this)
        try:
            if self.closing or self.tasks.get(op_id) is not this:
                return  # stopped, or the socket went away, while it was being prepared
            async for result in results:
                self._apply([machine.next(op_id, result)])
        except OperationRefused as refused:
            self._end(op_id, this, machine.error(op_id, refused.errors))
            return
        except asyncio.CancelledError:
            self._end(op_id, this, None)
            raise
        except Exception as exc:
            _log.error("graphql_ws_operation_failed", error=repr(exc), exc_info=exc)
            self._end(op_id, this, machine.error(op_id, _INTERNAL_ERROR))
            return
        finally:
            await cast(Any, results).aclose()
        self._end(op_id, this, machine.complete(op_id))

    def _end(self, op_id: str, task: asyncio.Task[Any], last: Action | None) -> None:
        """An operation's task is done: free its id and send its last message, unless it
        was stopped (or its id reused) meanwhile."""
        if self.tasks.get(op_id) is task:
            del self.tasks[op_id]
            self.machine.finished(op_id)
            if last is not None:
                self._apply([last])

    def _cancel(self, task: asyncio.Task[Any]) -> None:
        if task not in self._preparing:
            task.cancel()

    # --- writing and closing ------------------------------------------------------------------

    def send_message(self, message: dict[str, Any]) -> None:
        """Encode and write one protocol message."""
        self.send(encode_frame(OP_TEXT, encode(message)))

    def send(self, data: bytes) -> None:
        """Write a frame; a client that stops reading is cut off past `max_unsent_bytes`."""
        transport = self.transport
        if transport is None or self.closing:
            return
        if transport.get_write_buffer_size() > self.server.limits.max_unsent_bytes:
            self.server.refused(self, "slow_consumer", "unsent bytes over the bound")
            self.closing = True
            transport.abort()
            return
        transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; close the socket when the client's close frame arrives (or
        after `CLOSE_HANDSHAKE_S`). Nothing else is read or sent meanwhile."""
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.write(encode_close(code, reason[:120]))
        self.closing = True
        for task in self.tasks.values():
            self._cancel(task)
        self._decoder = None
        self._close_timer = asyncio.get_running_loop().call_later(
            CLOSE_HANDSHAKE_S, transport.close
        )

    def _drain_until_close(self, data: bytes) -> None:
        """Read and drop what the client still sends after our close frame, until its own."""
        transport = self.transport
        if transport is None or self._close_timer is None:
            return  # aborted, not closing
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = FrameDecoder(self.server.limits.max_message_bytes)
        try:
            finished = any(opcode == OP_CLOSE for opcode, _payload in decoder.feed(data))
        except ProtocolError:
            finished = True
        if finished:
            transport.close()


class GraphQLWsServer:
    """The GraphQL WebSockets of one node."""

    def __init__(self, operations: Operations, limits: GraphQLWsLimits | None = None) -> None:
        self.operations = operations
        self.limits = limits or GraphQLWsLimits()
        self.registry: SocketRegistry[GraphQLWsConnection] = SocketRegistry(
            self.limits.max_connections_per_ip
        )
        self.connections = self.registry.sockets
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self.refusals = 0

    def start(self) -> None:
        """Start the legacy protocol's keep-alive timer."""
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    async def drain(self) -> None:
        """Close every socket with 1001 (going away): clients reconnect to another node."""
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server restart")

    async def stop(self) -> None:
        """Cancel the keep-alive timer and every running operation."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reserve(self, remote_ip: str) -> Reservation | None:
        """A place for one more socket from `remote_ip` (None: at the per-address bound);
        `adopt` takes it, and the caller releases it if the handshake fails before."""
        return self.registry.reserve(remote_ip)

    async def adopt(
        self,
        sock: socket.socket,
        subprotocol: str,
        session: Session | None,
        url_session_invalid: bool,
        place: Reservation,
        handshake: bytes,
    ) -> None:
        """Take over an upgraded socket: write the 101 response, start the init timer."""
        conn = GraphQLWsConnection(self, subprotocol, session, url_session_invalid, place.remote_ip)
        await open_on(sock, conn)
        self.registry.add(conn, place)
        if session is not None and session.digest:
            self.registry.bind_session(conn, session.digest)
        conn.send(handshake)

    def close_session(self, digest: str) -> int:
        """Close the sockets acting for the revoked session `digest` with 4403."""
        conns = self.registry.of_session(digest)
        for conn in conns:
            _log.info(
                "graphql_ws_session_revoked", user_id=conn.session.user_id if conn.session else None
            )
            conn.close(CLOSE_FORBIDDEN, "Forbidden")
        return len(conns)

    def session_digests(self) -> set[str]:
        """The sessions the open sockets act for."""
        return self.registry.session_digests()

    def forget(self, conn: GraphQLWsConnection) -> None:
        """A socket is gone (called from `connection_lost`)."""
        self.registry.remove(conn)

    def spawn(self, work: Any) -> asyncio.Task[None]:
        """Run `work` as a task owned by the server (cancelled by `stop`)."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def refused(self, conn: GraphQLWsConnection, kind: str, reason: str) -> None:
        """Log a refused message or socket with who sent it."""
        self.refusals += 1
        user_id = conn.session.user_id if conn.session else None
        _log.warning(
            "graphql_ws_refused", kind=kind, reason=reason, remote=conn.remote_ip, user_id=user_id
        )

    async def _keep_alive(self) -> None:
        frame = encode_frame(OP_TEXT, encode({"type": "ka"}))
        while True:
            await asyncio.sleep(LEGACY_KEEPALIVE_S)
            for conn in list(self.connections):
                if conn.machine.subprotocol == LEGACY_WS and conn.machine.acknowledged:
                    conn.send(frame)
