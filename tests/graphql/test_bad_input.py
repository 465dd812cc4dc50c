"""Hostile and broken input: every case gets a clear error and the node keeps serving
(each test ends by checking that it still answers)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.websocket import WebSocketClosedError

from server.wiring.services import Services
from tests.helpers.cable import ExtraNode
from tests.helpers.graphql import codes, gql, graphql_settings, result
from tests.helpers.graphql_ws import WsClient

pytestmark = pytest.mark.usefixtures("clean_data")

MIB = 1024 * 1024


async def _still_serves(client: Any, url: str) -> None:
    body = result(await gql(client, url, "{ products(first: 1) { edges { node { id } } } }"))
    assert "errors" not in body


@pytest.mark.gen_test(timeout=30)
async def test_malformed_json_and_bodies_of_the_wrong_shape_are_400(
    client: Any, base_url: str, products: list[int]
) -> None:
    for raw in (b'{"query": ', b"\xff\xfe", b"[1, 2]", b'"query"', b'{"query": 42}'):
        response = await gql(client, base_url, body=raw)
        assert response.code == 400, raw
        assert json.loads(response.body)["errors"][0]["extensions"]["code"] in (
            "MALFORMED_JSON",
            "BAD_REQUEST",
        )
    wrong_type = await gql(client, base_url, body=b"{}", **{"Content-Type": "text/plain"})
    assert wrong_type.code == 415
    deep_json = await gql(client, base_url, body=b"[" * 100_000 + b"]" * 100_000)
    assert deep_json.code in (400, 413)
    for shape in (
        {"query": "{ __typename }", "variables": [1]},
        {"query": "{ __typename }", "operationName": 5},
        {"query": "{ __typename }", "extensions": {"persistedQuery": 1}},
    ):
        refused = await gql(client, base_url, body=json.dumps(shape).encode())
        assert codes(result(refused, 400)) == ["BAD_REQUEST"]
    await _still_serves(client, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_invalid_documents_are_parse_or_validation_errors(
    client: Any, base_url: str, products: list[int]
) -> None:
    cases = {
        "{ products(first: 2) { edges { node { id } }": "GRAPHQL_PARSE_FAILED",
        "query { ... }": "GRAPHQL_PARSE_FAILED",
        "{ product }": "GRAPHQL_VALIDATION_FAILED",
        "{ nope }": "GRAPHQL_VALIDATION_FAILED",
        "{ products { edges { node { id { deeper } } } } }": "GRAPHQL_VALIDATION_FAILED",
        "fragment A on Query { ...B } fragment B on Query { ...A } { ...A }": (
            "GRAPHQL_VALIDATION_FAILED"
        ),
        "{ __typename }\x00{ nope }": "GRAPHQL_PARSE_FAILED",
    }
    for document, code in cases.items():
        body = result(await gql(client, base_url, document))
        assert codes(body)[:1] == [code], (document, body)
        assert "data" not in body
    await _still_serves(client, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_unknown_or_ambiguous_operations_are_refused(
    client: Any, base_url: str, products: list[int]
) -> None:
    two = "query A { __typename } query B { __typename }"
    assert codes(result(await gql(client, base_url, two))) == ["OPERATION_RESOLUTION_FAILURE"]
    named = result(await gql(client, base_url, two, operation_name="C"))
    assert codes(named) == ["OPERATION_RESOLUTION_FAILURE"]
    chosen = result(await gql(client, base_url, two, operation_name="B"))
    assert chosen["data"] == {"__typename": "Query"}
    await _still_serves(client, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_variables_of_the_wrong_type_are_bad_user_input(
    client: Any, base_url: str, products: list[int]
) -> None:
    query = (
        "query($n: Int, $id: ID!) { products(first: $n) { edges { cursor } } "
        "product(id: $id) { id } }"
    )
    wrong = ({"n": "ten", "id": "1"}, {"n": 1}, {"n": 2**40, "id": "1"}, {"n": 1, "id": [1]})
    for variables in wrong:
        body = result(await gql(client, base_url, query, variables))
        assert codes(body)[:1] == ["BAD_USER_INPUT"], (variables, body)
    as_text = await gql(client, base_url, query, method="GET", variables="{not json")  # type: ignore[arg-type]
    assert codes(result(as_text, 400)) == ["BAD_REQUEST"]
    await _still_serves(client, base_url)


@pytest.mark.gen_test(timeout=60)
async def test_a_mebibyte_of_nested_brackets_is_refused_before_the_parser_sees_it(
    client: Any, base_url: str, infra_env: dict[str, str], products: list[int]
) -> None:
    brackets = "{ product(id: " + "[" * (MIB // 2) + "]" * (MIB // 2) + ") { id } }"
    # With the default limits the body alone is too large.
    assert (await gql(client, base_url, brackets)).code == 413
    # A node that accepts such bodies and documents still refuses the nesting, unparsed.
    node = await ExtraNode.start(
        graphql_settings(infra_env, max_body_bytes=4 * MIB, graphql_max_document_bytes=2 * MIB)
    )
    try:
        node_url = f"http://127.0.0.1:{node.port}"
        for document in (brackets, "{" * MIB, "query { a: " + "(" * 5000):
            body = result(await gql(client, node_url, document))
            assert codes(body) == ["DOCUMENT_TOO_DEEPLY_NESTED"]
        # brackets inside strings and comments are not nesting
        quoted = '{ product(id: "' + "[" * 5000 + '") { id } } # ' + "{" * 5000
        assert result(await gql(client, node_url, quoted))["data"] == {"product": None}
        await _still_serves(client, node_url)
    finally:
        await node.stop()
    too_large = result(await gql(client, base_url, "{ __typename " + " " * 40_000 + "}"))
    assert codes(too_large) == ["DOCUMENT_TOO_LARGE"]
    await _still_serves(client, base_url)


@pytest.mark.gen_test(timeout=60)
async def test_a_subscription_flood_on_one_socket_is_bounded_and_the_node_keeps_serving(
    client: Any, base_url: str, ws_url: str, services: Services, products: list[int]
) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    query = "subscription($id: ID!) { stockUpdated(productId: $id) { stock } }"
    for n in range(500):
        variables = {"id": str(products[n % 8])}
        payload = {"query": query, "variables": variables}
        message = {"id": f"s{n}", "type": "subscribe", "payload": payload}
        try:
            await ws.send(message)
        except WebSocketClosedError:
            break  # the server closed the flood
    seen: dict[str, int] = {}
    while (message := await ws.read(timeout=10)) is not None:
        seen[message["type"]] = seen.get(message["type"], 0) + 1
        if message["type"] == "error":
            assert message["payload"][0]["extensions"]["code"] == "TOO_MANY_OPERATIONS"
    assert ws.close_code == 4429  # the message bucket (50 at once) ran out
    assert seen.get("next", 0) <= services.settings.graphql_ws_max_subscriptions
    # the flood's operations are gone with its socket; the node still serves both ways
    for _ in range(100):
        if not services.graphql_ws.connections and not any(
            services.cable.hub.subscriber_count(f"inventory:product:{pid}") for pid in products
        ):
            break
        await asyncio.sleep(0.02)
    assert not services.graphql_ws.connections
    await _still_serves(client, base_url)
    fresh = await WsClient.connect(ws_url)
    await fresh.init()
    payload = {"query": query, "variables": {"id": str(products[0])}}
    await fresh.send({"id": "1", "type": "subscribe", "payload": payload})
    assert (await fresh.read() or {}).get("type") == "next"
    fresh.close()
