"""AnyCable's extended protocol on a raw WebSocket: the frames themselves (stream positions at the
top level, `sid`), history on subscribe and its refusals, session restore on another node,
client pings and the `no_pong` cut-off, in JSON and msgpack."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgpack
import pytest
import redis
from tornado.websocket import websocket_connect

from realtime.broker import stream_keys
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import (
    EXT_JSON,
    EXT_MSGPACK,
    CableClient,
    ExtraNode,
    identifier,
    stock_event,
    until_viewers,
)
from tests.helpers.commerce import make_user
from tests.helpers.deployment import make_settings

pytestmark = pytest.mark.usefixtures("clean_data")


def stream_of(product_id: int) -> str:
    return f"inventory:product:{product_id}"


async def subscribed(
    client: CableClient, ident: str, history: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Subscribe (with `history` if given) and return the frame after the confirmation."""
    command: dict[str, Any] = {"command": "subscribe", "identifier": ident}
    if history is not None:
        command["history"] = history
    await client.send(command)
    assert await client.read() == {"identifier": ident, "type": "confirm_subscription"}
    frame = await client.read()
    assert frame is not None
    return frame  # type: ignore[no-any-return]


async def stock_frames(client: CableClient, count: int) -> list[dict[str, Any]]:
    """The next `count` stock frames (presence counts share the stream and are skipped)."""
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        frame = await client.read(10.0)
        assert frame is not None
        if frame.get("message", {}).get("event") == "presence":
            continue
        frames.append(frame)
    return frames


@pytest.mark.parametrize("protocol", [EXT_JSON, EXT_MSGPACK])
@pytest.mark.gen_test(timeout=30)
async def test_stream_messages_carry_stream_id_epoch_and_offset_beside_the_message(
    services: Services, node_b: ExtraNode, product_id: int, protocol: str
) -> None:
    client, welcome = await CableClient.connect_ext(node_b.url("/cable"), protocol)
    assert set(welcome) == {"type", "sid"} and len(welcome["sid"]) >= 16
    ident = identifier("InventoryChannel", product_id=product_id)
    snapshot = await subscribed(client, ident)
    stream = stream_of(product_id)
    offset, epoch = await services.cable.broker.position(stream)
    assert snapshot == {
        "identifier": ident,
        "message": stock_event(product_id, 10),
        "stream_id": stream,
        "epoch": epoch,
        "offset": offset,
    }
    await services.cable.publish(stream, stock_event(product_id, 4))
    (change,) = await stock_frames(client, 1)
    assert list(change) == ["identifier", "message", "stream_id", "epoch", "offset"]
    assert change["message"] == stock_event(product_id, 4)  # nothing added inside `message`
    assert (change["stream_id"], change["epoch"]) == (stream, epoch)
    assert change["offset"] > offset
    client.close()


def cart_change(n: int) -> dict[str, Any]:
    """A message on a cart stream (published straight to it: only its place in order counts)."""
    return {"event": "cart", "n": n}


@pytest.mark.gen_test(timeout=30)
async def test_subscribe_with_a_position_replays_what_followed_it_then_confirms_history(
    services: Services, node_b: ExtraNode
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    stream = f"cart:user:{user_id}"
    offset, epoch = await services.cable.publish(stream, cart_change(0))
    for n in (1, 2, 3):
        await services.cable.publish(stream, cart_change(n))
    client, _welcome = await CableClient.connect_ext(node_b.url(f"/cable?token={token}"))
    ident = identifier("CartChannel")
    history = {
        "since": int(time.time()) - 60,
        "streams": {stream: {"epoch": epoch, "offset": offset}},
    }
    first = await subscribed(client, ident, history)
    rest = [await client.read() for _ in range(3)]
    replayed = [first, *rest[:2]]
    # No snapshot ahead of the replay: exactly the offsets after the client's, in order.
    assert [f["message"] for f in replayed] == [cart_change(n) for n in (1, 2, 3)]
    assert [f["offset"] for f in replayed] == [offset + 1, offset + 2, offset + 3]
    assert rest[2] == {"type": "confirm_history", "identifier": ident}
    await services.cable.publish(stream, cart_change(4))
    live = await client.read()
    assert (live["message"], live["offset"]) == (cart_change(4), offset + 4)
    client.close()


@pytest.mark.parametrize("case", ["other_epoch", "ahead", "trimmed", "no_position"])
@pytest.mark.gen_test(timeout=30)
async def test_history_that_cannot_be_answered_is_rejected_and_the_fresh_state_follows(
    services: Services,
    node_b: ExtraNode,
    infra_env: dict[str, str],
    case: str,
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    stream = f"cart:user:{user_id}"
    offset, epoch = await services.cable.publish(stream, cart_change(1))
    await services.cable.publish(stream, cart_change(2))
    position = {
        "other_epoch": {stream: {"epoch": "not-" + epoch, "offset": offset}},
        "ahead": {stream: {"epoch": epoch, "offset": offset + 50}},
        "trimmed": {stream: {"epoch": epoch, "offset": offset - 1}},
        "no_position": {},
    }[case]
    if case == "trimmed":  # history no longer holds what followed the client's offset
        client = redis.Redis.from_url(infra_env["FM_REDIS_URL"])
        client.xtrim(stream_keys(stream)[1], maxlen=1, approximate=False)
        client.close()
    cable, _welcome = await CableClient.connect_ext(node_b.url(f"/cable?token={token}"))
    ident = identifier("CartChannel")
    answer = await subscribed(cable, ident, {"since": False, "streams": position})
    assert answer == {"type": "reject_history", "identifier": ident}
    fresh = await cable.read()
    assert fresh is not None and fresh["message"]["cart"]["items"] == []  # the database's cart
    assert (fresh["epoch"], fresh["offset"]) == (epoch, offset + 1)
    await services.cable.publish(stream, cart_change(3))
    live = await cable.read()  # no confirm_history in between
    assert (live["message"], live["offset"]) == (cart_change(3), offset + 2)
    cable.close()


@pytest.mark.gen_test(timeout=30)
async def test_since_alone_gets_the_current_state_and_confirms_history(
    node_b: ExtraNode, product_id: int
) -> None:
    client, _welcome = await CableClient.connect_ext(node_b.url("/cable"))
    ident = identifier("InventoryChannel", product_id=product_id)
    snapshot = await subscribed(client, ident, {"since": int(time.time()), "streams": {}})
    assert snapshot["message"] == stock_event(product_id, 10)
    assert await client.read() == {"type": "confirm_history", "identifier": ident}
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_since_replays_a_channel_without_state_from_that_time(
    services: Services, node_b: ExtraNode
) -> None:
    user_id, token = await make_user(services, "ada@example.com")
    stream = f"notifications:user:{user_id}"
    await services.cable.publish(stream, {"event": "notification", "n": 1})
    client, _welcome = await CableClient.connect_ext(node_b.url(f"/cable?token={token}"))
    ident = identifier("NotificationsChannel")
    replayed = await subscribed(client, ident, {"since": int(time.time()) - 60, "streams": {}})
    assert (replayed["message"], replayed["stream_id"]) == (
        {"event": "notification", "n": 1},
        stream,
    )
    assert await client.read() == {"type": "confirm_history", "identifier": ident}
    client.close()


class TestRestore:
    @pytest.mark.parametrize("how", ["param", "header"])
    @pytest.mark.gen_test(timeout=30)
    async def test_a_session_is_restored_on_another_node_and_replays_on_history(
        self, services: Services, settings: Settings, node_b: ExtraNode, how: str
    ) -> None:
        user_id, token = await make_user(services, "ada@example.com")
        client, welcome = await CableClient.connect_ext(node_b.url(f"/cable?token={token}"))
        ident = identifier("CartChannel")
        seen = await subscribed(client, ident)
        client.close()
        stream = f"cart:user:{user_id}"
        await services.cable.publish(stream, cart_change(1))
        await services.cable.publish(stream, cart_change(2))
        node_c = await ExtraNode.start(settings, "node-c")
        url = node_c.url(f"/cable?token={token}")
        await _wait_for_session(services, welcome["sid"])
        if how == "param":
            back, again = await CableClient.connect_ext(url + f"&sid={welcome['sid']}")
        else:
            back, again = await CableClient.connect_ext(
                url, **{"X-AnyCable-Restore-SID": welcome["sid"]}
            )
        assert again["restored"] is True and again["restored_ids"] == [ident]
        assert again["sid"] != welcome["sid"]
        position = {stream: {"epoch": seen["epoch"], "offset": seen["offset"]}}
        await back.send(
            {
                "command": "history",
                "identifier": ident,
                "history": {"since": 0, "streams": position},
            }
        )
        frames = [await back.read() for _ in range(3)]  # no confirm_subscription: no resubscribe
        assert [f.get("message") for f in frames[:2]] == [cart_change(1), cart_change(2)]
        assert [f["offset"] for f in frames[:2]] == [seen["offset"] + 1, seen["offset"] + 2]
        assert frames[2] == {"type": "confirm_history", "identifier": ident}
        await services.cable.publish(stream, cart_change(3))
        live = await back.read()
        assert (live["message"], live["offset"]) == (cart_change(3), seen["offset"] + 3)
        back.close()
        assert node_c.services.cable.restored_sessions == 1
        assert node_c.services.cable.history_confirmed == 1
        await node_c.stop()

    @pytest.mark.gen_test(timeout=60)
    async def test_a_restored_viewer_counts_again_in_presence_through_the_restored_hook(
        self,
        services: Services,
        settings: Settings,
        node_b: ExtraNode,
        product_id: int,
        http_server: Any,
        http_port: int,
    ) -> None:
        # AnyCable runs nothing on a restore (its issue 208), so a presence count kept in
        # `subscribed` forgets a viewer back from a tunnel; InventoryChannel's `restored`
        # counts it again, once (a count of 3 here would mean `joined` ran as well).
        ident = identifier("InventoryChannel", product_id=product_id)
        watcher = await CableClient.connect(f"ws://127.0.0.1:{http_port}/cable")
        await watcher.subscribe(ident)
        viewer, welcome = await CableClient.connect_ext(node_b.url("/cable"))
        seen = await subscribed(viewer, ident)
        await until_viewers(watcher, ident, 2)
        viewer.close()
        await until_viewers(watcher, ident, 1)
        await _wait_for_session(services, welcome["sid"])
        node_c = await ExtraNode.start(settings, "node-c")
        try:
            back, again = await CableClient.connect_ext(node_c.url(f"/cable?sid={welcome['sid']}"))
            assert again["restored_ids"] == [ident]
            position = {seen["stream_id"]: {"epoch": seen["epoch"], "offset": seen["offset"]}}
            history = {"since": False, "streams": position}
            await back.send({"command": "history", "identifier": ident, "history": history})
            await until_viewers(watcher, ident, 2)
            assert (await until_viewers(back, ident, 2))["product_id"] == str(product_id)
            back.close()
            await until_viewers(watcher, ident, 1)  # `left` undoes `restored`
        finally:
            await node_c.stop()
        watcher.close()

    @pytest.mark.gen_test(timeout=30)
    async def test_a_session_is_not_restored_for_another_user(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        _ada_id, ada = await make_user(services, "ada@example.com")
        _bob_id, bob = await make_user(services, "bob@example.com")
        client, welcome = await CableClient.connect_ext(node_b.url(f"/cable?token={ada}"))
        await subscribed(client, identifier("CartChannel"))
        client.close()
        await _wait_for_session(services, welcome["sid"])
        url = node_b.url(f"/cable?token={bob}&sid={welcome['sid']}")
        other, again = await CableClient.connect_ext(url)
        assert set(again) == {"type", "sid"}  # a plain welcome
        anonymous, plain = await CableClient.connect_ext(node_b.url(f"/cable?sid={welcome['sid']}"))
        assert set(plain) == {"type", "sid"}
        other.close()
        anonymous.close()


async def _wait_for_session(services: Services, sid: str, timeout: float = 5.0) -> None:
    """Wait until the node has written the session that `sid` names (written as it goes)."""
    deadline = time.monotonic() + timeout
    while await services.cable.sessions.load(sid) is None:
        assert time.monotonic() < deadline, "session never written"
        await asyncio.sleep(0.05)


class TestPings:
    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, cable_ping_interval_s=0.5, cable_pong_timeout_s=1.5)

    @pytest.mark.gen_test(timeout=30)
    async def test_a_client_ping_is_answered_with_pong(self, node_b: ExtraNode) -> None:
        client, _welcome = await CableClient.connect_ext(node_b.url("/cable"))
        await client.send({"command": "ping"})
        assert await client.read() == {"type": "pong"}
        client.close()

    @pytest.mark.gen_test(timeout=30)
    async def test_a_client_that_sent_pongs_and_falls_silent_is_told_no_pong(
        self, node_b: ExtraNode
    ) -> None:
        ws = await websocket_connect(node_b.url("/cable"), subprotocols=[EXT_MSGPACK])
        welcome = msgpack.unpackb(await ws.read_message())
        assert welcome["type"] == "welcome"
        await ws.write_message(msgpack.packb({"command": "pong"}), binary=True)
        started = time.monotonic()
        while True:
            raw = await asyncio.wait_for(ws.read_message(), 10)
            assert raw is not None, "closed without a disconnect message"
            message = msgpack.unpackb(raw)
            if message["type"] != "ping":
                break
        assert message == {"type": "disconnect", "reason": "no_pong", "reconnect": True}
        assert 1.0 < time.monotonic() - started < 6.0
        assert await asyncio.wait_for(ws.read_message(), 5) is None

    @pytest.mark.gen_test(timeout=30)
    async def test_a_client_that_never_sent_a_pong_is_not_cut_off(self, node_b: ExtraNode) -> None:
        ws = await websocket_connect(node_b.url("/cable"), subprotocols=[EXT_JSON])
        deadline = time.monotonic() + 3.5  # over twice the pong timeout
        while time.monotonic() < deadline:
            message = json.loads(await asyncio.wait_for(ws.read_message(), 5))
            assert message["type"] in ("welcome", "ping"), message
        ws.close()
