"""The FastAPI peer of `scripts/bench/rest`: Final Market's two cached product reads, in FastAPI.

    FM_REDIS_URL=... FM_CATALOG_DSN=... uvicorn rest_fastapi_peer:app \\
        --loop uvloop --http httptools --workers 1

It runs in its own virtualenv (fastapi, uvicorn[standard], redis, msgpack, asyncpg, and ariadne
for the GraphQL peer; no hiredis, as in the node; `scripts/bench/rest` creates it) and imports
nothing from Final Market. `graphql_ariadne_peer.py` imports it for `Peer` (the read script,
the stock cache) and `lifespan`. It serves

- `GET /api/v1/products/{id}` and
- `GET /api/v1/products?first=N`

from **the same Redis entries Final Market wrote** (warm them through Final Market first): each
request runs the same versioned-read Lua script as `server/adapters/cache/store.py` (one round trip:
namespace version, entity version, value), unpacks the msgpack value and appends the live
stock, exactly as `server/domain/catalog.py` renders it (same bytes, same ETag, 304 on
`If-None-Match`). Stock comes from PostgreSQL with the same 1 s freshness bound as Final
Market's `LiveStock` (one statement per product per second, shared by concurrent misses).

The peer only reads: a missing entry answers 503 (the benchmark counts non-2xx answers), it
has no rate limiter and no in-process cache of the Redis value, so every request costs one
Redis round trip. Keep `_READ` and the key names in step with
`server/adapters/cache/{store,keys}.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import zlib
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgpack
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response

_READ = """
local nv = redis.call('GET', KEYS[1]) or '0'
local ev = redis.call('GET', KEYS[2]) or '0'
local version = nv .. '.' .. ev
local vkey = ARGV[1] .. 'v' .. version .. ':' .. ARGV[2]
local raw = redis.call('GET', vkey)
if raw then
  return {version, raw, redis.call('PTTL', vkey), 0}
end
local lkey = ARGV[1] .. 'lock:v' .. version .. ':' .. ARGV[2]
local locked = redis.call('SET', lkey, ARGV[3], 'NX', 'PX', ARGV[4])
return {version, false, 0, locked and 1 or 0}
"""
CACHE_BUCKETS = 64  # server/adapters/cache/keys.py BUCKETS
NS_PRODUCT = "product"
NS_PRODUCT_LIST = "product_list"
STOCK_FRESH_S = 1.0
CACHE_CONTROL = "public, max-age=1, stale-while-revalidate=4"
LOCK_MS = 1  # a miss takes Final Market's load lock for 1 ms only: the peer never loads


def _prefix(ns: str, ident: str) -> str:
    """The hash-tagged start of `ident`'s keys in `ns` (as keys.prefix; short idents only)."""
    bucket = zlib.crc32(ident.encode()) % CACHE_BUCKETS  # as keys.bucket
    return f"{{cache:{ns}:{bucket}}}:"


class Peer:
    """Redis client, the read script, a PostgreSQL pool and the 1 s stock cache."""

    def __init__(self) -> None:
        self.redis: Any = None
        self.read: Any = None
        self.pg: Any = None
        self.stock: dict[int, tuple[int, float]] = {}
        self.pending: dict[int, asyncio.Future[dict[int, int]]] = {}

    async def cached(self, ns: str, ident: str) -> Any:
        """The value Final Market stored for `ident` in `ns`, or None."""
        return (await self.versioned(ns, ident))[1]

    async def versioned(self, ns: str, ident: str) -> tuple[str, Any]:
        """(the version the read resolved, the value at it or None): one round trip."""
        prefix = _prefix(ns, ident)
        version, raw, _pttl, _locked = await self.read(
            keys=[prefix + "version", f"{prefix}ev:{ident}"],
            args=[prefix, ident, "fastapi-peer", LOCK_MS],
        )
        version = version.decode() if isinstance(version, bytes) else str(version)
        if raw is None:
            return version, None
        value, _delta_s = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return version, value

    async def store(self, ns: str, ident: str, version: str, value: Any, ttl_ms: int) -> None:
        """Write `value` at `version` (from `versioned`) as Final Market's store does, so a
        bump of `ns` hides it as it hides Final Market's entries (the GraphQL peer's results;
        the REST peer only reads)."""
        key = f"{_prefix(ns, ident)}v{version}:{ident}"
        await self.redis.set(key, msgpack.packb([value, 0.0], use_bin_type=True), px=ttl_ms)

    async def stocks(self, ids: list[int]) -> dict[int, int]:
        """Live counts, each read at most once per `STOCK_FRESH_S` (concurrent misses share)."""
        now = time.monotonic()
        found: dict[int, int] = {}
        waits: dict[int, asyncio.Future[dict[int, int]]] = {}
        missing: list[int] = []
        for pid in ids:
            entry = self.stock.get(pid)
            if entry is not None and now - entry[1] < STOCK_FRESH_S:
                found[pid] = entry[0]
            elif pid in self.pending:
                waits[pid] = self.pending[pid]
            else:
                missing.append(pid)
        if missing:
            task = asyncio.ensure_future(self._read_stock(missing, now))
            for pid in missing:
                self.pending[pid] = task
                waits[pid] = task
        for pid, fut in waits.items():
            found[pid] = (await asyncio.shield(fut)).get(pid, 0)
        return found

    async def _read_stock(self, ids: list[int], started: float) -> dict[int, int]:
        try:
            rows = await self.pg.fetch(
                "SELECT product_id, stock FROM inventory WHERE product_id = ANY($1::bigint[])",
                ids,
            )
        finally:
            for pid in ids:
                self.pending.pop(pid, None)
        counts = {int(r["product_id"]): int(r["stock"]) for r in rows}
        for pid in ids:
            self.stock[pid] = (counts.get(pid, 0), started)
        return counts


peer = Peer()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    peer.redis = aioredis.from_url(os.environ["FM_REDIS_URL"])
    peer.read = peer.redis.register_script(_READ)
    peer.pg = await asyncpg.create_pool(os.environ["FM_CATALOG_DSN"], min_size=1, max_size=4)
    yield
    await peer.pg.close()
    await peer.redis.aclose()


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _with_stock(head: bytes, stock: int) -> bytes:
    return b'%s,"stock":%d}' % (head, stock)


def _send(request: Request, body: bytes, etag: str) -> Response:
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    match = request.headers.get("if-none-match", "")
    if match.strip() == "*" or any(t.strip().removeprefix("W/") == etag for t in match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)


@app.get("/api/v1/products/{product_id}")
async def product(product_id: int, request: Request) -> Response:
    value = await peer.cached(NS_PRODUCT, str(product_id))
    if value is None:
        return Response(status_code=503, content=b"not cached (warm through Final Market)")
    head, digest = value
    stock = (await peer.stocks([product_id]))[product_id]
    return _send(request, _with_stock(head, stock), f'"{digest}-{stock}"')


@app.get("/api/v1/products")
async def products(request: Request, first: int = 20) -> Response:
    ident = json.dumps([first, None, None], separators=(",", ":"))
    value = await peer.cached(NS_PRODUCT_LIST, ident)
    if value is None:
        return Response(status_code=503, content=b"not cached (warm through Final Market)")
    ids, heads, next_cursor = value
    stocks = await peer.stocks(ids)
    items = b",".join(_with_stock(h, stocks[pid]) for pid, h in zip(ids, heads, strict=True))
    body = b'{"items":[%s],"next_cursor":%s}' % (items, json.dumps(next_cursor).encode())
    return _send(request, body, f'"{_digest(body)}"')
