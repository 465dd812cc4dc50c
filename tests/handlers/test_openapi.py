"""The OpenAPI document is valid 3.1, matches the routes the node actually serves, and states
the bounds the server enforces (in JSON Schema keywords tools read)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tornado.web
from openapi_spec_validator import validate

from handlers.openapi import documented_handlers
from server.wiring.services import Services
from tests.helpers.accounts import token_for
from tests.helpers.catalog import add_product
from tests.helpers.http import call, problem

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


def _schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in the document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _schemas_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _schemas_in(value)


def _bounds(schema: dict[str, Any]) -> tuple[str, int, int]:
    """`(kind, low, high)` of a property: string lengths or integer values (through anyOf)."""
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") == "string" and "minLength" in option and "maxLength" in option:
            return "length", option["minLength"], option["maxLength"]
        if option.get("type") == "integer" and "minimum" in option and "maximum" in option:
            return "value", option["minimum"], option["maximum"]
    raise AssertionError(f"no bounds in {schema}")


def _fields_named(found: dict[str, Any]) -> set[str]:
    """The fields a 422 problem blames: body validation's `errors`, or the domain's `field`."""
    return {error["field"] for error in found.get("errors", [])} | {found.get("field")} - {None}


@pytest.mark.gen_test(timeout=30)
async def test_schemas_use_only_json_schema_keywords_for_bounds(
    http_client: Any, base_url: str
) -> None:
    """pydantic keeps `ge`/`le` verbatim when it cannot apply them to the type itself; no
    JSON Schema tool reads those, so none may reach the document."""
    document = json.loads((await http_client.fetch(base_url + "/api/v1/openapi.json")).body)
    leaked = [s for s in _schemas_in(document) if {"ge", "le", "gt", "lt"} & set(s)]
    assert leaked == []
    first = {
        path: next(p for p in item["get"]["parameters"] if p["name"] == "first")["schema"]
        for path, item in document["paths"].items()
        if any(p["name"] == "first" for p in item.get("get", {}).get("parameters", []))
    }
    assert set(first) >= {"/api/v1/products", "/api/v1/orders", "/api/v1/notifications"}
    assert all(schema["type"] == "integer" for schema in first.values())


@pytest.mark.usefixtures("clean_data")
@pytest.mark.gen_test(timeout=60)
async def test_the_documents_bounds_are_the_ones_the_server_enforces(
    http_client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    """For each bounded field the issue named, read its bounds from the served document and
    send the values at and just past them: at the bounds no validation (the body's or the
    domain's) refuses the field (the answer may still be another refusal, such as not enough
    stock), past them a 422 names it. The same for the `first` query parameters."""
    document = json.loads((await http_client.fetch(base_url + "/api/v1/openapi.json")).body)
    schemas = document["components"]["schemas"]
    product = add_product(infra_env["FM_CATALOG_DSN"])
    admin = {"Authorization": f"Bearer {await token_for(services, 'root@example.com', admin=True)}"}
    shopper = {
        "Authorization": f"Bearer {await token_for(services, 'bo@example.com', admin=False)}"
    }
    emails = (f"user{n}@example.com" for n in itertools.count())
    cases: list[tuple[str, str, str, str, Any, dict[str, str]]] = [
        ("POST", "/api/v1/users", "SignUp", "password", lambda: {"email": next(emails)}, {}),
        # A product of its own each time: the cart's line (not the body) bounds what is added.
        ("POST", "/api/v1/cart/items", "AddItem", "quantity",
         lambda: {"product_id": add_product(infra_env["FM_CATALOG_DSN"])}, shopper),
        ("PATCH", f"/api/v1/cart/items/{product}", "SetQuantity", "quantity", dict, shopper),
        ("POST", f"/api/v1/products/{product}/stock", "StockChange", "delta", dict, admin),
        ("POST", f"/api/v1/products/{product}/stock", "StockChange", "set", dict, admin),
    ]  # fmt: skip
    for method, path, schema_name, name, base, headers in cases:
        kind, low, high = _bounds(schemas[schema_name]["properties"][name])
        value: Callable[[int], Any] = (lambda n: "p" * n) if kind == "length" else (lambda n: n)
        for n, valid in ((low - 1, False), (low, True), (high, True), (high + 1, False)):
            if n == 0 and name == "delta":
                continue  # 0 is refused on its own ("must not be 0"), not by the bounds
            payload = {**base(), name: value(n)}
            response = await call(http_client, base_url + path, method, payload, **headers)
            refused = response.code == 422 and name in _fields_named(problem(response))
            assert refused != valid, (schema_name, name, n, response.code, response.body)
    for path in ("/api/v1/products", "/api/v1/orders", "/api/v1/notifications"):
        parameters = document["paths"][path]["get"]["parameters"]
        schema = next(p for p in parameters if p["name"] == "first")["schema"]
        for n, valid in ((schema["minimum"] - 1, False), (schema["minimum"], True),
                         (schema["maximum"], True), (schema["maximum"] + 1, False)):  # fmt: skip
            response = await call(http_client, f"{base_url}{path}?first={n}", **shopper)
            assert (response.code == 200) == valid, (path, n, response.code, response.body)
            if not valid:
                assert response.code == 422 and problem(response)["field"] == "first"


@pytest.mark.usefixtures("clean_data")
@pytest.mark.gen_test(timeout=60)
async def test_a_product_patch_refuses_exactly_what_its_schema_refuses(
    http_client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    """`ProductPatch`: each field may be left out but never sent as null, and `stock` is not
    one of its fields. The served schema says so (no null branch, no null default, no
    `stock`, no extra properties), and the server answers null or `stock` with a 422 naming
    the field, a real value with 200."""
    document = json.loads((await http_client.fetch(base_url + "/api/v1/openapi.json")).body)
    schema = document["components"]["schemas"]["ProductPatch"]
    assert schema["additionalProperties"] is False and "stock" not in schema["properties"]
    nullable = [name for name, field in schema["properties"].items() if "null" in json.dumps(field)]
    assert nullable == []
    assert all("default" not in field for field in schema["properties"].values())
    product = add_product(infra_env["FM_CATALOG_DSN"])
    admin = {"Authorization": f"Bearer {await token_for(services, 'root@example.com', admin=True)}"}
    url = f"{base_url}/api/v1/products/{product}"
    for name in [*schema["properties"], "stock"]:
        response = await call(http_client, url, "PATCH", {name: None}, **admin)
        assert response.code == 422 and name in _fields_named(problem(response)), response.body
    response = await call(http_client, url, "PATCH", {"stock": 3}, **admin)
    assert response.code == 422 and "stock" in _fields_named(problem(response))
    renamed = await call(http_client, url, "PATCH", {"name": "Renamed"}, **admin)
    assert renamed.code == 200 and json.loads(renamed.body)["name"] == "Renamed"
