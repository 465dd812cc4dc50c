"""`/cable`: the HTTP side of the WebSocket upgrade, then the socket goes to the cable server.

Tornado parses the upgrade request; this handler checks it (WebSocket headers, Origin,
subprotocol, per-IP bound, credentials) and answers refusals as problem details. Accepted
sockets are detached from Tornado and handed to `realtime.cable.CableServer`, whose lean
protocol objects own them from then on (see docs/decisions.md for why).
"""

from __future__ import annotations

from handlers.base import ApiError
from handlers.gate import Gate
from handlers.websocket import WebSocketUpgrade, switching_protocols
from realtime.cable import CableServer
from realtime.cable_codec import UNSUPPORTED_PROTOCOL, choose_codec
from realtime.framed_socket import Reservation
from realtime.wsframe import CLOSE_PROTOCOL_ERROR, encode_close


class CableHandler(WebSocketUpgrade):
    """Upgrades `GET /cable` to an Action Cable connection."""

    cable: CableServer

    def initialize(self, gate: Gate, cable: CableServer) -> None:  # type: ignore[override]
        super().initialize(gate)
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
        client_key = self.check_handshake()
        remote_ip = self.request.remote_ip or "?"
        await self.within_address_bound(
            self.cable.reserve(remote_ip),
            self.cable.limits.max_connections_per_ip,
            lambda place: self._take_over(client_key, place),
        )

    async def _take_over(self, client_key: str, place: Reservation) -> None:
        """The handshake after the address check: subprotocol, credentials, 101."""
        headers = self.request.headers
        offered = self.offered_subprotocols()
        codec = choose_codec(offered)
        if codec is None and UNSUPPORTED_PROTOCOL not in offered:
            raise ApiError(
                400,
                "subprotocol",
                "offer actioncable-v1-json, actioncable-v1-msgpack, actioncable-v1-ext-json or "
                "actioncable-v1-ext-msgpack in Sec-WebSocket-Protocol",
                offered=offered,
            )
        user, unauthorized = await self.websocket_session()
        chosen = (codec.protocol if codec else UNSUPPORTED_PROTOCOL) if offered else None
        raw = switching_protocols(client_key, chosen)
        sock = self.detach_socket()
        if sock is None:
            return
        if codec is None:  # the client asked us to say "unsupported": it stops, not retrying
            sock.sendall(raw + encode_close(CLOSE_PROTOCOL_ERROR, "unsupported subprotocol"))
            sock.close()
            return
        # AnyCable's way to name the session to restore: the header first, then `?sid=`.
        restore_sid = headers.get("X-AnyCable-Restore-SID") or self.get_query_argument("sid", None)
        if not codec.extended:
            restore_sid = None
        await self.cable.adopt(sock, codec, user, place, raw, unauthorized, restore_sid)
