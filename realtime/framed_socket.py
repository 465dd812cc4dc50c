"""What every WebSocket of the node shares after the upgrade, whatever it speaks.

The cable (`realtime.connection`) and GraphQL (`realtime.graphql_socket`) sockets are both a
lean `asyncio.Protocol` (`__slots__`, no task, no stream buffers) on the socket Tornado
upgraded. `FramedSocket` is their common life: the frame loop (a decoder only while a partial
frame waits, bounded by the socket's frame limit; pings answered, pongs dropped, a close
frame answered, a protocol error refused and closed with its code), the message bucket, and
the bookkeeping of open sockets per client address (`SocketRegistry`). What the messages mean
is the subclass's: `message_received`.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import sys
import time
from typing import Any, Generic, TypeVar, cast

from realtime import allowance
from realtime.wsframe import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    parse_close,
)

CLOSE_NORMAL = 1000


class FramedSocket(asyncio.Protocol):
    """A WebSocket's frames, delivered to `message_received` (text and binary data frames)."""

    __slots__ = ("_allowance", "_decoder", "_refilled_at", "closing", "remote_ip", "transport")

    def __init__(self, remote_ip: str, burst: float) -> None:
        self.remote_ip = sys.intern(remote_ip)  # shared by every socket from one address
        self.transport: asyncio.Transport | None = None
        self._decoder: FrameDecoder | None = None
        self.closing = False
        self._allowance = burst  # a full bucket
        self._refilled_at = time.monotonic()

    # --- what a subclass defines --------------------------------------------------------------

    def frame_limit(self) -> int:
        """The largest message this socket accepts, in bytes."""
        raise NotImplementedError

    def message_received(self, opcode: int, payload: bytes) -> None:
        """A complete text or binary message."""
        raise NotImplementedError

    def refused(self, kind: str, reason: str) -> None:
        """Log (and count) something refused on this socket."""
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Write complete frames."""
        raise NotImplementedError

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close."""
        raise NotImplementedError

    def heard(self) -> None:
        """Called for every chunk of frames the client sends (liveness); nothing by default."""

    def close_received(self, code: int | None) -> None:
        """The client sent a close frame: answer it."""
        self.close(code or CLOSE_NORMAL, "")

    def data_while_closing(self, data: bytes) -> None:
        """Bytes that arrive after this side began closing: dropped by default."""

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its interface
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            self.data_while_closing(data)
            return
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = FrameDecoder(self.frame_limit())
        try:
            messages = decoder.feed(data)
        except ProtocolError as exc:
            self.refused("protocol_error", str(exc))
            self.close(exc.close_code, str(exc))
            return
        if not decoder.buffered:
            self._decoder = None  # idle sockets keep no decoder
        self.heard()
        for opcode, payload in messages:
            if self.closing:
                return
            if opcode == OP_PING:
                self.send(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code, _reason = parse_close(payload)
                self.close_received(code)
            elif opcode == OP_PONG:
                continue
            else:
                self.message_received(opcode, payload)

    # --- the message bucket -------------------------------------------------------------------

    def take_allowance(self, rate: float, burst: float) -> bool:
        """One message out of the socket's bucket (`rate` per second, up to `burst`)."""
        now = time.monotonic()
        allowed, self._allowance = allowance.take(
            self._allowance, self._refilled_at, now, rate, burst
        )
        self._refilled_at = now
        return allowed


Socket = TypeVar("Socket", bound=FramedSocket)


async def open_on(sock: socket.socket, protocol: FramedSocket) -> None:
    """Run `protocol` on the upgraded socket `sock` (its `connection_made` comes next).

    The transport runs its protocol's callbacks in a copy of the context it is created in,
    and keeps that copy for the socket's life. Created in the upgrade request's task, every
    socket would keep that request's own context (the log fields its handler bound and
    unbound, some 120 bytes); created in a new empty context, all of them share one.
    """
    loop = asyncio.get_running_loop()
    opening = loop.connect_accepted_socket(lambda: protocol, sock=sock)
    await loop.create_task(opening, context=contextvars.Context())


class Reservation:
    """A place for one socket from `remote_ip` (`SocketRegistry.reserve`): taken by `add`, or
    given back by `release` (a no-op once taken or released), e.g. when the handshake fails."""

    __slots__ = ("_registry", "remote_ip", "taken")

    def __init__(self, registry: SocketRegistry[Any], remote_ip: str) -> None:
        self._registry = registry
        self.remote_ip = remote_ip
        self.taken = False

    def release(self) -> None:
        """Give the place back unless a socket took it."""
        if not self.taken:
            self.taken = True
            self._registry._release(self.remote_ip)


class SocketRegistry(Generic[Socket]):
    """The open sockets of one server, how many each client address holds, and which
    sockets act for which session (so a revoked session's sockets can be found at once)."""

    def __init__(self, max_per_address: int) -> None:
        self.max_per_address = max_per_address
        self.sockets: dict[Socket, None] = {}
        self._per_address: dict[str, int] = {}
        self._session_of: dict[Socket, str] = {}
        self._by_session: dict[str, dict[Socket, None]] = {}

    def reserve(self, remote_ip: str) -> Reservation | None:
        """A place for one more socket from `remote_ip`, held while its handshake runs (None:
        the address holds its bound already). Counting the place at once, not when the
        socket opens, keeps concurrent handshakes from all passing the check."""
        held = self._per_address.get(remote_ip, 0)
        if held >= self.max_per_address:
            return None
        self._per_address[remote_ip] = held + 1
        return Reservation(self, remote_ip)

    def add(self, sock: Socket, place: Reservation) -> None:
        """`sock` is open, in the place reserved for it."""
        place.taken = True
        self.sockets[sock] = None

    def _release(self, remote_ip: str) -> None:
        left = self._per_address.get(remote_ip, 1) - 1
        if left:
            self._per_address[remote_ip] = left
        else:
            self._per_address.pop(remote_ip, None)

    def remove(self, sock: Socket) -> None:
        """`sock` is gone (a second call does nothing)."""
        if self.sockets.pop(sock, 0) is None:
            self._release(sock.remote_ip)
        self._unbind(sock)

    def bind_session(self, sock: Socket, digest: str) -> None:
        """`sock` (open) acts for the session whose token hashes to `digest` from now on."""
        if sock not in self.sockets:
            return
        self._unbind(sock)
        self._session_of[sock] = digest
        self._by_session.setdefault(digest, {})[sock] = None

    def of_session(self, digest: str) -> list[Socket]:
        """The open sockets acting for the session `digest`."""
        return list(self._by_session.get(digest, ()))

    def session_digests(self) -> set[str]:
        """Every session some open socket acts for."""
        return set(self._by_session)

    def _unbind(self, sock: Socket) -> None:
        digest = self._session_of.pop(sock, None)
        if digest is not None:
            holders = self._by_session[digest]
            del holders[sock]
            if not holders:
                del self._by_session[digest]

    def __len__(self) -> int:
        return len(self.sockets)
