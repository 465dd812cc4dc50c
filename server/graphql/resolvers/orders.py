"""Resolvers of `orders.graphql`: orders, checkout, notifications and their live stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from realtime.watch import StreamReset
from server.domain.events import notification_stream
from server.domain.orders import encode_cursor
from server.graphql.compiled import renamed
from server.graphql.context import RequestContext
from server.graphql.loaders import parse_id
from server.graphql.resolvers import carts

SDL = Path(__file__).with_suffix(".graphql")


def _connection(kind: str, page: dict[str, Any], after: str | None) -> dict[str, Any]:
    items = page["items"]
    edges = [{"node": item, "cursor": encode_cursor(kind, int(item["id"]))} for item in items]
    return {
        "edges": edges,
        "pageInfo": {
            "hasNextPage": page["next_cursor"] is not None,
            "hasPreviousPage": after is not None,
            "startCursor": edges[0]["cursor"] if edges else None,
            "endCursor": edges[-1]["cursor"] if edges else None,
        },
        "unread": page.get("unread"),
    }


async def orders(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.orders(first, after)`: null for anonymous callers."""
    if ctx.session is None:
        return None
    after = args.get("after") or None
    first = args.get("first")
    page = await ctx.domain.orders.page(ctx.session.user_id, 20 if first is None else first, after)
    ctx.loaders.product.prefetch(
        line["product_id"] for order in page["items"] for line in order["items"]
    )
    return _connection("order", page, after)


async def notifications(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.notifications(first, after)`: null for anonymous callers."""
    if ctx.session is None:
        return None
    after = args.get("after") or None
    first = args.get("first")
    page = await ctx.domain.notifications.page(
        ctx.session.user_id, 20 if first is None else first, after
    )
    return _connection("notification", page, after)


async def checkout(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Mutation.checkout(idempotencyKey)`: the order (the first one again for a used key)."""
    session = ctx.require_user()
    result = await ctx.domain.checkout.checkout(session.user_id, args["idempotencyKey"])
    order: dict[str, Any] = result.body["order"]
    ctx.loaders.product.prefetch(line["product_id"] for line in order["items"])
    return order


async def mark_read(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    session = ctx.require_user()
    service = ctx.domain.notifications
    return await service.mark_read(session.user_id, parse_id(args["id"], "notification"))


async def notification_received(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> AsyncIterator[dict[str, Any]]:
    """`Subscription.notificationReceived`: each new notification, from any node, once.

    When the node lost notification messages history could not give back (a `StreamReset`),
    the ones written since the last one sent are read from the user's shard and sent first.
    """
    session = ctx.require_user()
    service = ctx.domain.notifications
    async with ctx.domain.watch(notification_stream(session.user_id)) as events:
        last = await service.newest_id(session.user_id)
        async for message in events:
            if isinstance(message, StreamReset):
                for missed in await service.after(session.user_id, last):
                    last = int(missed["id"])
                    yield missed
            elif message.get("event") == "notification":
                notification = message["notification"]
                if int(notification["id"]) > last:
                    last = int(notification["id"])
                    yield notification


created_at = renamed("created_at")


read_at = renamed("read_at")


RESOLVERS = {
    "Query.orders": orders,
    "Query.notifications": notifications,
    "Mutation.checkout": checkout,
    "Mutation.markNotificationRead": mark_read,
    "Subscription.notificationReceived": carts.event,
    "Order.totalCents": carts.total_cents,
    "Order.createdAt": created_at,
    "OrderItem.productId": carts.item_product_id,
    "OrderItem.unitPriceCents": carts.item_unit_price,
    "OrderItem.product": carts.item_product,
    "Notification.createdAt": created_at,
    "Notification.readAt": read_at,
}
SUBSCRIPTIONS = {"Subscription.notificationReceived": notification_received}
