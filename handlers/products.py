"""Products over REST (CONTRACT "REST"): reads for everyone, writes for admins.

Reads send bytes the catalog keeps rendered (`server.domain.catalog.Rendered`): no JSON encoding on
a cached read. `GET` answers carry a strong `ETag` and honour `If-None-Match` with 304;
anonymous reads may be kept by shared caches for `PUBLIC_MAX_AGE_S` (the stock freshness
bound) and served stale for `STALE_WHILE_REVALIDATE_S` more while they refresh; the live
count is on the cable anyway.

Added to the app by `server.wiring.app.make_app` with `routes(gate, catalog)`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from handlers.api import ApiHandler
from handlers.base import ApiError
from handlers.gate import Gate
from handlers.openapi import Operation, Query, page_size_schema
from server.adapters.compression import etag_matches
from server.common.errors import InvalidInput
from server.domain.catalog import (
    DEFAULT_PAGE,
    MAX_DESCRIPTION_CHARS,
    MAX_NAME_CHARS,
    MAX_PAGE,
    MAX_PRICE_CENTS,
    MAX_PRODUCT_ID,
    MAX_QUERY_CHARS,
    CatalogService,
    Rendered,
)
from server.domain.inventory import MAX_STOCK

PUBLIC_MAX_AGE_S = 1
STALE_WHILE_REVALIDATE_S = 4
PUBLIC_CACHE_CONTROL = (
    f"public, max-age={PUBLIC_MAX_AGE_S}, stale-while-revalidate={STALE_WHILE_REVALIDATE_S}"
)
PRIVATE_CACHE_CONTROL = "private, no-cache"
_ID = re.compile(r"^[0-9]{1,19}$")
_FIRST = re.compile(r"^[0-9]{1,4}$")


def _only_int(value: Any) -> Any:
    """JSON integers only: `json_body` validates leniently, which would accept "5" or true."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


# Bounds come before the validator: pydantic then applies them to the integer itself and
# writes them as JSON Schema `minimum`/`maximum` in the OpenAPI document (after a validator,
# or on an optional field, it can only keep them as raw `ge`/`le`, which no tool reads).
PriceCents = Annotated[int, Field(ge=0, le=MAX_PRICE_CENTS), BeforeValidator(_only_int)]
StockUnits = Annotated[int, Field(ge=0, le=MAX_STOCK), BeforeValidator(_only_int)]
StockDelta = Annotated[int, Field(ge=-MAX_STOCK, le=MAX_STOCK), BeforeValidator(_only_int)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]


def _without_null_defaults(schema: dict[str, Any]) -> None:
    """Drop `default: null` from a model's properties: "absent" is not "null" there."""
    for field in schema.get("properties", {}).values():
        if field.get("default", ...) is None:
            del field["default"]


class ProductCreate(BaseModel):
    """`POST /api/v1/products` body."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    price_cents: PriceCents
    currency: Currency = "USD"
    stock: StockUnits = 0


class ProductPatch(BaseModel):
    """`PATCH /api/v1/products/{id}` body: any of the fields but stock (absent: unchanged).

    A field may be left out but not sent as null, and `stock` is refused here: the JSON Schema
    says the same (no `null` branch, no `default: null`, no `stock` property, so
    `additionalProperties: false` refuses it), so a client that follows the OpenAPI document
    never meets a 422 it could not have known about."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_without_null_defaults)

    name: str | SkipJsonSchema[None] = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    description: str | SkipJsonSchema[None] = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    price_cents: PriceCents | SkipJsonSchema[None] = None
    currency: Currency | SkipJsonSchema[None] = None
    stock: SkipJsonSchema[Any] = None

    @field_validator("name", "description", "price_cents", "currency", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null (leave the field out to keep it)")
        return value

    @field_validator("stock", mode="before")
    @classmethod
    def _no_stock(cls, value: Any) -> Any:
        raise ValueError("cannot be changed here; use POST /api/v1/products/{id}/stock")

    def changes(self) -> dict[str, Any]:
        """The fields the body gave."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class StockChange(BaseModel):
    """`POST /api/v1/products/{id}/stock` body: `{delta}` or `{set}`, not both."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    delta: StockDelta | None = None
    set_to: StockUnits | None = Field(None, alias="set")

    @field_validator("delta")
    @classmethod
    def _non_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must not be 0")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StockChange:
        if (self.delta is None) == (self.set_to is None):
            raise ValueError("give exactly one of delta and set")
        return self


def product_id_of(raw: str) -> int:
    """A path id as an int; a 404 problem unless it is digits naming a possible product."""
    if not _ID.match(raw) or not 0 < int(raw) <= MAX_PRODUCT_ID:
        raise ApiError(404, "not-found", f"no product {raw!r}: product ids are digits")
    return int(raw)


def _etag_matches(header: str, etag: str) -> bool:
    """`If-None-Match` (weak comparison, RFC 9110 13.1.2) against our ETag, its compressed
    forms (`"<etag>-br"`, `"<etag>-gz"`, see handlers/compression.py) included."""
    return etag_matches(header, etag)


class _CatalogHandler(ApiHandler):
    """Gives handlers the node's `CatalogService` and a way to send rendered bodies."""

    catalog: CatalogService

    def initialize(self, gate: Gate, catalog: CatalogService) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.catalog = catalog

    def send_rendered(self, page: Rendered) -> None:
        """200 with the body, or 304 when the client's copy is current; caching headers."""
        self.set_header("ETag", page.etag)
        self.set_header(
            "Cache-Control", PUBLIC_CACHE_CONTROL if self.session is None else PRIVATE_CACHE_CONTROL
        )
        if _etag_matches(self.request.headers.get("If-None-Match", ""), page.etag):
            self.set_status(304)
            self.finish()
            return
        self.set_header("Content-Type", "application/json")
        self.finish(page.body)


class ProductsHandler(_CatalogHandler):
    """`GET /api/v1/products?first=&after=&q=` (anyone); `POST /api/v1/products` (admins)."""

    openapi_path = "/api/v1/products"
    openapi = {
        "GET": Operation(
            "List products: {items, next_cursor}",
            query={
                "first": Query("page size", page_size_schema(DEFAULT_PAGE, MAX_PAGE)),
                "after": "cursor from next_cursor",
                "q": Query("full-text search", {"type": "string", "maxLength": MAX_QUERY_CHARS}),
            },
            problems={422: "bad first, after or q"},
        ),
        "POST": Operation("Create a product (admin)", ok=201, body=ProductCreate, auth="admin"),
    }

    async def get(self) -> None:
        first_arg = self.get_query_argument("first", None)
        first: int | None = None
        if first_arg is not None:
            if not _FIRST.match(first_arg):
                raise InvalidInput("first must be an integer from 1 to 100", field="first")
            first = int(first_arg)
        after = self.get_query_argument("after", None) or None
        q = self.get_query_argument("q", None)
        self.send_rendered(await self.catalog.list_page(first, after, q))

    async def post(self) -> None:
        session = self.require_admin()
        body = self.json_body(ProductCreate)
        product = await self.catalog.create_product(**body.model_dump(), actor=session.user_id)
        self.set_header("Location", f"/api/v1/products/{product['id']}")
        self.write_json(product, status=201)


class ProductHandler(_CatalogHandler):
    """`GET /api/v1/products/{id}` (anyone); `PATCH /api/v1/products/{id}` (admins)."""

    openapi_path = "/api/v1/products/{id}"
    openapi = {
        "GET": Operation(
            "One product, with a strong ETag; 304 on If-None-Match",
            problems={404: "no such product"},
        ),
        "PATCH": Operation(
            "Change name, description, price or currency (admin; not stock)",
            body=ProductPatch,
            auth="admin",
            problems={404: "no such product"},
        ),
    }

    async def get(self, raw_id: str) -> None:
        self.send_rendered(await self.catalog.product_page(product_id_of(raw_id)))

    async def patch(self, raw_id: str) -> None:
        session = self.require_admin()
        product_id = product_id_of(raw_id)
        body = self.json_body(ProductPatch)
        product = await self.catalog.update_product(
            product_id, body.changes(), actor=session.user_id
        )
        self.write_json(product)


class StockHandler(_CatalogHandler):
    """`POST /api/v1/products/{id}/stock` (admins): `{delta}` or `{set}` -> `{product_id,
    stock}`; the change is broadcast to `InventoryChannel` subscribers."""

    openapi_path = "/api/v1/products/{id}/stock"
    openapi = {
        "POST": Operation(
            "Change stock by {delta} or to {set} (admin); broadcasts to InventoryChannel",
            body=StockChange,
            auth="admin",
            problems={404: "no such product", 409: "out-of-stock or stock-limit"},
        )
    }

    async def post(self, raw_id: str) -> None:
        session = self.require_admin()
        product_id = product_id_of(raw_id)
        body = self.json_body(StockChange)
        result = await self.catalog.change_stock(
            product_id, delta=body.delta, set=body.set_to, actor=session.user_id
        )
        self.write_json(result)


def routes(gate: Gate, catalog: CatalogService) -> list[Any]:
    """The product routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "catalog": catalog}
    return [
        (r"/api/v1/products", ProductsHandler, args),
        (r"/api/v1/products/([^/]+)", ProductHandler, args),
        (r"/api/v1/products/([^/]+)/stock", StockHandler, args),
    ]
