"""`/graphql`: GraphQL over HTTP (POST, and GET for queries) and the WebSocket upgrade.

HTTP follows the GraphQL-over-HTTP spec: parameters `query`, `operationName`, `variables`,
`extensions` (JSON in the body of a POST, `application/json`; in the query string of a GET,
with `variables` and `extensions` JSON-encoded). The answer is `application/json`, or
`application/graphql-response+json` when the `Accept` header prefers it; with the latter, a
request refused before execution is 400 (with the former, 200, as the spec allows for older
clients). Mutations over GET are 405 with `Allow: POST`. Throttled requests are 429 with
`Retry-After`. Successful GETs of public queries by anonymous callers are cacheable by shared
caches (`Cache-Control: public`, the same bounds as REST product pages); everything else is
`no-store`. Errors of this endpoint, HTTP-level ones included (bad token, rate limit, body too
large), are GraphQL responses (`{"errors": [{"message", "extensions": {"code"}}]}`), the shape
GraphQL clients read.

Callers authenticate as on the REST API (bearer token, or the session cookie with the CSRF
header on POST). A WebSocket may also use `?token=` or its `connection_init` payload. The
upgrade is checked here (headers, Origin, subprotocol, per-address bound); the socket then goes
to `realtime.graphql_socket.GraphQLWsServer`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import tornado.escape
import tornado.web

from handlers.api import SessionHandler
from handlers.base import ApiError, BaseHandler
from handlers.gate import Gate
from handlers.products import PUBLIC_CACHE_CONTROL
from handlers.websocket import WebSocketUpgrade, switching_protocols
from realtime.framed_socket import Reservation
from realtime.graphql_socket import GraphQLWsServer
from realtime.graphql_ws import choose_subprotocol
from server.adapters.ratelimit import retry_after_whole_s
from server.common import jsontext
from server.graphql.errors import INTERNAL_SERVER_ERROR, GraphQLRequestError, code_of
from server.graphql.service import GraphQLRequest, GraphQLService, Outcome

JSON = "application/json"
GRAPHQL_RESPONSE = "application/graphql-response+json"
NO_STORE = "no-store"
_STATUSES = {status.value: status for status in HTTPStatus if 400 <= status.value < 500}


def negotiate(accept: str) -> str | None:
    """The media type to answer with for an `Accept` header, or None when it accepts
    neither of ours. No header (or a wildcard) gets `application/json`, as the spec asks for
    clients that predate `application/graphql-response+json`."""
    if not accept.strip():
        return JSON
    best: tuple[float, int, str] | None = None
    for order, part in enumerate(accept.split(",")):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if quality <= 0:
            continue
        if media == GRAPHQL_RESPONSE:
            choice = GRAPHQL_RESPONSE
        elif media in (JSON, "application/*", "*/*"):
            choice = JSON
        else:
            continue
        candidate = (quality, -order, choice)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[2]


class GraphQLHandler(SessionHandler, WebSocketUpgrade):
    """`GET`/`POST /graphql`, and `GET /graphql` with `Upgrade: websocket`."""

    graphql: GraphQLService
    media = JSON

    def initialize(  # type: ignore[override]
        self, gate: Gate, graphql: GraphQLService, ws: GraphQLWsServer
    ) -> None:
        super().initialize(gate)
        self.graphql = graphql
        self.ws = ws

    def _is_upgrade(self) -> bool:
        return self.request.headers.get("Upgrade", "").lower() == "websocket"

    async def prepare(self) -> None:
        if self.request.method == "GET" and self._is_upgrade():
            # Credentials of a WebSocket are checked by its connection_init; only the request
            # itself counts against the address's rate limit here.
            BaseHandler.prepare(self)
            await self._rate_limit(self.gate.ip_limit, f"ip:{self.request.remote_ip}")
            return
        media = negotiate(self.request.headers.get("Accept", ""))
        if media is None:
            raise ApiError(
                406,
                "not-acceptable",
                f"/graphql answers {JSON} or {GRAPHQL_RESPONSE}; the Accept header allows neither",
            )
        self.media = media
        await super().prepare()

    # --- HTTP -------------------------------------------------------------------------------

    async def get(self) -> None:
        if self._is_upgrade():
            await self._upgrade()
            return
        extensions: Any = self.get_query_argument("extensions", None)
        if extensions is not None:
            try:
                extensions = jsontext.loads(extensions)
            except ValueError:
                raise ApiError(400, "bad-request", "extensions is not JSON") from None
        request = GraphQLRequest(
            query=self.get_query_argument("query", None),
            operation_name=self.get_query_argument("operationName", None),
            variables=self.get_query_argument("variables", None),
            extensions=extensions,
        )
        await self._answer(request, "GET")

    async def post(self) -> None:
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != JSON:
            raise ApiError(415, "unsupported-media-type", f"send the body as {JSON}")
        try:
            body = jsontext.loads(self.request.body or b"null")
        except (ValueError, RecursionError):
            raise ApiError(400, "malformed-json", "the body is not JSON") from None
        try:
            request = GraphQLRequest.from_json(body)
        except GraphQLRequestError as exc:
            raise ApiError(400, "bad-request", str(exc)) from None
        await self._answer(request, "POST")

    async def _answer(self, request: GraphQLRequest, method: str) -> None:
        outcome: Outcome = await self.graphql.run_http(
            request, method=method, session=self.session, remote_ip=self.request.remote_ip or "?"
        )
        status = 200
        if outcome.kind == "throttled":
            status = 429
            self.set_header("Retry-After", str(retry_after_whole_s(outcome.retry_after_s or 1)))
        elif outcome.kind == "method_not_allowed":
            status = 405
            self.set_header("Allow", "POST")
        elif outcome.kind == "bad_request" or (
            outcome.kind == "request_error" and self.media == GRAPHQL_RESPONSE
        ):
            status = 400
        self.set_status(status)
        public = outcome.public and method == "GET"
        self.set_header("Cache-Control", PUBLIC_CACHE_CONTROL if public else NO_STORE)
        self.set_header("Vary", "Accept")
        self.set_header("Content-Type", f"{self.media}; charset=utf-8")
        self.finish(outcome.body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors of this endpoint as GraphQL responses, with `extensions.code`."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            message, code = exc.detail, code_of(exc.kind)
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError) and status_code in _STATUSES:
            # Tornado's own refusals, e.g. 405 for a method this handler does not serve.
            message, code = _STATUSES[status_code].phrase, _STATUSES[status_code].name
        else:
            message, code = "internal error", INTERNAL_SERVER_ERROR
        request_id = getattr(self, "request_id", None)
        if request_id:
            self.set_header("X-Request-Id", request_id)
        self.set_header("Content-Type", f"{self.media}; charset=utf-8")
        self.set_header("Cache-Control", NO_STORE)
        error = {"message": message, "extensions": {"code": code, "requestId": request_id}}
        self.finish(tornado.escape.json_encode({"errors": [error]}))

    # --- WebSocket --------------------------------------------------------------------------

    async def _upgrade(self) -> None:
        if "upgrade" not in self.request.headers.get("Connection", "").lower():
            raise ApiError(400, "bad-upgrade", "Connection must include Upgrade")
        client_key = self.check_handshake()
        remote_ip = self.request.remote_ip or "?"
        await self.within_address_bound(
            self.ws.reserve(remote_ip),
            self.ws.limits.max_connections_per_ip,
            lambda place: self._take_over(client_key, place),
        )

    async def _take_over(self, client_key: str, place: Reservation) -> None:
        """The handshake after the address check: subprotocol, credentials, 101."""
        ws = self.ws
        offered = self.offered_subprotocols()
        subprotocol = choose_subprotocol(offered)
        if subprotocol is None:
            raise ApiError(
                400,
                "subprotocol",
                "offer graphql-transport-ws (or the legacy graphql-ws) in Sec-WebSocket-Protocol",
                offered=offered,
            )
        session, invalid = await self.websocket_session()
        handshake = switching_protocols(client_key, subprotocol)
        sock = self.detach_socket()
        if sock is None:
            return
        await ws.adopt(sock, subprotocol, session, invalid, place, handshake)


def routes(gate: Gate, graphql: GraphQLService, ws: GraphQLWsServer) -> list[Any]:
    """The `/graphql` route (HTTP and WebSocket), for `server.wiring.app.make_app`."""
    return [(r"/graphql", GraphQLHandler, {"gate": gate, "graphql": graphql, "ws": ws})]
