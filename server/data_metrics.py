"""Exports the data layer's counters to Prometheus, read when /metrics is scraped: what the
shard router did per database, and the catalog's database loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.domain.catalog import CatalogService
from server.adapters.db.router import ShardRouter


class DataStatsCollector(Collector):
    """`fm_db_router_total{db, what}` and `fm_catalog_db_loads_total{what}`."""

    def __init__(self, router: ShardRouter, catalog: CatalogService) -> None:
        self._router = router
        self._catalog = catalog

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The current counters (called by the registry on each scrape)."""
        routed = CounterMetricFamily(
            "fm_db_router",
            "Shard router decisions per database (reads by role, fallbacks, retries, ...).",
            labels=["db", "what"],
        )
        for db, counters in sorted(self._router.counters.items()):
            for what, value in counters.as_dict().items():
                routed.add_metric([db, what], value)
        yield routed
        loads = CounterMetricFamily(
            "fm_catalog_db_loads",
            "Catalog statements run to fill caches (product, list page, stock counts).",
            labels=["what"],
        )
        for what, value in dataclasses.asdict(self._catalog.counters).items():
            loads.add_metric([what], value)
        yield loads
