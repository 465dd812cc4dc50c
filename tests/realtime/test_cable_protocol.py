"""The cable's protocol details a client relies on: ping cadence, the three ways to sign in,
`unsubscribe` (and the Redis channel it releases), channel authorisation, concurrent publishers
on two nodes, and the gap a Redis restart leaves being filled from history."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
import redis
from tornado.websocket import websocket_connect

from realtime.broker import stream_keys
from server.wiring.infra import ValkeyServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import (
    JSON,
    CableClient,
    ExtraNode,
    OwnRedis,
    identifier,
    read_stocks,
    stock_event,
)
from tests.helpers.commerce import make_user
from tests.helpers.deployment import make_settings

pytestmark = pytest.mark.usefixtures("clean_data")


class TestPings:
    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, cable_ping_interval_s=0.5)

    @pytest.mark.gen_test(timeout=30)
    async def test_pings_come_every_interval_with_the_unix_time(self, node_b: ExtraNode) -> None:
        ws = await websocket_connect(node_b.url("/cable"), subprotocols=[JSON])
        assert json.loads(await ws.read_message()) == {"type": "welcome"}
        arrivals: list[float] = []
        while len(arrivals) < 5:
            message = json.loads(await asyncio.wait_for(ws.read_message(), 2.0))
            assert message["type"] == "ping"
            assert abs(message["message"] - time.time()) < 2  # whole seconds, as Rails sends
            arrivals.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        # Every interval, give or take a busy loop (the test shares 2 cores with the node).
        assert all(0.25 < gap < 1.25 for gap in gaps), gaps
        assert 0.4 < sum(gaps) / len(gaps) < 0.75, gaps
        ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_bearer_header_cookie_and_token_parameter_all_sign_in(
    services: Services, node_b: ExtraNode
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    cart = identifier("CartChannel")
    ways = [
        CableClient.connect(node_b.url("/cable"), Authorization=f"Bearer {token}"),
        CableClient.connect(
            node_b.url("/cable"), Cookie=f"fm_session={token}", Origin=node_b.url("")
        ),
        CableClient.connect(node_b.url(f"/cable?token={token}")),
    ]
    for way in ways:
        client = await way
        await client.subscribe(cart)
        first = await client.next_message(cart)
        assert first["event"] == "cart" and first["cart"]["items"] == []
        client.close()
    anonymous = await CableClient.connect(node_b.url("/cable"))
    await anonymous.send({"command": "subscribe", "identifier": cart})
    assert await anonymous.read() == {"identifier": cart, "type": "reject_subscription"}
    anonymous.close()
    assert user_id > 0


@pytest.mark.gen_test(timeout=30)
async def test_notifications_are_only_for_their_owner(
    services: Services, node_b: ExtraNode
) -> None:
    ada_id, ada = await make_user(services, "ada@example.com")
    bob_id, _bob = await make_user(services, "bob@example.com")
    client = await CableClient.connect(node_b.url(f"/cable?token={ada}"))
    own = identifier("NotificationsChannel", user_id=ada_id)
    await client.subscribe(own)
    for foreign in (
        identifier("NotificationsChannel", user_id=bob_id),
        identifier("CartChannel", user_id=bob_id),
    ):
        await client.send({"command": "subscribe", "identifier": foreign})
        assert await client.read() == {"identifier": foreign, "type": "reject_subscription"}
    client.close()
    anonymous = await CableClient.connect(node_b.url("/cable"))
    mine = identifier("NotificationsChannel")
    await anonymous.send({"command": "subscribe", "identifier": mine})
    assert await anonymous.read() == {"identifier": mine, "type": "reject_subscription"}
    anonymous.close()


@pytest.mark.gen_test(timeout=30)
async def test_benchmark_channel_exists_only_when_enabled(node_b: ExtraNode) -> None:
    assert not node_b.services.settings.benchmark_channel
    client = await CableClient.connect(node_b.url("/cable"))
    bench = identifier("BenchmarkChannel")
    await client.send({"command": "subscribe", "identifier": bench})
    assert await client.read() == {"identifier": bench, "type": "reject_subscription"}
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_unsubscribe_stops_delivery_and_releases_the_redis_channel(
    services: Services, node_b: ExtraNode, product_id: int, infra_env: dict[str, str]
) -> None:
    stream = f"inventory:product:{product_id}"
    channel = stream_keys(stream)[3]
    plain = redis.Redis.from_url(infra_env["FM_REDIS_URL"])
    try:
        client = await CableClient.connect(node_b.url("/cable"))
        ident = identifier("InventoryChannel", product_id=product_id)
        await client.subscribe(ident)
        await read_stocks(client, ident, 1)
        assert plain.pubsub_numsub(channel) == [(channel.encode(), 1)]
        await client.send({"command": "unsubscribe", "identifier": ident})
        deadline = time.monotonic() + 5
        while plain.pubsub_numsub(channel) != [(channel.encode(), 0)]:
            assert time.monotonic() < deadline, "node B still follows the stream"
            await asyncio.sleep(0.05)
        await services.cable.publish(stream, stock_event(product_id, 3))
        with pytest.raises(TimeoutError):  # nothing for an identifier it left
            await client.read(timeout=0.5)
        await client.subscribe(ident)  # and it may come back
        assert (await read_stocks(client, ident, 1))[0][0]["stock"] == 10  # the database's count
        client.close()
    finally:
        plain.close()


@pytest.mark.gen_test(timeout=60)
async def test_two_nodes_publishing_at_once_never_reorder_or_duplicate_offsets(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    stream = f"inventory:product:{product_id}"
    client = await CableClient.connect(node_b.url("/cable"))
    ident = identifier("InventoryChannel", product_id=product_id)
    await client.subscribe(ident)
    first = (await read_stocks(client, ident, 1))[0][0]

    async def publish_from(node: Services, stocks: range) -> list[int]:
        offsets = []
        for stock in stocks:
            offset, _epoch = await node.cable.publish(stream, stock_event(product_id, stock))
            offsets.append(offset)
        return offsets

    from_a, from_b = await asyncio.gather(
        publish_from(services, range(1000, 1050)), publish_from(node_b.services, range(2000, 2050))
    )
    assert sorted(from_a + from_b) == list(range(first["offset"] + 1, first["offset"] + 101))
    received, _ = await read_stocks(client, ident, 100)
    by_offset = {m["offset"]: m["stock"] for m in received}
    assert len(by_offset) == 100  # no duplicates
    assert [m["offset"] for m in received] == sorted(by_offset)  # delivered in offset order
    assert [by_offset[o] for o in from_a] == list(range(1000, 1050))  # each node's own order
    assert [by_offset[o] for o in from_b] == list(range(2000, 2050))
    client.close()


class TestRedisRestartKeepingData(OwnRedis):
    """A Redis that restarts with its data (append-only file): the same epoch, and what was
    published while node B was resubscribing comes from history, once and in order."""

    @pytest.mark.gen_test(timeout=60)
    async def test_messages_published_around_the_restart_arrive_once_in_order(
        self, services: Services, node_b: ExtraNode, product_id: int, valkey: ValkeyServer
    ) -> None:
        stream = f"inventory:product:{product_id}"
        client = await CableClient.connect(node_b.url("/cable"))
        ident = identifier("InventoryChannel", product_id=product_id)
        await client.subscribe(ident)
        before = (await read_stocks(client, ident, 1))[0][0]
        await asyncio.to_thread(valkey.stop)
        await asyncio.to_thread(valkey.start)
        published = 0
        deadline = time.monotonic() + 20
        while published < 5:  # as soon as Redis answers node A, before node B is back
            try:
                await services.cable.publish(stream, stock_event(product_id, 9 - published))
                published += 1
            except redis.RedisError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        received, _ = await read_stocks(client, ident, 5)
        assert [m["stock"] for m in received] == [9, 8, 7, 6, 5]
        assert [m["offset"] for m in received] == list(
            range(before["offset"] + 1, before["offset"] + 6)
        )
        assert {m["epoch"] for m in received} == {before["epoch"]}
        with pytest.raises(TimeoutError):  # and nothing twice
            while True:
                extra = await client.next_message(ident, timeout=0.5)
                assert extra["event"] == "presence", extra
        assert node_b.services.cable.broker.reconnects >= 1
        client.close()
