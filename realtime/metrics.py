"""Exports the cable's counters to Prometheus, read when /metrics is scraped.

The cable keeps plain ints on its hot paths (no label lookups while fanning out); this
collector turns them into metric families on each scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from realtime.cable import CableServer


class CableStatsCollector(Collector):
    """Connections, subscriptions, streams, messages in and out, fan-out latency, refusals,
    slow consumers and Redis reconnects of one node's cable."""

    def __init__(self, cable: CableServer) -> None:
        self._cable = cable

    def collect(self) -> Iterator[Metric]:
        """The current figures (called by the registry on each scrape)."""
        cable = self._cable
        yield GaugeMetricFamily(
            "fm_cable_connections", "Open /cable connections.", value=len(cable.connections)
        )
        yield GaugeMetricFamily(
            "fm_cable_subscriptions",
            "Channel subscriptions held by open /cable connections.",
            value=sum(len(conn.subscriptions) for conn in cable.connections),
        )
        yield CounterMetricFamily(
            "fm_cable_commands",
            "Commands received from clients (subscribe, unsubscribe, message), refused or not.",
            value=cable.commands,
        )
        yield CounterMetricFamily(
            "fm_cable_received_messages",
            "Stream messages received from Redis (every node's publishes of followed streams).",
            value=cable.received,
        )
        yield GaugeMetricFamily(
            "fm_cable_streams",
            "Streams with local subscribers (each one Redis channel followed).",
            value=len(cable.hub.streams()),
        )
        yield CounterMetricFamily(
            "fm_cable_delivered_messages",
            "Stream messages written to subscribers.",
            value=cable.hub.delivered,
        )
        yield CounterMetricFamily(
            "fm_cable_refusals",
            "Frames, commands and subscriptions refused (malformed, unknown, forbidden, flood).",
            value=cable.refusals,
        )
        yield CounterMetricFamily(
            "fm_cable_slow_consumers",
            "Connections cut off for not reading what they were sent.",
            value=cable.slow_consumers,
        )
        yield CounterMetricFamily(
            "fm_cable_redis_reconnects",
            "Times the node re-established its Redis pub/sub after losing it (gaps then filled "
            "from history).",
            value=cable.broker.reconnects,
        )
        yield CounterMetricFamily(
            "fm_cable_restored_sessions",
            "Extended-protocol connections that came back with a session (`restored: true`).",
            value=cable.restored_sessions,
        )
        gaps = CounterMetricFamily(
            "fm_cable_live_gaps",
            "Gaps in a followed stream's offsets (a lost pub/sub message, a Redis reconnect or "
            "failover), by how they were closed: `filled` from history before the newer "
            "message, or `resynced` with a fresh state for every subscriber.",
            labels=["closed_by"],
        )
        gaps.add_metric(["filled"], cable.gaps_filled)
        gaps.add_metric(["resynced"], cable.resyncs)
        yield gaps
        yield CounterMetricFamily(
            "fm_cable_epochs_rotated",
            "Followed streams given a new epoch because Redis lost writes of them (a master "
            "failed over unplanned, or Redis is behind what this node delivered); their "
            "subscribers got a fresh state.",
            value=cable.epochs_rotated,
        )
        answers = CounterMetricFamily(
            "fm_cable_history_answers",
            "Extended-protocol history requests answered, by answer (`confirm_history` with the "
            "replay, or `reject_history` and the current state).",
            labels=["answer"],
        )
        answers.add_metric(["confirmed"], cable.history_confirmed)
        answers.add_metric(["rejected"], cable.history_rejected)
        yield answers
        yield from cable.fanout_seconds.collect()
