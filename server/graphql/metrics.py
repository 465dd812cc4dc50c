"""Exports the GraphQL counters of a node to Prometheus, read when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from realtime.graphql_socket import GraphQLWsServer
    from server.graphql.service import GraphQLService


class GraphQLStatsCollector(Collector):
    """Operations executed, requests refused (by code), and GraphQL WebSockets."""

    def __init__(self, service: GraphQLService, ws: GraphQLWsServer) -> None:
        self._service = service
        self._ws = ws

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The current figures (called by the registry on each scrape)."""
        service = self._service
        yield CounterMetricFamily(
            "fm_graphql_executed_operations",
            "GraphQL operations that reached execution (result cache hits excluded).",
            value=service.executed,
        )
        refused = CounterMetricFamily(
            "fm_graphql_refused_operations",
            "GraphQL operations refused before execution, by error code.",
            labels=["code"],
        )
        for code, count in sorted(service.refusals.items()):
            refused.add_metric([code], count)
        yield refused
        yield GaugeMetricFamily(
            "fm_graphql_ws_connections",
            "Open GraphQL WebSockets.",
            value=len(self._ws.connections),
        )
        yield CounterMetricFamily(
            "fm_graphql_ws_refusals",
            "GraphQL WebSocket messages and sockets refused (malformed, flood, unauthorized).",
            value=self._ws.refusals,
        )
