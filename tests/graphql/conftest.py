"""Fixtures of the GraphQL tests: a node with generous REST limits (every test client is
127.0.0.1), users and admins, products, and a second node sharing Redis and the databases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode
from tests.helpers.graphql import graphql_settings, insert_products, make_user


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return graphql_settings(infra_env)


@pytest.fixture
def client(io_loop: Any, http_server: Any) -> Iterator[Any]:
    """An HTTP client allowed many requests at once; asking for `http_server` makes
    pytest-tornado serve the app at `base_url`."""
    http = AsyncHTTPClient(force_instance=True, max_clients=100)
    yield http
    http.close()


@pytest.fixture
def ws_url(http_server: Any, base_url: str) -> str:
    """The WebSocket URL of node A's /graphql (served by pytest-tornado's `http_server`)."""
    return base_url.replace("http://", "ws://") + "/graphql"


@pytest.fixture
def node_b(io_loop: Any, settings: Settings) -> Iterator[ExtraNode]:
    """A second node sharing Redis and the databases with the test's node (node A)."""
    node: ExtraNode = io_loop.run_sync(lambda: ExtraNode.start(settings))
    yield node
    io_loop.run_sync(node.stop)


@pytest.fixture
def products(clean_data: None, infra_env: dict[str, str]) -> list[int]:
    """Eight products (stock 10 each), two images each; their ids."""
    return insert_products(infra_env["FM_CATALOG_DSN"], 8, images=2)


@pytest.fixture
def shopper(io_loop: Any, clean_data: None, services: Services) -> tuple[int, str]:
    """(user id, bearer token) of a signed-in shopper."""
    return io_loop.run_sync(lambda: make_user(services, "shopper@example.com"))  # type: ignore[no-any-return]


@pytest.fixture
def admin(io_loop: Any, clean_data: None, services: Services) -> tuple[int, str]:
    """(user id, bearer token) of a signed-in administrator."""
    return io_loop.run_sync(lambda: make_user(services, "admin@example.com", admin=True))  # type: ignore[no-any-return]
