"""The caller's cart (CONTRACT "REST": `/api/v1/cart`, `/api/v1/cart/items[/{product_id}]`).

Every answer is the whole `Cart` (`{items, total_cents, version}`), so a client never has
to merge; every change is also published to the caller's `CartChannel` on every node.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from handlers.gate import Gate
from handlers.idempotent import IDEMPOTENCY_HEADER, IdempotentHandler
from handlers.openapi import Operation
from server.adapters.idempotency import IdempotencyStore
from server.domain.carts import MAX_ID, MAX_QUANTITY, MIN_QUANTITY, CartService


def parse_id(value: Any) -> int:
    """An id given as a JSON integer or a string of digits (CONTRACT: both are ids)."""
    if isinstance(value, bool):
        raise ValueError("must be an integer or a string of digits")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 19:
            raise ValueError("must be an integer or a string of digits")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError("must be an integer or a string of digits")
    if not 1 <= value <= MAX_ID:
        raise ValueError(f"must be between 1 and {MAX_ID}")
    return value


def require_int(value: Any) -> Any:
    """Only JSON integers: `"2"`, `2.0` and `true` are refused (json_body validates in lax
    mode, which would coerce them, and `StrictInt` does not survive that)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


IDEMPOTENT_CHANGE = {
    IDEMPOTENCY_HEADER: "optional, 1..255 characters: a replay by the same user within 24 h "
    "answers the first answer and does not apply again (offline replays)"
}

Id = Annotated[int, BeforeValidator(parse_id)]
# Bounds before the validator, so the OpenAPI document has them as `minimum`/`maximum`.
Quantity = Annotated[int, Field(ge=MIN_QUANTITY, le=MAX_QUANTITY), BeforeValidator(require_int)]


class AddItem(BaseModel):
    """`POST /api/v1/cart/items` body: add `quantity` units of a product."""

    model_config = ConfigDict(extra="forbid")

    product_id: Id
    quantity: Quantity = 1


class SetQuantity(BaseModel):
    """`PATCH /api/v1/cart/items/{product_id}` body: the line's new quantity."""

    model_config = ConfigDict(extra="forbid")

    quantity: Quantity


class CartLine(BaseModel):
    """A line of the answered `Cart` (documentation of the answer: `server.domain.carts`)."""

    product_id: str = Field(pattern=r"^[0-9]{1,19}$")
    quantity: int = Field(ge=MIN_QUANTITY, le=MAX_QUANTITY)
    unit_price_cents: int = Field(ge=0, description="the price when the line was last set")
    available: int | None = Field(
        ge=0, description="units in stock when read; null when the catalog could not be asked"
    )


class CartWarning(BaseModel):
    """A line that wants more units than are in stock (it is kept; checkout would refuse it)."""

    kind: Literal["over-stock"]
    product_id: str
    quantity: int
    available: int = Field(ge=0)
    detail: str


class Cart(BaseModel):
    """The answer of every cart operation: the whole cart, so a client never merges."""

    items: list[CartLine]
    total_cents: int = Field(ge=0)
    version: int = Field(ge=0, description="grows by one with every change")
    warnings: list[CartWarning]


class _CartBase(IdempotentHandler):
    """Handlers of the caller's cart: they get the node's `CartService` and the store of cart
    idempotency keys."""

    carts: CartService

    def initialize(  # type: ignore[override]
        self, gate: Gate, idempotency: IdempotencyStore, carts: CartService
    ) -> None:
        super().initialize(gate, idempotency)
        self.carts = carts


class CartHandler(_CartBase):
    """`GET /api/v1/cart`: the caller's cart."""

    openapi_path = "/api/v1/cart"
    openapi = {"GET": Operation("The caller's cart", auth="user", answer=Cart)}

    async def get(self) -> None:
        session = self.require_user()
        self.write_json(await self.carts.get(session.user_id))


class CartItemsHandler(_CartBase):
    """`POST /api/v1/cart/items`: add a product (at its current price) to the cart."""

    openapi_path = "/api/v1/cart/items"
    openapi = {
        "POST": Operation(
            "Add units of a product at its current price; answers the Cart (also past the "
            "stock: the line's `available` and the cart's `warnings` say so)",
            body=AddItem,
            auth="user",
            headers=IDEMPOTENT_CHANGE,
            answer=Cart,
            problems={
                404: "unknown product",
                409: "the same Idempotency-Key is in flight",
                422: "invalid body, or the line would pass 99 units",
            },
        )
    }

    async def post(self) -> None:
        session = self.require_user()
        body = self.json_body(AddItem)
        await self.run_idempotent(
            session.user_id,
            lambda once: self.carts.add_item(session.user_id, body.product_id, body.quantity, once),
        )


class CartItemHandler(_CartBase):
    """`PATCH` (set the quantity) and `DELETE` (remove) one line of the cart."""

    openapi_path = "/api/v1/cart/items/{product_id}"
    openapi = {
        "PATCH": Operation(
            "Set a line's quantity (takes the current price); answers the Cart",
            body=SetQuantity,
            auth="user",
            headers=IDEMPOTENT_CHANGE,
            answer=Cart,
            problems={404: "the product is not in the cart"},
        ),
        "DELETE": Operation(
            "Remove a line; answers the Cart",
            auth="user",
            headers=IDEMPOTENT_CHANGE,
            answer=Cart,
            problems={404: "the product is not in the cart"},
        ),
    }

    async def patch(self, product_id: str) -> None:
        session = self.require_user()
        body = self.json_body(SetQuantity)
        await self.run_idempotent(
            session.user_id,
            lambda once: self.carts.set_quantity(
                session.user_id, int(product_id), body.quantity, once
            ),
        )

    async def delete(self, product_id: str) -> None:
        session = self.require_user()
        await self.run_idempotent(
            session.user_id,
            lambda once: self.carts.remove_item(session.user_id, int(product_id), once),
        )


def routes(gate: Gate, idempotency: IdempotencyStore, carts: CartService) -> list[Any]:
    """The cart routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "idempotency": idempotency, "carts": carts}
    return [
        (r"/api/v1/cart", CartHandler, args),
        (r"/api/v1/cart/items", CartItemsHandler, args),
        (r"/api/v1/cart/items/([0-9]+)", CartItemHandler, args),
    ]
