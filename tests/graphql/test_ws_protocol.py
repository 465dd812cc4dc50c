"""The graphql-transport-ws protocol's rules over real sockets: each violation closes the
socket with the protocol's code, and the node goes on serving."""

from __future__ import annotations

from typing import Any

import pytest

from realtime.graphql_ws import LegacyWsProtocol, Send, Start, TransportWsProtocol
from tests.helpers.cable import ExtraNode
from tests.helpers.graphql import graphql_settings
from tests.helpers.graphql_ws import LEGACY_WS, WsClient

pytestmark = pytest.mark.usefixtures("clean_data")

STOCK = "subscription { stockUpdated(productId: 1) { stock } }"


async def _still_serves(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send({"id": "1", "type": "subscribe", "payload": {"query": "{ __typename }"}})
    answer = await ws.read()
    assert answer is not None and answer["type"] == "next"
    assert answer["payload"]["data"] == {"__typename": "Query"}
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_message_that_is_not_json_closes_with_4400(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.send("{not json")
    assert await ws.closed_with() == 4400
    await _still_serves(ws_url)


@pytest.mark.gen_test(timeout=30)
async def test_binary_message_closes_with_4400(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.ws.write_message(b'{"type":"connection_init"}', binary=True)
    assert await ws.closed_with() == 4400


@pytest.mark.gen_test(timeout=30)
async def test_subscribe_before_the_ack_closes_with_4401(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.send({"id": "1", "type": "subscribe", "payload": {"query": STOCK}})
    assert await ws.closed_with() == 4401


@pytest.mark.gen_test(timeout=30)
async def test_unknown_token_in_connection_init_closes_with_4403(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.send({"type": "connection_init", "payload": {"token": "forged"}})
    assert await ws.closed_with() == 4403


@pytest.mark.gen_test(timeout=30)
async def test_unknown_token_in_the_url_closes_with_4403_at_init(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url + "?token=forged")
    await ws.send({"type": "connection_init"})
    assert await ws.closed_with() == 4403


@pytest.mark.gen_test(timeout=30)
async def test_no_connection_init_in_time_closes_with_4408(infra_env: dict[str, str]) -> None:
    node = await ExtraNode.start(graphql_settings(infra_env, graphql_ws_init_timeout_s=0.3))
    try:
        ws = await WsClient.connect(node.url("/graphql"))
        assert await ws.closed_with() == 4408
    finally:
        await node.stop()


@pytest.mark.gen_test(timeout=30)
async def test_reusing_a_running_operation_id_closes_with_4409(
    ws_url: str, products: list[int]
) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send({"id": "same", "type": "subscribe", "payload": {"query": STOCK}})
    assert (await ws.read() or {}).get("type") == "next"
    await ws.send({"id": "same", "type": "subscribe", "payload": {"query": STOCK}})
    assert await ws.closed_with() == 4409


@pytest.mark.gen_test(timeout=30)
async def test_second_connection_init_closes_with_4429(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send({"type": "connection_init"})
    assert await ws.closed_with() == 4429


@pytest.mark.gen_test(timeout=30)
async def test_message_over_the_size_bound_closes_with_1009(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    query = "{ __typename " + " " * (128 * 1024) + "}"
    await ws.send({"id": "1", "type": "subscribe", "payload": {"query": query}})
    assert await ws.closed_with() == 1009
    await _still_serves(ws_url)


@pytest.mark.gen_test(timeout=30)
async def test_ping_is_answered_with_pong(ws_url: str) -> None:
    ws = await WsClient.connect(ws_url)
    await ws.init()
    await ws.send({"type": "ping", "payload": {"t": 1}})
    assert await ws.read() == {"type": "pong", "payload": {"t": 1}}
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_refused_upgrades_answer_http_errors(client: Any, base_url: str) -> None:
    bad_protocol = await client.fetch(
        base_url + "/graphql",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "chat",
        },
        raise_error=False,
    )
    assert bad_protocol.code == 400
    foreign = await client.fetch(
        base_url + "/graphql",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": "graphql-transport-ws",
            "Origin": "https://evil.example",
        },
        raise_error=False,
    )
    assert foreign.code == 403


@pytest.mark.gen_test(timeout=30)
async def test_legacy_protocol_answers_bad_messages_with_errors_and_keeps_the_socket(
    ws_url: str,
) -> None:
    ws = await WsClient.connect(ws_url, LEGACY_WS)
    await ws.send("nonsense")
    refused = await ws.read()
    assert refused is not None and refused["type"] == "error"
    await ws.send({"id": "1", "type": "start", "payload": {"query": "{ __typename }"}})
    early = await ws.read()
    assert early == {
        "id": "1",
        "type": "error",
        "payload": {"message": "send connection_init first"},
    }
    await ws.send({"type": "connection_init"})
    assert await ws.read() == {"type": "connection_ack"}
    await ws.send({"id": "2", "type": "start", "payload": {"query": "{ __typename }"}})
    data = await ws.read()
    assert data is not None and (data["id"], data["type"]) == ("2", "data")
    assert data["payload"]["data"] == {"__typename": "Query"}
    assert await ws.read() == {"id": "2", "type": "complete"}
    ws.close()


def test_transport_machine_frees_ids_of_finished_operations() -> None:
    machine = TransportWsProtocol(max_operations=1)
    machine.receive('{"type":"connection_init"}')
    assert machine.accepted() == [Send({"type": "connection_ack"})]
    assert machine.receive('{"type":"subscribe","id":"a","payload":{"query":"{x}"}}') == [
        Start("a", {"query": "{x}"})
    ]
    refused = machine.receive('{"type":"subscribe","id":"b","payload":{"query":"{x}"}}')
    assert isinstance(refused[0], Send) and refused[0].message["type"] == "error"
    machine.finished("a")
    assert machine.receive('{"type":"subscribe","id":"b","payload":{"query":"{x}"}}') == [
        Start("b", {"query": "{x}"})
    ]


def test_legacy_machine_replaces_an_operation_started_twice() -> None:
    machine = LegacyWsProtocol(max_operations=5)
    machine.receive('{"type":"connection_init"}')
    machine.accepted()
    machine.receive('{"type":"start","id":"a","payload":{"query":"{x}"}}')
    again = machine.receive('{"type":"start","id":"a","payload":{"query":"{y}"}}')
    assert [type(action).__name__ for action in again] == ["Stop", "Start"]
