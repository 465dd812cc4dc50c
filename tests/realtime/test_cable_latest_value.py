"""Latest-value streams (InventoryChannel, `Recovery.LATEST_VALUE`) on raw WebSockets: a client
that was away while the stock changed 5 times gets exactly one message on its return, the
current count at the stream's newest offset, whatever its protocol and whatever history holds.

Invariant checked: after the return, the stream messages before `confirm_history` (extended) or
before the next live change (plain `since`/`epoch`) are exactly one stock message with the
database's count; every message after it has the next offset, so it stood at the newest one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from realtime.broker import stream_keys
from server.wiring.services import Services
from tests.helpers.cable import (
    EXT_JSON,
    EXT_MSGPACK,
    JSON,
    MSGPACK,
    CableClient,
    ExtraNode,
    identifier,
)

pytestmark = pytest.mark.usefixtures("clean_data")

CHANGES = 5  # while the client is away; the product starts with 10 units


async def _settled_position(services: Services, stream: str, quiet_s: float = 2.0) -> int:
    """The stream's offset once it has not moved for `quiet_s` (viewer counts trail a
    connection's going by up to a presence period)."""
    offset, _epoch = await services.cable.broker.position(stream)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        await asyncio.sleep(0.1)
        now, _epoch = await services.cable.broker.position(stream)
        if now != offset:
            offset, quiet_since = now, time.monotonic()
    return offset


async def _first_stream_message(client: CableClient, ident: str) -> dict[str, Any]:
    await client.send({"command": "subscribe", "identifier": ident})
    assert await client.read() == {"identifier": ident, "type": "confirm_subscription"}
    frame = await client.read(10.0)
    assert frame is not None and frame["identifier"] == ident, frame
    return frame  # type: ignore[no-any-return]


def _position_of(frame: dict[str, Any]) -> tuple[int, str]:
    if "stream_id" in frame:  # extended: beside the message
        return frame["offset"], frame["epoch"]
    return frame["message"]["offset"], frame["message"]["epoch"]


async def _until_stock(
    client: CableClient, ident: str, stock: int, first_offset: int
) -> list[dict[str, Any]]:
    """Frames until the stock message with `stock`; each stream message has the next offset."""
    frames: list[dict[str, Any]] = []
    expected = first_offset + 1
    while True:
        frame = await client.read(10.0)
        assert frame is not None and frame.get("identifier") == ident, frame
        offset, _epoch = _position_of(frame)
        assert offset == expected, (offset, expected, frame)
        expected += 1
        frames.append(frame)
        if frame["message"]["event"] == "stock" and frame["message"]["stock"] == stock:
            return frames


@pytest.mark.parametrize(
    ("protocol", "case"),
    [
        (EXT_JSON, "position"),
        (EXT_MSGPACK, "position"),
        (EXT_JSON, "trimmed"),
        (EXT_JSON, "other_epoch"),
        (JSON, "since"),
        (MSGPACK, "since"),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_a_client_back_after_five_changes_gets_one_message_with_the_current_count(
    services: Services,
    node_b: ExtraNode,
    product_id: int,
    infra_env: dict[str, str],
    protocol: str,
    case: str,
) -> None:
    stream = f"inventory:product:{product_id}"
    extended = protocol in (EXT_JSON, EXT_MSGPACK)
    plain_ident = identifier("InventoryChannel", product_id=product_id)
    if extended:
        client, _welcome = await CableClient.connect_ext(node_b.url("/cable"), protocol)
    else:
        client = await CableClient.connect(node_b.url("/cable"), protocol)
    seen_offset, seen_epoch = _position_of(await _first_stream_message(client, plain_ident))
    client.close()

    for _ in range(CHANGES):  # through node A, into the database and onto the stream
        await services.catalog.change_stock(product_id, delta=-1)
    newest = await _settled_position(services, stream)
    assert newest >= seen_offset + CHANGES
    if case == "trimmed":
        with redis.Redis.from_url(infra_env["FM_REDIS_URL"]) as r:
            r.xtrim(stream_keys(stream)[1], maxlen=0, approximate=False)
    client_epoch = "not-" + seen_epoch if case == "other_epoch" else seen_epoch

    if extended:
        back, _welcome = await CableClient.connect_ext(node_b.url("/cable"), protocol)
        ident = plain_ident
        history = {
            "since": False,
            "streams": {stream: {"epoch": client_epoch, "offset": seen_offset}},
        }
        await back.send({"command": "subscribe", "identifier": ident, "history": history})
    else:
        back = await CableClient.connect(node_b.url("/cable"), protocol)
        ident = identifier(
            "InventoryChannel", product_id=product_id, since=seen_offset, epoch=client_epoch
        )
        await back.send({"command": "subscribe", "identifier": ident})
    assert await back.read() == {"identifier": ident, "type": "confirm_subscription"}
    one = await back.read()
    assert one["message"]["event"] == "stock" and one["message"]["stock"] == 10 - CHANGES
    one_offset, one_epoch = _position_of(one)
    assert (one_offset, one_epoch) == (newest, seen_epoch)
    if extended:
        assert one["stream_id"] == stream
        assert await back.read() == {"type": "confirm_history", "identifier": ident}
    await services.catalog.change_stock(product_id, delta=-1)  # live again: the next offset
    await _until_stock(back, ident, 10 - CHANGES - 1, one_offset)
    back.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_at_the_newest_offset_gets_nothing_but_the_history_confirmation(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    stream = f"inventory:product:{product_id}"
    ident = identifier("InventoryChannel", product_id=product_id)
    for _ in range(CHANGES):
        await services.catalog.change_stock(product_id, delta=-1)
    newest = await _settled_position(services, stream)
    _offset, epoch = await services.cable.broker.position(stream)
    client, _welcome = await CableClient.connect_ext(node_b.url("/cable"))
    history = {"since": False, "streams": {stream: {"epoch": epoch, "offset": newest}}}
    await client.send({"command": "subscribe", "identifier": ident, "history": history})
    assert await client.read() == {"identifier": ident, "type": "confirm_subscription"}
    assert await client.read() == {"type": "confirm_history", "identifier": ident}
    await services.catalog.change_stock(product_id, delta=-1)
    await _until_stock(client, ident, 10 - CHANGES - 1, newest)
    client.close()
