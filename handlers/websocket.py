"""The HTTP side of a WebSocket upgrade, shared by `/cable` and `/graphql`.

Both endpoints let Tornado parse the upgrade request, check it here (version, key, Origin,
draining, per-address bound, credentials), answer the 101 themselves and detach the socket
for their own lean connection objects (docs/decisions.md, "The upgrade is Tornado's, the
connection is not"). Refusals raise `ApiError`, rendered by each handler's `write_error`.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from handlers.api import SESSION_COOKIE
from handlers.base import ApiError, BaseHandler
from realtime.framed_socket import Reservation
from server.adapters.sessions import Session

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + _WS_GUID).digest()).decode()


def switching_protocols(client_key: str, subprotocol: str | None) -> bytes:
    """The 101 answer that completes the opening handshake."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(client_key)}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WebSocketUpgrade(BaseHandler):
    """Checks of an opening handshake, and the hand-over of its socket."""

    def check_handshake(self) -> str:
        """Version, key, Origin and draining checks; the client's Sec-WebSocket-Key."""
        headers = self.request.headers
        if headers.get("Sec-WebSocket-Version") != "13":
            raise ApiError(
                426,
                "websocket-version",
                "only WebSocket version 13 is supported",
                headers={"Sec-WebSocket-Version": "13"},
            )
        client_key = headers.get("Sec-WebSocket-Key", "")
        if len(client_key) != 24:
            raise ApiError(400, "websocket-key", "Sec-WebSocket-Key is missing or malformed")
        self.check_origin()
        if self.gate.lifecycle.draining:
            raise ApiError(
                503,
                "draining",
                "node is shutting down; reconnect elsewhere",
                headers={"Retry-After": "1"},
            )
        return client_key

    def check_origin(self) -> None:
        """Refuse cross-site WebSocket hijacking: a browser Origin must be this site's own or
        one of `cable_allowed_origins`. Clients that send no Origin are not browsers."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            return
        if origin in self.gate.allowed_origins:
            return
        if urlsplit(origin).netloc == self.request.host:
            return
        raise ApiError(
            403,
            "origin-not-allowed",
            f"Origin {origin} may not open {self.request.path}",
            origin=origin,
        )

    async def within_address_bound(
        self,
        place: Reservation | None,
        max_per_address: int,
        take_over: Callable[[Reservation], Awaitable[None]],
    ) -> None:
        """Run the rest of the handshake (`take_over`) in the place reserved for this
        connection, given back unless the connection took it; 429 when there is none (this
        address already holds its share of connections)."""
        if place is None:
            raise ApiError(
                429,
                "too-many-connections",
                f"at most {max_per_address} connections per address",
                headers={"Retry-After": "5"},
            )
        try:
            await take_over(place)
        finally:
            place.release()  # a no-op once the connection took it

    def offered_subprotocols(self) -> list[str]:
        """The client's Sec-WebSocket-Protocol list, in its order."""
        offered = self.request.headers.get("Sec-WebSocket-Protocol", "")
        return [p.strip() for p in offered.split(",") if p.strip()]

    async def websocket_session(self) -> tuple[Session | None, bool]:
        """(session or None, whether credentials were given but are invalid) from the
        Authorization header, `?token=` or the session cookie."""
        token = None
        authorization = self.request.headers.get("Authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        token = token or self.get_query_argument("token", None) or self.get_cookie(SESSION_COOKIE)
        if not token:
            return None, False
        session = await self.gate.sessions.resolve(token)
        return session, session is None

    def detach_socket(self) -> socket.socket | None:
        """Take the connection away from Tornado: a duplicate of its socket (None if gone)."""
        stream = self.detach()
        self.on_finish()  # detach() skips it; keep the in-flight count right
        # What `finish()` does and `detach()` does not: the template namespace refers back to
        # the handler, a cycle only the cyclic GC would free, long after the handshake.
        self.ui = None  # type: ignore[assignment]
        sock = stream.socket.dup() if stream.socket is not None else None
        stream.close()  # the duplicate keeps the connection open
        return sock
