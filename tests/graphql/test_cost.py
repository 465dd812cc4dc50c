"""Cost and depth limits (computed before execution, with the variables applied), the cost
bucket shared by all nodes (429 THROTTLED with Retry-After, then recovery), and the cost that
every response reports."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.graphql import codes, gql, graphql_settings, insert_products, result

pytestmark = pytest.mark.usefixtures("clean_data")


def _reads(services: Services) -> int:
    return services.router.totals().read_statements


@pytest.mark.gen_test(timeout=30)
async def test_six_aliased_products_250_are_refused_with_their_cost_before_any_resolver_runs(
    client: Any, base_url: str, services: Services, products: list[int]
) -> None:
    aliases = " ".join(
        f"p{n}: products(first: 250) {{ edges {{ node {{ id name }} }} }}" for n in range(6)
    )
    query = "{ " + aliases + " }"
    executed, reads = services.graphql.executed, _reads(services)
    loads = (services.catalog.counters.list_loads, services.catalog.counters.product_loads)
    body = result(await gql(client, base_url, query))
    assert codes(body) == ["MAX_COST_EXCEEDED"]
    assert "data" not in body
    error = body["errors"][0]
    assert error["extensions"]["cost"] == 6 * (1 + 250) and error["extensions"]["maxCost"] == 1000
    cost = body["extensions"]["cost"]
    assert cost["requestedQueryCost"] == 1506 and cost["actualQueryCost"] is None
    assert cost["throttleStatus"]["maximumAvailable"] == 100_000
    # nothing ran: no execution, no statement, no catalog load
    assert services.graphql.executed == executed and _reads(services) == reads
    assert (services.catalog.counters.list_loads, services.catalog.counters.product_loads) == loads
    metrics = (await client.fetch(base_url + "/metrics")).body.decode()
    assert 'fm_graphql_refused_operations_total{code="MAX_COST_EXCEEDED"} 1.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_variables_are_applied_before_the_cost_is_computed(
    client: Any, base_url: str, products: list[int]
) -> None:
    query = "query($n: Int) { products(first: $n) { edges { node { id } } } }"
    cheap = result(await gql(client, base_url, query, {"n": 3}))
    assert cheap["extensions"]["cost"]["requestedQueryCost"] == 1 + 3
    assert cheap["extensions"]["cost"]["actualQueryCost"] == 1 + 3
    dear = result(await gql(client, base_url, query, {"n": 5000}))
    assert codes(dear) == ["MAX_COST_EXCEEDED"] and dear["errors"][0]["extensions"]["cost"] == 5001


@pytest.mark.gen_test(timeout=30)
async def test_query_twenty_levels_deep_is_refused(
    client: Any, base_url: str, services: Services
) -> None:
    nested = "name"
    for _ in range(9):
        nested = f"fields {{ type {{ {nested} }} }}"
    query = "{ __schema { types { " + nested + " } } }"  # 2 + 9 * 2 = 20 levels
    executed = services.graphql.executed
    body = result(await gql(client, base_url, query))
    assert codes(body) == ["MAX_DEPTH_EXCEEDED"]
    assert body["errors"][0]["extensions"]["depth"] == 21  # `name` sits under 20 object levels
    assert body["errors"][0]["extensions"]["maxDepth"] == 15
    assert services.graphql.executed == executed


@pytest.mark.gen_test(timeout=30)
async def test_actual_cost_counts_what_came_back_and_the_difference_is_refunded(
    client: Any, base_url: str, products: list[int]
) -> None:
    query = "{ products(first: 100) { edges { node { id } } } }"  # only 8 products exist
    body = result(await gql(client, base_url, query))
    cost = body["extensions"]["cost"]
    assert cost["requestedQueryCost"] == 101 and cost["actualQueryCost"] == 1 + len(products)
    assert cost["throttleStatus"]["currentlyAvailable"] >= 100_000 - 101 + (101 - 9)


class TestThrottle:
    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        # A bucket of 60 units refilling 30 per second; the query below costs 21.
        return graphql_settings(
            infra_env, graphql_throttle_maximum=60, graphql_throttle_restore_per_second=30.0
        )

    @pytest.fixture
    def products(self, clean_data: None, infra_env: dict[str, str]) -> list[int]:
        # Enough that a page of 20 is full: its actual cost equals its requested cost.
        return insert_products(infra_env["FM_CATALOG_DSN"], 25)

    @pytest.mark.gen_test(timeout=30)
    async def test_throttled_client_gets_429_with_retry_after_and_recovers_after_it(
        self, client: Any, base_url: str, products: list[int]
    ) -> None:
        query = "{ products(first: 20) { edges { node { name } } } }"
        statuses = []
        for _ in range(4):
            response = await gql(client, base_url, query)
            statuses.append(response.code)
            if response.code == 429:
                break
        assert statuses[-1] == 429 and statuses[:-1] == [200] * (len(statuses) - 1)
        throttled = result(response, 429)
        assert codes(throttled) == ["THROTTLED"]
        status = throttled["extensions"]["cost"]["throttleStatus"]
        assert status == {
            "maximumAvailable": 60,
            "currentlyAvailable": status["currentlyAvailable"],
            "restoreRate": 30.0,
        }
        assert status["currentlyAvailable"] < 21
        retry_after = int(response.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        await asyncio.sleep(retry_after)
        assert result(await gql(client, base_url, query))["data"]["products"]["edges"]

    @pytest.mark.gen_test(timeout=30)
    async def test_buckets_are_per_caller(
        self, client: Any, base_url: str, products: list[int], shopper: tuple[int, str]
    ) -> None:
        query = "{ products(first: 20) { edges { node { name } } } }"
        while (await gql(client, base_url, query)).code != 429:
            pass
        signed_in = await gql(client, base_url, query, token=shopper[1])
        assert signed_in.code == 200
