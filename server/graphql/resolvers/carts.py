"""Resolvers of `carts.graphql`: the caller's cart, its changes, and their live stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from realtime.watch import StreamReset
from server.domain.carts import CartService
from server.domain.events import cart_stream
from server.graphql.compiled import direct, renamed
from server.graphql.context import RequestContext
from server.graphql.loaders import parse_id

SDL = Path(__file__).with_suffix(".graphql")


def _carts(ctx: RequestContext) -> CartService:
    return ctx.domain.carts


def _prefetched(ctx: RequestContext, cart: dict[str, Any]) -> dict[str, Any]:
    """Start loading the products of the cart's lines at once (one batch for all lines)."""
    ctx.loaders.product.prefetch(item["product_id"] for item in cart["items"])
    return cart


async def cart(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.cart`: null for anonymous callers."""
    if ctx.session is None:
        return None
    found = await ctx.loaders.cart.load(ctx.session.user_id)
    return None if found is None else _prefetched(ctx, found)


async def add_to_cart(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    session = ctx.require_user()
    changed = await _carts(ctx).add_item(
        session.user_id, parse_id(args["productId"]), args["quantity"]
    )
    ctx.loaders.cart.prime(session.user_id, changed)
    return _prefetched(ctx, changed)


async def update_cart_item(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> Any:
    session = ctx.require_user()
    changed = await _carts(ctx).set_quantity(
        session.user_id, parse_id(args["productId"]), args["quantity"]
    )
    ctx.loaders.cart.prime(session.user_id, changed)
    return _prefetched(ctx, changed)


async def remove_from_cart(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> Any:
    session = ctx.require_user()
    changed = await _carts(ctx).remove_item(session.user_id, parse_id(args["productId"]))
    ctx.loaders.cart.prime(session.user_id, changed)
    return _prefetched(ctx, changed)


async def cart_updated(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> AsyncIterator[dict[str, Any]]:
    """`Subscription.cartUpdated`: the cart now, then after every change (any node); after
    changes the node lost for good (a `StreamReset`), the cart as it is then."""
    session = ctx.require_user()
    async with ctx.domain.watch(cart_stream(session.user_id)) as events:
        yield await _carts(ctx).get(session.user_id)
        async for message in events:
            if isinstance(message, StreamReset):
                yield await _carts(ctx).get(session.user_id)
            elif message.get("event") == "cart":
                yield message["cart"]


@direct
def event(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    return parent


total_cents = renamed("total_cents")


item_product_id = renamed("product_id")


item_unit_price = renamed("unit_price_cents")


@direct
def item_product(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`CartItem.product` (also `OrderItem.product`): through the request's product loader."""
    return ctx.loaders.product.load(parent["product_id"])


RESOLVERS = {
    "Query.cart": cart,
    "Mutation.addToCart": add_to_cart,
    "Mutation.updateCartItem": update_cart_item,
    "Mutation.removeFromCart": remove_from_cart,
    "Subscription.cartUpdated": event,
    "Cart.totalCents": total_cents,
    "CartItem.productId": item_product_id,
    "CartItem.unitPriceCents": item_unit_price,
    "CartItem.product": item_product,
    "CartWarning.productId": item_product_id,
}
SUBSCRIPTIONS = {"Subscription.cartUpdated": cart_updated}
