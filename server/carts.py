"""Carts as the rest of the product sees them (read side; changes arrive with the commerce API)."""

from __future__ import annotations

from typing import Any

from server.db.router import ShardRouter


async def cart_view(router: ShardRouter, user_id: int) -> dict[str, Any]:
    """The contract's `Cart`: items with price snapshots, total and version."""
    async with router.read(user_id) as cur:
        await cur.execute(
            "SELECT c.version, i.product_id, i.quantity, i.unit_price_cents "
            "FROM carts c LEFT JOIN cart_items i ON i.user_id = c.user_id "
            "WHERE c.user_id = %s ORDER BY i.added_at, i.product_id",
            (user_id,),
        )
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
