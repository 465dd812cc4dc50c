"""Two nodes on a real Redis Cluster (Valkey, 3 masters + 3 replicas): `FM_REDIS_CLUSTER=1`.

Every Lua script touches keys of one hash tag, so the broker's offsets and history, the cache,
sessions, rate limits and presence run unchanged on a cluster; these tests hold them to it
(a key of another slot in a script is a CROSSSLOT error here and nowhere else). Streams use
sharded pub/sub (SPUBLISH/SSUBSCRIBE), which must survive a master failing over, planned or not.
The failover tests come last: they leave the cluster with its masters moved, still healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from tornado.httpclient import AsyncHTTPClient

from server.adapters.sharded_pubsub import ShardedSubscription
from server.wiring.infra import ValkeyServer, create_cluster
from server.wiring.infra.common import pick_free_port
from server.wiring.infra.valkey import CLUSTER_BUS_OFFSET, parse_info
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import CableClient, identifier, read_stocks, stock_event
from tests.helpers.caches import CountingLoader, Nodes
from tests.helpers.catalog import add_product
from tests.helpers.commerce import call, commerce_app, commerce_settings, make_user, ok, start_node
from tests.helpers.graphql import gql, result
from tests.helpers.pubsub import racing_subscribes_all_receive

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_data")]

_NODES = 6


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ValkeyServer]]:
    """A Valkey cluster of this module's own (3 masters, each with a replica)."""
    root = tmp_path_factory.mktemp("valkey-cluster")
    used: set[int] = set()
    nodes = []
    for i in range(_NODES):
        port = pick_free_port(exclude=used, bus_offset=CLUSTER_BUS_OFFSET)
        used.update({port, port + CLUSTER_BUS_OFFSET})
        nodes.append(ValkeyServer(Path(root, f"node{i}"), port, cluster=True, log=lambda _: None))
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes, replicas=1, log=lambda _: None)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def infra_env(infra_env: dict[str, str], valkey_cluster: list[ValkeyServer]) -> dict[str, str]:
    """The suite's databases with Redis replaced by the cluster (`clean_data` flushes it)."""
    return infra_env | {"FM_REDIS_URL": valkey_cluster[0].url, "FM_REDIS_CLUSTER": "1"}


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return commerce_settings(infra_env)


@pytest.fixture
def app(services: Services) -> Any:
    return commerce_app(services)


@pytest.fixture
def client(io_loop: Any, http_server: Any) -> Iterator[AsyncHTTPClient]:
    """An HTTP client; asking for `http_server` serves node A at `base_url`."""
    http = AsyncHTTPClient(force_instance=True)
    yield http
    http.close()


@pytest.fixture
def cluster(infra_env: dict[str, str]) -> Iterator[RedisCluster]:
    """A plain client of the cluster, to look at where keys went."""
    client = RedisCluster.from_url(infra_env["FM_REDIS_URL"])
    yield client
    client.close()


def _live_channel(product_id: int) -> str:
    return "{inventory:product:" + str(product_id) + "}:live"


def _master_of(nodes: list[ValkeyServer], cluster: RedisCluster, key: str) -> ValkeyServer:
    cluster.nodes_manager.initialize()  # the slot map as it is now
    owner = cluster.get_node_from_key(key)
    return next(node for node in nodes if node.port == owner.port)


def _replica_of(nodes: list[ValkeyServer], master: ValkeyServer) -> ValkeyServer:
    for node in nodes:
        with contextlib.suppress(OSError):
            info = parse_info(str(node.command("INFO", "replication")))
            if info.get("role") == "slave" and info.get("master_port") == str(master.port):
                return node
    raise AssertionError(f"no replica of {master.port}")


def _wait_until(check: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


async def _subscriber_on(node: Any, product_id: int) -> tuple[CableClient, str, dict[str, Any]]:
    client = await CableClient.connect(node.url("/cable"))
    ident = identifier("InventoryChannel", product_id=product_id)
    await client.subscribe(ident)
    (first,), _ = await read_stocks(client, ident, 1)
    return client, ident, first


def _promoted(replica: ValkeyServer) -> bool:
    """Whether `replica` has become a master."""
    return parse_info(str(replica.command("INFO", "replication")))["role"] == "master"


@pytest.mark.gen_test(timeout=60)
async def test_stream_offsets_history_and_recovery_across_nodes(
    services: Services,
    settings: Settings,
    infra_env: dict[str, str],
    cluster: RedisCluster,
    valkey_cluster: list[ValkeyServer],
) -> None:
    assert services.settings.redis_cluster
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    stream = f"inventory:product:{product_id}"
    ident = identifier("InventoryChannel", product_id=product_id)
    node_b = await start_node(settings)
    try:
        client = await CableClient.connect(node_b.url("/cable"))
        await client.subscribe(ident)
        snapshot = await client.next_message(ident)
        assert snapshot["stock"] == 10
        await services.cable.publish(stream, stock_event(product_id, 9))
        seen = await client.next_message(ident)
        assert (seen["stock"], seen["offset"]) == (9, snapshot["offset"] + 1)
        # Sharded pub/sub: node B follows the stream on the master owning its slot, and no
        # node has a classic subscriber (whose messages the cluster copies to every node).
        channel = _live_channel(product_id).encode()
        owner = cluster.get_node_from_key(channel)
        with redis.Redis(host=owner.host, port=owner.port) as master:
            assert master.execute_command("PUBSUB", "SHARDNUMSUB", channel) == [channel, 1]
        for node in valkey_cluster:
            assert node.command("PUBSUB", "NUMSUB", channel.decode())[1] == 0
        client.close()

        for stock in (8, 7, 6):  # published on node A while the client is away
            await services.cable.publish(stream, stock_event(product_id, stock))
        back = await CableClient.connect(node_b.url("/cable"))
        resume = identifier(
            "InventoryChannel", product_id=product_id, since=seen["offset"], epoch=seen["epoch"]
        )
        # History on the cluster holds them in order (XRANGE on the stream's master) ...
        missed = await services.cable.broker.history_after(
            stream, seen["offset"], seen["offset"] + 3
        )
        assert missed is not None
        assert [(offset, m["stock"]) for offset, m in missed] == [
            (seen["offset"] + 1, 8),
            (seen["offset"] + 2, 7),
            (seen["offset"] + 3, 6),
        ]
        # ... and a product's stream recovers only its latest value: the database's count at
        # the newest offset.
        await back.subscribe(resume)
        (latest,), _ = await read_stocks(back, resume, 1)
        assert latest["stock"] == 10 and latest["offset"] >= seen["offset"] + 3
        back.close()
    finally:
        await node_b.stop()
    # The offset, history and epoch keys share the stream's hash tag: one slot, one master.
    tag = "{" + stream + "}"
    keys = [f"{tag}:offset", f"{tag}:history", f"{tag}:epoch"]
    assert {cluster.keyslot(key) for key in keys} == {cluster.keyslot(tag)}
    assert all(cluster.exists(key) for key in keys)


@pytest.mark.gen_test(timeout=60)
async def test_sessions_cache_cart_and_presence_across_nodes(
    client: Any, base_url: str, services: Services, settings: Settings, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    _, token = await make_user(services, "ada@example.com")  # a session stored in the cluster
    url = f"{base_url}/api/v1/products/{product_id}"
    first = ok(await call(client, url))
    assert ok(await call(client, url)) == first  # the second read comes through the cache
    node_b = await start_node(settings)
    try:
        cable = await CableClient.connect(node_b.url(f"/cable?token={token}"))
        cart_id = identifier("CartChannel")
        await cable.subscribe(cart_id)
        assert (await cable.next_message(cart_id))["cart"]["version"] == 0
        body = {"product_id": product_id, "quantity": 2}
        answered = ok(await call(client, base_url + "/api/v1/cart/items", "POST", body, token))
        pushed = await cable.next_message(cart_id)
        assert pushed["event"] == "cart" and pushed["cart"] == answered

        watcher = await CableClient.connect(node_b.url("/cable"))
        inventory = identifier("InventoryChannel", product_id=product_id)
        await watcher.subscribe(inventory)
        while (message := await watcher.next_message(inventory))["event"] != "presence":
            pass
        assert message["viewers"] == 1
        cable.close()
        watcher.close()
    finally:
        await node_b.stop()


@pytest.mark.gen_test(timeout=60)
async def test_rate_limits_count_across_nodes(
    client: Any, base_url: str, services: Services, settings: Settings
) -> None:
    limited = settings.model_copy(update={"ratelimit_ip_per_second": 0.01, "ratelimit_ip_burst": 3})
    node_b = await start_node(limited, "node-b")
    node_c = await start_node(limited, "node-c")
    try:
        statuses = []
        for node in (node_b, node_c, node_b, node_c, node_b):
            statuses.append(
                (await call(client, f"http://127.0.0.1:{node.port}/api/v1/products")).code
            )
        assert statuses == [200, 200, 200, 429, 429]
    finally:
        await node_b.stop()
        await node_c.stop()


@pytest.mark.gen_test(timeout=60)
async def test_graphql_persisted_query_registered_on_one_node_answers_on_another(
    client: Any, base_url: str, settings: Settings, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=4)
    query = "query One($id: ID!) { product(id: $id) { id stock } }"
    persisted = {"persistedQuery": {"version": 1, "sha256Hash": sha256(query.encode()).hexdigest()}}
    variables = {"id": str(product_id)}
    registered = result(await gql(client, base_url, query, variables, extensions=persisted))
    assert registered["data"]["product"] == {"id": str(product_id), "stock": 4}
    node_b = await start_node(settings)
    try:
        for _ in range(2):  # the second answer may come from the result cache
            answered = await gql(
                client,
                f"http://127.0.0.1:{node_b.port}",
                method="GET",
                variables=variables,
                extensions=persisted,
            )
            assert result(answered)["data"] == registered["data"]
    finally:
        await node_b.stop()


@pytest.mark.gen_test(timeout=30)
async def test_cache_bump_on_one_node_clears_the_others_local_entry(settings: Settings) -> None:
    """Cache invalidations stay on classic pub/sub (every node needs all of them)."""
    nodes = Nodes(settings)
    try:
        a, b = nodes.cache(), nodes.cache(local_max_staleness_s=60.0)
        await nodes.listen(b)
        loader = CountingLoader(7)
        await b.get_or_load("product", 7, loader, 30)
        assert b.local.get("product", "7")[0] is True
        await a.bump("product", 7)
        deadline = time.monotonic() + 2
        while b.local.get("product", "7")[0]:
            assert time.monotonic() < deadline, "the bump never reached node b"
            await asyncio.sleep(0.01)
        assert (await b.get_or_load("product", 7, loader, 30))["n"] == 2  # loaded again
    finally:
        await nodes.close()


def test_clean_data_flushes_every_master(infra_env: dict[str, str], cluster: RedisCluster) -> None:
    """The fixture this module relies on: nothing left on any master after `clean_data`."""
    for primary in cluster.get_primaries():
        with redis.Redis(host=primary.host, port=primary.port) as node:
            assert node.dbsize() == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_burst_of_publishes_keeps_each_streams_order(
    services: Services, settings: Settings, infra_env: dict[str, str]
) -> None:
    """Publishes queued together go out as one batch (on a cluster: per stream, in order)."""
    products = [add_product(infra_env["FM_CATALOG_DSN"], stock=50) for _ in range(3)]
    node_b = await start_node(settings)
    try:
        client, ident, first = await _subscriber_on(node_b, products[0])
        offsets = await asyncio.gather(
            *(
                services.cable.publish(f"inventory:product:{product}", stock_event(product, stock))
                for stock in range(49, 29, -1)
                for product in products
            )
        )
        messages, seen = await read_stocks(client, ident, 20, 30.0)
        stocks = [m["stock"] for m in messages]
        assert stocks == list(range(49, 29, -1))
        assert seen == list(range(first["offset"] + 1, first["offset"] + 1 + len(seen)))
        assert {offset for offset, _ in offsets[::3]} <= set(seen)
        client.close()
    finally:
        await node_b.stop()


@pytest.mark.gen_test(timeout=90)
async def test_subscribers_keep_their_stream_through_a_planned_failover(
    services: Services,
    settings: Settings,
    infra_env: dict[str, str],
    cluster: RedisCluster,
    valkey_cluster: list[ValkeyServer],
) -> None:
    """`CLUSTER FAILOVER` on the replica: the old master ends its shard subscriptions
    (`sunsubscribe`), node B follows the slot to the new master and misses nothing."""
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    stream = f"inventory:product:{product_id}"
    node_b = await start_node(settings)
    try:
        client, ident, first = await _subscriber_on(node_b, product_id)
        master = _master_of(valkey_cluster, cluster, _live_channel(product_id))
        replica = _replica_of(valkey_cluster, master)
        replica.command("CLUSTER", "FAILOVER")
        await asyncio.to_thread(
            _wait_until,
            lambda: _promoted(replica),
        )
        for stock in (9, 8, 7):
            await services.cable.publish(stream, stock_event(product_id, stock))
        messages, seen = await read_stocks(client, ident, 3, 30.0)
        stocks = [m["stock"] for m in messages]
        assert stocks == [9, 8, 7]
        assert seen == list(range(first["offset"] + 1, first["offset"] + 1 + len(seen)))
        assert node_b.services.cable.broker.reconnects >= 1
        # Node B's probe counts a planned failover (nothing lost: no new epoch).
        health = node_b.services.cluster_health
        assert health is not None
        await health.probe()
        assert health.failovers["planned"] >= 1 and health.failovers["unplanned"] == 0
        assert node_b.services.cable.epochs_rotated == 0
        client.close()
    finally:
        await node_b.stop()


@pytest.mark.gen_test(timeout=120)
async def test_subscribers_recover_their_stream_when_its_master_dies(
    services: Services,
    settings: Settings,
    infra_env: dict[str, str],
    cluster: RedisCluster,
    valkey_cluster: list[ValkeyServer],
) -> None:
    """The master owning the stream is stopped: its replica takes over after the cluster's
    node timeout; node B reconnects to it and the subscriber gets every later message."""
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    stream = f"inventory:product:{product_id}"
    node_b = await start_node(settings)
    master = _master_of(valkey_cluster, cluster, _live_channel(product_id))
    replica = _replica_of(valkey_cluster, master)
    try:
        client, ident, first = await _subscriber_on(node_b, product_id)
        await asyncio.to_thread(master.stop)
        await asyncio.to_thread(
            _wait_until,
            lambda: _promoted(replica),
            60.0,
        )
        deadline = time.monotonic() + 30
        while True:  # node A's client learns the new slot map on its first refusals
            try:
                await services.cable.publish(stream, stock_event(product_id, 9))
                break
            except redis.RedisError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        (message,), _ = await read_stocks(client, ident, 1, 30.0)
        # The master died unplanned, so its last writes may be lost: the stream goes on in a
        # new epoch, and the subscriber holds the message or a fresh state (the database's
        # count) in the new epoch.
        if message["stock"] == 10:
            assert message["epoch"] != first["epoch"]
        else:
            assert message["stock"] == 9
            assert message["offset"] == first["offset"] + 1 or message["epoch"] != first["epoch"]
        await services.cable.publish(stream, stock_event(product_id, 8))  # and it goes on
        while message["stock"] != 8:
            (message,), _ = await read_stocks(client, ident, 1, 30.0)
        client.close()
    finally:
        await node_b.stop()
        await asyncio.to_thread(master.start)  # it rejoins as a replica of the new master
        await asyncio.to_thread(
            _wait_until,
            lambda: parse_info(str(master.command("CLUSTER", "INFO")))["cluster_state"] == "ok",
        )


@pytest.mark.gen_test(timeout=60)
async def test_channels_subscribed_at_once_on_fresh_shards_all_receive(
    infra_env: dict[str, str],
) -> None:
    cluster = AsyncRedisCluster.from_url(infra_env["FM_REDIS_URL"])
    try:
        await racing_subscribes_all_receive(
            lambda on_message, on_reconnect: ShardedSubscription(
                cluster, on_message, on_reconnect, "t"
            ),
            cluster.spublish,
        )
    finally:
        await cluster.aclose()
