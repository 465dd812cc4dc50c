"""A signed-out session ends its cable and GraphQL sockets on every node, within a second;
the same user's other sessions keep theirs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from server.adapters.sessions import SessionStore
from server.wiring.services import Services
from tests.helpers.cable import JSON, CableClient, ExtraNode, identifier
from tests.helpers.commerce import make_user
from tests.helpers.graphql_ws import WsClient
from tests.helpers.http import call

pytestmark = pytest.mark.usefixtures("clean_data")

CART = identifier("CartChannel")
CART_UPDATED = "subscription { cartUpdated { totalCents } }"


async def second_token(services: Services, user_id: int) -> str:
    """Another session of the same user (a second device)."""
    return await services.sessions.create(user_id)


async def cart_socket(node: ExtraNode, token: str) -> CableClient:
    client = await CableClient.connect(node.url(f"/cable?token={token}"))
    await client.subscribe(CART)
    await client.next_message(CART)  # the cart now
    return client


async def graphql_socket(node: ExtraNode, token: str) -> WsClient:
    client = await WsClient.connect(node.url("/graphql"))
    await client.init({"token": token})
    await client.send({"id": "1", "type": "subscribe", "payload": {"query": CART_UPDATED}})
    first = await client.read()
    assert first is not None and first["type"] == "next", first
    return client


@pytest.mark.gen_test(timeout=60)
async def test_sign_out_on_one_node_closes_that_sessions_sockets_on_another_within_a_second(
    services: Services, node_b: ExtraNode, http_client: Any, base_url: str
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    other_device = await second_token(services, user_id)
    await node_b.services.revocations.wait_following()
    cable = await cart_socket(node_b, token)
    graphql = await graphql_socket(node_b, token)
    kept = await cart_socket(node_b, other_device)

    started = time.monotonic()
    out = await call(
        http_client, base_url + "/api/v1/sessions", "DELETE", Authorization=f"Bearer {token}"
    )
    assert out.code == 204, out.body

    assert await cable.read(timeout=1.0) == {
        "type": "disconnect",
        "reason": "unauthorized",
        "reconnect": False,
    }
    assert await cable.read(timeout=1.0) is None
    assert await graphql.closed_with(timeout=1.0) == 4403
    assert time.monotonic() - started < 1.0

    # The other device's socket still follows the cart.
    await services.cable.publish(f"cart:user:{user_id}", {"event": "cart", "n": 1})
    assert (await kept.next_message(CART))["n"] == 1
    # And the revoked token cannot come back.
    request = HTTPRequest(node_b.url(f"/cable?token={token}"))
    again = await websocket_connect(request, subprotocols=[JSON])
    assert json.loads(await again.read_message()) == {
        "type": "disconnect",
        "reason": "unauthorized",
        "reconnect": False,
    }
    kept.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_revocation_the_node_did_not_hear_of_is_found_by_its_recheck(
    services: Services, node_b: ExtraNode
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    other_device = await second_token(services, user_id)
    cable = await cart_socket(node_b, token)
    kept = await cart_socket(node_b, other_device)
    # Revoked with no announcement: as if node B had lost its subscription then.
    await SessionStore(services.redis, services.router).revoke(token)
    await asyncio.sleep(0.3)
    assert len(node_b.services.cable.connections) == 2  # nobody told node B

    await node_b.services.revocations.recheck()

    assert (await cable.read(timeout=1.0))["reason"] == "unauthorized"
    assert len(node_b.services.cable.connections) == 1
    await services.cable.publish(f"cart:user:{user_id}", {"event": "cart", "n": 2})
    assert (await kept.next_message(CART))["n"] == 2
    kept.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_graphql_socket_is_closed_for_the_token_of_its_connection_init(
    services: Services, node_b: ExtraNode
) -> None:
    # The URL names one session, `connection_init` another: the socket acts for the second.
    user_id, url_token = await make_user(services, "ada@example.com")
    init_token = await second_token(services, user_id)
    await node_b.services.revocations.wait_following()
    client = await WsClient.connect(node_b.url(f"/graphql?token={url_token}"))
    await client.init({"token": init_token})

    await services.sessions.revoke(url_token)
    await asyncio.sleep(0.3)
    assert client.close_code is None

    await services.sessions.revoke(init_token)
    assert await client.closed_with(timeout=1.0) == 4403
