"""Stock levels: read for live views, changed by single conditional statements."""

from __future__ import annotations

from server.db.router import ShardRouter


async def current_stock(router: ShardRouter, product_id: int) -> int | None:
    """Units in stock for `product_id`, or None if there is no such product."""
    async with router.catalog_read() as cur:
        await cur.execute("SELECT stock FROM inventory WHERE product_id = %s", (product_id,))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def adjust_stock(router: ShardRouter, product_id: int, delta: int) -> int | None:
    """Add `delta` (may be negative) to a product's stock in one conditional statement;
    returns the new count, or None if the product is unknown or stock would go below zero."""
    async with router.catalog_write() as cur:
        await cur.execute(
            "UPDATE inventory SET stock = stock + %s, updated_at = now() "
            "WHERE product_id = %s AND stock + %s >= 0 RETURNING stock",
            (delta, product_id, delta),
        )
        row = await cur.fetchone()
    return None if row is None else int(row[0])
