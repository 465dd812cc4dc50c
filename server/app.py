"""The Tornado application factory: routes wired to the node's services."""

from __future__ import annotations

import logging
from typing import Any

import tornado.web

from handlers import cart as cart_handlers
from handlers import checkout as checkout_handlers
from handlers import graphql as graphql_handlers
from handlers import images as image_handlers
from handlers import products
from handlers import static_files as static_handlers
from handlers import storefront as storefront_handlers
from handlers.auth import MeHandler, SessionsHandler, UsersHandler
from handlers.base import BaseHandler
from handlers.cable import CableHandler
from handlers.compression import compression_transform
from handlers.health import HealthzHandler, MetricsHandler, ReadyzHandler
from handlers.openapi import OpenApiHandler
from handlers.pages import Storefront
from server.adapters.compression import Compressor
from server.common.logs import get_logger
from server.wiring.services import Services

_access_log = get_logger("finalmarket.access")
_ACCESS_LOGGER = logging.getLogger("finalmarket.access")


def make_app(services: Services) -> tornado.web.Application:
    """Build the application for one node; every handler gets `services` via `initialize`."""
    deps = {"services": services}
    storefront = Storefront(services)
    routes: list[Any] = [
        (r"/healthz", HealthzHandler, deps),
        (r"/readyz", ReadyzHandler, deps),
        (r"/metrics", MetricsHandler, deps),
        (r"/cable", CableHandler, {**deps, "cable": services.cable}),
        *graphql_handlers.routes(deps),
        (r"/api/v1/users", UsersHandler, deps),
        (r"/api/v1/sessions", SessionsHandler, deps),
        (r"/api/v1/me", MeHandler, deps),
        *products.routes(deps),
        *cart_handlers.routes(deps),
        *checkout_handlers.routes(deps),
        *image_handlers.routes(deps),
        (r"/api/v1/openapi\.json", OpenApiHandler, deps),
        *storefront_handlers.routes(deps, storefront),
        *static_handlers.routes(deps, storefront),
    ]
    settings = services.settings
    app = tornado.web.Application(
        routes,
        default_handler_class=storefront_handlers.StorefrontNotFoundHandler,
        default_handler_args={**deps, "storefront": storefront},
        log_function=_log_request,
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


def _route_name(handler: tornado.web.RequestHandler) -> str:
    # The handler class, not the path: paths carry ids and would explode metric cardinality.
    return type(handler).__name__.removesuffix("Handler")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log and request metrics, called by Tornado once per finished request."""
    status = handler.get_status()
    elapsed_s = handler.request.request_time()
    if isinstance(handler, BaseHandler):
        route, method = _route_name(handler), handler.request.method or "?"
        metrics = handler.services.metrics
        metrics.http_requests.labels(route, method, str(status)).inc()
        metrics.http_latency.labels(route, method).observe(elapsed_s)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not _ACCESS_LOGGER.isEnabledFor(level):
        return  # build nothing for a line that would be dropped (the hot path of every request)
    _access_log.log(
        level,
        "request",
        method=handler.request.method,
        path=handler.request.path,
        status=status,
        duration_ms=round(elapsed_s * 1000, 2),
        remote=handler.request.remote_ip,
        request_id=getattr(handler, "request_id", None),
    )
