"""The Tornado application factory: routes wired to the node's services."""

from __future__ import annotations

import logging
from typing import Any

import tornado.web

from handlers import auth as auth_handlers
from handlers import cart as cart_handlers
from handlers import checkout as checkout_handlers
from handlers import graphql as graphql_handlers
from handlers import health as health_handlers
from handlers import images as image_handlers
from handlers import products
from handlers import static_files as static_handlers
from handlers import storefront as storefront_handlers
from handlers.base import BaseHandler
from handlers.cable import CableHandler
from handlers.compression import compression_transform
from handlers.gate import Gate
from handlers.health import NodeHealth
from handlers.openapi import OpenApiHandler
from handlers.pages import PageCaching, Storefront
from server.adapters.compression import Compressor
from server.adapters.idempotency import IdempotencyStore
from server.adapters.readiness import unready_reasons
from server.common.logs import AccessLog
from server.wiring.metrics import NodeMetrics
from server.wiring.services import Services


def make_app(services: Services) -> tornado.web.Application:
    """Build the application for one node: each route gets the node's `Gate` and exactly the
    domain services its handlers use, through Tornado's `initialize()`."""
    gate = Gate(
        lifecycle=services.state,
        sessions=services.sessions,
        rate_limiter=services.rate_limiter,
        ip_limit=services.ip_limit,
        user_limit=services.user_limit,
        max_body_bytes=services.settings.max_body_bytes,
        cookie_secure=services.settings.cookie_secure,
        allowed_origins=frozenset(services.settings.cable_allowed_origins),
    )
    metrics = services.metrics
    access_log = AccessLog()
    health = NodeHealth(
        node_id=services.settings.node_id,
        unready_reasons=lambda: unready_reasons(
            services.router,
            services.redis,
            services.settings.readiness_timeout_s,
            services.cluster_health,
        ),
        record_ready=lambda ready: metrics.ready.set(1 if ready else 0),
        render_metrics=metrics.render,
    )
    only_gate = {"gate": gate}
    settings = services.settings
    storefront = Storefront(
        services.cache,
        static_dir=settings.static_dir,
        fragment_ttl_s=settings.fragment_ttl_s,
        caching=PageCaching(
            s_maxage_s=settings.html_s_maxage_s,
            stale_while_revalidate_s=settings.html_stale_while_revalidate_s,
            stale_if_error_s=settings.html_stale_if_error_s,
        ),
    )
    shop = storefront_handlers.Shop(
        catalog=services.catalog,
        carts=services.carts,
        checkout=services.checkout,
        orders=services.orders,
        users=services.users,
    )
    cart_keys = IdempotencyStore(services.redis, "cart", settings.cart_idempotency_ttl_s)
    routes: list[Any] = [
        *health_handlers.routes(gate, health),
        (r"/cable", CableHandler, {"gate": gate, "cable": services.cable}),
        *graphql_handlers.routes(gate, services.graphql, services.graphql_ws),
        *auth_handlers.routes(gate, services.users),
        *products.routes(gate, services.catalog),
        *cart_handlers.routes(gate, cart_keys, services.carts),
        *checkout_handlers.routes(gate, services.checkout, services.orders, services.notifications),
        *image_handlers.routes(gate, services.images),
        (r"/api/v1/openapi\.json", OpenApiHandler, only_gate),
        *storefront_handlers.routes(gate, storefront, shop),
        *static_handlers.routes(gate, storefront),
    ]
    app = tornado.web.Application(
        routes,
        default_handler_class=storefront_handlers.StorefrontNotFoundHandler,
        default_handler_args={"gate": gate, "storefront": storefront},
        log_function=lambda handler: _log_request(handler, metrics, access_log),
        serve_traceback=services.settings.debug,
        compress_response=False,  # ours below: Brotli and gzip, cached bodies compressed once
    )
    compressor = Compressor(
        min_bytes=settings.compress_min_bytes,
        brotli_quality=settings.compress_brotli_quality,
        gzip_level=settings.compress_gzip_level,
        cache_entries=settings.compress_cache_entries,
    )
    app.add_transform(compression_transform(compressor))
    # Reachable for tests and tools; handlers get what they need through their routes.
    app.settings["storefront"] = storefront
    app.settings["compressor"] = compressor
    return app


# Health checks that succeeded are logged at debug level only (FM_LOG_LEVEL=debug shows them).
_PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def _route_name(handler: tornado.web.RequestHandler) -> str:
    # The handler class, not the path: paths carry ids and would explode metric cardinality.
    return type(handler).__name__.removesuffix("Handler")


def _log_request(
    handler: tornado.web.RequestHandler, metrics: NodeMetrics, access_log: AccessLog
) -> None:
    """Access log and request metrics, called by Tornado once per finished request."""
    status = handler.get_status()
    elapsed_s = handler.request.request_time()
    if isinstance(handler, BaseHandler):
        route, method = _route_name(handler), handler.request.method or "?"
        metrics.http_requests.labels(route, method, str(status)).inc()
        metrics.http_latency.labels(route, method).observe(elapsed_s)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if level == logging.INFO and handler.request.path in _PROBE_PATHS:
        level = logging.DEBUG  # a balancer asks every second: answers only at debug level
    if not access_log.enabled_for(level):
        return  # build nothing for a line that would be dropped (the hot path of every request)
    request = handler.request
    access_log.write(
        level,
        {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": int(elapsed_s * 100_000 + 0.5) / 100,  # round(, 2) at half the cost
            "remote": request.remote_ip,
            "request_id": getattr(handler, "request_id", None),
        },
    )
