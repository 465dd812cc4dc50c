"""Liveness, readiness and metrics endpoints for load balancers and Prometheus."""

from __future__ import annotations

from handlers.base import BaseHandler
from server.adapters.readiness import unready_reasons


class HealthzHandler(BaseHandler):
    """`GET /healthz`: 200 while the process runs its loop; checks nothing else."""

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write_json({"status": "ok", "node": self.services.settings.node_id})


class ReadyzHandler(BaseHandler):
    """`GET /readyz`: 200 when Redis and every database primary answer, else 503 with why.

    A draining node (after SIGTERM) answers 503 so the load balancer takes it out first.
    """

    async def get(self) -> None:
        services = self.services
        self.set_header("Cache-Control", "no-store")
        reasons = ["draining: node is shutting down"] if services.state.draining else []
        if not reasons:
            reasons = await unready_reasons(
                services.router, services.redis, services.settings.readiness_timeout_s
            )
        services.metrics.ready.set(0 if reasons else 1)
        if reasons:
            self.write_json({"status": "unavailable", "reasons": reasons}, status=503)
        else:
            self.write_json({"status": "ready", "node": services.settings.node_id})


class MetricsHandler(BaseHandler):
    """`GET /metrics`: Prometheus text exposition of the node's registry."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(self.services.metrics.render())
