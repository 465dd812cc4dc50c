"""Rendered HTML fragments of products (storefront cards and product bodies), cached in Redis.

A storefront page is assembled from one fragment per product: the list page from cards, the
product page from the product's body. Each fragment is rendered once and kept through the
node's `CachedLoader` (the in-memory layer, then Redis for every node), under
`fragment:<kind>:<product id>:<version>`, where the version is the digest of the product's
cached catalog entry (`CatalogService.product_entry` / `list_entries`). That entry lives in
the `product` namespace that REST and GraphQL read, and every write that changes a product
bumps it there (`CatalogService._bump`), which reloads the entry, which changes its digest:
so the same bumps that invalidate REST and GraphQL move the fragment to a new key, the page
re-renders just that product, and the old fragment expires by its TTL. No bump of its own to
forget, and no extra round trip to learn a version.

Stock is never inside a fragment: a fragment holds `STOCK_SLOT` where the count goes, and
the page fills it from the live count when it is assembled (`fill_stock`). Renders are
counted per kind (`renders`), so tests can tell a cache hit from a render.

The rendering itself is a callable the caller passes (the handlers' Tornado templates): this
module knows no HTTP and no template engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from server.adapters.cache import CachedLoader

NS_FRAGMENT = "fragment"
STOCK_SLOT = "<!--fm:stock-->"
DEFAULT_TTL_S = 3600.0


def fill_stock(fragment: str, stock: int) -> str:
    """`fragment` with its stock slot replaced by the live count."""
    return fragment.replace(STOCK_SLOT, str(int(stock)))


class FragmentCache:
    """Product fragments by (kind, product id, version), rendered at most once per version."""

    def __init__(self, cache: CachedLoader, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.cache = cache
        self.ttl_s = ttl_s
        self.renders: Counter[str] = Counter()

    async def get(
        self, kind: str, product_id: int | str, version: str, render: Callable[[], str]
    ) -> str:
        """The fragment, from the cache or `render()` (which must leave `STOCK_SLOT` where
        the stock goes and show nothing personal)."""

        async def load() -> str:
            self.renders[kind] += 1
            return render()

        key = f"{kind}:{product_id}:{version}"
        fragment: str = await self.cache.get_or_load(NS_FRAGMENT, key, load, self.ttl_s)
        return fragment
