"""Subscriptions over WebSocket at /graphql: the official graphql-ws npm client and a legacy
(subscriptions-transport-ws) client on node B receive changes made by mutations on node A,
because subscriptions follow the realtime hub's streams through Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from realtime.cable_codec import StreamMessage
from server.domain.events import NotificationCreated, notification_stream
from server.domain.notifications import insert_notification
from server.wiring.services import Services
from tests.helpers.cable import ExtraNode, publish_unheard
from tests.helpers.graphql import gql, result
from tests.helpers.graphql_ws import LEGACY_WS, WsClient, js_client, js_events, stop

pytestmark = pytest.mark.usefixtures("clean_data")

STOCK = "subscription($id: ID!) { stockUpdated(productId: $id) { productId stock } }"
CART = "subscription { cartUpdated { version } }"


async def _next_event(events: Any, kind: str) -> dict[str, Any]:
    event: dict[str, Any] = await asyncio.wait_for(anext(events), 20)
    assert event["event"] == kind, event
    return event


@pytest.mark.gen_test(timeout=60)
async def test_npm_client_on_node_b_receives_stock_change_made_by_adjust_stock_on_node_a(
    client: Any,
    base_url: str,
    node_b: ExtraNode,
    products: list[int],
    admin: tuple[int, str],
) -> None:
    product_id = products[0]
    proc = await js_client(
        node_b.url("/graphql"), STOCK, variables={"id": str(product_id)}, count=2
    )
    try:
        events = js_events(proc)
        await _next_event(events, "connected")
        first = await _next_event(events, "next")
        stock = {"productId": str(product_id), "stock": 10}
        assert first["data"]["data"] == {"stockUpdated": stock}
        assert first["data"]["extensions"]["cost"]["requestedQueryCost"] == 1
        changed = result(
            await gql(
                client,
                base_url,
                "mutation($id: ID!) { adjustStock(productId: $id, delta: -3) { id stock } }",
                {"id": str(product_id)},
                token=admin[1],
            )
        )
        assert changed["data"]["adjustStock"] == {"id": str(product_id), "stock": 7}
        second = await _next_event(events, "next")
        assert second["data"]["data"]["stockUpdated"] == {"productId": str(product_id), "stock": 7}
        assert (await _next_event(events, "done"))["received"] == 2
        assert await proc.wait() == 0
    finally:
        await stop(proc)


@pytest.mark.gen_test(timeout=60)
async def test_npm_client_on_node_b_receives_cart_change_made_on_node_a(
    client: Any,
    base_url: str,
    node_b: ExtraNode,
    products: list[int],
    shopper: tuple[int, str],
) -> None:
    query = "subscription { cartUpdated { version totalCents items { productId quantity } } }"
    proc = await js_client(node_b.url("/graphql"), query, token=shopper[1], count=2)
    try:
        events = js_events(proc)
        await _next_event(events, "connected")
        first = await _next_event(events, "next")
        assert first["data"]["data"]["cartUpdated"] == {"version": 0, "totalCents": 0, "items": []}
        added = result(
            await gql(
                client,
                base_url,
                "mutation($id: ID!) { addToCart(productId: $id, quantity: 2) "
                "{ version totalCents items { productId quantity } } }",
                {"id": str(products[1])},
                token=shopper[1],
            )
        )
        second = await _next_event(events, "next")
        assert second["data"]["data"]["cartUpdated"] == added["data"]["addToCart"]
        assert second["data"]["data"]["cartUpdated"]["version"] == 1
        assert await proc.wait() == 0
    finally:
        await stop(proc)


@pytest.mark.gen_test(timeout=60)
async def test_legacy_protocol_client_on_node_b_receives_stock_changes_from_node_a(
    services: Services, node_b: ExtraNode, products: list[int]
) -> None:
    product_id = products[2]
    ws = await WsClient.connect(node_b.url("/graphql"), LEGACY_WS)
    await ws.send({"type": "connection_init", "payload": {}})
    assert await ws.read() == {"type": "connection_ack"}
    await ws.send(
        {"id": "1", "type": "start", "payload": {"query": STOCK, "variables": {"id": product_id}}}
    )
    first = await ws.read()
    assert first is not None and (first["id"], first["type"]) == ("1", "data")
    assert first["payload"]["data"] == {"stockUpdated": {"productId": str(product_id), "stock": 10}}
    await services.catalog.change_stock(product_id, delta=5)
    second = await ws.read()
    assert second is not None and second["type"] == "data"
    assert second["payload"]["data"]["stockUpdated"]["stock"] == 15
    await ws.send({"id": "1", "type": "stop"})
    await ws.send({"type": "connection_terminate"})
    assert await ws.closed_with() == 1000


@pytest.mark.gen_test(timeout=30)
async def test_subscription_with_token_in_url_follows_the_callers_cart(
    ws_url: str, products: list[int], shopper: tuple[int, str]
) -> None:
    ws = await WsClient.connect(f"{ws_url}?token={shopper[1]}")
    await ws.init()
    await ws.send({"id": "c", "type": "subscribe", "payload": {"query": CART}})
    first = await ws.read()
    assert first is not None and (first["id"], first["type"]) == ("c", "next")
    assert first["payload"]["data"] == {"cartUpdated": {"version": 0}}
    await ws.send({"id": "c", "type": "complete"})
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_anonymous_cart_subscription_ends_with_an_unauthenticated_error(
    ws_url: str, products: list[int]
) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send({"id": "c", "type": "subscribe", "payload": {"query": CART}})
    refused = await ws.read()
    assert refused is not None and refused["type"] == "error" and refused["id"] == "c"
    assert refused["payload"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    # the socket stays usable
    query = "{ products(first: 1) { edges { node { id } } } }"
    await ws.send({"id": "q", "type": "subscribe", "payload": {"query": query}})
    answer = await ws.read()
    assert answer is not None and answer["type"] == "next"
    assert answer["payload"]["data"]["products"]["edges"][0]["node"]["id"] == str(products[0])
    assert await ws.read() == {"id": "q", "type": "complete"}
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_client_complete_stops_the_subscription_and_releases_the_stream(
    services: Services, ws_url: str, products: list[int]
) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    subscribe = {"query": STOCK, "variables": {"id": str(products[0])}}
    await ws.send({"id": "s", "type": "subscribe", "payload": subscribe})
    assert (await ws.read() or {})["type"] == "next"
    stream = f"inventory:product:{products[0]}"
    assert services.cable.hub.subscriber_count(stream) == 1
    await ws.send({"id": "s", "type": "complete"})
    for _ in range(100):
        if services.cable.hub.subscriber_count(stream) == 0:
            break
        await asyncio.sleep(0.01)
    assert services.cable.hub.subscriber_count(stream) == 0
    await services.catalog.change_stock(products[0], delta=1)
    with pytest.raises(asyncio.TimeoutError):
        await ws.read(timeout=0.3)  # nothing more for a completed operation
    # the same id may be used again once completed
    await ws.send({"id": "s", "type": "subscribe", "payload": subscribe})
    assert (await ws.read() or {})["payload"]["data"]["stockUpdated"]["stock"] == 11
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_subscription_that_falls_behind_its_stream_ends_lagged_and_the_socket_goes_on(
    services: Services, ws_url: str, products: list[int]
) -> None:
    """A burst of 300 stock messages delivered to the node in one go (as the broker hands over
    a full read from Redis) outruns the subscription's bound of 256 pending: it ends with a
    `SUBSCRIPTION_LAGGED` error, and the same socket keeps serving."""
    product_id = products[0]
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send(
        {
            "id": "s",
            "type": "subscribe",
            "payload": {"query": STOCK, "variables": {"id": product_id}},
        }
    )
    first = await ws.read()
    assert first is not None and first["type"] == "next"
    stream = f"inventory:product:{product_id}"
    for n in range(300):
        services.cable.hub.broadcast(
            stream,
            StreamMessage(
                stream, {"event": "stock", "product_id": str(product_id), "stock": n}, n + 1, "e"
            ),
        )
    ended = await ws.read()
    assert ended is not None and (ended["id"], ended["type"]) == ("s", "error"), ended
    assert ended["payload"][0]["extensions"]["code"] == "SUBSCRIPTION_LAGGED"
    query = "{ products(first: 1) { edges { node { id } } } }"
    await ws.send({"id": "q", "type": "subscribe", "payload": {"query": query}})
    answer = await ws.read()
    assert answer is not None and answer["type"] == "next"
    ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_notifications_lost_for_good_are_read_again_and_sent_once(
    services: Services, node_b: ExtraNode, shopper: tuple[int, str]
) -> None:
    """A notification whose live message node B never heard, and history cannot give back, is
    read from the shard and sent before the next one, each once (`StreamReset`)."""
    user_id, token = shopper
    ws = await WsClient.connect(node_b.url(f"/graphql?token={token}"))
    await ws.init()
    query = "subscription { notificationReceived { id title } }"
    await ws.send({"id": "n", "type": "subscribe", "payload": {"query": query}})
    stream = notification_stream(user_id)
    deadline = asyncio.get_running_loop().time() + 10
    while node_b.services.cable.hub.subscriber_count(stream) == 0:
        assert asyncio.get_running_loop().time() < deadline, "never subscribed"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the resolver has read where it starts
    first = await services.notifications.create(user_id, "test", "first")
    async with services.router.write(user_id) as cur:  # written, its message lost for good
        lost = await insert_notification(cur, user_id, "test", "lost", "")
    await publish_unheard(
        services.redis, stream, NotificationCreated(user_id, lost).to_message(), history=False
    )
    newer = await services.notifications.create(user_id, "test", "newer")
    received = []
    for _ in range(3):
        event = await ws.read(10.0)
        assert event is not None and event["type"] == "next", event
        received.append(event["payload"]["data"]["notificationReceived"])
    assert received == [
        {"id": first["id"], "title": "first"},
        {"id": lost["id"], "title": "lost"},
        {"id": newer["id"], "title": "newer"},
    ]
    with pytest.raises(TimeoutError):  # the newer one's own message is not sent again
        await ws.read(0.5)
    assert node_b.services.cable.resyncs == 1
    ws.close()
