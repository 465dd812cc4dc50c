"""Stock levels: read for live views, changed by single conditional statements.

Every change is one `UPDATE inventory ... WHERE <the result stays in range> RETURNING stock`:
the database decides, under its row lock, whether the change fits, so concurrent changes on
any number of nodes can never oversell (there is no read-then-write to race). When the
statement matches no row, a second read (in the same transaction, after the refusal) only
explains why: unknown product, not enough stock, or above the ceiling.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.adapters.db.router import ShardRouter
from server.common.errors import Conflict, InvalidInput, NotFound

MAX_STOCK = 1_000_000  # units one product may hold (the API's validation bound, too)

_DELTA_SQL = (
    "UPDATE inventory SET stock = stock + %s, updated_at = now() "
    "WHERE product_id = %s AND stock + %s >= 0 AND stock + %s <= %s RETURNING stock"
)
_SET_SQL = (
    "UPDATE inventory SET stock = %s, updated_at = now() "
    "WHERE product_id = %s AND %s >= 0 AND %s <= %s RETURNING stock"
)


class OutOfStock(Conflict):
    """A change would take a product's stock below zero; `available` is what there is."""

    kind = "out-of-stock"

    def __init__(self, product_id: int, available: int, wanted: int) -> None:
        super().__init__(
            f"product {product_id} has {available} in stock; {wanted} requested",
            product_id=str(product_id),
            available=available,
            requested=wanted,
        )


class StockWouldGoNegative(Conflict):
    """An admin's stock change would take a product below zero (kind `out-of-stock`, as for a
    buyer, but said as a stock change: nobody requested units)."""

    kind = "out-of-stock"

    def __init__(self, product_id: int, available: int, delta: int) -> None:
        super().__init__(
            f"product {product_id} has {available} in stock; a change of {delta} would take "
            "it below zero",
            product_id=str(product_id),
            available=available,
            delta=delta,
        )


class StockLimitExceeded(Conflict):
    """A change would take a product's stock above `MAX_STOCK`."""

    kind = "stock-limit"

    def __init__(self, product_id: int, available: int, delta: int) -> None:
        super().__init__(
            f"product {product_id} has {available} in stock; adding {delta} would pass the "
            f"limit of {MAX_STOCK}",
            product_id=str(product_id),
            available=available,
            limit=MAX_STOCK,
        )


async def current_stock(router: ShardRouter, product_id: int) -> int | None:
    """Units in stock for `product_id`, or None if there is no such product."""
    async with router.catalog_read() as cur:
        await cur.execute("SELECT stock FROM inventory WHERE product_id = %s", (product_id,))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def stock_of(
    router: ShardRouter,
    product_ids: Iterable[int],
    *,
    fresh: bool = False,
    actor: int | None = None,
) -> dict[int, int]:
    """Units in stock of each of `product_ids` that exists, in one statement (`actor`: whose
    own recent catalog writes the answer must show)."""
    ids = list(product_ids)
    if not ids:
        return {}
    async with router.catalog_read(actor, fresh=fresh) as cur:
        await cur.execute(
            "SELECT product_id, stock FROM inventory WHERE product_id = ANY(%s::bigint[])", (ids,)
        )
        rows = await cur.fetchall()
    return {int(pid): int(stock) for pid, stock in rows}


async def adjust_stock(router: ShardRouter, product_id: int, delta: int) -> int | None:
    """Add `delta` (may be negative) to a product's stock in one conditional statement;
    returns the new count, or None if the product is unknown or stock would go below zero
    (or above `MAX_STOCK`)."""
    async with router.catalog_write() as cur:
        await cur.execute(_DELTA_SQL, (delta, product_id, delta, delta, MAX_STOCK))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def change_stock(
    router: ShardRouter,
    product_id: int,
    *,
    delta: int | None = None,
    set_to: int | None = None,
    actor: int | None = None,
) -> int:
    """Apply exactly one of `delta` / `set_to` in one conditional statement; the new count.

    Raises `NotFound` (no such product), `StockWouldGoNegative` (would go below zero) or
    `StockLimitExceeded` (would pass `MAX_STOCK`). The transaction has committed when this
    returns, so callers may announce the new count.
    """
    if (delta is None) == (set_to is None):
        raise InvalidInput("give exactly one of delta and set")
    if set_to is not None and not 0 <= set_to <= MAX_STOCK:
        raise InvalidInput(f"set must be 0 to {MAX_STOCK}", field="set")
    async with router.catalog_write(actor) as cur:
        if delta is not None:
            await cur.execute(_DELTA_SQL, (delta, product_id, delta, delta, MAX_STOCK))
        else:
            await cur.execute(_SET_SQL, (set_to, product_id, set_to, set_to, MAX_STOCK))
        row = await cur.fetchone()
        if row is not None:
            return int(row[0])
        # Refused: say why. (A new statement, so it sees what the refusal saw or newer.)
        await cur.execute("SELECT stock FROM inventory WHERE product_id = %s", (product_id,))
        current = await cur.fetchone()
    if current is None:
        raise NotFound(f"no product {product_id}", product_id=str(product_id))
    available = int(current[0])
    if delta is not None and available + delta > MAX_STOCK:
        raise StockLimitExceeded(product_id, available, delta)
    if delta is None:  # `set` within bounds only fails for an unknown product
        raise NotFound(f"no product {product_id}", product_id=str(product_id))
    raise StockWouldGoNegative(product_id, available, delta)
