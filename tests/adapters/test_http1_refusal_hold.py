"""The refusal hold of the HTTP/1.1 layer (`FM_HTTP_REFUSAL_HOLD_S`, issue 16): after a 429 on a
client's own keep-alive connection the node reads nothing more from that connection for the
hold, nor from new connections of that address, so a flood costs one refusal per connection
per hold; connections already open, of the same address or another, are served meanwhile; an
address with the most connections held has further ones closed; behind a trusted proxy
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
from tests.helpers.raw_http import Response, closed_by_server, read_response

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


def holds(text: str, name: str = "fm_http_refusal_holds_total") -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name}")


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
        # At least until the address's last refusal (the other connection's, 0.1 s later) plus
        # the hold; at most half a hold more (the jitter), twice.
        assert held.status == 429 and HOLD_S + 0.05 <= held_s < 2.5 * HOLD_S, held_s
        # Served again after the hold (and held again after this refusal).
        metrics, _ = await bystander.get("/metrics")
        # The flooder after each refusal (and once more if its jittered hold ended before the
        # other connection's); that one once.
        assert holds(metrics.body.decode()) in (3, 4)
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
        assert node.server.refusals.holds == 0  # type: ignore[attr-defined]
    finally:
        proxy.close()


@pytest.mark.gen_test(timeout=30)
async def test_new_connections_of_a_refused_address_wait_out_the_hold(
    node: Node, product: int
) -> None:
    """A flood that opens a new connection per request is held the same way: a refused
    address's new connections are read only once its hold is over; other addresses' are
    read at once."""
    path = f"/api/v1/products/{product}"
    flooder = await Client.open(node)
    try:
        for _ in range(BURST):
            assert (await flooder.get(path))[0].status == 200
        refused, _ = await flooder.get(path, "Connection: close")  # the node closes it
        assert refused.status == 429
    finally:
        flooder.close()
    fresh, other = await Client.open(node), await Client.open(node, "127.0.0.3")
    try:
        (answer, waited_s), (served, served_s) = await asyncio.gather(
            fresh.get(path), other.get(path)
        )
        assert answer.status == 429 and HOLD_S - 0.2 <= waited_s < 1.5 * HOLD_S + 0.3, waited_s
        assert served.status == 200 and served_s < 0.5, served_s
    finally:
        fresh.close()
        other.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_address_with_the_most_connections_held_has_more_closed_at_once(
    node: Node, product: int
) -> None:
    """An open-loop flood cannot pile up sockets: past `max_held` waiting connections, a
    refused address's new connections are closed as they come, and counted."""
    node.server.refusals.max_held = 3  # type: ignore[attr-defined]
    path = f"/api/v1/products/{product}"
    flooder = await Client.open(node)
    waiting: list[Client] = []
    try:
        for _ in range(BURST):
            assert (await flooder.get(path))[0].status == 200
        assert (await flooder.get(path))[0].status == 429  # held: one waiting
        for _ in range(2):
            waiting.append(await Client.open(node))
        extra = await Client.open(node)
        waiting.append(extra)
        assert await closed_by_server(extra.reader, within_s=2.0)
        bystander = await Client.open(node, "127.0.0.2")
        waiting.append(bystander)
        metrics, _ = await bystander.get("/metrics")
        assert holds(metrics.body.decode(), "fm_http_refusal_turned_away_total") == 1
    finally:
        flooder.close()
        for client in waiting:
            client.close()
