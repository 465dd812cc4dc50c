"""The OpenAPI document is valid 3.1 and matches the routes the node actually serves."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import tornado.web
from openapi_spec_validator import validate

from handlers.openapi import documented_handlers

_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")


@pytest.mark.gen_test(timeout=30)
async def test_document_is_served_and_valid_openapi_3_1(http_client: Any, base_url: str) -> None:
    response = await http_client.fetch(base_url + "/api/v1/openapi.json")
    document = json.loads(response.body)
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def _api_routes(app: tornado.web.Application) -> dict[str, type]:
    routes: dict[str, type] = {}
    for rule in app.wildcard_router.rules:
        pattern = rule.matcher.regex.pattern.rstrip("$")
        if pattern.startswith("/api/v1/") and "openapi" not in pattern:
            routes[pattern] = rule.target
    return routes


@pytest.mark.gen_test(timeout=30)  # async, so the node's background tasks run normally
async def test_every_api_route_is_documented_and_every_documented_method_exists(
    app: Any,
) -> None:
    routes = _api_routes(app)
    assert routes, "no /api/v1 routes found"
    documented = {handler.openapi_path: handler for handler in documented_handlers(app)}
    for pattern, handler in routes.items():
        path = getattr(handler, "openapi_path", None)
        assert path is not None, f"{handler.__name__} ({pattern}) has no openapi_path"
        assert re.fullmatch(pattern, re.sub(r"\{[^}]+\}", "42", path)), (pattern, path)
        implemented = {
            m
            for m in _METHODS
            if getattr(handler, m.lower()) is not getattr(tornado.web.RequestHandler, m.lower())
        }
        assert set(handler.openapi) == implemented, (handler.__name__, implemented)
    assert set(documented) == {h.openapi_path for h in routes.values()}
