"""Exports the cache's per-namespace counters to Prometheus, read when /metrics is scraped.

The counters stay plain ints in `CacheStats` (no locking or label lookups on the read path);
this collector turns them into two counter families:

- `fm_cache_lookups_total{ns, result}`: `result` is `local_hit`, `hit` (Redis) or `miss`;
- `fm_cache_events_total{ns, event}`: loads, load errors, early refreshes, lock waits, ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.adapters.cache.stats import CacheStats

_LOOKUPS = {"local_hits": "local_hit", "hits": "hit", "misses": "miss"}


class CacheStatsCollector(Collector):
    """A Prometheus collector over `stats()`, e.g. `CachedLoader.all_stats`."""

    def __init__(self, stats: Callable[[], Mapping[str, CacheStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The current counters (called by the registry on each scrape)."""
        lookups = CounterMetricFamily(
            "fm_cache_lookups",
            "Cache lookups by namespace and result (local_hit, hit in Redis, miss).",
            labels=["ns", "result"],
        )
        events = CounterMetricFamily(
            "fm_cache_events",
            "Cache work by namespace: loads, load errors, early refreshes, lock waits, ...",
            labels=["ns", "event"],
        )
        for ns, stats in sorted(self._stats().items()):
            for name, value in stats.as_dict().items():
                if name in _LOOKUPS:
                    lookups.add_metric([ns, _LOOKUPS[name]], value)
                else:
                    events.add_metric([ns, name], value)
        yield lookups
        yield events
