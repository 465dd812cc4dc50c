"""`/cable`: the HTTP side of the WebSocket upgrade, then the socket goes to the cable server.

Tornado parses the upgrade request; this handler checks it (WebSocket headers, Origin,
subprotocol, per-IP bound, credentials) and answers refusals as problem details. Accepted
sockets are detached from Tornado and handed to `realtime.cable.CableServer`, whose lean
protocol objects own them from then on (see docs/decisions.md for why).
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import urlsplit

from handlers.base import ApiError, BaseHandler
from realtime.cable import CableServer
from realtime.cable_codec import UNSUPPORTED_PROTOCOL, choose_codec
from server.services import Services
from server.sessions import Session

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SESSION_COOKIE = "fm_session"


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + _WS_GUID).digest()).decode()


class CableHandler(BaseHandler):
    """Upgrades `GET /cable` to an Action Cable connection."""

    cable: CableServer

    def initialize(self, services: Services, cable: CableServer) -> None:  # type: ignore[override]
        super().initialize(services)
        self.cable = cable

    async def get(self) -> None:
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in (
            headers.get("Connection", "").lower()
        ):
            raise ApiError(
                426,
                "upgrade-required",
                "/cable speaks WebSocket only",
                headers={"Upgrade": "websocket"},
            )
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
        self._check_origin()
        if self.services.state.draining:
            raise ApiError(
                503,
                "draining",
                "node is shutting down; reconnect elsewhere",
                headers={"Retry-After": "1"},
            )
        remote_ip = self.request.remote_ip or "?"
        if not self.cable.may_accept(remote_ip):
            raise ApiError(
                429,
                "too-many-connections",
                f"at most {self.cable.limits.max_connections_per_ip} connections per address",
                headers={"Retry-After": "5"},
            )
        offered = [
            p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        codec = choose_codec(offered)
        if codec is None and UNSUPPORTED_PROTOCOL not in offered:
            raise ApiError(
                400,
                "subprotocol",
                "offer actioncable-v1-json or actioncable-v1-msgpack in Sec-WebSocket-Protocol",
                offered=offered,
            )
        user, unauthorized = await self._authenticate()
        handshake = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(client_key)}",
        ]
        if offered:
            handshake.append(
                f"Sec-WebSocket-Protocol: {codec.protocol if codec else UNSUPPORTED_PROTOCOL}"
            )
        raw = ("\r\n".join(handshake) + "\r\n\r\n").encode()
        stream = self.detach()
        self.on_finish()  # detach() skips it; keep the in-flight count right
        sock = stream.socket.dup() if stream.socket is not None else None
        stream.close()  # the duplicate keeps the connection open for the cable server
        if sock is None:
            return
        if codec is None:  # the client asked us to say "unsupported": it will close
            sock.sendall(raw)
            sock.close()
            return
        await self.cable.adopt(sock, codec, user, remote_ip, raw, unauthorized)

    def _check_origin(self) -> None:
        """Refuse cross-site WebSocket hijacking: a browser Origin must be this site's own
        or one of `cable_allowed_origins`. Clients that send no Origin are not browsers."""
        origin = self.request.headers.get("Origin")
        if origin is None:
            return
        allowed = self.services.settings.cable_allowed_origins
        if origin in allowed or urlsplit(origin).netloc == self.request.host:
            return
        raise ApiError(
            403, "origin-not-allowed", f"Origin {origin} may not open /cable", origin=origin
        )

    async def _authenticate(self) -> tuple[Session | None, bool]:
        """(session or None, whether credentials were given but are invalid)."""
        token = None
        authorization = self.request.headers.get("Authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        token = token or self.get_query_argument("token", None) or self.get_cookie(SESSION_COOKIE)
        if not token:
            return None, False
        session = await self.services.sessions.resolve(token)
        return session, session is None
