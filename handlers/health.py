"""Liveness, readiness and metrics endpoints for load balancers and Prometheus."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from handlers.base import BaseHandler
from handlers.gate import Gate


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """How the node reports on itself: its name, why it cannot serve now (an empty list when
    it can), where readiness is recorded for /metrics, and the metrics text."""

    node_id: str
    unready_reasons: Callable[[], Awaitable[list[str]]]
    record_ready: Callable[[bool], None]
    render_metrics: Callable[[], bytes]


class _HealthHandler(BaseHandler):
    health: NodeHealth

    def initialize(self, gate: Gate, health: NodeHealth) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.health = health


class HealthzHandler(_HealthHandler):
    """`GET /healthz`: 200 while the process runs its loop; checks nothing else."""

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write_json({"status": "ok", "node": self.health.node_id})


class ReadyzHandler(_HealthHandler):
    """`GET /readyz`: 200 when Redis and every database primary answer, else 503 with why.

    A draining node (after SIGTERM) answers 503 so the load balancer takes it out first.
    """

    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        reasons = ["draining: node is shutting down"] if self.gate.lifecycle.draining else []
        if not reasons:
            reasons = await self.health.unready_reasons()
        self.health.record_ready(not reasons)
        if reasons:
            self.write_json({"status": "unavailable", "reasons": reasons}, status=503)
        else:
            self.write_json({"status": "ready", "node": self.health.node_id})


class MetricsHandler(_HealthHandler):
    """`GET /metrics`: Prometheus text exposition of the node's registry."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.health.render_metrics())


def routes(gate: Gate, health: NodeHealth) -> list[Any]:
    """The health routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "health": health}
    return [
        (r"/healthz", HealthzHandler, args),
        (r"/readyz", ReadyzHandler, args),
        (r"/metrics", MetricsHandler, args),
    ]
