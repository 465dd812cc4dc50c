"""One cable connection: a lean `asyncio.Protocol` on the socket Tornado upgraded.

Per connection there is this object (`__slots__`), the loop's transport and, only while a
partial frame is waiting, a decoder buffer: no Task, coroutine, Future or stream buffers, so
an idle subscribed connection costs little memory. Frames are parsed in `data_received`;
commands that need I/O (subscribe) run as tasks owned by the cable server.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from realtime import cable_codec
from realtime.cable_codec import CableCodec, CommandError, HistoryRequest
from realtime.framed_socket import CLOSE_NORMAL, FramedSocket
from realtime.limits import CableLimits
from realtime.wsframe import encode_close
from server.adapters.sessions import Session
from server.common import jsontext

if TYPE_CHECKING:
    from realtime.channels import Subscription

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_NORMAL", "CLOSE_POLICY", "CableConnection"]

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
# Errors tolerated before the connection is cut off as abusive.
MAX_COMMAND_ERRORS = 20


class ConnectionOwner(Protocol):
    """What a connection asks of the cable server that owns it (`realtime.cable.CableServer`):
    its limits, the commands it cannot run alone, and the bookkeeping of its life."""

    limits: CableLimits
    full_allowance: float
    commands: int

    def subscribe(
        self, conn: CableConnection, identifier: str, history: HistoryRequest | None = None
    ) -> None: ...
    def unsubscribe(self, conn: CableConnection, identifier: str) -> None: ...
    def perform(self, conn: CableConnection, identifier: str, data: str) -> None: ...
    def history(
        self, conn: CableConnection, identifier: str, request: HistoryRequest | None
    ) -> None: ...
    def pong_received(self, conn: CableConnection) -> None: ...
    def forget(self, conn: CableConnection) -> None: ...
    def log_refusal(self, conn: CableConnection, kind: str, reason: str) -> None: ...
    def writer_paused(self, conn: CableConnection) -> None: ...
    def writer_resumed(self, conn: CableConnection) -> None: ...
    def metrics_slow_consumer(self) -> None: ...


class ExtendedState:
    """What a connection speaking the extended protocol keeps beyond a plain one: its session
    id, when the client was last heard from (for `no_pong`), whether it sends pongs, and the
    restored subscriptions still waiting for the client's `history` command."""

    __slots__ = ("awaiting_history", "heard_at", "pongs", "sid")

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.heard_at = time.monotonic()
        self.pongs = False
        self.awaiting_history: dict[str, None] | None = None


class CableConnection(FramedSocket):
    """A WebSocket speaking Action Cable after the HTTP upgrade (its frame loop, bucket and
    closing are `realtime.framed_socket`'s, shared with the GraphQL sockets)."""

    __slots__ = ("_errors", "codec", "ext", "server", "subscriptions", "user")

    def __init__(
        self, server: ConnectionOwner, codec: CableCodec, user: Session | None, remote_ip: str
    ) -> None:
        # `full_allowance`: one float object shared by every connection until its first use
        super().__init__(remote_ip, server.full_allowance)
        self.server = server
        self.codec = codec
        self.user = user
        # identifier -> Subscription, or None while the subscribe command is being processed
        self.subscriptions: dict[str, Subscription | None] = {}
        self.ext: ExtendedState | None = None  # set when the extended protocol's welcome goes
        self._errors = 0

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=self.server.limits.slow_consumer_bytes)

    def pause_writing(self) -> None:
        # More than `slow_consumer_bytes` unsent: the client has `slow_consumer_grace_s` to
        # catch up before it is cut off.
        self.server.writer_paused(self)

    def resume_writing(self) -> None:
        self.server.writer_resumed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closing = True
        self.server.forget(self)

    # --- framed socket ------------------------------------------------------------------------

    def frame_limit(self) -> int:
        return self.server.limits.max_frame_bytes

    def refused(self, kind: str, reason: str) -> None:
        self.server.log_refusal(self, kind, reason)

    def heard(self) -> None:
        if self.ext is not None:
            self.ext.heard_at = time.monotonic()  # any frame counts as a pong, as in AnyCable

    def message_received(self, opcode: int, payload: bytes) -> None:
        self._command(opcode, payload)

    # --- commands -----------------------------------------------------------------------------

    def _command(self, opcode: int, payload: bytes) -> None:
        self.server.commands += 1
        limits = self.server.limits
        if not self.take_allowance(limits.commands_per_second, limits.command_burst):
            self.server.log_refusal(self, "command_flood", "too many commands")
            self.disconnect("too_many_commands", reconnect=False)
            return
        try:
            command = self.codec.parse(opcode, payload)
        except CommandError as exc:
            self.refuse(str(exc))
            return
        name = command.command
        if name == "subscribe":
            self.server.subscribe(self, command.identifier, command.history)
        elif name == "unsubscribe":
            self.server.unsubscribe(self, command.identifier)
        elif name == "message":
            self.server.perform(self, command.identifier, command.data or "")
        elif name == "history":
            self.server.history(self, command.identifier, command.history)
        elif name == "ping":
            self.send_message(cable_codec.pong())
        else:  # "pong" (only extended codecs parse ping, pong and history)
            self.server.pong_received(self)

    def refuse(self, reason: str, identifier: str | None = None) -> None:
        """Answer a bad command with an error frame; cut off clients that keep sending them."""
        self.server.log_refusal(self, "bad_command", reason)
        self._errors += 1
        if self._errors > MAX_COMMAND_ERRORS:
            self.disconnect("too_many_errors", reconnect=False)
        else:
            self.send(self.codec.frame(cable_codec.error(reason, identifier)))

    # --- writing and closing ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write frames (the fan-out's hot path: no checks beyond liveness). Backlogged
        connections are watched by the server's slow-consumer sweep."""
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.write(data)

    def cut_off_slow(self, reason: str) -> None:
        """Close a connection that does not read what it is sent.

        Nothing more is queued for it; `disconnect` (`slow_consumer`, reconnect: true, so it
        comes back and recovers with `since`) and a close frame go out behind what it has not
        read yet. A client that is slow but alive reads them; one that has not within the
        slow-consumer grace period (`FM_CABLE_SLOW_CONSUMER_GRACE_S`) is dropped outright,
        releasing its buffers.
        """
        self.server.log_refusal(self, "slow_consumer", reason)
        self.server.metrics_slow_consumer()
        if self.transport is None or self.closing:
            return
        self.disconnect("slow_consumer", reconnect=True)
        grace_s = self.server.limits.slow_consumer_grace_s
        asyncio.get_running_loop().call_later(grace_s, self.abort)

    def send_message(self, message: dict[str, Any]) -> None:
        """Encode and write one protocol message."""
        self.send(self.codec.frame(message))

    def disconnect(self, reason: str, reconnect: bool) -> None:
        """Tell the client why, then close (the official client honours `reconnect`)."""
        self.send_message(cable_codec.disconnect(reason, reconnect))
        self.close(CLOSE_NORMAL if reconnect else CLOSE_POLICY, reason)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close once written."""
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.write(encode_close(code, reason))
        self.closing = True
        transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding what is unsent."""
        transport = self.transport
        self.closing = True
        if transport is not None:
            transport.abort()


def parse_identifier(identifier: str) -> dict[str, Any]:
    """The params object inside an identifier string; raises CommandError if malformed."""
    try:
        params = jsontext.loads(identifier)
    except jsontext.LoneSurrogate as exc:
        raise CommandError(f"identifier is not valid JSON text: {exc}") from None
    except ValueError:
        raise CommandError("identifier is not JSON") from None
    if not isinstance(params, dict) or not isinstance(params.get("channel"), str):
        raise CommandError("identifier must be a JSON object with a channel name")
    return params
