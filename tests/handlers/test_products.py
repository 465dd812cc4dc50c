"""Products over real HTTP against real PostgreSQL and Redis: CRUD, pagination, search, ETags,
admin checks, precise problems, stock broadcasts on the cable, cache invalidation across two
nodes, and a stampede on a just-expired hot product."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from server.adapters.cache import NS_PRODUCT
from server.domain.catalog import CatalogService, encode_cursor
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import CableClient, ExtraNode, identifier
from tests.helpers.catalog import insert_products
from tests.helpers.deployment import make_settings
from tests.helpers.http import body, call, problem

pytestmark = pytest.mark.usefixtures("clean_data")


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    # Generous limits: these tests make many requests from one address.
    return make_settings(infra_env, ratelimit_ip_burst=10_000, ratelimit_user_burst=10_000)


@pytest.fixture
def catalog(services: Services) -> CatalogService:
    """The node's catalog (one per node: its stock cache is the node's)."""
    return services.catalog


@pytest.fixture
def node_b(io_loop: Any, settings: Settings) -> Iterator[ExtraNode]:
    """A second node sharing Redis and the databases with the test's node (node A)."""
    node: ExtraNode = io_loop.run_sync(lambda: ExtraNode.start(settings))
    yield node
    io_loop.run_sync(node.stop)


def node_b_catalog(node: ExtraNode) -> CatalogService:
    return node.services.catalog


@pytest.fixture
def lamp(infra_env: dict[str, str]) -> int:
    return insert_products(infra_env["FM_CATALOG_DSN"], [("Desk Lamp", "brass", 10)])[0]


PRODUCT_KEYS = {
    "id",
    "name",
    "description",
    "price_cents",
    "currency",
    "stock",
    "images",
    "updated_at",
}


# --- CRUD -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_create_read_update_and_stock(
    http_client: Any, base_url: str, admin: dict[str, str]
) -> None:
    url = base_url + "/api/v1/products"
    created = await call(
        http_client,
        url,
        "POST",
        {"name": "Oak Table", "description": "solid", "price_cents": 25000, "stock": 4},
        **admin,
    )
    assert created.code == 201, created.body
    product = body(created)
    assert set(product) == PRODUCT_KEYS
    assert product["id"].isdigit() and product["currency"] == "USD" and product["stock"] == 4
    assert product["images"] == [] and product["updated_at"].endswith("Z")
    assert created.headers["Location"] == f"/api/v1/products/{product['id']}"

    one = await call(http_client, f"{url}/{product['id']}")
    assert one.code == 200 and body(one) == product

    patched = await call(
        http_client,
        f"{url}/{product['id']}",
        "PATCH",
        {"name": "Walnut Table", "price_cents": 27500, "currency": "EUR"},
        **admin,
    )
    assert patched.code == 200, patched.body
    changed = body(patched)
    assert (changed["name"], changed["price_cents"], changed["currency"]) == (
        "Walnut Table",
        27500,
        "EUR",
    )
    assert changed["description"] == "solid" and changed["stock"] == 4
    again = await call(http_client, f"{url}/{product['id']}")
    assert body(again) == changed  # the write invalidated the cached entry

    stock = await call(http_client, f"{url}/{product['id']}/stock", "POST", {"delta": -3}, **admin)
    assert stock.code == 200 and body(stock) == {"product_id": product["id"], "stock": 1}
    reset = await call(http_client, f"{url}/{product['id']}/stock", "POST", {"set": 9}, **admin)
    assert body(reset) == {"product_id": product["id"], "stock": 9}
    after = await call(http_client, f"{url}/{product['id']}")
    assert body(after)["stock"] == 9  # this node serves its own change at once
    listed = body(await call(http_client, url))
    assert [item["stock"] for item in listed["items"]] == [9]


# --- lists and search -------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_list_page_rendered_before_shows_every_later_change(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str]
) -> None:
    # Invariant: pages are kept rendered per node, but never past a stock or product change.
    url = base_url + "/api/v1/products"
    first = await call(http_client, url)
    assert [item["stock"] for item in body(first)["items"]] == [10]
    assert (await call(http_client, url)).headers["ETag"] == first.headers["ETag"]

    await call(http_client, f"{url}/{lamp}/stock", "POST", {"delta": -4}, **admin)
    after_stock = await call(http_client, url)
    assert [item["stock"] for item in body(after_stock)["items"]] == [6]
    assert after_stock.headers["ETag"] != first.headers["ETag"]

    await call(http_client, f"{url}/{lamp}", "PATCH", {"name": "Reading Lamp"}, **admin)
    assert [item["name"] for item in body(await call(http_client, url))["items"]] == [
        "Reading Lamp"
    ]


@pytest.mark.gen_test(timeout=30)
async def test_pagination_walks_every_product_exactly_once(
    http_client: Any, base_url: str, infra_env: dict[str, str]
) -> None:
    ids = insert_products(infra_env["FM_CATALOG_DSN"], [(f"Item {n}", "", n) for n in range(1, 26)])
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        page = body(await call(http_client, f"{base_url}/api/v1/products?first=7{after}"))
        pages += 1
        assert len(page["items"]) <= 7
        seen += [item["id"] for item in page["items"]]
        assert all(item["stock"] == int(item["name"].split()[1]) for item in page["items"])
        if page["next_cursor"] is None:
            break
        after = f"&after={page['next_cursor']}"
    assert pages == 4
    assert seen == [str(i) for i in ids]  # all, once each, in id order

    default = body(await call(http_client, f"{base_url}/api/v1/products"))
    assert len(default["items"]) == 20 and default["next_cursor"] == encode_cursor(ids[19])


@pytest.mark.gen_test(timeout=30)
async def test_q_finds_products_by_word(
    http_client: Any, base_url: str, infra_env: dict[str, str]
) -> None:
    insert_products(
        infra_env["FM_CATALOG_DSN"],
        [("Red Lamp", "bright", 1), ("Blue Chair", "walnut legs", 1), ("Green Rug", "wool", 1)],
    )

    async def names(q: str) -> list[str]:
        url = f"{base_url}/api/v1/products?q={q}"
        return [item["name"] for item in body(await call(http_client, url))["items"]]

    assert await names("lamp") == ["Red Lamp"]
    assert await names("lamps") == ["Red Lamp"]  # English stemming
    assert await names("walnut") == ["Blue Chair"]  # the description counts too
    assert await names("lamp%20or%20chair") == ["Red Lamp", "Blue Chair"]
    assert await names("sofa") == []


# --- HTTP caching -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_etag_and_304_and_cache_control(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str]
) -> None:
    url = f"{base_url}/api/v1/products/{lamp}"
    first = await call(http_client, url)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert first.headers["Cache-Control"].startswith("public, max-age=")
    assert "stale-while-revalidate=" in first.headers["Cache-Control"]

    same = await call(http_client, url, **{"If-None-Match": etag})
    assert same.code == 304 and same.body == b"" and same.headers["ETag"] == etag
    listed = await call(http_client, url, **{"If-None-Match": f'"other", W/{etag}'})
    assert listed.code == 304
    stale = await call(http_client, url, **{"If-None-Match": '"other"'})
    assert stale.code == 200 and body(stale) == body(first)

    signed_in = await call(http_client, url, **admin)
    assert signed_in.headers["Cache-Control"] == "private, no-cache"

    await call(http_client, url + "/stock", "POST", {"delta": 1}, **admin)
    changed = await call(http_client, url, **{"If-None-Match": etag})
    assert changed.code == 200 and changed.headers["ETag"] != etag
    assert body(changed)["stock"] == 11

    page = await call(http_client, f"{base_url}/api/v1/products")
    again = await call(
        http_client, f"{base_url}/api/v1/products", **{"If-None-Match": page.headers["ETag"]}
    )
    assert again.code == 304


# --- who may write ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_writes_need_an_admin(
    http_client: Any, base_url: str, lamp: int, shopper: dict[str, str]
) -> None:
    writes = [
        ("/api/v1/products", "POST", {"name": "X", "price_cents": 1}),
        (f"/api/v1/products/{lamp}", "PATCH", {"name": "X"}),
        (f"/api/v1/products/{lamp}/stock", "POST", {"delta": 1}),
    ]
    for path, method, payload in writes:
        anonymous = await call(http_client, base_url + path, method, payload)
        assert anonymous.code == 401 and problem(anonymous)["type"] == "/problems/unauthorized"
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        forbidden = await call(http_client, base_url + path, method, payload, **shopper)
        assert forbidden.code == 403 and problem(forbidden)["type"] == "/problems/forbidden"
    stock_url = f"{base_url}/api/v1/products/{lamp}/stock"
    forged = await call(http_client, stock_url, "POST", {"delta": 1}, Authorization="Bearer x")
    assert forged.code == 401
    unchanged = await call(http_client, f"{base_url}/api/v1/products/{lamp}")
    assert body(unchanged)["name"] == "Desk Lamp" and body(unchanged)["stock"] == 10


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_bad_inputs_get_precise_problems(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str]
) -> None:
    products = base_url + "/api/v1/products"

    async def invalid(path: str, method: str, payload: Any) -> dict[str, Any]:
        response = await call(http_client, base_url + path, method, payload, **admin)
        assert response.code == 422, (path, payload, response.body)
        return problem(response)

    def fields(found: dict[str, Any]) -> list[str]:
        return [error["field"] for error in found["errors"]]

    create = "/api/v1/products"
    assert fields(await invalid(create, "POST", {"name": "A", "price_cents": "5"})) == [
        "price_cents"
    ]
    assert fields(await invalid(create, "POST", {"name": "A", "price_cents": -1})) == [
        "price_cents"
    ]
    assert fields(await invalid(create, "POST", {"name": "A", "price_cents": 10**9 + 1})) == [
        "price_cents"
    ]
    assert fields(await invalid(create, "POST", {"name": "", "price_cents": 1})) == ["name"]
    assert fields(await invalid(create, "POST", {"name": "A" * 201, "price_cents": 1})) == ["name"]
    assert fields(
        await invalid(create, "POST", {"name": "A", "price_cents": 1, "description": "d" * 10_001})
    ) == ["description"]
    assert fields(
        await invalid(create, "POST", {"name": "A", "price_cents": 1, "currency": "usd"})
    ) == ["currency"]
    assert fields(
        await invalid(create, "POST", {"name": "A", "price_cents": 1, "stock": 10**6 + 1})
    ) == ["stock"]
    assert fields(await invalid(create, "POST", {"name": "A", "price_cents": True})) == [
        "price_cents"
    ]
    assert fields(await invalid(create, "POST", {"price_cents": 1})) == ["name"]

    patch = f"/api/v1/products/{lamp}"
    refused = await invalid(patch, "PATCH", {"stock": 3})
    assert fields(refused) == ["stock"] and "/stock" in refused["detail"]
    assert fields(await invalid(patch, "PATCH", {"name": None})) == ["name"]
    assert fields(await invalid(patch, "PATCH", {"color": "red"})) == ["color"]
    assert (await invalid(patch, "PATCH", {}))["type"] == "/problems/invalid-input"

    stock = f"/api/v1/products/{lamp}/stock"
    assert fields(await invalid(stock, "POST", {"delta": 10**6 + 1})) == ["delta"]
    assert fields(await invalid(stock, "POST", {"delta": 0})) == ["delta"]
    assert fields(await invalid(stock, "POST", {"delta": 1.5})) == ["delta"]
    assert fields(await invalid(stock, "POST", {"set": -1})) == ["set"]
    assert fields(await invalid(stock, "POST", {"delta": 1, "set": 1})) == ["(body)"]
    assert fields(await invalid(stock, "POST", {})) == ["(body)"]

    out = await call(http_client, base_url + stock, "POST", {"delta": -11}, **admin)
    assert out.code == 409
    assert {k: problem(out)[k] for k in ("type", "product_id", "available", "delta")} == {
        "type": "/problems/out-of-stock",
        "product_id": str(lamp),
        "available": 10,
        "delta": -11,
    }
    # Said as the admin's stock change, not as a buyer's request for units.
    assert problem(out)["detail"] == (
        f"product {lamp} has 10 in stock; a change of -11 would take it below zero"
    )
    assert "requested" not in problem(out)
    await call(http_client, base_url + stock, "POST", {"set": 10**6}, **admin)
    full = await call(http_client, base_url + stock, "POST", {"delta": 1}, **admin)
    assert full.code == 409 and problem(full)["type"] == "/problems/stock-limit"

    malformed = await call(http_client, products, "POST", b'{"name": ', **admin)
    assert malformed.code == 400 and problem(malformed)["type"] == "/problems/malformed-json"
    for path in ("/api/v1/products/999999", "/api/v1/products/abc", "/api/v1/products/0"):
        missing = await call(http_client, base_url + path)
        assert missing.code == 404 and problem(missing)["type"] == "/problems/not-found"
    for method, suffix, payload in (("PATCH", "", {"name": "X"}), ("POST", "/stock", {"set": 1})):
        missing = await call(http_client, f"{products}/999999{suffix}", method, payload, **admin)
        assert missing.code == 404, (method, suffix)
        assert problem(missing)["product_id"] == "999999"

    for query, field in (
        ("after=!!!", "after"),
        ("after=YWJj", "after"),  # base64 of "abc": not an id
        ("first=0", "first"),
        ("first=101", "first"),
        ("first=ten", "first"),
        ("q=" + "x" * 201, "q"),
    ):
        bad = await call(http_client, f"{products}?{query}")
        assert bad.code == 422, query
        assert problem(bad)["type"] == "/problems/invalid-input" and problem(bad)["field"] == field


# --- realtime and caches ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_stock_change_reaches_a_cable_subscriber(
    http_client: Any, base_url: str, lamp: int, admin: dict[str, str]
) -> None:
    client = await CableClient.connect(base_url.replace("http", "ws", 1) + "/cable")
    try:
        ident = identifier("InventoryChannel", product_id=str(lamp))
        await client.subscribe(ident)
        assert (await client.next_message(ident))["stock"] == 10
        response = await call(
            http_client, f"{base_url}/api/v1/products/{lamp}/stock", "POST", {"delta": -4}, **admin
        )
        assert body(response) == {"product_id": str(lamp), "stock": 6}
        change = await client.next_message(ident)
        assert {k: change[k] for k in ("event", "product_id", "stock")} == {
            "event": "stock",
            "product_id": str(lamp),
            "stock": 6,
        }
    finally:
        client.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_write_on_one_node_shows_on_the_other(
    http_client: Any,
    base_url: str,
    lamp: int,
    admin: dict[str, str],
    node_b: ExtraNode,
    catalog: CatalogService,
) -> None:
    b_catalog = node_b_catalog(node_b)
    url_a = f"{base_url}/api/v1/products/{lamp}"
    url_b = f"http://127.0.0.1:{node_b.port}/api/v1/products/{lamp}"
    before = body(await call(http_client, url_b))
    assert before["name"] == "Desk Lamp"
    assert body(await call(http_client, url_b))["name"] == "Desk Lamp"  # now cached on B

    patched = await call(http_client, url_a, "PATCH", {"name": "Floor Lamp"}, **admin)
    assert patched.code == 200
    stocked = await call(http_client, url_a + "/stock", "POST", {"delta": 5}, **admin)
    assert body(stocked)["stock"] == 15

    # The bump message usually arrives at once; the local layer's bound caps it regardless.
    bound_s = max(node_b.services.settings.cache_local_max_staleness_s, b_catalog.stock.fresh_s)
    deadline = time.monotonic() + bound_s + 0.5
    seen = before
    while time.monotonic() < deadline:
        seen = body(await call(http_client, url_b))
        if seen["name"] == "Floor Lamp" and seen["stock"] == 15:
            break
        await asyncio.sleep(0.05)
    assert (seen["name"], seen["stock"]) == ("Floor Lamp", 15)
    assert b_catalog is not catalog


@pytest.mark.gen_test(timeout=60)
async def test_stampede_on_a_just_expired_hot_product_reads_the_database_at_most_twice(
    services: Services,
    node_b: ExtraNode,
    lamp: int,
) -> None:
    """1,000 concurrent reads over two nodes right after the entry expired everywhere.

    Database reads are counted by the routers of both nodes: every read block passes through
    one of them (writes are not reads). The entry and the stock live 2 s: the 1,000 reads
    must all fall within one lifetime (with 0.3 s, a loaded CI machine took longer, and the
    entry expired again during them: a third read, rightly).
    """
    ttl_s = 2.0
    nodes = [
        CatalogService(s.router, s.cache, s.cable.publish, product_ttl_s=ttl_s, stock_fresh_s=ttl_s)
        for s in (services, node_b.services)
    ]
    warm = [await node.product_page(lamp) for node in nodes]
    assert warm[0] == warm[1]
    await asyncio.sleep(ttl_s + 0.2)  # Redis value, local copies and stock counts all expired

    def loads() -> int:
        return sum(n.counters.product_loads + n.counters.stock_loads for n in nodes)

    def database_reads() -> int:
        # Every read block of either node passes through its router, which counts it.
        totals = [s.router.totals() for s in (services, node_b.services)]
        return sum(t.replica_reads + t.primary_reads for t in totals)

    def gave_up_waiting() -> int:
        # A node waits `lock_wait_s` (1 s) for the other's load before loading itself: on a
        # loaded machine the other's load, sharing this loop with 1,000 reads, can take longer.
        return sum(
            s.cache.stats(NS_PRODUCT).lock_wait_timeouts for s in (services, node_b.services)
        )

    loads_before, reads_before, gave_up_before = loads(), database_reads(), gave_up_waiting()
    pages = await asyncio.gather(*(nodes[n % 2].product_page(lamp) for n in range(1000)))
    reads = database_reads() - reads_before

    assert reads <= 2 + (gave_up_waiting() - gave_up_before), reads
    assert {page.body for page in pages} == {warm[0].body}
    assert loads() - loads_before == reads  # the catalog's own counters agree


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_reads_of_many_products_share_one_stock_statement(
    services: Services, infra_env: dict[str, str]
) -> None:
    """Product pages for 30 different products asked for at once, their entries cached and
    their stock counts expired: the live counts come from one statement, not 30."""
    ids = insert_products(
        infra_env["FM_CATALOG_DSN"], [(f"Lamp {n}", "brass", n) for n in range(30)]
    )
    ttl_s = 0.3
    catalog = CatalogService(
        services.router,
        services.cache,
        services.cable.publish,
        product_ttl_s=60,
        stock_fresh_s=ttl_s,
    )
    await asyncio.gather(*(catalog.product_page(product_id) for product_id in ids))
    await asyncio.sleep(ttl_s + 0.2)
    loads_before = catalog.counters.stock_loads
    pages = await asyncio.gather(*(catalog.product_page(product_id) for product_id in ids))
    assert [json.loads(page.body)["stock"] for page in pages] == list(range(30))
    assert catalog.counters.stock_loads - loads_before == 1
