"""Fixtures shared by the cable tests: a product to watch and a second node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode
from tests.helpers.catalog import add_product


@pytest.fixture
def product_id(clean_data: None, infra_env: dict[str, str]) -> int:
    """A product with 10 units, in freshly emptied databases."""
    return add_product(infra_env["FM_CATALOG_DSN"], stock=10)


@pytest.fixture
def node_b(io_loop: Any, settings: Settings) -> Iterator[ExtraNode]:
    """A second node sharing Redis and the databases with the test's node (node A)."""
    node: ExtraNode = io_loop.run_sync(lambda: ExtraNode.start(settings))
    yield node
    io_loop.run_sync(node.stop)
