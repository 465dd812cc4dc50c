"""Orders as their owner reads them, and the opaque cursors of paginated lists.

Orders live on the buyer's shard and every query is scoped by `user_id`, so another user's
order is indistinguishable from a missing one (404, never 403: its existence is not revealed).
Order ids come from each shard's own sequence; they are unique per user, which is the only
scope in which they are ever looked up.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from server.adapters.db.router import ShardRouter
from server.common.errors import InvalidInput, NotFound

MAX_ID = 2**63 - 1
DEFAULT_PAGE = 20
MAX_PAGE = 100


def encode_cursor(kind: str, last_id: int) -> str:
    """An opaque cursor pointing after `last_id` in a list of `kind` (newest first)."""
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> int | None:
    """The id a cursor points after (None for the first page); `InvalidInput` when it was
    not made by `encode_cursor` for the same kind of list."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        last_id = int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("after is not a cursor this list returned", field="after") from None
    if prefix != kind or not 0 < last_id <= MAX_ID:
        raise InvalidInput("after is not a cursor this list returned", field="after")
    return last_id


def check_page_size(first: int) -> None:
    """Refuse page sizes outside 1..MAX_PAGE."""
    if not 1 <= first <= MAX_PAGE:
        raise InvalidInput(f"first must be between 1 and {MAX_PAGE}", field="first")


def order_dict(row: tuple[Any, ...], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The public JSON shape of an order from `(id, status, total_cents, currency,
    created_at)` and its items."""
    created_at: datetime = row[4]
    return {
        "id": str(row[0]),
        "status": row[1],
        "total_cents": int(row[2]),
        "currency": str(row[3]),
        "items": items,
        "created_at": created_at.isoformat(),
    }


_ORDER_COLUMNS = "o.id, o.status, o.total_cents, o.currency, o.created_at"


class OrderService:
    """Reads of a user's own orders."""

    def __init__(self, router: ShardRouter) -> None:
        self.router = router

    async def get(self, user_id: int, order_id: int) -> dict[str, Any]:
        """One of the user's orders; `NotFound` for unknown ids and other users' orders."""
        if not 1 <= order_id <= MAX_ID:
            raise NotFound(f"no order {order_id}", order_id=str(order_id))
        async with self.router.read(user_id) as cur:
            await cur.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.id = %s AND o.user_id = %s",
                (order_id, user_id),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no order {order_id}", order_id=str(order_id))
            items = await self._items(cur, [order_id])
        return order_dict(row, items.get(order_id, []))

    async def page(
        self, user_id: int, first: int = DEFAULT_PAGE, after: str | None = None
    ) -> dict[str, Any]:
        """`{items: [Order], next_cursor}`, newest first."""
        check_page_size(first)
        before_id = decode_cursor("order", after)
        async with self.router.read(user_id) as cur:
            await cur.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE o.user_id = %s "
                "AND (%s::bigint IS NULL OR o.id < %s::bigint) ORDER BY o.id DESC LIMIT %s",
                (user_id, before_id, before_id, first + 1),
            )
            rows = await cur.fetchall()
            page = rows[:first]
            items = await self._items(cur, [int(row[0]) for row in page])
        orders = [order_dict(row, items.get(int(row[0]), [])) for row in page]
        next_cursor = encode_cursor("order", int(page[-1][0])) if len(rows) > first else None
        return {"items": orders, "next_cursor": next_cursor}

    @staticmethod
    async def _items(cur: Any, order_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
        if not order_ids:
            return {}
        await cur.execute(
            "SELECT order_id, product_id, quantity, unit_price_cents FROM order_items "
            "WHERE order_id = ANY(%s) ORDER BY order_id, product_id",
            (order_ids,),
        )
        found: dict[int, list[dict[str, Any]]] = {}
        for order_id, product_id, quantity, unit_price_cents in await cur.fetchall():
            found.setdefault(int(order_id), []).append(
                {
                    "product_id": str(product_id),
                    "quantity": int(quantity),
                    "unit_price_cents": int(unit_price_cents),
                }
            )
        return found
