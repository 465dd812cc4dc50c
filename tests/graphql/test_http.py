"""GraphQL over HTTP: GET and POST per the GraphQL-over-HTTP spec, media types and status
codes, authentication and typed errors, pagination, and the result cache with its
invalidation by catalog writes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.domain.catalog import encode_cursor
from server.wiring.services import Services
from tests.helpers.cable import ExtraNode
from tests.helpers.graphql import codes, gql, result

pytestmark = pytest.mark.usefixtures("clean_data")

RESPONSE_TYPE = "application/graphql-response+json"
PAGE = """query($after: String) { products(first: 3, after: $after) {
    edges { cursor node { id } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }"""
ONE = "query($id: ID!) { product(id: $id) { name } }"
ADJUST = "mutation($id: ID!, $delta: Int!) { adjustStock(productId: $id, delta: $delta) { stock } }"
ADD = "mutation($id: ID!, $n: Int!) { addToCart(productId: $id, quantity: $n) { version } }"
FIRST_TWO = "{ products(first: 2) { edges { node { id } } } }"


@pytest.mark.gen_test(timeout=30)
async def test_products_page_through_with_catalog_cursors(
    client: Any, base_url: str, products: list[int]
) -> None:
    seen: list[str] = []
    after = None
    while True:
        page = result(await gql(client, base_url, PAGE, {"after": after}))["data"]["products"]
        ids = [edge["node"]["id"] for edge in page["edges"]]
        assert [edge["cursor"] for edge in page["edges"]] == [encode_cursor(int(i)) for i in ids]
        assert page["pageInfo"]["endCursor"] == page["edges"][-1]["cursor"]
        assert page["pageInfo"]["hasPreviousPage"] is (after is not None)
        seen += ids
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert seen == [str(pid) for pid in products]


@pytest.mark.gen_test(timeout=30)
async def test_graphql_response_media_type_is_used_when_asked_with_400_for_refusals(
    client: Any, base_url: str, products: list[int]
) -> None:
    ok = await gql(client, base_url, "{ __typename }", Accept=RESPONSE_TYPE)
    assert ok.code == 200 and ok.headers["Content-Type"].startswith(RESPONSE_TYPE)
    refused = await gql(client, base_url, "{ nope }", Accept=RESPONSE_TYPE)
    assert refused.code == 400 and codes(json.loads(refused.body)) == ["GRAPHQL_VALIDATION_FAILED"]
    legacy = await gql(client, base_url, "{ nope }", Accept="application/json")
    assert legacy.code == 200 and legacy.headers["Content-Type"].startswith("application/json")
    assert codes(json.loads(legacy.body)) == ["GRAPHQL_VALIDATION_FAILED"]
    unacceptable = await gql(client, base_url, "{ __typename }", Accept="text/html")
    assert unacceptable.code == 406
    field_error = await gql(
        client, base_url, '{ product(id: "1") { id } cart { version } }', Accept=RESPONSE_TYPE
    )
    assert field_error.code == 200  # data is present: the request itself was fine


@pytest.mark.gen_test(timeout=30)
async def test_get_runs_queries_and_refuses_mutations_with_405(
    client: Any, base_url: str, products: list[int], admin: tuple[int, str]
) -> None:
    got = result(await gql(client, base_url, ONE, {"id": products[0]}, method="GET"))
    assert got["data"]["product"]["name"] == "Lamp 0"
    change = {"id": products[0], "delta": 1}
    refused = await gql(client, base_url, ADJUST, change, method="GET", token=admin[1])
    assert refused.code == 405 and refused.headers["Allow"] == "POST"
    assert codes(json.loads(refused.body)) == ["OPERATION_NOT_SUPPORTED"]
    posted = result(await gql(client, base_url, ADJUST, change, token=admin[1]))
    assert posted["data"]["adjustStock"] == {"stock": 11}
    put = await gql(client, base_url, "{ __typename }", method="PUT")
    assert put.code == 405 and codes(json.loads(put.body)) == ["METHOD_NOT_ALLOWED"]


@pytest.mark.gen_test(timeout=30)
async def test_mutations_need_a_signed_in_caller_and_admin_ones_an_administrator(
    client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    anonymous = result(await gql(client, base_url, ADD, {"id": products[0], "n": 1}))
    assert codes(anonymous) == ["UNAUTHENTICATED"] and anonymous["data"] == {"addToCart": None}
    change = {"id": products[0], "delta": 1}
    assert codes(result(await gql(client, base_url, ADJUST, change, token=shopper[1]))) == [
        "FORBIDDEN"
    ]
    forged = await gql(client, base_url, "{ me { id } }", token="forged")
    assert forged.code == 401 and codes(json.loads(forged.body)) == ["UNAUTHENTICATED"]
    assert result(await gql(client, base_url, "{ me { id } cart { version } }"))["data"] == {
        "me": None,
        "cart": None,
    }


@pytest.mark.gen_test(timeout=30)
async def test_domain_errors_carry_their_code_and_fields(
    client: Any, base_url: str, products: list[int], admin: tuple[int, str]
) -> None:
    change = {"id": products[0], "delta": -11}
    body = result(await gql(client, base_url, ADJUST, change, token=admin[1]))
    error = body["errors"][0]
    assert error["extensions"]["code"] == "OUT_OF_STOCK" and error["extensions"]["available"] == 10
    assert error["path"] == ["adjustStock"]
    too_many = result(await gql(client, base_url, "{ products(first: 500) { edges { cursor } } }"))
    assert codes(too_many) == ["INVALID_INPUT"]


@pytest.mark.gen_test(timeout=60)
async def test_checkout_with_the_same_key_answers_the_same_order(
    client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    added = await gql(client, base_url, ADD, {"id": products[0], "n": 3}, token=shopper[1])
    assert result(added)["data"]["addToCart"]
    checkout = """mutation($key: String!) { checkout(idempotencyKey: $key) {
        id status totalCents items { productId quantity product { name stock } } } }"""
    first = result(await gql(client, base_url, checkout, {"key": "k-1"}, token=shopper[1]))
    order = first["data"]["checkout"]
    assert order["items"][0]["quantity"] == 3 and order["items"][0]["product"]["name"] == "Lamp 0"
    again = result(await gql(client, base_url, checkout, {"key": "k-1"}, token=shopper[1]))
    assert again["data"]["checkout"]["id"] == order["id"]
    orders = "{ orders { edges { node { id totalCents } } } }"
    listed = result(await gql(client, base_url, orders, token=shopper[1]))
    assert [e["node"]["id"] for e in listed["data"]["orders"]["edges"]] == [order["id"]]
    empty = result(await gql(client, base_url, checkout, {"key": "k-2"}, token=shopper[1]))
    assert codes(empty) == ["CART_EMPTY"]


@pytest.mark.gen_test(timeout=30)
async def test_public_get_is_cacheable_and_private_or_signed_in_answers_are_not(
    client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    public = await gql(client, base_url, FIRST_TWO, method="GET")
    assert public.headers["Cache-Control"].startswith("public, max-age=")
    signed_in = await gql(client, base_url, FIRST_TWO, method="GET", token=shopper[1])
    assert signed_in.headers["Cache-Control"] == "no-store"
    private = await gql(client, base_url, "{ me { id } }", method="GET")
    assert private.headers["Cache-Control"] == "no-store"
    posted = await gql(client, base_url, FIRST_TWO)
    assert posted.headers["Cache-Control"] == "no-store"


@pytest.mark.gen_test(timeout=60)
async def test_result_cache_answers_repeats_and_catalog_writes_invalidate_it_on_every_node(
    client: Any,
    base_url: str,
    services: Services,
    node_b: ExtraNode,
    products: list[int],
    admin: tuple[int, str],
) -> None:
    query = '{ product(id: "' + str(products[0]) + '") { name } }'
    spelled_otherwise = '# the same query\n{product(id:"' + str(products[0]) + '"){name}}'
    node_b_url = f"http://127.0.0.1:{node_b.port}"
    assert result(await gql(client, base_url, query))["data"]["product"]["name"] == "Lamp 0"
    executed = services.graphql.executed
    again = result(await gql(client, base_url, spelled_otherwise))
    assert again["data"]["product"]["name"] == "Lamp 0"
    assert services.graphql.executed == executed  # answered from the cache
    b_executed = node_b.services.graphql.executed
    assert result(await gql(client, node_b_url, query))["data"]["product"]["name"] == "Lamp 0"
    assert node_b.services.graphql.executed == b_executed  # from Redis, stored by node A

    patched = await client.fetch(
        base_url + f"/api/v1/products/{products[0]}",
        method="PATCH",
        body=json.dumps({"name": "Lamp Renamed"}),
        headers={"Authorization": f"Bearer {admin[1]}", "Content-Type": "application/json"},
    )
    assert patched.code == 200
    for url in (base_url, node_b_url):
        renamed = result(await gql(client, url, query))
        assert renamed["data"]["product"]["name"] == "Lamp Renamed"


@pytest.mark.gen_test(timeout=30)
async def test_cookie_authenticated_mutations_need_the_csrf_header(
    client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    add = {"id": products[0], "n": 1}
    cookie = f"fm_session={shopper[1]}; fm_csrf=abc"
    refused = await gql(client, base_url, ADD, add, Cookie=cookie)
    assert refused.code == 403 and codes(json.loads(refused.body)) == ["CSRF"]
    accepted = await gql(client, base_url, ADD, add, Cookie=cookie, **{"X-CSRF-Token": "abc"})
    assert result(accepted)["data"]["addToCart"]["version"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_adding_more_than_in_stock_answers_the_cart_with_a_warning(
    client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    """As REST does (docs/decisions.md, "Carts over stock"): 12 of a product with 10 in
    stock are added; the line says 10 are available, and `warnings` names it; the same cart
    read back says the same; checkout refuses it with OUT_OF_STOCK."""
    add = """mutation($id: ID!, $n: Int!) { addToCart(productId: $id, quantity: $n) {
        items { productId quantity available }
        warnings { kind productId quantity available detail } } }"""
    added = result(await gql(client, base_url, add, {"id": products[0], "n": 12}, token=shopper[1]))
    cart = added["data"]["addToCart"]
    assert cart["items"] == [{"productId": str(products[0]), "quantity": 12, "available": 10}]
    [warning] = cart["warnings"]
    assert warning["kind"] == "over-stock" and warning["productId"] == str(products[0])
    assert (warning["quantity"], warning["available"]) == (12, 10) and warning["detail"]
    read = "{ cart { warnings { productId available } } }"
    again = result(await gql(client, base_url, read, token=shopper[1]))
    assert again["data"]["cart"]["warnings"] == [{"productId": str(products[0]), "available": 10}]
    checkout = 'mutation { checkout(idempotencyKey: "over-1") { id } }'
    refused = result(await gql(client, base_url, checkout, token=shopper[1]))
    assert codes(refused) == ["OUT_OF_STOCK"]
