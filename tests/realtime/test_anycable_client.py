"""AnyCable's published client (`@anycable/core`, `actioncable-v1-ext-json`, under Node with
`ws`) through a tunnel: it follows a cart and a product on node B through a TCP proxy the test
cuts; while it is away node A makes 5 cart changes and 3 stock changes; the client reconnects on
its own (no code of ours runs in it) and must get exactly what it missed, in order, once.

Invariant checked each time: after the reconnect, the cart states it receives before the next
live change are exactly the missed ones (quantities 1..5, offsets consecutive from the last one
it had), no snapshot ahead of them, `history_received` for both subscriptions; or, when history
cannot answer, `history_not_found` and the current state. The inventory stream recovers only
its latest value: one message, the current count, then `history_received`, however many
changes it missed and whatever history holds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.wiring.node import Node
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode, TcpProxy
from tests.helpers.commerce import make_user
from tests.helpers.deployment import make_settings

pytestmark = pytest.mark.usefixtures("clean_data")

JS_CLIENT = Path(__file__).resolve().parents[1] / "js" / "anycable-client.mjs"
CART, INVENTORY = 0, 1  # the client's subscriptions, by index
STOCK_CHANGES = 5  # while the client is away; the product starts with 10 units
Event = dict[str, Any]


class JsClient:
    """The Node driver's process and every event it has printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[Event] = []

    @classmethod
    async def start(cls, url: str, *subscriptions: dict[str, Any]) -> JsClient:
        assert (JS_CLIENT.parent / "node_modules" / "@anycable" / "core").is_dir(), (
            "run `npm ci --prefix tests/js` (scripts/test does)"
        )
        args = [str(JS_CLIENT), "--url", url, "--frames", "--reconnect-ms", "150"]
        for subscription in subscriptions:
            args += ["--subscribe", json.dumps(subscription)]
        proc = await asyncio.create_subprocess_exec(
            "node", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        return cls(proc)

    async def until(self, done: Callable[[list[Event]], bool], timeout: float = 30.0) -> None:
        """Read events until `done(all events so far)` holds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not done(self.events):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events: {self.events[-20:]}"
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            assert line, f"the client exited; events: {self.events[-20:]}"
            self.events.append(json.loads(line))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def since(events: list[Event], mark: int) -> list[Event]:
    return events[mark:]


def messages(events: list[Event], channel: int, event: str) -> list[Event]:
    return [
        e
        for e in events
        if e["event"] == "message" and e["channel"] == channel and e["data"].get("event") == event
    ]


def infos(events: list[Event], channel: int) -> list[str]:
    return [e["type"] for e in events if e["event"] == "info" and e["channel"] == channel]


def frames_of_type(events: list[Event], kind: str) -> list[Event]:
    return [e["data"] for e in events if e["event"] == "frame" and e["data"].get("type") == kind]


def quantities(cart_messages: list[Event]) -> list[int]:
    return [sum(item["quantity"] for item in m["data"]["cart"]["items"]) for m in cart_messages]


@pytest.fixture
def proxy(io_loop: Any, node_b: ExtraNode) -> Iterator[TcpProxy]:
    proxy: TcpProxy = io_loop.run_sync(TcpProxy(node_b.port).start)
    yield proxy
    io_loop.run_sync(proxy.stop)


async def run_tunnel(
    services: Services,
    proxy: TcpProxy,
    product_id: int,
    *,
    to_node: int | None = None,
    leave: Callable[[], Awaitable[None]] | None = None,
) -> tuple[JsClient, list[Event], list[Event], Event]:
    """Subscribe through the proxy, cut it (or run `leave`, which must end the client's
    connection), change the cart 5 times and the stock 5 times on node A, mend it (towards
    `to_node`'s port if given) and wait until the client has caught up and seen one more live
    cart change. Returns the client, the events before the cut, the events after it, and the
    last cart message before the cut."""
    user_id, token = await make_user(services, "ada@example.com")
    client = await JsClient.start(
        proxy.url(f"/cable?token={token}"),
        {"channel": "CartChannel"},
        {"channel": "InventoryChannel", "product_id": product_id},
    )
    await client.until(
        lambda ev: bool(messages(ev, CART, "cart")) and bool(messages(ev, INVENTORY, "stock"))
    )
    before = list(client.events)
    last_cart = messages(before, CART, "cart")[-1]
    assert last_cart["meta"]["stream"] == f"cart:user:{user_id}"

    if leave is None:
        proxy.cut()
    else:
        await leave()
    await client.until(
        lambda ev: any(e.get("type") == "disconnect" for e in since(ev, len(before)))
    )
    mark = len(client.events)
    for _ in range(5):
        await services.carts.add_item(user_id, product_id, 1)
    for _ in range(STOCK_CHANGES):
        await services.catalog.change_stock(product_id, delta=-1)
    if to_node is not None:
        proxy.upstream = to_node
    proxy.mend()

    def caught_up(ev: list[Event]) -> bool:
        after = since(ev, mark)
        done = {"history_received", "history_not_found"}
        return all(done & set(infos(after, channel)) for channel in (CART, INVENTORY))

    await client.until(caught_up)
    await services.carts.add_item(user_id, product_id, 1)  # a live change after the recovery
    await client.until(lambda ev: 6 in quantities(messages(since(ev, mark), CART, "cart")))
    return client, before, since(client.events, mark), last_cart


def assert_exactly_the_missed_states(after: list[Event], last_cart: Event) -> None:
    carts = messages(after, CART, "cart")
    assert quantities(carts) == [1, 2, 3, 4, 5, 6]  # the 5 missed in order, once, then live
    offset = last_cart["meta"]["offset"]
    assert [m["meta"]["offset"] for m in carts] == list(range(offset + 1, offset + 7))
    assert infos(after, CART) == ["history_received"]
    assert_the_latest_stock_only(after, "history_received")


def assert_the_latest_stock_only(after: list[Event], info: str) -> None:
    """The inventory subscription's events after the reconnect: one message with the current
    count, the history answer, then only live messages, each at the next offset."""
    inventory = [
        e for e in after if e.get("channel") == INVENTORY and e["event"] in ("message", "info")
    ]
    answered = next(i for i, e in enumerate(inventory) if e["event"] == "info")
    (one,) = inventory[:answered]
    assert one["event"] == "message" and one["data"]["event"] == "stock", inventory
    assert one["data"]["stock"] == 10 - STOCK_CHANGES
    assert inventory[answered]["type"] == info
    live = [e["meta"]["offset"] for e in inventory[answered + 1 :] if e["event"] == "message"]
    assert live == list(range(one["meta"]["offset"] + 1, one["meta"]["offset"] + 1 + len(live)))


class TestResubscribe:
    """Sessions off (TTL 0): the client gets a plain welcome and resubscribes with history."""

    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, cable_session_ttl_s=0)

    @pytest.mark.gen_test(timeout=90)
    async def test_the_client_resubscribes_and_gets_exactly_what_it_missed(
        self, services: Services, proxy: TcpProxy, product_id: int
    ) -> None:
        client, _before, after, last_cart = await run_tunnel(services, proxy, product_id)
        try:
            assert_exactly_the_missed_states(after, last_cart)
            assert len(frames_of_type(after, "confirm_subscription")) == 2
            assert all(not e.get("restored") for e in after if e.get("event") == "cable")
        finally:
            await client.stop()


class TestRestore:
    @pytest.mark.gen_test(timeout=90)
    async def test_the_session_is_restored_and_replays_without_a_new_confirmation(
        self, services: Services, proxy: TcpProxy, product_id: int
    ) -> None:
        client, _before, after, last_cart = await run_tunnel(services, proxy, product_id)
        try:
            assert_exactly_the_missed_states(after, last_cart)
            (welcome,) = frames_of_type(after, "welcome")
            assert welcome["restored"] is True and len(welcome["restored_ids"]) == 2
            assert frames_of_type(after, "confirm_subscription") == []
            assert [e["restored"] for e in after if e.get("type") == "connect"] == [True]
        finally:
            await client.stop()

    @pytest.mark.gen_test(timeout=90)
    async def test_the_session_is_restored_on_the_other_node(
        self, services: Services, settings: Settings, proxy: TcpProxy, product_id: int
    ) -> None:
        node_c = await ExtraNode.start(settings, "node-c")
        try:
            client, _before, after, last_cart = await run_tunnel(
                services, proxy, product_id, to_node=node_c.port
            )
            assert_exactly_the_missed_states(after, last_cart)
            (welcome,) = frames_of_type(after, "welcome")
            assert welcome["restored"] is True
            assert frames_of_type(after, "confirm_subscription") == []
            assert len(node_c.services.cable.connections) == 1
            await client.stop()
        finally:
            await node_c.stop()


class TestDrain:
    """Node B drains (the SIGTERM sequence of `server.wiring.node.Node.shutdown`) while the
    client is subscribed through the proxy: `disconnect {reason: "server_restart", reconnect:
    true}` reaches it, so it drops its sid (a restart means no restore), comes back to node A
    and resubscribes with history."""

    @pytest.mark.gen_test(timeout=90)
    async def test_a_drained_node_s_client_recovers_on_the_other_node(
        self,
        services: Services,
        settings: Settings,
        product_id: int,
        http_server: Any,
        http_port: int,
    ) -> None:
        node_settings = settings.model_copy(
            update={"node_id": "node-b", "host": "127.0.0.1", "port": 0, "drain_delay_s": 0.1}
        )
        node_b = Node(await Services.open(node_settings))
        node_b.services.start()
        proxy = await TcpProxy(await node_b.listen()).start()
        stopped = False

        async def drain_node_b() -> None:
            nonlocal stopped
            proxy.hold()  # the drain's disconnect gets through; the way back opens later
            await node_b.shutdown()
            stopped = True

        try:
            client, _before, after, last_cart = await run_tunnel(
                services, proxy, product_id, to_node=http_port, leave=drain_node_b
            )
            try:
                assert_exactly_the_missed_states(after, last_cart)
                assert frames_of_type(client.events, "disconnect") == [
                    {"type": "disconnect", "reason": "server_restart", "reconnect": True}
                ]
                (welcome,) = frames_of_type(after, "welcome")
                assert "restored" not in welcome  # no sid sent: it resubscribed
                assert len(frames_of_type(after, "confirm_subscription")) == 2
                assert len(services.cable.connections) == 1  # on node A now
            finally:
                await client.stop()
        finally:
            await proxy.stop()
            if not stopped:
                await node_b.shutdown()


class TestTrimmedHistory:
    """History keeps 2 messages per stream: 5 missed cart changes cannot be replayed."""

    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, cable_history_limit=2)

    @pytest.mark.gen_test(timeout=90)
    async def test_the_client_is_told_history_not_found_and_gets_the_current_state(
        self, services: Services, proxy: TcpProxy, product_id: int
    ) -> None:
        client, _before, after, _last_cart = await run_tunnel(services, proxy, product_id)
        try:
            assert infos(after, CART) == ["history_not_found"]
            assert quantities(messages(after, CART, "cart")) == [5, 6]  # fresh state, then live
            # The latest value is all the inventory stream needs: history is not asked for it.
            assert_the_latest_stock_only(after, "history_received")
        finally:
            await client.stop()
