"""The Ariadne peer of `scripts/bench/graphql`: Final Market's GraphQL schema, in Ariadne.

    FM_REDIS_URL=... FM_CATALOG_DSN=... PEER_GRAPHQL_MODE=cached|uncached \\
        uvicorn graphql_ariadne_peer:app --loop uvloop --http httptools --workers 1

Ariadne (schema-first, on graphql-core) loads **the very same SDL files** as the node
(`server/graphql/resolvers/*.graphql`, read as files; `PEER_GRAPHQL_SDL` names another
directory) and serves GraphQL-over-HTTP GETs (`/graphql?query=...&variables=...`, as
`graphql_http.graphql_path` builds them) with Ariadne's own ASGI app and HTTP handler on
uvicorn, at their defaults (access log on; every request parsed and validated) but one:
`execute_get_queries=True`, without which Ariadne answers a GET with its explorer page.

It runs in the REST peer's virtualenv (`scripts/bench/rest` adds ariadne to it) and imports
nothing from Final Market; it imports `rest_fastapi_peer` (beside it) for the same Redis
read (the versioned-read Lua script of `server/adapters/cache/store.py`, one round trip per
entry) and the same live stock (PostgreSQL, each count served at most 1 s, concurrent misses
sharing one statement). Resolvers:

- `product(id)`: the product entry Final Market wrote (`product` namespace, the rendered head
  with its images), decoded with `json.loads`, its `stock` resolved from the live stock;
- `products(first)`: the list page entry Final Market wrote (`product_list`, key
  `[first,null,null]`: ids, heads with images, next cursor), decoded, the page's stock read in
  one call (as the node's list resolver prefetches it), edges and pageInfo built from them
  (cursors as the node's: unpadded urlsafe base64 of the id's digits); `after` and `query`
  are refused (the benchmark does not send them).

It only reads Final Market's entries: a missing one is a GraphQL error, and any answer whose
errors say so is sent with status 503 instead of Ariadne's 200, so `wrk` counts it.

Two modes, `PEER_GRAPHQL_MODE`:

- **cached** (the default, as the node's result cache is on by default): a whole-result cache
  in Redis in front of Ariadne, keyed by SHA-256 of (query text, operationName, variables as
  canonical JSON). Entries are stored under the node's result-cache namespace version
  (`product_list`, read and written as Final Market's store does, ident `ariadne-peer:<sha>`),
  so every catalog bump invalidates them as it does the node's results; lifetime the node's
  policy at its defaults: 60 s (`FM_GRAPHQL_RESULT_CACHE_TTL_S`), 1 s for results that select
  a `stock` field (the stock freshness bound). Answers with errors are not stored. Concurrent
  misses of one key in this process share one execution; a hit is one Redis round trip and
  sends the stored bytes;
- **uncached**: Ariadne executes every request (the entries it reads stay cached, as the
  node's catalog caches stay on with `FM_GRAPHQL_RESULT_CACHE_TTL_S=0`).

Differences from the node, for the comparison: the node also analyses cost and depth, charges
and refunds the caller's cost bucket, adds `extensions.cost` and `Cache-Control`, and keeps
parsed and validated documents; the peer does none of that. The node has an in-process layer
(at most 1 s) in front of Redis and keeps decoded product dicts; the peer reads Redis on every
request (one round trip per entry) and decodes every time, as a straightforward service would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ariadne import ObjectType, QueryType, load_schema_from_path, make_executable_schema
from ariadne.asgi import GraphQL
from ariadne.asgi.handlers import GraphQLHTTPHandler
from ariadne.exceptions import HttpError
from graphql import GraphQLError, Visitor, parse, visit
from rest_fastapi_peer import NS_PRODUCT, NS_PRODUCT_LIST, lifespan, peer
from starlette.requests import Request
from starlette.responses import Response

SDL_DIR = Path(__file__).resolve().parents[2] / "server" / "graphql" / "resolvers"
MODES = ("cached", "uncached")
MODE = os.environ.get("PEER_GRAPHQL_MODE", "cached")
if MODE not in MODES:
    raise SystemExit(f"PEER_GRAPHQL_MODE={MODE!r}: one of {', '.join(MODES)}")
RESULT_TTL_S = 60.0  # FM_GRAPHQL_RESULT_CACHE_TTL_S default
LIVE_TTL_S = 1.0  # the stock freshness bound: results showing stock live no longer
RESULT_IDENT = "ariadne-peer:"
DEFAULT_PAGE = 20
MAX_PAGE = 100
NOT_CACHED = "not cached (warm through Final Market)"


def _cursor(product_id: int | str) -> str:
    """The node's cursor after `product_id` (unpadded urlsafe base64 of its digits)."""
    return base64.urlsafe_b64encode(str(product_id).encode()).rstrip(b"=").decode()


def _product(head: bytes) -> dict[str, Any]:
    """The product dict of a cached head (the entry is the JSON object without its `}`)."""
    product: dict[str, Any] = json.loads(head + b"}")
    return product


query = QueryType()
product_type = ObjectType("Product")
product_type.set_alias("priceCents", "price_cents")
product_type.set_alias("updatedAt", "updated_at")


@query.field("product")
async def resolve_product(_obj: Any, _info: Any, id: str) -> dict[str, Any] | None:
    if not id.isdigit():
        return None
    value = await peer.cached(NS_PRODUCT, id)
    if value is None:
        raise GraphQLError(NOT_CACHED)
    head, _digest = value
    return _product(head)


@query.field("products")
async def resolve_products(
    _obj: Any, _info: Any, first: int | None = None, after: str | None = None, **rest: Any
) -> dict[str, Any]:
    if after or rest.get("query"):
        raise GraphQLError("the peer serves products(first) only")
    first = DEFAULT_PAGE if first is None else first
    if not 1 <= first <= MAX_PAGE:
        raise GraphQLError(f"first must be an integer from 1 to {MAX_PAGE}")
    ident = json.dumps([first, None, None], separators=(",", ":"))
    value = await peer.cached(NS_PRODUCT_LIST, ident)
    if value is None:
        raise GraphQLError(NOT_CACHED)
    ids, heads, next_cursor = value
    stocks = await peer.stocks(ids)
    edges = []
    for product_id, head in zip(ids, heads, strict=True):
        node = _product(head)
        node["stock"] = stocks[product_id]
        edges.append({"node": node, "cursor": _cursor(product_id)})
    return {
        "edges": edges,
        "pageInfo": {
            "hasNextPage": next_cursor is not None,
            "hasPreviousPage": False,
            "startCursor": _cursor(ids[0]) if ids else None,
            "endCursor": _cursor(ids[-1]) if ids else None,
        },
    }


@product_type.field("stock")
def resolve_stock(obj: dict[str, Any], _info: Any) -> Any:
    """The count a list page attached (no awaitable per item), else the live one."""
    known = obj.get("stock")
    if known is not None:
        return known
    return _live_stock(int(obj["id"]))


async def _live_stock(product_id: int) -> int:
    return (await peer.stocks([product_id]))[product_id]


schema = make_executable_schema(
    load_schema_from_path(os.environ.get("PEER_GRAPHQL_SDL", str(SDL_DIR))), query, product_type
)


class _StockFields(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def enter_field(self, node: Any, *_args: Any) -> None:
        if node.name.value == "stock":
            self.found = True


def _shows_stock(text: str) -> bool:
    """Whether the document selects a `stock` field (its result lives `LIVE_TTL_S`)."""
    try:
        document = parse(text)
    except GraphQLError:
        return True  # not stored anyway (an error)
    fields = _StockFields()
    visit(document, fields)
    return fields.found


class PeerHandler(GraphQLHTTPHandler):
    """Ariadne's HTTP handler; 503 for answers from missing entries; in cached mode, the
    whole-result cache in front of it."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, asyncio.Future[tuple[bytes, int]]] = {}
        self.live: dict[str, bool] = {}

    async def create_json_response(self, request: Any, result: dict, success: bool) -> Response:
        response = await super().create_json_response(request, result, success)
        errors = result.get("errors") or []
        if any(NOT_CACHED in str(e.get("message", "")) for e in errors):
            response.status_code = 503
        return response

    async def handle_request_override(self, request: Request) -> Response | None:
        if MODE != "cached" or request.method != "GET" or not request.query_params.get("query"):
            return None
        try:
            data = self.extract_data_from_get_request(request)
        except HttpError:
            return None  # Ariadne answers it
        material = json.dumps(
            [data["query"], data["operationName"], data["variables"]],
            sort_keys=True,
            separators=(",", ":"),
        )
        ident = RESULT_IDENT + hashlib.sha256(material.encode()).hexdigest()
        version, body = await peer.versioned(NS_PRODUCT_LIST, ident)
        if body is not None:
            return Response(body, media_type="application/json")
        waiting = self.pending.get(ident)
        if waiting is not None:  # another request of this process is executing it
            body, status = await asyncio.shield(waiting)
            return Response(body, status_code=status, media_type="application/json")
        future: asyncio.Future[tuple[bytes, int]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            success, result = await self.execute_graphql_query(request, data)
            response = await self.create_json_response(request, result, success)
            if success and not result.get("errors"):
                live = self.live.get(data["query"])
                if live is None:
                    live = self.live[data["query"]] = _shows_stock(data["query"])
                ttl_ms = int((LIVE_TTL_S if live else RESULT_TTL_S) * 1000)
                await peer.store(NS_PRODUCT_LIST, ident, version, response.body, ttl_ms)
            future.set_result((bytes(response.body), response.status_code))
            return response
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: there may be no follower
            raise
        finally:
            del self.pending[ident]


graphql_app = GraphQL(schema, http_handler=PeerHandler(), execute_get_queries=True)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The Ariadne app, with a lifespan that opens the Redis client and PostgreSQL pool."""
    if scope["type"] != "lifespan":
        await graphql_app(scope, receive, send)
        return
    message = await receive()
    assert message["type"] == "lifespan.startup"
    async with lifespan(None):  # type: ignore[arg-type]
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
    await send({"type": "lifespan.shutdown.complete"})
