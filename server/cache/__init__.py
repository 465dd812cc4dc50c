"""Redis cache for products, list pages, sessions and users (msgpack values).

One job per module: `keys` (names and hash tags), `versions` (invalidation by INCR, announced
over pub/sub), `store` (one-round-trip reads, locks, writes), `xfetch` (early refresh),
`local` (the bounded in-memory layer), `stats` (counters), `metrics` (their Prometheus
export), `loader` (`CachedLoader`, tying them
together) and `listener` (other nodes' bumps).

Typical use on a node::

    cache = CachedLoader(redis, node_id=settings.node_id)
    listener = CacheInvalidationListener(redis, cache)
    listener.start()
    product = await cache.get_or_load(NS_PRODUCT, product_id, load_product, ttl_s=300)
    await cache.bump(NS_PRODUCT, product_id)  # after the write commits
    await cache.bump(NS_PRODUCT_LIST)         # list pages may all have changed
"""

from server.adapters.cache.keys import BUMP_CHANNEL
from server.adapters.cache.listener import CacheInvalidationListener
from server.adapters.cache.loader import CachedLoader, Loader
from server.adapters.cache.local import LocalLRU
from server.adapters.cache.metrics import CacheStatsCollector
from server.adapters.cache.stats import CacheStats
from server.adapters.cache.versions import MAX_VALUE_TTL_S
from server.adapters.cache.xfetch import should_refresh_early

# Namespaces used by the node (one version counter each).
NS_PRODUCT = "product"  # one product's public fields, by id (bumped per product)
NS_PRODUCT_LIST = "product_list"  # list pages, by query (bumped on any catalog write)
NS_USER = "user"  # a user's profile, by id (bumped per user)
NS_SESSION = "session"  # resolved sessions, by token digest (bumped on revocation)

__all__ = [
    "BUMP_CHANNEL",
    "MAX_VALUE_TTL_S",
    "NS_PRODUCT",
    "NS_PRODUCT_LIST",
    "NS_SESSION",
    "NS_USER",
    "CacheInvalidationListener",
    "CacheStats",
    "CacheStatsCollector",
    "CachedLoader",
    "Loader",
    "LocalLRU",
    "should_refresh_early",
]
