"""The result cache of public GraphQL queries, invalidated by the catalog's own version bumps.

Which results: queries that read no caller data (no `me`, `cart`, `orders`, `notifications`)
and came back without errors; the same answer suits every caller. Key: SHA-256 of the
normalized document, the operation name and the variables (canonical JSON).

Where: the catalog's `product_list` cache namespace (`server.adapters.cache`). Every catalog write
(product created or changed, image added) bumps that namespace's version, which is exactly when
a product query's answer can change; entries stored under the old version are never read again.
So GraphQL results are invalidated by the same bumps as REST list pages, on every node, with
the same single-flight loads, local layer and early refresh. Stock is the exception (the catalog
does not bump on stock changes, see `server.domain.catalog`): results that show stock are kept no
longer than the catalog's stock freshness bound, like the REST pages that show it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from server.adapters.cache import NS_PRODUCT_LIST, CachedLoader
from server.graphql.document import normalize
from server.graphql.executor import ParsedDocument

Run = Callable[[], Awaitable[tuple[dict[str, Any], int]]]


class _NotCacheable(Exception):
    """The run produced errors: hand its response to the caller, store nothing."""

    def __init__(self, response: dict[str, Any], actual: int) -> None:
        super().__init__("response with errors")
        self.response = response
        self.actual = actual


def encode(value: Any) -> bytes:
    """Compact JSON bytes (the response encoding)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class ResultCache:
    """Cached `data` (encoded) and actual cost of public queries."""

    def __init__(self, cache: CachedLoader, ttl_s: float, live_ttl_s: float) -> None:
        self._cache = cache
        self.ttl_s = ttl_s
        self.live_ttl_s = min(live_ttl_s, ttl_s)

    @property
    def enabled(self) -> bool:
        """False when the TTL setting is 0."""
        return self.ttl_s > 0 and self.live_ttl_s > 0

    @staticmethod
    def key(parsed: ParsedDocument, operation_name: str | None, variables: Any) -> str:
        """The entry of one operation with its variables (normal form, so layout and comments
        do not split entries)."""
        normalized = parsed.normalized
        if normalized is None:
            normalized = parsed.normalized = normalize(parsed.text)
        material = json.dumps(
            [normalized, operation_name, variables], sort_keys=True, separators=(",", ":")
        )
        return "gql:" + hashlib.sha256(material.encode()).hexdigest()

    async def get_or_run(self, key: str, live: bool, run: Run) -> tuple[bytes | None, Any, int]:
        """(encoded data or None, the response when it had errors, actual cost): from the
        cache, or by running the operation (once per key across the nodes)."""

        async def load() -> list[Any]:
            response, actual = await run()
            if response.get("errors"):
                raise _NotCacheable(response, actual)
            return [encode(response.get("data")), actual]

        ttl_s = self.live_ttl_s if live else self.ttl_s
        try:
            data, actual = await self._cache.get_or_load(NS_PRODUCT_LIST, key, load, ttl_s)
        except _NotCacheable as uncached:
            return None, uncached.response, uncached.actual
        return bytes(data), None, int(actual)
