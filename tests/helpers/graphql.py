"""Helpers of the GraphQL tests: node settings, requests over real HTTP, users, products with
images."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import psycopg2
from argon2 import PasswordHasher
from tornado.httpclient import HTTPResponse

from server.domain.users import UserService
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings

# Fast enough for many test users; production hashing is untouched.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


async def make_user(services: Services, email: str, *, admin: bool = False) -> tuple[int, str]:
    """A user (cheaply hashed) and a bearer token for it."""
    user = await UserService(services.router, CHEAP_HASHER).create_user(
        email, "correct horse", is_admin=admin
    )
    return user.id, await services.sessions.create(user.id, admin)


def insert_products(dsn: str, count: int, *, stock: int = 10, images: int = 0) -> list[int]:
    """`count` products written straight to the catalog, each with `images` images; ids."""
    ids = []
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for n in range(count):
            cur.execute(
                "WITH p AS (INSERT INTO products (name, description, price_cents) "
                "VALUES (%s, 'A test product', %s) RETURNING id) "
                "INSERT INTO inventory (product_id, stock) SELECT id, %s FROM p "
                "RETURNING product_id",
                (f"Lamp {n}", 1000 + n, stock),
            )
            (product_id,) = cur.fetchone()
            for position in range(images):
                variants = {
                    size: {
                        fmt: f"/images/{product_id}/{position}/{size}.{fmt}"
                        for fmt in ("jpeg", "webp", "avif")
                    }
                    for size in ("thumbnail", "small", "medium", "large")
                }
                cur.execute(
                    "INSERT INTO product_images (product_id, content_hash, placeholder, variants, "
                    "position) VALUES (%s, %s, 'data:,', %s, %s)",
                    (product_id, f"h{product_id}-{position}", json.dumps(variants), position),
                )
            ids.append(int(product_id))
    conn.close()
    return ids


async def gql(
    client: Any,
    base_url: str,
    query: str | None = None,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    method: str = "POST",
    operation_name: str | None = None,
    extensions: dict[str, Any] | None = None,
    body: bytes | None = None,
    **headers: str,
) -> HTTPResponse:
    """One GraphQL request over HTTP; error statuses are returned, not raised."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = base_url + "/graphql"
    params: dict[str, Any] = {}
    if query is not None:
        params["query"] = query
    if variables is not None:
        params["variables"] = variables
    if operation_name is not None:
        params["operationName"] = operation_name
    if extensions is not None:
        params["extensions"] = extensions
    payload: bytes | None = None
    if method == "GET":
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        url += "?" + urlencode(encoded)
    else:
        headers.setdefault("Content-Type", "application/json")
        payload = body if body is not None else json.dumps(params).encode()
    return await client.fetch(
        url,
        method=method,
        body=payload,
        headers=headers,
        request_timeout=60,
        connect_timeout=60,
        raise_error=False,
    )


def result(response: HTTPResponse, status: int = 200) -> dict[str, Any]:
    """The JSON body of a response with `status`."""
    assert response.code == status, (response.code, response.body)
    body: dict[str, Any] = json.loads(response.body)
    return body


def codes(body: dict[str, Any]) -> list[str]:
    """The `extensions.code` of every error of a response."""
    return [error["extensions"]["code"] for error in body.get("errors", [])]


def graphql_settings(env: dict[str, str], **overrides: Any) -> Settings:
    """Test settings: REST limits out of the way, small pools (two nodes x five databases
    stay under the embedded server's connection limit)."""
    values: dict[str, Any] = {
        "ratelimit_ip_per_second": 10_000.0,
        "ratelimit_ip_burst": 10_000,
        "ratelimit_user_per_second": 10_000.0,
        "ratelimit_user_burst": 10_000,
        "pool_max_size": 5,
        "graphql_throttle_maximum": 100_000,
        "graphql_throttle_restore_per_second": 100_000.0,
    }
    values.update(overrides)
    return make_settings(env, **values)
