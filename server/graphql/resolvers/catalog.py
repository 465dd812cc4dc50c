"""Resolvers of `catalog.graphql`: products, stock changes, stock subscriptions.

Plain async functions `(parent, args, ctx, info)` over `CatalogService`; registered by
`server.graphql.executor`. Product values are the catalog's dicts (snake_case keys, ids as
strings); fields whose names differ have a resolver, the rest are read by the default one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from realtime.watch import StreamReset
from server.common.errors import NotFound
from server.domain.catalog import encode_cursor
from server.domain.events import stock_stream
from server.graphql.compiled import direct, renamed
from server.graphql.context import RequestContext
from server.graphql.loaders import parse_id

SDL = Path(__file__).with_suffix(".graphql")


async def product(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.product(id)`: null for an unknown id."""
    return await ctx.loaders.product.load(str(args["id"]))


async def products(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Query.products(first, after, query)`: one cached list page; its products and their
    stock are handed to the loaders at once, so the page costs the same statements for 5
    products as for 50."""
    after = args.get("after") or None
    page, next_cursor = await ctx.domain.catalog.product_list(
        args.get("first"), after, args.get("query")
    )
    loaders = ctx.loaders
    ids = []
    for item in page:
        loaders.product.prime(item["id"], item)
        ids.append(item["id"])
    loaders.stock.prefetch(ids)
    return {
        "edges": page,  # an edge is its product: `ProductEdge` resolves node and cursor from it
        "pageInfo": {
            "hasNextPage": next_cursor is not None,
            "hasPreviousPage": after is not None,
            "startCursor": encode_cursor(int(ids[0])) if ids else None,
            "endCursor": encode_cursor(int(ids[-1])) if ids else None,
        },
    }


@direct
def edge_node(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`ProductEdge.node`: the edge is the product itself."""
    return parent


@direct
def edge_cursor(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`ProductEdge.cursor`: the catalog's cursor after this product."""
    return encode_cursor(int(parent["id"]))


price_cents = renamed("price_cents")


updated_at = renamed("updated_at")


@direct
def stock(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Product.stock`: the count the product carries (after a change), else the live one."""
    known = parent.get("stock")
    if known is not None:
        return known
    return ctx.loaders.stock.load(parent["id"])


async def adjust_stock(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """`Mutation.adjustStock(productId, delta)` (administrators)."""
    session = ctx.require_admin()
    product_id = parse_id(args["productId"])
    changed = await ctx.domain.catalog.change_stock(
        product_id, delta=args["delta"], actor=session.user_id
    )
    key = str(product_id)
    ctx.loaders.stock.prime(key, changed["stock"])
    found = await ctx.loaders.product.load(key)
    if found is None:  # deleted right after the change
        raise NotFound(f"no product {product_id}", product_id=key)
    return {**found, "stock": changed["stock"]}


async def stock_updated(
    parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any
) -> AsyncIterator[dict[str, Any]]:
    """`Subscription.stockUpdated(productId)`: the count now, then each change from any node.

    The stream is followed before the count is read (from the primary), so no change between
    the two is lost; one that raced the read may repeat the count it already showed. After
    changes the node lost for good (a `StreamReset`), the count is read again.
    """
    product_id = parse_id(args["productId"])
    async with ctx.domain.watch(stock_stream(product_id)) as events:
        now = await ctx.domain.catalog.current_stock(product_id)
        if now is None:
            raise NotFound(f"no product {product_id}", product_id=str(product_id))
        yield {"productId": str(product_id), "stock": now}
        async for message in events:
            if isinstance(message, StreamReset):  # changes were lost: the count now
                now = await ctx.domain.catalog.current_stock(product_id)
                if now is not None:
                    yield {"productId": str(product_id), "stock": now}
            elif message.get("event") == "stock":
                yield {"productId": message["product_id"], "stock": message["stock"]}


@direct
def event(parent: Any, args: dict[str, Any], ctx: RequestContext, info: Any) -> Any:
    """The value a subscription's source yielded is the field's value."""
    return parent


RESOLVERS = {
    "Query.product": product,
    "Query.products": products,
    "ProductEdge.node": edge_node,
    "ProductEdge.cursor": edge_cursor,
    "Product.priceCents": price_cents,
    "Product.updatedAt": updated_at,
    "Product.stock": stock,
    "Mutation.adjustStock": adjust_stock,
    "Subscription.stockUpdated": event,
}
SUBSCRIPTIONS = {"Subscription.stockUpdated": stock_updated}
