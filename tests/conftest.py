"""Test fixtures: real embedded PostgreSQL and Valkey, started once per test session.

With `FM_TEST_PGBOUNCER=1` the session also starts PgBouncer (transaction mode) in front of every
database, after migrating directly, and every DSN the tests get goes through it.

When `FM_CATALOG_DSN`, `FM_SHARDS` and `FM_REDIS_URL` are all set, the suite uses those
servers instead (their data is wiped between tests: never point it at anything you keep).
Each test that touches data asks for `clean_data`, which empties every table and Redis.

Helpers the test modules share live in `tests/helpers/`; the headers of a signed-in `admin`
and `shopper` (product and image tests) are fixtures here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import uvloop
from redis.cluster import RedisCluster

from server.wiring import infra
from server.wiring.infra import pgbouncer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.accounts import token_for
from tests.helpers.deployment import make_settings, migrate, primary_dsns, run_in_private_loop

# The node runs on uvloop (server/wiring/node.py): so do the tests, with its transports and sockets.
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

_EXTERNAL_KEYS = ("FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL")

_CATALOG_TABLES = (
    "products, inventory, stock_reservations, product_images, user_directory, sessions"
)
_SHARD_TABLES = "users, carts, cart_items, orders, order_items, notifications, idempotency_keys"


@pytest.fixture(scope="session")
def infra_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`FM_*` settings of the servers the suite runs against, migrated once."""
    if all(os.environ.get(key) for key in _EXTERNAL_KEYS):
        env = {key: os.environ[key] for key in os.environ if key.startswith("FM_")}
        data_dir = None
    else:
        data_dir = tmp_path_factory.mktemp("infra")
        env = infra.up(data_dir, log=lambda line: None)
    bouncer: pgbouncer.PgBouncer | None = None
    try:
        run_in_private_loop(migrate(env))
        if os.environ.get("FM_TEST_PGBOUNCER") == "1":  # scripts/test's transaction-mode pass
            bouncer, env = front_with_pgbouncer(env, tmp_path_factory.mktemp("pgbouncer"))
        yield env
    finally:
        if bouncer is not None:
            bouncer.stop()
        if data_dir is not None:
            infra.down(data_dir, log=lambda line: None)


def front_with_pgbouncer(
    env: dict[str, str], directory: Path
) -> tuple[pgbouncer.PgBouncer, dict[str, str]]:
    """Start PgBouncer (transaction mode) in front of every database of `env`; return it and
    `env` with DSNs through it. It re-applies the nodes' statement timeout (see the module)."""
    timeout_ms = make_settings(env).statement_timeout_ms
    return pgbouncer.front(env, directory, statement_timeout_ms=timeout_ms, log=lambda line: None)


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    """Settings of one node of the test deployment."""
    return make_settings(infra_env)


@pytest.fixture
def clean_data(infra_env: dict[str, str]) -> None:
    """Empty every table of every database and flush Redis (every master of a cluster)
    before the test."""
    for index, dsn in enumerate(primary_dsns(infra_env)):
        tables = _CATALOG_TABLES if index == 0 else _SHARD_TABLES
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        conn.close()
    if infra_env.get("FM_REDIS_CLUSTER") == "1":
        cluster = RedisCluster.from_url(infra_env["FM_REDIS_URL"])
        cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
        cluster.close()
    else:
        client = redis.Redis.from_url(infra_env["FM_REDIS_URL"])
        client.flushdb()
        client.close()


@pytest.fixture
def services(io_loop: Any, settings: Settings) -> Iterator[Services]:
    """The node's services opened on the test's IOLoop (closed after the test)."""

    async def open_and_start() -> Services:
        opened = await Services.open(settings)
        opened.start()
        return opened

    opened: Services = io_loop.run_sync(open_and_start)
    yield opened
    io_loop.run_sync(opened.close)


@pytest.fixture
def app(services: Services) -> Any:
    """The Tornado application under test (pytest-tornado's `http_server` serves it)."""
    from server.wiring.app import make_app

    return make_app(services)


@pytest.fixture
def admin(io_loop: Any, services: Services) -> dict[str, str]:
    """Headers of a signed-in admin."""
    token = io_loop.run_sync(lambda: token_for(services, "admin@example.com", admin=True))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def shopper(io_loop: Any, services: Services) -> dict[str, str]:
    """Headers of a signed-in user who is not an admin."""
    token = io_loop.run_sync(lambda: token_for(services, "shopper@example.com", admin=False))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def http_server(request: pytest.FixtureRequest, io_loop: Any, _unused_port: Any) -> Iterator[Any]:
    """pytest-tornado's fixture, but serving through the HTTP server the node uses
    (`server.adapters.http1.make_http_server`, chosen by `FM_HTTP_SERVER`), not Tornado's
    default."""
    from server.adapters.http1 import make_http_server

    app = request.getfixturevalue(request.config.option.app_fixture)
    node_settings = request.getfixturevalue("settings")
    server = make_http_server(app, node_settings)
    io_loop.run_sync(lambda: server.listen_on([_unused_port[0]]))
    yield server
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=10)


@pytest.fixture
def project_root() -> Path:
    """The repository checkout the tests run from."""
    return Path(__file__).resolve().parent.parent
