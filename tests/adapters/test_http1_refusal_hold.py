"""The refusal hold of the HTTP/1.1 layer (`FM_HTTP_REFUSAL_HOLD_S`, issue 16): after a 429 on a
client's own keep-alive connection the node reads nothing more from that connection for the
hold, so a flood over keep-alive connections costs one refusal per connection per hold; other
connections, from the same address or another, are served meanwhile; behind a trusted proxy
nothing is held. Real node (its app, rate limiter on Redis, `Node`'s HTTP server), raw sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.wiring.node import Node
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.catalog import add_product
from tests.helpers.deployment import make_settings
from tests.helpers.raw_http import Response, read_response

pytestmark = pytest.mark.usefixtures("clean_data")

BURST = 2  # requests an address may make before its refusals begin (nothing refills)
HOLD_S = 1.0


@pytest.fixture
def trust_proxy() -> bool:
    return False


@pytest.fixture
def settings(infra_env: dict[str, str], trust_proxy: bool) -> Settings:
    return make_settings(
        infra_env,
        ratelimit_ip_per_second=0.01,
        ratelimit_ip_burst=BURST,
        http_refusal_hold_s=HOLD_S,
        trust_forwarded_headers=trust_proxy,
    )


@pytest.fixture
def product(infra_env: dict[str, str]) -> int:
    return add_product(infra_env["FM_CATALOG_DSN"])


@pytest.fixture
def node(io_loop: Any, services: Services) -> Iterator[Node]:
    """The node's own HTTP server (as `finalmarket serve` builds it) on a free port."""
    node = Node(services)
    io_loop.run_sync(node.listen)
    yield node
    node.server.stop()
    io_loop.run_sync(node.server.close_all_connections, timeout=10)


class Client:
    """One keep-alive connection from `address`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, node: Node, address: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", node.port, local_addr=(address, 0)
        )
        return cls(reader, writer)

    async def get(self, path: str, *headers: str) -> tuple[Response, float]:
        """The answer to one GET, and how long it took."""
        started = time.monotonic()
        lines = [f"GET {path} HTTP/1.1", "Host: test", *headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = await read_response(self.reader)
        return response, time.monotonic() - started

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def holds(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fm_http_refusal_holds_total":
                return float(sample.value)
    raise AssertionError("no fm_http_refusal_holds_total")


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_connection_is_read_again_only_after_the_hold(
    node: Node, product: int
) -> None:
    path = f"/api/v1/products/{product}"
    flooder = await Client.open(node)
    bystander = await Client.open(node, "127.0.0.2")
    same_address = await Client.open(node)
    try:
        for _ in range(BURST):
            assert (await flooder.get(path))[0].status == 200
        refused, took_s = await flooder.get(path)
        assert refused.status == 429 and took_s < 0.5, (refused.status, took_s)
        assert int(refused.headers["retry-after"]) >= 1
        # The flooder's next request waits out the hold; meanwhile another address is
        # served, and the same address on another connection is answered (refused) at once.
        nxt = asyncio.ensure_future(flooder.get(path))
        await asyncio.sleep(0.1)
        other, other_s = await bystander.get(path)
        again, again_s = await same_address.get(path)
        assert (other.status, again.status) == (200, 429)
        assert other_s < 0.5 and again_s < 0.5, (other_s, again_s)
        assert not nxt.done()
        held, held_s = await nxt
        assert held.status == 429 and HOLD_S - 0.05 <= held_s < HOLD_S + 1.0, held_s
        # Served again after the hold (and held again after this refusal).
        metrics, _ = await bystander.get("/metrics")
        assert holds(metrics.body.decode()) == 3  # the flooder twice, the same address once
    finally:
        for client in (flooder, bystander, same_address):
            client.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("trust_proxy", [True])
async def test_behind_a_trusted_proxy_no_connection_is_held(node: Node, product: int) -> None:
    """A proxy's connection carries many clients: a refusal for one must not delay the next
    request on it, which may be another client's (the edge in front limits floods)."""
    path = f"/api/v1/products/{product}"
    proxy = await Client.open(node)
    try:
        for _ in range(BURST):
            assert (await proxy.get(path, "X-Forwarded-For: 203.0.113.7"))[0].status == 200
        refused, _ = await proxy.get(path, "X-Forwarded-For: 203.0.113.7")
        assert refused.status == 429
        other, took_s = await proxy.get(path, "X-Forwarded-For: 198.51.100.9")
        assert other.status == 200 and took_s < 0.5, (other.status, took_s)
        assert node.server.holds == 0  # type: ignore[attr-defined]
    finally:
        proxy.close()
