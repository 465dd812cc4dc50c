"""The catalog: products, their pages as clients see them, and stock changes that announce
themselves. Free of HTTP: the REST handlers (and later GraphQL) call `CatalogService`.

Reads are the hot path, so a product is kept *rendered*: its JSON is encoded once, when it
is loaded from the database, and cached (Redis, and the node's in-memory layer in front of it)
as bytes together with a digest. A cached `GET /products/{id}` then costs one in-memory lookup
and a byte concatenation, no JSON encoding and no hashing.

Stock is live data and is **not** part of the cached entry. The cached bytes are the product's
JSON object without `stock` and without its closing brace (the "head"); a response is
`head + ',"stock":N}'`, with N from `LiveStock`, a tiny per-node cache whose entries are
served for at most `stock_fresh_s` (1 s by default) after they were read. Why not cache stock
with the product and bump on every change: the hottest products are the ones that sell, so
every sale would evict the hottest entries on every node, and every path that moves stock
(checkout, its compensations, the sweeper, admins) would have to remember to bump; a missed
bump would serve stale stock for the whole entry TTL. Separated, the product entry survives
sales, and stock staleness is bounded by `stock_fresh_s` whoever changed it. Clients that need
the exact count follow `InventoryChannel` on the cable.

The ETag of a product is `"<digest of head>-<stock>"`: a strong validator, since it is a
function of exactly the bytes sent (the head's digest, and the only other part, the stock).

Cache fills read the catalog primary (`fresh=True`): a value stored under a freshly bumped
version must not come from a replica that has not replayed the write yet, or it would stay
stale for its whole TTL. Stock counts read the primary too, and its standby while the primary
is unreachable (a count kept for `stock_fresh_s` only), so cached products keep answering.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg2.errors

from server.adapters.cache import NS_PRODUCT, NS_PRODUCT_LIST, CachedLoader
from server.adapters.db.router import ShardRouter
from server.adapters.faults import as_domain_error
from server.common.errors import InvalidInput, NotFound, Unavailable
from server.common.logs import get_logger
from server.domain.events import Publish, Purge, StockChanged, pages_changed
from server.domain.inventory import (
    MAX_STOCK,
    OutOfStock,
    StockLimitExceeded,
    change_stock,
    stock_of,
)

__all__ = [
    "MAX_PRICE_CENTS",
    "MAX_STOCK",
    "CatalogCounters",
    "CatalogService",
    "LiveStock",
    "OutOfStock",
    "Rendered",
    "StockLimitExceeded",
    "decode_cursor",
    "encode_cursor",
]

_log = get_logger("finalmarket.catalog")

MAX_PRODUCT_ID = 2**63 - 1
MAX_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 10_000
MAX_PRICE_CENTS = 1_000_000_000
MAX_QUERY_CHARS = 200
DEFAULT_PAGE = 20
MAX_PAGE = 100
PRODUCT_TTL_S = 300.0  # Redis lifetime of a rendered product (bumps invalidate earlier)
LIST_TTL_S = 60.0  # Redis lifetime of a rendered list page
STOCK_FRESH_S = 1.0  # longest a node serves a stock count after reading it
RENDERED_PAGES_MAX = 1024  # list pages kept rendered per node (with the counts they show)
DECODED_HEADS_MAX = 10_000  # product dicts kept decoded per node (GraphQL reads dicts)

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CURSOR = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_EDITABLE = ("name", "description", "price_cents", "currency")

# One product row: public fields, live stock, images in display order.
_COLUMNS = """
    p.id, p.name, p.description, p.price_cents, p.currency, p.updated_at,
    COALESCE(i.stock, 0),
    COALESCE((SELECT json_agg(json_build_object(
                  'id', im.id::text, 'placeholder', im.placeholder, 'variants', im.variants,
                  'src', im.src, 'width', im.width, 'height', im.height)
                  ORDER BY im.position, im.id)
              FROM product_images im WHERE im.product_id = p.id), '[]'::json)
FROM products p LEFT JOIN inventory i ON i.product_id = p.id
"""
_ONE_SQL = f"SELECT {_COLUMNS} WHERE p.id = %s"
_IMAGE_JSON = """json_build_object('id', id::text, 'placeholder', placeholder,
    'variants', variants, 'src', src, 'width', width, 'height', height)"""
_FIND_IMAGE_SQL = (
    f"SELECT {_IMAGE_JSON} FROM product_images WHERE product_id = %s AND content_hash = %s"
)
_ADD_IMAGE_SQL = f"""
INSERT INTO product_images
    (product_id, content_hash, placeholder, variants, src, width, height, position)
SELECT %s, %s, %s, %s, %s, %s, %s, COALESCE(MAX(position) + 1, 0)
FROM product_images WHERE product_id = %s
ON CONFLICT (product_id, content_hash) DO NOTHING
RETURNING {_IMAGE_JSON}
"""
_CREATE_SQL = """
WITH p AS (
    INSERT INTO products (name, description, price_cents, currency)
    VALUES (%s, %s, %s, %s) RETURNING id
)
INSERT INTO inventory (product_id, stock) SELECT id, %s FROM p RETURNING product_id
"""


@dataclass(frozen=True, slots=True)
class Rendered:
    """A response body ready to send, with its strong ETag (quoted, as in the header)."""

    body: bytes
    etag: str


@dataclass(slots=True)
class CatalogCounters:
    """Database reads the catalog made on this node (tests and /metrics)."""

    product_loads: int = 0  # statements loading one product (cache fills)
    list_loads: int = 0  # statements loading a list page (cache fills)
    stock_loads: int = 0  # statements reading stock counts (LiveStock misses)
    standby_stock_loads: int = 0  # of those, read from the standby: the primary was down


# --- cursors and validation ---------------------------------------------------------------


def encode_cursor(product_id: int) -> str:
    """The opaque cursor after `product_id`: unpadded urlsafe base64 of the id's digits."""
    return base64.urlsafe_b64encode(str(product_id).encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    """The id a cursor from `encode_cursor` stands for; `InvalidInput` for anything else."""
    bad = InvalidInput("after is not a cursor this API issued", field="after")
    if not _CURSOR.match(cursor):
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad from None
    if not text.isdigit() or len(text) > 19 or not 0 < int(text) <= MAX_PRODUCT_ID:
        raise bad
    return int(text)


def check_product_id(product_id: int) -> int:
    """`product_id` if it can name a product, else `NotFound` (ids are positive bigints)."""
    if not 0 < product_id <= MAX_PRODUCT_ID:
        raise NotFound(f"no product {product_id}", product_id=str(product_id))
    return product_id


def check_fields(fields: Mapping[str, Any]) -> None:
    """Refuse product fields out of range (the API validates too; this guards other callers)."""
    for name, value in fields.items():
        if name == "stock":
            _check_int("stock", value, 0, MAX_STOCK)
        elif name == "price_cents":
            _check_int("price_cents", value, 0, MAX_PRICE_CENTS)
        elif name == "name":
            if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
                raise InvalidInput(f"name must be 1 to {MAX_NAME_CHARS} characters", field=name)
            if not value.strip():
                raise InvalidInput("name must not be blank", field=name)
        elif name == "description":
            if not isinstance(value, str) or len(value) > MAX_DESCRIPTION_CHARS:
                raise InvalidInput(
                    f"description must be at most {MAX_DESCRIPTION_CHARS} characters", field=name
                )
        elif name == "currency":
            if not isinstance(value, str) or not _CURRENCY.match(value):
                raise InvalidInput("currency must be three capital letters (ISO 4217)", field=name)
        else:
            raise InvalidInput(f"unknown product field {name}", field=name)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high}", field=name)


# --- rendering ----------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _head(row: Sequence[Any]) -> tuple[int, bytes, int]:
    """(id, head bytes, stock) of a product row from `_COLUMNS`."""
    product_id, name, description, price_cents, currency, updated_at, stock, images = row
    fields = {
        "id": str(product_id),
        "name": name,
        "description": description,
        "price_cents": int(price_cents),
        "currency": currency,
        "images": images,
        "updated_at": _iso(updated_at),
    }
    encoded = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    return int(product_id), encoded[:-1], int(stock)  # without "}": the stock follows


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _with_stock(head: bytes, stock: int) -> bytes:
    return b'%s,"stock":%d}' % (head, stock)


# --- live stock ---------------------------------------------------------------------------


class LiveStock:
    """Stock counts per node, each served for at most `fresh_s` after it was read.

    Concurrent misses share one statement (single flight, also across the ids of a list page
    and across requests: the ids not already being read that are asked for while another
    stock statement is in flight, or within one loop iteration, are read together). A read
    that began before a local change is not stored over the change's result (a change
    counter, like `LocalLRU.ticket`).
    """

    def __init__(
        self,
        router: ShardRouter,
        counters: CatalogCounters,
        fresh_s: float = STOCK_FRESH_S,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._router = router
        self._counters = counters
        self.fresh_s = fresh_s
        self.max_entries = max_entries
        self._clock = clock
        self._values: dict[int, tuple[int, float]] = {}  # id -> (stock, read started at)
        self._pending: dict[int, asyncio.Task[dict[int, int]]] = {}
        # Misses asked for before the next statement starts (within one loop iteration, or
        # while another statement is in flight), across requests, share that statement.
        self._next_read: asyncio.Task[dict[int, int]] | None = None
        self._next_ids: list[int] = []
        self._reading: asyncio.Task[Any] | None = None
        self._changes = 0

    def ticket(self) -> tuple[int, float]:
        """Take before reading stock elsewhere (a product load) and hand to `seed`."""
        return self._changes, self._clock()

    def seed(self, product_id: int, stock: int, ticket: tuple[int, float]) -> None:
        """Keep a count read by another statement, unless a local change happened since."""
        if ticket[0] == self._changes:
            self._store(product_id, stock, ticket[1])

    def changed(self, product_id: int, stock: int) -> None:
        """A committed local change: serve its result and drop reads in flight from before."""
        self._changes += 1
        self._pending.pop(product_id, None)
        self._store(product_id, stock, self._clock())

    def forget(self, product_id: int | None = None) -> None:
        """Drop one count (or all): the next read goes to the database."""
        self._changes += 1
        if product_id is None:
            self._values.clear()
            self._pending.clear()
        else:
            self._values.pop(product_id, None)
            self._pending.pop(product_id, None)

    def _store(self, product_id: int, stock: int, read_at: float) -> None:
        if self.fresh_s <= 0:
            return
        self._values.pop(product_id, None)  # re-insert: dict order is age order
        self._values[product_id] = (stock, read_at)
        while len(self._values) > self.max_entries:
            del self._values[next(iter(self._values))]

    def cached(self, product_id: int) -> int | None:
        """The count if one read less than `fresh_s` ago is kept, else None."""
        entry = self._values.get(product_id)
        if entry is None:
            return None
        if self._clock() - entry[1] >= self.fresh_s:
            del self._values[product_id]
            return None
        return entry[0]

    async def get(self, product_id: int) -> int:
        """The live count of one product (0 if it has no inventory row)."""
        stock = self.cached(product_id)
        if stock is not None:
            return stock
        return (await self.get_many((product_id,)))[product_id]

    async def get_many(self, product_ids: Iterable[int]) -> dict[int, int]:
        """Live counts of `product_ids`, reading the missing ones in at most one statement."""
        found: dict[int, int] = {}
        waits: dict[int, asyncio.Task[dict[int, int]]] = {}
        missing: list[int] = []
        for product_id in dict.fromkeys(product_ids):  # each id once, in order
            stock = self.cached(product_id)
            if stock is not None:
                found[product_id] = stock
            elif (task := self._pending.get(product_id)) is not None:
                waits[product_id] = task
            else:
                missing.append(product_id)
        if missing:
            task = self._next_read
            if task is None:  # starts on the next loop iteration, with every id asked by then
                task = asyncio.get_running_loop().create_task(self._read_batch())
                task.add_done_callback(_retrieve)
                self._next_read = task
            self._next_ids.extend(missing)
            for product_id in missing:
                self._pending[product_id] = task
                waits[product_id] = task
        for product_id, task in waits.items():
            # Shielded: one caller giving up must not cancel the read others wait for.
            found[product_id] = (await asyncio.shield(task)).get(product_id, 0)
        return found

    async def _read_batch(self) -> dict[int, int]:
        previous = self._reading
        if previous is not None and not previous.done():
            # One stock statement in flight at a time: ids asked for meanwhile join this one
            # (group commit), so a stream of requests makes few statements, not one each.
            await asyncio.wait((previous,))
        ids, self._next_ids, self._next_read = self._next_ids, [], None
        self._reading = asyncio.current_task()
        return await self._read(ids)

    async def _read(self, product_ids: list[int]) -> dict[int, int]:
        ticket = self.ticket()
        try:
            self._counters.stock_loads += 1
            try:
                counts = await stock_of(self._router, product_ids, fresh=True)
            except Exception as error:
                if not isinstance(as_domain_error(error), Unavailable):
                    raise
                # The primary is unreachable: the standby's count (behind by its replay lag
                # at most, and kept for `fresh_s` only) serves the page instead of a 503; the
                # cable carries the exact count. (Cache fills never do this: a stale value
                # would stay for the entry's whole TTL.)
                self._counters.standby_stock_loads += 1
                counts = await stock_of(self._router, product_ids)
        finally:
            for product_id in product_ids:
                if self._pending.get(product_id) is asyncio.current_task():
                    del self._pending[product_id]
        for product_id in product_ids:
            self.seed(product_id, counts.get(product_id, 0), ticket)
        return counts


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared read's failure as seen (its waiters get it; none may be left)."""
    if not task.cancelled():
        task.exception()


# --- the service --------------------------------------------------------------------------


class CatalogService:
    """Products for readers (rendered, cached) and admins (writes that invalidate and announce).

    `publish(stream, message)` sends an inventory event to the realtime hub; the node passes
    `services.cable.publish`. `purge(keys)` is told the surrogate keys of the pages a write
    changed (`product-<id>`, `products`); the node passes its `PurgeQueue.submit`.
    One instance per node: its `LiveStock` is the node's stock cache.
    """

    def __init__(
        self,
        router: ShardRouter,
        cache: CachedLoader,
        publish: Publish,
        *,
        product_ttl_s: float = PRODUCT_TTL_S,
        list_ttl_s: float = LIST_TTL_S,
        stock_fresh_s: float = STOCK_FRESH_S,
        purge: Purge | None = None,
    ) -> None:
        self.router = router
        self.cache = cache
        self._publish = publish
        self._purge = purge
        self.product_ttl_s = product_ttl_s
        self.list_ttl_s = list_ttl_s
        self.counters = CatalogCounters()
        self.stock = LiveStock(router, self.counters, stock_fresh_s)
        # list page key -> (cached heads, stock counts, the page rendered from them)
        self._rendered_pages: dict[str, tuple[list[bytes], tuple[int, ...], Rendered]] = {}
        self._decoded_heads: dict[bytes, dict[str, Any]] = {}

    # --- reads --------------------------------------------------------------------------------

    async def product_page(self, product_id: int) -> Rendered:
        """`GET /products/{id}`: the product's JSON and ETag; `NotFound` if there is none."""
        check_product_id(product_id)
        head, digest = await self._cached_head(product_id)
        stock = self.stock.cached(product_id)
        if stock is None:
            stock = await self.stock.get(product_id)
        return Rendered(_with_stock(head, stock), f'"{digest}-{stock}"')

    async def get_product(self, product_id: int) -> dict[str, Any]:
        """One product as a dict (Product shape of the CONTRACT); `NotFound` if there is none."""
        product: dict[str, Any] = json.loads((await self.product_page(product_id)).body)
        return product

    async def _cached_head(self, product_id: int) -> tuple[bytes, str]:
        async def load() -> list[Any]:
            ticket = self.stock.ticket()
            self.counters.product_loads += 1
            async with self.router.catalog_read(fresh=True) as cur:
                await cur.execute(_ONE_SQL, (product_id,))
                row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no product {product_id}", product_id=str(product_id))
            _, head, stock = _head(row)
            self.stock.seed(product_id, stock, ticket)
            return [head, _digest(head)]

        head, digest = await self.cache.get_or_load(
            NS_PRODUCT, str(product_id), load, self.product_ttl_s
        )
        return head, digest

    async def product_entry(self, product_id: int) -> tuple[dict[str, Any], str]:
        """One product as a dict **without** `stock` (shared: do not change it) and the digest
        of its cached entry, which changes exactly when a write bumps the product: a version
        for whatever is derived from it (the storefront's HTML fragments). `NotFound`."""
        check_product_id(product_id)
        head, digest = await self._cached_head(product_id)
        return self._decoded(head), digest

    async def list_entries(
        self, first: int | None = None, after: str | None = None, q: str | None = None
    ) -> tuple[list[tuple[dict[str, Any], str]], str | None]:
        """A list page as (product dict without `stock`, entry digest) pairs and the next
        cursor (see `product_entry`, `list_page`)."""
        _key, _ids, heads, next_cursor = await self._cached_list(first, after, q)
        return [(self._decoded(head), _digest(head)) for head in heads], next_cursor

    async def list_page(
        self, first: int | None = None, after: str | None = None, q: str | None = None
    ) -> Rendered:
        """`GET /products`: `{items, next_cursor}` encoded, with a strong ETag.

        Keyset pagination on id (`after` is the opaque cursor of the previous page's
        `next_cursor`, None at the end); `q` is a web-search style full-text query.
        """
        key, ids, heads, next_cursor = await self._cached_list(first, after, q)
        stocks = await self.stock.get_many(ids)
        counts = tuple([stocks[pid] for pid in ids])
        # A hot page is rendered once per (cached page, stock counts), not once per request.
        rendered = self._rendered_pages.get(key)
        if rendered is not None and rendered[1] == counts and rendered[0] == heads:
            return rendered[2]
        items = b",".join(
            _with_stock(head, stock) for head, stock in zip(heads, counts, strict=True)
        )
        body = b'{"items":[%s],"next_cursor":%s}' % (items, json.dumps(next_cursor).encode())
        page = Rendered(body, f'"{_digest(body)}"')
        if len(self._rendered_pages) >= RENDERED_PAGES_MAX:
            self._rendered_pages.clear()  # a bound, not a cache policy: rebuilt on demand
        self._rendered_pages[key] = (heads, counts, page)
        return page

    async def _cached_list(
        self, first: int | None, after: str | None, q: str | None
    ) -> tuple[str, list[int], list[bytes], str | None]:
        """(cache key, ids, heads, next cursor) of a list page, from the cache or one
        statement; REST and GraphQL share these entries."""
        first, after_id, q = self._page_args(first, after, q)

        async def load() -> list[Any]:
            ticket = self.stock.ticket()
            self.counters.list_loads += 1
            rows = await self._page_rows(first, after_id, q)
            more = len(rows) > first
            rows = rows[:first]
            ids, heads = [], []
            for row in rows:
                product_id, head, stock = _head(row)
                self.stock.seed(product_id, stock, ticket)
                ids.append(product_id)
                heads.append(head)
            return [ids, heads, encode_cursor(ids[-1]) if more else None]

        key = json.dumps([first, after_id, q], separators=(",", ":"))
        ids, heads, next_cursor = await self.cache.get_or_load(
            NS_PRODUCT_LIST, key, load, self.list_ttl_s
        )
        return key, ids, heads, next_cursor

    async def product_list(
        self, first: int | None = None, after: str | None = None, q: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A list page as product dicts **without** `stock` (read it from `self.stock`), and
        the next cursor: for callers that build their own answer (GraphQL). The dicts are
        shared between requests: do not change them."""
        _key, _ids, heads, next_cursor = await self._cached_list(first, after, q)
        return [self._decoded(head) for head in heads], next_cursor

    async def products_by_ids(self, product_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Products (dicts without `stock`, shared: do not change them) by id; unknown ids
        are left out. Cached entries cost no statement; all misses together cost one."""
        ids = list(dict.fromkeys(pid for pid in product_ids if 0 < pid <= MAX_PRODUCT_ID))
        if not ids:
            return {}
        batch: asyncio.Task[dict[int, bytes]] | None = None

        async def load_all() -> dict[int, bytes]:
            ticket = self.stock.ticket()
            self.counters.product_loads += 1
            async with self.router.catalog_read(fresh=True) as cur:
                await cur.execute(f"SELECT {_COLUMNS} WHERE p.id = ANY(%s)", (ids,))
                rows = await cur.fetchall()
            heads = {}
            for row in rows:
                product_id, head, stock = _head(row)
                self.stock.seed(product_id, stock, ticket)
                heads[product_id] = head
            return heads

        def loader(product_id: int) -> Callable[[], Awaitable[list[Any]]]:
            async def load() -> list[Any]:
                # The first miss reads every id of the batch; later misses share that read.
                nonlocal batch
                if batch is None:
                    batch = asyncio.ensure_future(load_all())
                head = (await asyncio.shield(batch)).get(product_id)
                if head is None:
                    raise NotFound(f"no product {product_id}", product_id=str(product_id))
                return [head, _digest(head)]

            return load

        async def one(product_id: int) -> bytes | None:
            try:
                entry = await self.cache.get_or_load(
                    NS_PRODUCT, str(product_id), loader(product_id), self.product_ttl_s
                )
            except NotFound:
                return None
            head: bytes = entry[0]
            return head

        if len(ids) == 1:
            heads = [await one(ids[0])]
        else:
            heads = await asyncio.gather(*(one(pid) for pid in ids))
        return {pid: self._decoded(head) for pid, head in zip(ids, heads, strict=True) if head}

    def _decoded(self, head: bytes) -> dict[str, Any]:
        """The product dict of a cached head, decoded once per distinct head on this node."""
        product = self._decoded_heads.get(head)
        if product is None:
            product = json.loads(head + b"}")
            if len(self._decoded_heads) >= DECODED_HEADS_MAX:
                self._decoded_heads.clear()  # a bound, not a cache policy: rebuilt on demand
            self._decoded_heads[head] = product
        return product

    async def list_products(
        self, first: int | None = None, after: str | None = None, q: str | None = None
    ) -> dict[str, Any]:
        """`{items: [Product], next_cursor}` (see `list_page`)."""
        page: dict[str, Any] = json.loads((await self.list_page(first, after, q)).body)
        return page

    @staticmethod
    def _page_args(
        first: int | None, after: str | None, q: str | None
    ) -> tuple[int, int | None, str | None]:
        if first is None:
            first = DEFAULT_PAGE
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= MAX_PAGE:
            raise InvalidInput(f"first must be an integer from 1 to {MAX_PAGE}", field="first")
        after_id = decode_cursor(after) if after else None
        if q is not None:
            q = q.strip() or None
        if q is not None and len(q) > MAX_QUERY_CHARS:
            raise InvalidInput(f"q must be at most {MAX_QUERY_CHARS} characters", field="q")
        return first, after_id, q

    async def _page_rows(self, first: int, after_id: int | None, q: str | None) -> list[Any]:
        where: list[str] = []
        params: list[Any] = []
        if after_id is not None:
            where.append("p.id > %s")
            params.append(after_id)
        if q is not None:
            where.append("p.search @@ websearch_to_tsquery('english', %s)")
            params.append(q)
        sql = f"SELECT {_COLUMNS}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY p.id LIMIT %s"
        params.append(first + 1)
        async with self.router.catalog_read(fresh=True) as cur:
            await cur.execute(sql, params)
            rows: list[Any] = await cur.fetchall()
        return rows

    # --- writes (admins) ----------------------------------------------------------------------

    async def create_product(
        self,
        *,
        name: str,
        description: str = "",
        price_cents: int,
        currency: str = "USD",
        stock: int = 0,
        actor: int | None = None,
    ) -> dict[str, Any]:
        """Add a product with its stock; returns it. List pages are invalidated."""
        check_fields(
            {
                "name": name,
                "description": description,
                "price_cents": price_cents,
                "currency": currency,
                "stock": stock,
            }
        )
        async with self.router.catalog_write(actor) as cur:
            await cur.execute(_CREATE_SQL, (name, description, price_cents, currency, stock))
            (product_id,) = await cur.fetchone()
            await cur.execute(_ONE_SQL, (product_id,))
            row = await cur.fetchone()
        # A new id has no cached entry (misses are not cached), so only the lists change.
        await self._bump(NS_PRODUCT_LIST)
        self._purge_edge(None)
        return self._product_of(row)

    async def update_product(
        self, product_id: int, fields: Mapping[str, Any], actor: int | None = None
    ) -> dict[str, Any]:
        """Change any of name, description, price_cents, currency; returns the product.

        Stock is refused here: it moves only through `change_stock`.
        """
        check_product_id(product_id)
        if "stock" in fields:
            raise InvalidInput(
                "stock cannot be changed here; use POST /api/v1/products/{id}/stock",
                field="stock",
            )
        if not fields:
            raise InvalidInput(f"give at least one of {', '.join(_EDITABLE)}")
        check_fields(fields)
        names = [name for name in _EDITABLE if name in fields]
        assignments = ", ".join(f"{name} = %s" for name in names)
        async with self.router.catalog_write(actor) as cur:
            await cur.execute(
                f"UPDATE products SET {assignments}, updated_at = now() WHERE id = %s RETURNING id",
                [fields[name] for name in names] + [product_id],
            )
            if await cur.fetchone() is None:
                raise NotFound(f"no product {product_id}", product_id=str(product_id))
            await cur.execute(_ONE_SQL, (product_id,))
            row = await cur.fetchone()
        await self._bump(NS_PRODUCT, str(product_id))
        await self._bump(NS_PRODUCT_LIST)
        self._purge_edge(product_id)
        return self._product_of(row)

    async def change_stock(
        self,
        product_id: int,
        delta: int | None = None,
        set: int | None = None,
        actor: int | None = None,
    ) -> dict[str, Any]:
        """Add `delta` to the stock, or `set` it, in one conditional statement.

        Returns `{product_id, stock}`. After the commit, the new count is announced on the
        product's cable stream (`{event: "stock", product_id, stock}`) and served by this
        node at once (other nodes within their `stock_fresh_s`). Cached product entries hold
        no stock, so none is bumped. Raises `NotFound`, `StockWouldGoNegative` (kind `out-of-stock`,
        with `product_id` and `available`), `StockLimitExceeded` or `InvalidInput`.
        """
        check_product_id(product_id)
        if delta is not None:
            _check_int("delta", delta, -MAX_STOCK, MAX_STOCK)
            if delta == 0:
                raise InvalidInput("delta must not be 0", field="delta")
        stock = await change_stock(self.router, product_id, delta=delta, set_to=set, actor=actor)
        self.stock.changed(product_id, stock)
        self._purge_edge(product_id)  # pages show the count (cached up to their s-maxage)
        event = StockChanged(product_id, stock)
        try:
            await self._publish(event.stream, event.to_message())
        except Exception as exc:
            # The change stands; cable subscribers resynchronise from snapshots on reconnect.
            _log.warning("stock_publish_failed", product_id=product_id, error=repr(exc))
        return {"product_id": str(product_id), "stock": stock}

    # --- images (admins) ----------------------------------------------------------------------

    async def current_stock(self, product_id: int) -> int | None:
        """The product's stock read from the primary now (None: no such product); for callers
        that follow the stock stream and need the count it starts from."""
        found = await stock_of(self.router, [product_id], fresh=True)
        return found.get(product_id)

    async def find_image(self, product_id: int, content_hash: str) -> dict[str, Any] | None:
        """The product's image made from an upload with this digest, if there is one."""
        async with self.router.catalog_read(fresh=True) as cur:
            await cur.execute(_FIND_IMAGE_SQL, (product_id, content_hash))
            row = await cur.fetchone()
        return None if row is None else dict(row[0])

    async def add_image(
        self,
        product_id: int,
        *,
        content_hash: str,
        placeholder: str,
        variants: Mapping[str, Mapping[str, str]],
        src: Mapping[str, str],
        width: int,
        height: int,
        actor: int | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Record an image (after the last existing one); returns it and whether it is new.

        The same upload twice (same `content_hash`) records nothing and returns the first.
        The product's cached page and the list pages are invalidated, so readers see it.
        """
        check_product_id(product_id)
        image = (content_hash, placeholder, json.dumps(variants), json.dumps(src), width, height)
        try:
            async with self.router.catalog_write(actor) as cur:
                await cur.execute(_ADD_IMAGE_SQL, (product_id, *image, product_id))
                row = await cur.fetchone()
                if row is not None:
                    await cur.execute(
                        "UPDATE products SET updated_at = now() WHERE id = %s", (product_id,)
                    )
        except psycopg2.errors.ForeignKeyViolation:
            raise NotFound(f"no product {product_id}", product_id=str(product_id)) from None
        if row is None:
            existing = await self.find_image(product_id, content_hash)
            if existing is None:  # removed between the two statements
                raise NotFound(f"no product {product_id}", product_id=str(product_id))
            return existing, False
        await self._bump(NS_PRODUCT, str(product_id))
        await self._bump(NS_PRODUCT_LIST)
        self._purge_edge(product_id)
        return dict(row[0]), True

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _product_of(row: Sequence[Any]) -> dict[str, Any]:
        _, head, stock = _head(row)
        product: dict[str, Any] = json.loads(_with_stock(head, stock))
        return product

    def _purge_edge(self, product_id: int | None) -> None:
        """Tell the edge the pages of `product_id` (None: only list pages) changed."""
        pages_changed(self._purge, [] if product_id is None else [product_id])

    async def _bump(self, ns: str, key: str | None = None) -> None:
        """Invalidate after a commit. If Redis is down the write still stands: this node drops
        its copies, other nodes' and Redis' entries expire by their TTL."""
        try:
            await self.cache.bump(ns, key)
        except Exception as exc:
            self.cache.invalidate(ns, key)
            _log.warning("catalog_cache_bump_failed", ns=ns, error=repr(exc))
