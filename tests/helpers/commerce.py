"""The commerce test helpers shared by the cart, checkout, failover and cluster tests: a node
with the commerce routes and rate limits out of the way, a second node, cheap users, requests
with a bearer token, precise problem checks, and the stock accounting.

The fixtures `settings`, `app` and `client` are taken into a test module by assignment
(`settings = commerce.settings`), so they apply to that module only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from argon2 import PasswordHasher
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.netutil import bind_sockets
from tornado.web import Application

from server.adapters.http1 import make_http_server
from server.domain.users import UserService
from server.wiring.app import make_app
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode
from tests.helpers.deployment import make_settings

# Fast enough for hundreds of test users; production hashing is untouched.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


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
    return await client.fetch(
        url,
        method=method,
        body=payload,
        headers=headers,
        allow_nonstandard_methods=True,
        request_timeout=60,
        connect_timeout=60,
        raise_error=False,
    )


def ok(response: HTTPResponse, status: int = 200) -> Any:
    """The JSON body of a response with `status`."""
    assert response.code == status, response.body
    return json.loads(response.body)


def problem(response: HTTPResponse, status: int, kind: str) -> dict[str, Any]:
    """The body of a problem of `status` and type `/problems/{kind}`, with a detail."""
    assert response.code == status, response.body
    assert response.headers["Content-Type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(response.body)
    assert body["type"] == f"/problems/{kind}", body
    assert body["status"] == status and body["detail"]
    return body


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    """`commerce_settings` of the test deployment."""
    return commerce_settings(infra_env)


@pytest.fixture
def app(services: Services) -> Application:
    """`commerce_app` of the test's node."""
    return commerce_app(services)


@pytest.fixture
def client(io_loop: Any, http_server: Any) -> Iterator[Any]:
    """An HTTP client allowed many requests at once (races need real concurrency); asking
    for `http_server` makes pytest-tornado serve the app at `base_url`."""
    http = AsyncHTTPClient(force_instance=True, max_clients=300)
    yield http
    http.close()


def accounting(env: dict[str, str], product_id: int) -> tuple[int, int, int]:
    """(stock left, quantity in held reservations, quantity ordered on every shard)."""
    with psycopg2.connect(env["FM_CATALOG_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT stock FROM inventory WHERE product_id = %s", (product_id,))
        (stock,) = cur.fetchone()
        cur.execute(
            "SELECT COALESCE(sum(quantity), 0) FROM stock_reservations "
            "WHERE product_id = %s AND state = 'held'",
            (product_id,),
        )
        (held,) = cur.fetchone()
    conn.close()
    ordered = 0
    for shard in json.loads(env["FM_SHARDS"]):
        with psycopg2.connect(shard["primary"]) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT COALESCE(sum(quantity), 0) FROM order_items WHERE product_id = %s",
                (product_id,),
            )
            ordered += int(cur.fetchone()[0])
        conn.close()
    return int(stock), int(held), ordered


async def buyer_with_cart(
    services: Services, email: str, product_id: int, quantity: int = 1
) -> tuple[int, str]:
    """A user whose cart holds `quantity` units of `product_id` (written directly)."""
    user_id, token = await make_user(services, email)
    async with services.router.write(user_id) as cur:
        await cur.execute(
            "INSERT INTO cart_items (user_id, product_id, quantity, unit_price_cents) "
            "VALUES (%s, %s, %s, 1999)",
            (user_id, product_id, quantity),
        )
    return user_id, token
