"""The cable across two nodes: the official client, msgpack, recovery with `since`, Redis restarts.

Invariant checked throughout: a subscriber sees every message of its stream exactly once, in
offset order, or (when history is gone) a fresh snapshot under a new epoch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from server.wiring.infra import ValkeyServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import (
    MSGPACK,
    CableClient,
    ExtraNode,
    OwnRedis,
    identifier,
    restart_losing_data,
    stock_event,
)
from tests.helpers.commerce import make_user
from tests.helpers.deployment import make_settings
from tests.helpers.processes import cli_env, free_port, server_settings, started, wait_ready

JS_CLIENT = Path(__file__).resolve().parents[1] / "js" / "cable-client.mjs"


async def _js_events(proc: asyncio.subprocess.Process) -> AsyncIterator[dict[str, Any]]:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        yield json.loads(line)


@pytest.mark.gen_test(timeout=60)
async def test_official_client_on_node_b_receives_change_published_on_node_a(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    assert (JS_CLIENT.parent / "node_modules" / "@rails" / "actioncable").is_dir(), (
        "run `npm ci --prefix tests/js` (scripts/test does)"
    )
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS_CLIENT),
        "--url",
        node_b.url("/cable"),
        "--channel",
        "InventoryChannel",
        "--params",
        json.dumps({"product_id": str(product_id)}),
        "--count",
        "2",
        "--timeout-ms",
        "20000",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        events = _js_events(proc)
        assert (await anext(events))["event"] == "connected"
        first = await anext(events)
        assert first["event"] == "received"
        assert {k: first["data"][k] for k in ("event", "product_id", "stock")} == stock_event(
            product_id, 10
        )
        await services.cable.publish(f"inventory:product:{product_id}", stock_event(product_id, 7))
        second = await anext(events)
        assert second["data"]["stock"] == 7
        assert second["data"]["offset"] == first["data"]["offset"] + 1
        assert second["data"]["epoch"] == first["data"]["epoch"]
        assert (await anext(events)) == {"event": "done", "received": 2}
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.gen_test(timeout=30)
async def test_msgpack_client_on_node_b_receives_change_published_on_node_a(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    client = await CableClient.connect(node_b.url("/cable"), MSGPACK)
    ident = identifier("InventoryChannel", product_id=product_id)
    await client.subscribe(ident)
    first = await client.next_message(ident)
    assert first["stock"] == 10
    await services.cable.publish(f"inventory:product:{product_id}", stock_event(product_id, 3))
    change = await client.next_message(ident)
    assert (change["stock"], change["offset"]) == (3, first["offset"] + 1)
    client.close()


@pytest.mark.usefixtures("clean_data")
@pytest.mark.gen_test(timeout=30)
async def test_resubscribing_with_since_replays_exactly_the_missed_messages(
    services: Services, node_b: ExtraNode
) -> None:
    # A cart stream: every message counts (InventoryChannel recovers only the latest value,
    # tests/realtime/test_cable_latest_value.py).
    user_id, token = await make_user(services, "ada@example.com")
    ident = identifier("CartChannel")
    stream = f"cart:user:{user_id}"
    client = await CableClient.connect(node_b.url(f"/cable?token={token}"))
    await client.subscribe(ident)
    await services.cable.publish(stream, {"event": "cart", "n": 0})
    seen = await client.next_message(ident)  # first the snapshot
    seen = await client.next_message(ident)
    assert seen["n"] == 0
    client.close()  # the phone drops

    for n in (1, 2, 3, 4, 5):  # published on the other node while it is away
        await services.cable.publish(stream, {"event": "cart", "n": n})

    back = await CableClient.connect(node_b.url(f"/cable?token={token}"))
    resume = identifier("CartChannel", since=seen["offset"], epoch=seen["epoch"])
    await back.subscribe(resume)
    replayed = [await back.next_message(resume) for _ in range(5)]
    assert [m["n"] for m in replayed] == [1, 2, 3, 4, 5]
    assert [m["offset"] for m in replayed] == list(range(seen["offset"] + 1, seen["offset"] + 6))
    await services.cable.publish(stream, {"event": "cart", "n": 6})
    live = await back.next_message(resume)
    assert (live["n"], live["offset"]) == (6, seen["offset"] + 6)
    back.close()


@pytest.mark.gen_test(timeout=30)
async def test_since_beyond_history_gets_a_fresh_snapshot(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    stream = f"inventory:product:{product_id}"
    position = await services.cable.broker.position(stream)
    await services.cable.publish(stream, stock_event(product_id, 6))
    await services.redis.delete("{" + stream + "}:history")  # trimmed away meanwhile
    client = await CableClient.connect(node_b.url("/cable"))
    ident = identifier("InventoryChannel", product_id=product_id, since=0, epoch=position[1])
    await client.subscribe(ident)
    fresh = await client.next_message(ident)
    assert fresh["event"] == "stock" and fresh["stock"] == 10  # the database's count
    assert fresh["offset"] == position[0] + 1
    client.close()


class TestRedisRestart(OwnRedis):
    """A Redis that restarts and loses its data: epochs change, clients get fresh state."""

    @pytest.mark.gen_test(timeout=60)
    async def test_since_with_old_epoch_after_data_loss_gets_new_epoch_and_fresh_state(
        self, services: Services, node_b: ExtraNode, product_id: int, valkey: ValkeyServer
    ) -> None:
        stream = f"inventory:product:{product_id}"
        client = await CableClient.connect(node_b.url("/cable"))
        ident = identifier("InventoryChannel", product_id=product_id)
        await client.subscribe(ident)
        before = await client.next_message(ident)
        client.close()
        await asyncio.get_running_loop().run_in_executor(None, restart_losing_data, valkey)
        await services.cable.publish(stream, stock_event(product_id, 2))  # after the restart
        back = await CableClient.connect(node_b.url("/cable"))
        resume = identifier(
            "InventoryChannel", product_id=product_id, since=before["offset"], epoch=before["epoch"]
        )
        await back.subscribe(resume)
        fresh = await back.next_message(resume)
        assert fresh["epoch"] != before["epoch"]
        assert fresh["event"] == "stock" and fresh["stock"] == 10
        back.close()

    @pytest.mark.gen_test(timeout=60)
    async def test_connected_subscriber_recovers_after_redis_restart(
        self, services: Services, node_b: ExtraNode, product_id: int, valkey: ValkeyServer
    ) -> None:
        stream = f"inventory:product:{product_id}"
        client = await CableClient.connect(node_b.url("/cable"))
        ident = identifier("InventoryChannel", product_id=product_id)
        await client.subscribe(ident)
        before = await client.next_message(ident)
        await asyncio.get_running_loop().run_in_executor(None, restart_losing_data, valkey)
        # Node A publishes once Redis answers again; node B must resubscribe by itself.
        deadline = asyncio.get_running_loop().time() + 20
        received: list[dict[str, Any]] = []
        while asyncio.get_running_loop().time() < deadline:
            await services.cable.publish(stream, stock_event(product_id, 1))
            try:
                received.append(await client.next_message(ident, timeout=0.5))
            except TimeoutError:
                continue
            if received[-1]["stock"] == 1:
                break
        assert received, "no message reached the subscriber after Redis came back"
        assert received[0]["epoch"] != before["epoch"]
        assert received[-1]["stock"] == 1
        assert _metric(await _scrape(node_b.url("/metrics")), "fm_cable_redis_reconnects") >= 1
        client.close()


async def _scrape(url: str) -> dict[str, float]:
    """A node's /metrics as {sample name with labels: value}."""
    response = await AsyncHTTPClient().fetch(url.replace("ws://", "http://"))
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def _metric(samples: dict[str, float], name: str) -> float:
    for suffix in ("_total", ""):
        if name + suffix in samples:
            return samples[name + suffix]
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.gen_test(timeout=30)
async def test_metrics_count_connections_subscriptions_messages_and_fanout_latency(
    services: Services, node_b: ExtraNode, product_id: int
) -> None:
    stream = f"inventory:product:{product_id}"
    before = await _scrape(node_b.url("/metrics"))
    clients = [await CableClient.connect(node_b.url("/cable")) for _ in range(3)]
    ident = identifier("InventoryChannel", product_id=product_id)
    for client in clients:
        await client.subscribe(ident)
        await client.next_message(ident)  # the snapshot
    await clients[0].send({"command": "subscribe", "identifier": "not json"})  # refused
    assert (await clients[0].read())["type"] in ("reject_subscription", "error")
    published = 4
    for stock in range(published):
        await services.cable.publish(stream, stock_event(product_id, stock))
    for client in clients:
        stocks = []
        while len(stocks) < published:
            message = await client.next_message(ident)
            if message["event"] == "stock":
                stocks.append(message["stock"])
        assert stocks == list(range(published))
    after = await _scrape(node_b.url("/metrics"))

    def grew(name: str) -> float:
        return _metric(after, name) - _metric(before, name)

    assert _metric(after, "fm_cable_connections") == 3
    assert _metric(after, "fm_cable_subscriptions") == 3
    assert grew("fm_cable_commands") == 4  # three subscribes and the refused one
    assert grew("fm_cable_refusals") == 1
    # Presence counts travel on the same stream: at least the four stock changes came in,
    # and everything that came in went out to all three subscribers.
    received = grew("fm_cable_received_messages")
    assert received >= published
    assert grew("fm_cable_delivered_messages") == 3 * received
    assert grew("fm_cable_fanout_seconds_count") == received
    assert 0 < grew("fm_cable_fanout_seconds_sum") < received * 1.0
    assert (
        after['fm_cable_fanout_seconds_bucket{le="+Inf"}'] == after["fm_cable_fanout_seconds_count"]
    )
    for client in clients:
        client.close()


async def _presence_until(client: CableClient, ident: str, viewers: int) -> dict[str, Any]:
    """Read stream messages until a presence message with `viewers` arrives."""
    while True:
        message = await client.next_message(ident, timeout=10)
        if message["event"] == "presence" and message["viewers"] == viewers:
            return message


@pytest.mark.gen_test(timeout=60)
async def test_presence_counts_viewers_on_every_node_and_drops_those_who_leave(
    node_b: ExtraNode, product_id: int, http_server: Any, http_port: int
) -> None:
    ident = identifier("InventoryChannel", product_id=product_id)
    url_a = f"ws://127.0.0.1:{http_port}/cable"
    watcher = await CableClient.connect(url_a)
    await watcher.subscribe(ident)
    others = [await CableClient.connect(node_b.url("/cable")) for _ in range(2)]
    for other in others:
        await other.subscribe(ident)
    seen = await _presence_until(watcher, ident, viewers=3)
    assert seen["product_id"] == str(product_id)
    others[0].close()
    await _presence_until(watcher, ident, viewers=2)
    others[1].close()
    watcher.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_viewer_arriving_as_another_leaves_still_gets_the_count(
    node_b: ExtraNode, product_id: int
) -> None:
    # As when a shopper goes from a product's card to its page: the total stays 1 across
    # the flush, and the newcomer's first message is the stock, so only an announcement
    # of the unchanged total tells it how many are viewing.
    ident = identifier("InventoryChannel", product_id=product_id)
    leaving = await CableClient.connect(node_b.url("/cable"))
    await leaving.subscribe(ident)
    await _presence_until(leaving, ident, viewers=1)
    arriving = await CableClient.connect(node_b.url("/cable"))
    leaving.close()
    await arriving.subscribe(ident)
    assert (await arriving.next_message(ident))["event"] == "stock"
    await _presence_until(arriving, ident, viewers=1)
    arriving.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_crowd_arriving_at_once_costs_a_presence_message_per_period_not_per_shopper(
    node_b: ExtraNode, product_id: int
) -> None:
    ident = identifier("InventoryChannel", product_id=product_id)
    watcher = await CableClient.connect(node_b.url("/cable"))
    await watcher.subscribe(ident)
    await _presence_until(watcher, ident, viewers=1)
    crowd = [await CableClient.connect(node_b.url("/cable")) for _ in range(30)]
    await asyncio.gather(*(shopper.subscribe(ident) for shopper in crowd))
    counts = []
    while not counts or counts[-1] != 31:
        message = await watcher.next_message(ident, timeout=10)
        if message["event"] == "presence":
            counts.append(message["viewers"])
    assert len(counts) <= 3, counts  # one per flush period while the crowd arrived
    for shopper in crowd:
        shopper.close()
    watcher.close()


class TestPresenceWhenANodeDies:
    """A node killed outright cannot withdraw its counts: they must expire."""

    TTL_S = 3.0

    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, presence_ttl_s=self.TTL_S)

    @pytest.mark.gen_test(timeout=90)
    async def test_its_viewers_stop_counting_within_its_presence_ttl(
        self,
        infra_env: dict[str, str],
        product_id: int,
        http_server: Any,
        http_port: int,
        tmp_path: Path,
    ) -> None:
        ident = identifier("InventoryChannel", product_id=product_id)
        watcher = await CableClient.connect(f"ws://127.0.0.1:{http_port}/cable")
        await watcher.subscribe(ident)
        (tmp_path / "config").mkdir()
        port = free_port()
        env = cli_env(
            tmp_path / "config",
            {
                **server_settings(infra_env),
                "FM_SECRET_KEY": "s" * 48,
                "FM_PORT": str(port),
                "FM_PRESENCE_TTL_S": str(self.TTL_S),
            },
        )
        with started("serve", env=env, stderr_path=tmp_path / "stderr.log") as node_c:
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}", node_c)
            viewers = [await CableClient.connect(f"ws://127.0.0.1:{port}/cable") for _ in range(2)]
            for viewer in viewers:
                await viewer.subscribe(ident)
            await _presence_until(watcher, ident, viewers=3)
            os.killpg(node_c.proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            node_c.proc.wait(timeout=10)
        await _presence_until(watcher, ident, viewers=1)
        # Its entries expire after TTL_S; the surviving node notices on its next refresh.
        assert time.monotonic() - killed < self.TTL_S * 4 / 3 + 2.0
        watcher.close()
