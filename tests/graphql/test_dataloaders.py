"""Batching: the SQL statements a query costs grow with its depth, never with its rows.
Statements are counted where they run (the shard router's read cursors)."""

from __future__ import annotations

from typing import Any

import pytest

from server.domain.carts import CartService
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.graphql import gql, graphql_settings, insert_products, make_user, result

pytestmark = pytest.mark.usefixtures("clean_data")

PAGE = """query($n: Int) { products(first: $n) { edges { node {
    id name priceCents stock updatedAt
    images { id placeholder variants { thumbnail { webp } large { avif } } }
} } pageInfo { hasNextPage endCursor } } }"""
CART = "{ cart { totalCents items { quantity product { name stock images { id } } } } }"


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    # No result cache: every request executes, so every statement it needs is counted.
    return graphql_settings(infra_env, graphql_result_cache_ttl_s=0)


async def _statements(
    services: Services, client: Any, base_url: str, *request: Any, **kw: Any
) -> tuple[int, dict[str, Any]]:
    before = services.router.totals().read_statements
    body = result(await gql(client, base_url, *request, **kw))
    assert "errors" not in body, body
    return services.router.totals().read_statements - before, body


@pytest.mark.gen_test(timeout=30)
async def test_fifty_products_with_images_and_stock_cost_the_statements_of_five(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    insert_products(infra_env["FM_CATALOG_DSN"], 60, images=3)
    # Cold caches: the page's one statement brings products, images and stock together.
    fifty, body = await _statements(services, client, base_url, PAGE, {"n": 50})
    five, _ = await _statements(services, client, base_url, PAGE, {"n": 5})
    edges = body["data"]["products"]["edges"]
    assert len(edges) == 50 and all(len(edge["node"]["images"]) == 3 for edge in edges)
    assert all(edge["node"]["stock"] == 10 for edge in edges)
    assert fifty == five == 1
    # Cached pages, stock forgotten: every row's stock comes from one batched statement.
    services.catalog.stock.forget()
    fifty, _ = await _statements(services, client, base_url, PAGE, {"n": 50})
    services.catalog.stock.forget()
    five, _ = await _statements(services, client, base_url, PAGE, {"n": 5})
    assert fifty == five == 1


@pytest.mark.gen_test(timeout=30)
async def test_cart_lines_load_their_products_in_one_batch_however_many_there_are(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    ids = insert_products(infra_env["FM_CATALOG_DSN"], 11, images=2)
    carts = CartService(services.router)
    one_id, one_token = await make_user(services, "one@example.com")
    many_id, many_token = await make_user(services, "many@example.com")
    await carts.add_item(one_id, ids[0], 1)
    for product_id in ids[1:]:
        await carts.add_item(many_id, product_id, 2)
    one, _ = await _statements(services, client, base_url, CART, token=one_token)
    many, body = await _statements(services, client, base_url, CART, token=many_token)
    items = body["data"]["cart"]["items"]
    assert len(items) == 10 and all(item["product"]["stock"] == 10 for item in items)
    assert many == one <= 3  # the cart, its products (one batch), nothing per line


@pytest.mark.gen_test(timeout=30)
async def test_aliased_products_are_loaded_in_one_batch(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    ids = insert_products(infra_env["FM_CATALOG_DSN"], 12)
    query = "{ " + " ".join(f'p{pid}: product(id: "{pid}") {{ name stock }}' for pid in ids) + " }"
    count, body = await _statements(services, client, base_url, query)
    assert all(body["data"][f"p{pid}"]["stock"] == 10 for pid in ids)
    assert count == 1
    missing = result(await gql(client, base_url, '{ product(id: "999999") { name } }'))
    assert missing["data"] == {"product": None}
