"""Carts: one per user on the user's shard, versioned, with a price snapshot per item.

Why a snapshot: the price a buyer saw when adding an item is the price the cart shows and the
order charges, even if an admin changes the product later (re-adding or updating the quantity
takes the current price again). Why a version: clients on several devices (and CartChannel
subscribers) can tell which cart state is newer; every change bumps it by one.

A cart may hold more units than are in stock (docs/decisions.md, "Carts over stock"): adding
or setting such a quantity answers the cart, not a refusal, as shops do, because stock moves
on its own (another buyer, an admin) and only checkout takes it. Every cart answer says so:
each line has `available` (the units in stock when the cart was read; null when the catalog
could not be asked just then) and `warnings` lists each line that wants more than that
(`{kind: "over-stock", product_id, quantity, available, detail}`). Checkout still refuses a
line short of stock with its 409 `out-of-stock`.

Every change runs in one transaction on the user's shard primary that first bumps the
`carts` row (which also serialises concurrent changes of the same cart), records its
`Idempotency-Key` if the request had one (`Once`), then publishes
`{event: "cart", cart}` on `cart:user:<id>` after the commit, through an injected
`publish(stream, message)` callable (the node passes `CableServer.publish`), so this module
knows nothing of Tornado or Redis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from server.adapters.db.router import ShardRouter
from server.adapters.faults import as_domain_error
from server.common.errors import InvalidInput, NotFound, Unavailable
from server.common.logs import get_logger
from server.domain.events import CartChanged, Publish, announce
from server.domain.inventory import stock_of

"""`publish(stream, message)`: delivers a domain event to cable subscribers on every node."""

MIN_QUANTITY = 1
MAX_QUANTITY = 99
MAX_ID = 2**63 - 1  # bigint; larger ids cannot name anything

_log = get_logger("finalmarket.carts")

_CART_SQL = (
    "SELECT c.version, i.product_id, i.quantity, i.unit_price_cents "
    "FROM carts c LEFT JOIN cart_items i ON i.user_id = c.user_id "
    "WHERE c.user_id = %s ORDER BY i.added_at, i.product_id"
)


class _Cursor(Protocol):
    """What cart reads need of a cursor (an aiopg cursor or the router's ReadCursor)."""

    async def execute(self, sql: str, params: Any = ...) -> Any: ...

    async def fetchone(self) -> Any: ...

    async def fetchall(self) -> Any: ...


async def load_cart(cur: _Cursor, user_id: int) -> dict[str, Any]:
    """The contract's `Cart` read through `cur` (inside a transaction it sees its changes)."""
    await cur.execute(_CART_SQL, (user_id,))
    rows = await cur.fetchall()
    items = [
        {"product_id": str(row[1]), "quantity": row[2], "unit_price_cents": row[3]}
        for row in rows
        if row[1] is not None
    ]
    return {
        "items": items,
        "total_cents": sum(item["quantity"] * item["unit_price_cents"] for item in items),
        "version": rows[0][0] if rows else 0,
    }


OVER_STOCK = "over-stock"


async def with_availability(
    router: ShardRouter, user_id: int, cart: dict[str, Any]
) -> dict[str, Any]:
    """`cart` with each line's `available` (units in stock now) and the cart's `warnings`
    (the lines that want more than that), read in one catalog statement (on the primary
    while the user's own checkout's change may not have reached the replica).

    The catalog being busy or down does not fail a cart answer (the cart lives on the
    user's shard): `available` is then null and there are no warnings."""
    ids = [int(item["product_id"]) for item in cart["items"]]
    stock: dict[int, int] | None
    try:
        stock = await stock_of(router, ids, actor=user_id)
    except Exception as error:
        if not isinstance(as_domain_error(error), Unavailable):
            raise
        _log.warning("cart_stock_unknown", error=repr(error))
        stock = None
    warnings = []
    for item, product_id in zip(cart["items"], ids, strict=True):
        available = None if stock is None else stock.get(product_id, 0)
        item["available"] = available
        if available is not None and item["quantity"] > available:
            warnings.append(
                {
                    "kind": OVER_STOCK,
                    "product_id": item["product_id"],
                    "quantity": item["quantity"],
                    "available": available,
                    "detail": f"the cart holds {item['quantity']} of product {product_id}; "
                    f"{available} are in stock now, so checkout would refuse it",
                }
            )
    cart["warnings"] = warnings
    return cart


async def cart_view(router: ShardRouter, user_id: int) -> dict[str, Any]:
    """The contract's `Cart`: items with price snapshots and availability, total, version
    and warnings."""
    async with router.read(user_id) as cur:
        cart = await load_cart(cur, user_id)
    return await with_availability(router, user_id, cart)


def check_quantity(quantity: int) -> None:
    """Refuse quantities outside 1..99 (`InvalidInput` naming the field)."""
    if not MIN_QUANTITY <= quantity <= MAX_QUANTITY:
        raise InvalidInput(
            f"quantity must be between {MIN_QUANTITY} and {MAX_QUANTITY}",
            field="quantity",
            minimum=MIN_QUANTITY,
            maximum=MAX_QUANTITY,
        )


@dataclass(frozen=True, slots=True)
class Once:
    """A change sent with an `Idempotency-Key`: `key` names it in the shard's
    `idempotency_keys` (the handler passes `cart:` and the key's SHA-256, so it cannot meet a
    checkout's key), `fingerprint` what makes a replay the same request.

    The key is written in the change's own transaction, so PostgreSQL, not Redis, decides
    that a change applies once: Redis (`server.adapters.idempotency`) answers replays and
    in-flight copies fast, but a master's death may lose a key it acknowledged, and a replay
    of `add_item` would then add the units twice."""

    key: str
    fingerprint: str


class ChangeAlreadyApplied(Exception):
    """The shard already holds this `Once` key: the change ran before; `answer` is the cart
    it answered then (a replay, not an error)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__("change already applied")
        self.answer = answer


class IdempotencyKeyReused(InvalidInput):
    """The key was first used for a different change."""

    kind = "idempotency-key-reused"


class CartService:
    """Changes to a user's cart, each one versioned and published after commit."""

    def __init__(self, router: ShardRouter, publish: Publish | None = None) -> None:
        self.router = router
        self.publish = publish

    async def get(self, user_id: int) -> dict[str, Any]:
        """The user's cart (read-your-writes: the router reads the primary after a change)."""
        return await cart_view(self.router, user_id)

    async def add_item(
        self, user_id: int, product_id: int, quantity: int, once: Once | None = None
    ) -> dict[str, Any]:
        """Add `quantity` units (to what the cart holds already) at the current price.

        `NotFound` for an unknown product; `InvalidInput` when the line would pass 99 units;
        with `once`, `ChangeAlreadyApplied` / `IdempotencyKeyReused` for a key seen before.
        More than is in stock is added, and the answer's `warnings` say so.
        """
        check_quantity(quantity)
        price_cents, currency = await self._price_of(product_id)
        async with self.router.write(user_id) as cur:
            await self._bump(cur, user_id)
            await self._claim(cur, user_id, once)
            await cur.execute(
                "INSERT INTO cart_items "
                "(user_id, product_id, quantity, unit_price_cents, currency) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (user_id, product_id) DO UPDATE "
                "SET quantity = cart_items.quantity + EXCLUDED.quantity, "
                "    unit_price_cents = EXCLUDED.unit_price_cents, currency = EXCLUDED.currency "
                "RETURNING quantity",
                (user_id, product_id, quantity, price_cents, currency),
            )
            (total,) = await cur.fetchone()
            if total > MAX_QUANTITY:  # raising rolls the whole change back
                raise InvalidInput(
                    f"the cart would hold {total} units of product {product_id}; "
                    f"at most {MAX_QUANTITY} are allowed",
                    field="quantity",
                    product_id=str(product_id),
                    maximum=MAX_QUANTITY,
                )
            cart = await load_cart(cur, user_id)
            await self._remember(cur, user_id, once, cart)
        await self._announce(user_id, cart)
        return cart

    async def set_quantity(
        self, user_id: int, product_id: int, quantity: int, once: Once | None = None
    ) -> dict[str, Any]:
        """Set an item's quantity, taking the current price; `NotFound` if it is not there."""
        check_quantity(quantity)
        price_cents, currency = await self._price_of(product_id)
        async with self.router.write(user_id) as cur:
            await self._bump(cur, user_id)
            await self._claim(cur, user_id, once)
            await cur.execute(
                "UPDATE cart_items SET quantity = %s, unit_price_cents = %s, currency = %s "
                "WHERE user_id = %s AND product_id = %s",
                (quantity, price_cents, currency, user_id, product_id),
            )
            if cur.rowcount == 0:
                raise self._not_in_cart(product_id)
            cart = await load_cart(cur, user_id)
            await self._remember(cur, user_id, once, cart)
        await self._announce(user_id, cart)
        return cart

    async def remove_item(
        self, user_id: int, product_id: int, once: Once | None = None
    ) -> dict[str, Any]:
        """Remove an item; `NotFound` if the cart does not hold it."""
        async with self.router.write(user_id) as cur:
            await self._bump(cur, user_id)
            await self._claim(cur, user_id, once)
            await cur.execute(
                "DELETE FROM cart_items WHERE user_id = %s AND product_id = %s",
                (user_id, product_id),
            )
            if cur.rowcount == 0:
                raise self._not_in_cart(product_id)
            cart = await load_cart(cur, user_id)
            await self._remember(cur, user_id, once, cart)
        await self._announce(user_id, cart)
        return cart

    # --- helpers ----------------------------------------------------------------------------

    async def _price_of(self, product_id: int) -> tuple[int, str]:
        """The product's current price and currency (the snapshot), or `NotFound`."""
        if not 1 <= product_id <= MAX_ID:
            raise NotFound(f"no product {product_id}", product_id=str(product_id))
        row = await self._price_row(product_id, fresh=False)
        if row is None:
            # A product created moments ago may not have reached the catalog replica yet:
            # ask the primary before telling the shopper it does not exist.
            row = await self._price_row(product_id, fresh=True)
        if row is None:
            raise NotFound(f"no product {product_id}", product_id=str(product_id))
        return int(row[0]), str(row[1])

    async def _price_row(self, product_id: int, *, fresh: bool) -> Any:
        async with self.router.catalog_read(fresh=fresh) as cur:
            await cur.execute(
                "SELECT price_cents, currency FROM products WHERE id = %s", (product_id,)
            )
            return await cur.fetchone()

    @staticmethod
    async def _bump(cur: Any, user_id: int) -> None:
        """Increment the cart's version (creating the cart row if the user has none); the
        row lock this takes serialises concurrent changes of one cart."""
        await cur.execute(
            "INSERT INTO carts (user_id, version) VALUES (%s, 1) "
            "ON CONFLICT (user_id) DO UPDATE "
            "SET version = carts.version + 1, updated_at = now()",
            (user_id,),
        )

    async def _claim(self, cur: Any, user_id: int, once: Once | None) -> None:
        """Record `once` in this change's transaction, or raise if the shard has it already
        (raising rolls the change back: it ran before). The answer then is the cart the first
        change answered, with each line's availability as it is now."""
        if once is None:
            return
        await cur.execute(
            "INSERT INTO idempotency_keys (user_id, key, request_hash, state, status_code) "
            "VALUES (%s, %s, %s, 'completed', 200) ON CONFLICT (user_id, key) DO NOTHING "
            "RETURNING 1",
            (user_id, once.key, once.fingerprint),
        )
        if await cur.fetchone() is not None:
            return
        await cur.execute(
            "SELECT request_hash, response FROM idempotency_keys WHERE user_id = %s AND key = %s",
            (user_id, once.key),
        )
        stored_hash, response = await cur.fetchone()
        if stored_hash != once.fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a different request", field="Idempotency-Key"
            )
        answer = dict(response or {})
        await with_availability(self.router, user_id, answer)
        raise ChangeAlreadyApplied(answer)

    @staticmethod
    async def _remember(cur: Any, user_id: int, once: Once | None, cart: dict[str, Any]) -> None:
        """Store the answer of a `once` change beside its key."""
        if once is not None:
            await cur.execute(
                "UPDATE idempotency_keys SET response = %s::jsonb, updated_at = now() "
                "WHERE user_id = %s AND key = %s",
                (json.dumps(cart), user_id, once.key),
            )

    @staticmethod
    def _not_in_cart(product_id: int) -> NotFound:
        return NotFound(f"product {product_id} is not in the cart", product_id=str(product_id))

    async def _announce(self, user_id: int, cart: dict[str, Any]) -> None:
        """Add availability to the committed `cart` (it is the answer too), then publish it."""
        await with_availability(self.router, user_id, cart)
        await announce(self.publish, CartChanged(user_id, cart))
