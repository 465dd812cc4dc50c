"""The cart over real HTTP: versions, price snapshots, bounds, privacy, and live updates
reaching a CartChannel subscriber on another node. Also home of the commerce test helpers
(a node with the commerce routes, cheap users, the stock invariant)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from argon2 import PasswordHasher
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from tornado.netutil import bind_sockets
from tornado.web import Application

from server.adapters.http1 import make_http_server
from server.domain.users import UserService
from server.wiring.app import make_app
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import CableClient, ExtraNode, add_product, identifier
from tests.helpers.deployment import make_settings

pytestmark = pytest.mark.usefixtures("clean_data")

# Fast enough for hundreds of test users; production hashing is untouched.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


# --- helpers shared with test_checkout ---------------------------------------------------------


def commerce_app(services: Services) -> Application:
    """The node's app (it serves the cart and checkout routes)."""
    return make_app(services)


def commerce_settings(env: dict[str, str]) -> Settings:
    """Test settings with rate limits out of the way (every test client is 127.0.0.1)."""
    return make_settings(
        env,
        ratelimit_ip_per_second=10_000.0,
        ratelimit_ip_burst=10_000,
        ratelimit_user_per_second=10_000.0,
        ratelimit_user_burst=10_000,
        # two nodes x five databases x 5 stay under the embedded server's max_connections (60)
        pool_max_size=5,
    )


async def start_node(settings: Settings, node_id: str = "node-b") -> ExtraNode:
    """A second node (own services, app, HTTP server) on the test's loop."""
    services = await Services.open(settings.model_copy(update={"node_id": node_id}))
    services.start()
    server = make_http_server(commerce_app(services), services.settings)
    sockets = bind_sockets(0, "127.0.0.1")
    await server.listen_on(sockets)
    return ExtraNode(services, server, sockets[0].getsockname()[1])


async def make_user(services: Services, email: str) -> tuple[int, str]:
    """A user (cheaply hashed) and a bearer token for it."""
    user = await UserService(services.router, CHEAP_HASHER).create_user(email, "correct horse")
    return user.id, await services.sessions.create(user.id)


async def call(
    client: Any,
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    **headers: str,
) -> HTTPResponse:
    """One request; error statuses are returned, not raised."""
    payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
    if payload is not None:
        headers.setdefault("Content-Type", "application/json")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if method == "POST" and payload is None:
        payload = b""
    try:
        return await client.fetch(
            url,
            method=method,
            body=payload,
            headers=headers,
            allow_nonstandard_methods=True,
            request_timeout=60,
            connect_timeout=60,
        )
    except HTTPClientError as exc:
        assert exc.response is not None
        return exc.response


def ok(response: HTTPResponse, status: int = 200) -> Any:
    assert response.code == status, response.body
    return json.loads(response.body)


def problem(response: HTTPResponse, status: int, kind: str) -> dict[str, Any]:
    assert response.code == status, response.body
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(response.body)
    assert body["type"] == f"/problems/{kind}", body
    assert body["status"] == status and body["detail"]
    return body


def set_price(catalog_dsn: str, product_id: int, price_cents: int) -> None:
    with psycopg2.connect(catalog_dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE products SET price_cents = %s WHERE id = %s", (price_cents, product_id))
    conn.close()


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return commerce_settings(infra_env)


@pytest.fixture
def app(services: Services) -> Application:
    return commerce_app(services)


@pytest.fixture
def client(io_loop: Any, http_server: Any) -> Iterator[Any]:
    """An HTTP client allowed many requests at once (races need real concurrency); asking
    for `http_server` makes pytest-tornado serve the app at `base_url`."""
    http = AsyncHTTPClient(force_instance=True, max_clients=300)
    yield http
    http.close()


@pytest.fixture
def product_id(infra_env: dict[str, str]) -> int:
    return add_product(infra_env["FM_CATALOG_DSN"], stock=10)  # price 1999


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_add_update_remove_bump_the_version_and_keep_totals(
    client: Any, base_url: str, services: Services, product_id: int, infra_env: dict[str, str]
) -> None:
    _, token = await make_user(services, "ada@example.com")
    other = add_product(infra_env["FM_CATALOG_DSN"], stock=5)
    empty = ok(await call(client, base_url + "/api/v1/cart", token=token))
    assert empty == {"items": [], "total_cents": 0, "version": 0}

    items = base_url + "/api/v1/cart/items"
    added = ok(await call(client, items, "POST", {"product_id": product_id, "quantity": 2}, token))
    assert added == {
        "items": [{"product_id": str(product_id), "quantity": 2, "unit_price_cents": 1999}],
        "total_cents": 3998,
        "version": 1,
    }
    # ids as strings of digits work too; adding again adds to the line
    again = ok(await call(client, items, "POST", {"product_id": str(product_id)}, token))
    assert again["items"][0]["quantity"] == 3 and again["version"] == 2
    both = ok(await call(client, items, "POST", {"product_id": other, "quantity": 1}, token))
    assert [i["product_id"] for i in both["items"]] == [str(product_id), str(other)]
    assert both["total_cents"] == 4 * 1999 and both["version"] == 3

    patched = ok(await call(client, f"{items}/{product_id}", "PATCH", {"quantity": 7}, token))
    assert patched["items"][0]["quantity"] == 7 and patched["version"] == 4
    removed = ok(await call(client, f"{items}/{product_id}", "DELETE", token=token))
    assert removed["items"] == [{"product_id": str(other), "quantity": 1, "unit_price_cents": 1999}]
    assert removed["version"] == 5 and removed["total_cents"] == 1999
    assert ok(await call(client, base_url + "/api/v1/cart", token=token)) == removed


@pytest.mark.gen_test(timeout=30)
async def test_price_snapshot_survives_a_price_change_until_the_line_is_updated(
    client: Any, base_url: str, services: Services, product_id: int, infra_env: dict[str, str]
) -> None:
    _, token = await make_user(services, "ada@example.com")
    items = base_url + "/api/v1/cart/items"
    ok(await call(client, items, "POST", {"product_id": product_id, "quantity": 1}, token))
    set_price(infra_env["FM_CATALOG_DSN"], product_id, 2500)
    cart = ok(await call(client, base_url + "/api/v1/cart", token=token))
    assert cart["items"][0]["unit_price_cents"] == 1999 and cart["total_cents"] == 1999
    updated = ok(await call(client, f"{items}/{product_id}", "PATCH", {"quantity": 2}, token))
    assert updated["items"][0]["unit_price_cents"] == 2500 and updated["total_cents"] == 5000


@pytest.mark.gen_test(timeout=30)
async def test_quantity_bounds_types_and_unknown_products_are_precise_problems(
    client: Any, base_url: str, services: Services, product_id: int
) -> None:
    _, token = await make_user(services, "ada@example.com")
    items = base_url + "/api/v1/cart/items"
    for quantity in (0, -1, 100, 10**30, "2", 1.5, True, None):
        bad = await call(
            client, items, "POST", {"product_id": product_id, "quantity": quantity}, token
        )
        body = problem(bad, 422, "invalid-body")
        assert [e["field"] for e in body["errors"]] == ["quantity"], (quantity, body)
    for pid in (-1, 0, "12a", 2**63, 1.5, None, [1]):
        bad = await call(client, items, "POST", {"product_id": pid, "quantity": 1}, token)
        body = problem(bad, 422, "invalid-body")
        assert [e["field"] for e in body["errors"]] == ["product_id"], (pid, body)
    unknown = await call(client, items, "POST", {"product_id": 987654, "quantity": 1}, token)
    assert problem(unknown, 404, "not-found")["product_id"] == "987654"
    extra = await call(client, items, "POST", {"product_id": product_id, "colour": "red"}, token)
    assert problem(extra, 422, "invalid-body")["errors"][0]["field"] == "colour"
    problem(await call(client, items, "POST", b'{"product_id": ', token), 400, "malformed-json")
    problem(await call(client, items, "POST", [product_id], token), 422, "invalid-body")

    # a line may never pass 99 units, and the refused change leaves the cart as it was
    ok(await call(client, items, "POST", {"product_id": product_id, "quantity": 98}, token))
    over = await call(client, items, "POST", {"product_id": product_id, "quantity": 2}, token)
    assert problem(over, 422, "invalid-input")["maximum"] == 99
    cart = ok(await call(client, base_url + "/api/v1/cart", token=token))
    assert cart["items"][0]["quantity"] == 98 and cart["version"] == 1

    missing = f"{items}/{product_id + 1}"
    problem(await call(client, missing, "PATCH", {"quantity": 1}, token), 404, "not-found")
    problem(await call(client, missing, "DELETE", token=token), 404, "not-found")
    huge = f"{items}/{'9' * 30}"
    problem(await call(client, huge, "DELETE", token=token), 404, "not-found")
    bad_patch = await call(client, f"{items}/{product_id}", "PATCH", {"quantity": 0}, token)
    problem(bad_patch, 422, "invalid-body")
    problem(await call(client, items + "/abc", "DELETE", token=token), 404, "not-found")


@pytest.mark.gen_test(timeout=30)
async def test_missing_or_forged_auth_is_401(
    client: Any, base_url: str, services: Services, product_id: int
) -> None:
    items = base_url + "/api/v1/cart/items"
    problem(await call(client, base_url + "/api/v1/cart"), 401, "unauthorized")
    body = {"product_id": product_id, "quantity": 1}
    problem(await call(client, items, "POST", body), 401, "unauthorized")
    problem(await call(client, items, "POST", body, token="forged"), 401, "unauthorized")
    problem(await call(client, f"{items}/{product_id}", "DELETE"), 401, "unauthorized")


@pytest.mark.gen_test(timeout=30)
async def test_carts_are_private(
    client: Any, base_url: str, services: Services, product_id: int
) -> None:
    _, ada = await make_user(services, "ada@example.com")
    _, bob = await make_user(services, "bob@example.com")
    items = base_url + "/api/v1/cart/items"
    ok(await call(client, items, "POST", {"product_id": product_id, "quantity": 3}, ada))
    assert ok(await call(client, base_url + "/api/v1/cart", token=bob))["items"] == []
    # bob cannot change ada's line: for him it does not exist
    problem(await call(client, f"{items}/{product_id}", "DELETE", token=bob), 404, "not-found")
    assert ok(await call(client, base_url + "/api/v1/cart", token=ada))["items"][0]["quantity"] == 3


@pytest.mark.gen_test(timeout=60)
async def test_a_change_on_node_a_reaches_a_cart_subscriber_on_node_b(
    client: Any, base_url: str, services: Services, settings: Settings, product_id: int
) -> None:
    _, token = await make_user(services, "ada@example.com")
    node_b = await start_node(settings)
    try:
        cable = await CableClient.connect(node_b.url(f"/cable?token={token}"))
        cart_id = identifier("CartChannel")
        await cable.subscribe(cart_id)
        first = await cable.next_message(cart_id)
        assert first["event"] == "cart" and first["cart"]["version"] == 0
        body = {"product_id": product_id, "quantity": 2}
        answered = ok(await call(client, base_url + "/api/v1/cart/items", "POST", body, token))
        pushed = await cable.next_message(cart_id)
        assert pushed["event"] == "cart" and pushed["cart"] == answered
        cable.close()
    finally:
        await node_b.stop()
