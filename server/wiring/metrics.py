"""Prometheus metrics of one node, in a registry owned by the node (no global registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.adapters.cluster_health import ClusterHealth
from server.adapters.refusal_hold import RefusedAddresses
from server.common.logs import lines_buffered, lines_dropped

# Buckets in seconds: from a cached read on loopback (~0.5 ms) to a slow checkout.
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class NodeMetrics:
    """The metrics every part of a node reports into; rendered by /metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.http_requests = Counter(
            "fm_http_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "fm_http_request_duration_seconds",
            "Time from request start to response finish, by route.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "fm_http_requests_in_flight", "HTTP requests being handled.", registry=self.registry
        )
        self.ready = Gauge(
            "fm_ready", "1 while the node reports ready on /readyz.", registry=self.registry
        )
        self.draining = Gauge(
            "fm_draining", "1 once the node is shutting down.", registry=self.registry
        )
        self.registry.register(LogStatsCollector())

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class LogStatsCollector(Collector):
    """The log writer's figures: lines dropped (never silently) and lines waiting."""

    def collect(self) -> Iterator[Metric]:
        """The current figures (called by the registry on each scrape)."""
        yield CounterMetricFamily(
            "fm_log_lines_dropped",
            "Log lines given up because the log buffer was full (the sink, stderr, was slower "
            "than the node) or a write to it failed.",
            value=lines_dropped(),
        )
        yield GaugeMetricFamily(
            "fm_log_lines_buffered",
            "Log lines waiting for the background writer.",
            value=lines_buffered(),
        )


class HttpServerStatsCollector(Collector):
    """The HTTP/1.1 layer's refusal hold (`http_refusal_hold_s`), which is how a flood from
    one address shows: connections held, and connections closed at once because their
    address had too many held already."""

    def __init__(self, refusals: RefusedAddresses | None) -> None:
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        """The current figures (called by the registry on each scrape)."""
        refusals = self._refusals
        yield CounterMetricFamily(
            "fm_http_refusal_holds",
            "Client connections held back after a 429 to their address (their own, or new "
            "ones while it is refused).",
            value=refusals.holds if refusals else 0,
        )
        yield CounterMetricFamily(
            "fm_http_refusal_turned_away",
            "New connections closed at once: their refused address had the most connections "
            "held already.",
            value=refusals.turned_away if refusals else 0,
        )


class RedisStatsCollector(Collector):
    """Redis as the node sees it: pub/sub resubscriptions by subscription and, on a Redis
    Cluster, unreachable slots, failovers and slot moves (`server.adapters.cluster_health`)."""

    def __init__(
        self, resubscriptions: dict[str, Callable[[], int]], cluster: ClusterHealth | None
    ) -> None:
        self._resubscriptions = resubscriptions
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        """The current figures (called by the registry on each scrape)."""
        resubscribed = CounterMetricFamily(
            "fm_redis_resubscriptions",
            "Times a pub/sub subscription was rebuilt after losing its connection, a failover "
            "or a slot move (`broker`: stream messages, gaps then filled from history or "
            "resynced; `cache_invalidations`: every local cache entry then dropped).",
            labels=["subscription"],
        )
        for name, count in sorted(self._resubscriptions.items()):
            resubscribed.add_metric([name], count())
        yield resubscribed
        cluster = self._cluster
        if cluster is None:
            return
        yield GaugeMetricFamily(
            "fm_redis_cluster_unreachable_slots",
            "Hash slots of the Redis Cluster that no answering master served at the last "
            "probe (about once a second; also on every /readyz).",
            value=cluster.unreachable_slots,
        )
        failovers = CounterMetricFamily(
            "fm_redis_cluster_failovers",
            "Replicas seen promoted to master, by kind: `planned` (the old master follows the "
            "new one; nothing lost) or `unplanned` (the old master died or was cut off; its "
            "streams then start a new epoch).",
            labels=["kind"],
        )
        for kind, seen in sorted(cluster.failovers.items()):
            failovers.add_metric([kind], seen)
        yield failovers
        yield CounterMetricFamily(
            "fm_redis_cluster_slots_moved",
            "Hash slots seen moving to another master other than by a failover (a reshard).",
            value=cluster.slots_moved,
        )
        yield CounterMetricFamily(
            "fm_redis_cluster_probes",
            "Probes of the cluster's slot map and masters.",
            value=cluster.probes,
        )
