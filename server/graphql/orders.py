"""Resolvers of `orders.graphql`: orders, checkout, notifications and their live stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.domain.checkout import CheckoutService
from server.graphql.resolvers import carts
from server.graphql.compiled import renamed
from server.graphql.context import RequestContext
from server.graphql.loaders import parse_id
from server.domain.notifications import NotificationService, notification_stream
from server.domain.orders import OrderService, encode_cursor

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
    page = await OrderService(ctx.services.router).page(
        ctx.session.user_id, 20 if first is None else first, after
    )
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
    page = await NotificationService(ctx.services.router).page(
        ctx.session.user_id, 20 if first is None else first, after
    )
    return _connection("notification", page, after)


async def checkout(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Mutation.checkout(idempotencyKey)`: the order (the first one again for a used key)."""
    session = ctx.require_user()
    services = ctx.services
    result = await CheckoutService(services.router, services.cable.publish).checkout(
        session.user_id, args["idempotencyKey"]
    )
    order: dict[str, Any] = result.body["order"]
    ctx.loaders.product.prefetch(line["product_id"] for line in order["items"])
    return order


async def mark_read(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    session = ctx.require_user()
    service = NotificationService(ctx.services.router)
    return await service.mark_read(session.user_id, parse_id(args["id"], "notification"))


async def notification_received(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> AsyncIterator[dict[str, Any]]:
    """`Subscription.notificationReceived`: each new notification, from any node."""
    session = ctx.require_user()
    async with ctx.services.cable.watch(notification_stream(session.user_id)) as events:
        async for message in events:
            if message.get("event") == "notification":
                yield message["notification"]


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
