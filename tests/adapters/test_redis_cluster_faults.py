"""A Redis Cluster (Valkey, 3 masters + 3 replicas) changing under load, with real processes:
`valkey-cli --cluster reshard` moving a hot stream's slot while it streams to subscribers on two
nodes, and a master SIGKILLed during a broadcast stream and during rate-limited traffic.

What must hold (docs/redis-cluster.md): a subscriber holds every acknowledged message, or was
given an epoch change and a fresh state after the messages it lacks; no command waits past its
timeout (each one is bounded, and the node answers 503 meanwhile, never hangs); `/readyz`
reports the unreachable slots and recovers after the failover; `/metrics` counts the failover
and the resubscriptions; a rate-limit bucket may reset (one burst more), never stop limiting.

The cluster is this module's own; each test leaves it whole again (a killed master restarted
as a replica). Victims are never the node the clients were pointed at first (`FM_REDIS_URL`),
as an operator's seed list would name several.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster
from redis.crc import key_slot
from tornado.httpclient import AsyncHTTPClient

from server.adapters.cache import NS_PRODUCT
from server.adapters.cache import keys as cache_keys
from server.adapters.sessions import COPY_TTL_S, token_digest
from server.wiring.infra import ValkeyServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import CableClient, identifier, stock_event
from tests.helpers.caches import CountingLoader
from tests.helpers.commerce import commerce_app, commerce_settings, start_node
from tests.helpers.redis_cluster import (
    cluster_ok,
    master_of,
    masters,
    pause,
    promoted,
    replica_of,
    replicating,
    reshard,
    sigkill,
    valkey_cluster,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_data")]

DB_STOCK = 1_000_000  # the database's count: a message with it is a fresh state (snapshot)
TIMEOUT_S = 1.0  # FM_REDIS_TIMEOUT_S of these nodes
# The longest a command may take while its master is dead: redis-py's cluster client tries
# the slot's node, refreshes the slot map and tries again (each try bounded by TIMEOUT_S, a
# refused connection fails at once), a few times with short backoff.
COMMAND_BOUND_S = 8 * TIMEOUT_S


@pytest.fixture(scope="module")
def valkey_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ValkeyServer]]:
    with valkey_cluster(tmp_path_factory.mktemp("faults"), masters=3, replicas=1) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def infra_env(infra_env: dict[str, str], valkey_nodes: list[ValkeyServer]) -> dict[str, str]:
    """The suite's databases with Redis replaced by this module's cluster."""
    return infra_env | {"FM_REDIS_URL": valkey_nodes[0].url, "FM_REDIS_CLUSTER": "1"}


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return commerce_settings(infra_env).model_copy(update={"redis_timeout_s": TIMEOUT_S})


@pytest.fixture
def app(services: Services) -> Any:
    return commerce_app(services)


@pytest.fixture
def cluster(infra_env: dict[str, str]) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(infra_env["FM_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def http(io_loop: Any, http_server: Any) -> Iterator[AsyncHTTPClient]:
    """An HTTP client; asking for `http_server` serves node A at `base_url`."""
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


# --- helpers ------------------------------------------------------------------------------


def stream_tag(product_id: int) -> bytes:
    return b"{inventory:product:" + str(product_id).encode() + b"}"


def product_in_slot(catalog_dsn: str, slot: int) -> int:
    """A product (stock `DB_STOCK`) whose stream hashes to `slot` (its id chosen for it)."""
    product_id = next(n for n in range(10**6, 10**7) if key_slot(stream_tag(n)) == slot)
    with psycopg2.connect(catalog_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO products (id, name, price_cents) VALUES (%s, 'Hot Lamp', 1999)",
            (product_id,),
        )
        cur.execute(
            "INSERT INTO inventory (product_id, stock) VALUES (%s, %s)", (product_id, DB_STOCK)
        )
    conn.close()
    return product_id


def product_on(catalog_dsn: str, nodes: list[ValkeyServer], cluster: RedisCluster) -> int:
    """A product whose stream's master is not the clients' first node (`nodes[0]`)."""
    cluster.nodes_manager.initialize()
    for slot in range(0, 16384, 97):
        owner = cluster.nodes_manager.get_node_from_slot(slot)
        if owner.port != nodes[0].port:
            return product_in_slot(catalog_dsn, slot)
    raise AssertionError("every slot on nodes[0]?")


def lowest_slot(node: ValkeyServer) -> int:
    """The first slot `node` (a master) serves."""
    for line in str(node.command("CLUSTER", "NODES")).splitlines():
        parts = line.split()
        if "myself" in parts[2]:
            ranges = [item for item in parts[8:] if not item.startswith("[")]
            return min(int(item.partition("-")[0]) for item in ranges)
    raise AssertionError("no myself line")


def heal(nodes: list[ValkeyServer], victim: ValkeyServer) -> None:
    """Start a killed node again (it rejoins as a replica) and wait for a whole cluster."""
    if victim.is_running():
        return  # the test failed before killing it
    victim.start()
    wait_until(lambda: all(cluster_ok(node) for node in nodes), 60.0, "cluster_state ok")
    wait_until(lambda: replicating(victim), 60.0, "the old master to follow the new one")


async def get(http: AsyncHTTPClient, url: str) -> tuple[int, str]:
    response = await http.fetch(url, raise_error=False, request_timeout=30, connect_timeout=30)
    return response.code, response.body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample `name` with `labels` in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


@dataclass
class Watcher:
    """A subscriber of one product's stream, recording every stock message it gets."""

    client: CableClient
    ident: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @classmethod
    async def on(cls, cable_url: str, product_id: int) -> Watcher:
        client = await CableClient.connect(cable_url)
        ident = identifier("InventoryChannel", product_id=product_id)
        await client.subscribe(ident)
        watcher = cls(client, ident)
        first = await client.next_message(ident)
        assert first["stock"] == DB_STOCK
        watcher.messages.append(first)
        watcher.task = asyncio.get_running_loop().create_task(watcher._read())
        return watcher

    async def _read(self) -> None:
        while True:
            frame = await self.client.read(timeout=120)
            if frame is None:
                return
            message = frame.get("message")
            if (
                frame.get("identifier") == self.ident
                and isinstance(message, dict)
                and message.get("event") == "stock"
            ):
                self.messages.append(message)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.client.close()

    def has(self, seq: int, offset: int, epoch: str) -> bool:
        """Holds message `seq` (at `offset` of `epoch`), or a fresh state at or past it."""
        return any(
            m["stock"] == seq
            or (m["stock"] == DB_STOCK and m["epoch"] == epoch and m["offset"] >= offset)
            for m in self.messages
        )

    def check(self, acked: list[tuple[int, int, str]], *, may_resync: bool) -> None:
        """Every acknowledged (seq, offset, epoch) is held, or a fresh state came after it (in
        another epoch, or past its offset); what it holds is in publish order, never twice."""
        seqs = [m["stock"] for m in self.messages if m["stock"] != DB_STOCK]
        assert seqs == sorted(set(seqs)), f"out of order or twice: {seqs}"
        fresh = [m for m in self.messages[1:] if m["stock"] == DB_STOCK]
        if not may_resync:
            assert not fresh, fresh
        held = set(seqs)
        for seq, offset, epoch in acked:
            if seq in held:
                continue
            assert any(m["epoch"] != epoch or m["offset"] >= offset for m in fresh), (
                f"message {seq} (offset {offset}, epoch {epoch}) missing, no fresh state after "
                f"it; got {[(m['stock'], m['offset'], m['epoch']) for m in self.messages]}"
            )


@dataclass
class Publisher:
    """Publishes stock events `0, 1, 2, ...` on a product's stream every `period_s` through a
    node's cable, recording what was acknowledged and how long each publish took."""

    services: Services
    product_id: int
    period_s: float = 0.02
    retry: bool = False  # publish a refused message again (its seq) until acknowledged
    acked: list[tuple[int, int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        stream = f"inventory:product:{self.product_id}"
        seq = 0
        while True:
            started = time.monotonic()
            try:
                offset, epoch = await asyncio.wait_for(
                    self.services.cable.publish(stream, stock_event(self.product_id, seq)),
                    COMMAND_BOUND_S * 3,
                )
                self.acked.append((seq, offset, epoch))
                seq += 1
            except Exception as exc:
                self.failed.append((seq, repr(exc)))
                if not self.retry:
                    seq += 1
            self.durations.append(time.monotonic() - started)
            await asyncio.sleep(self.period_s)

    async def until_acked(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait for `count` more acknowledged publishes."""
        target = len(self.acked) + count
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"publishes stalled: {self.failed[-3:]}"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def delivered(
    watchers: list[Watcher], acked: tuple[int, int, str], timeout_s: float = 20.0
) -> None:
    """Every watcher holds the acknowledged message `acked` (seq, offset, epoch), or was given
    a fresh state at or past it (a node that resyncs after the last publish sends the state
    at its offset instead)."""
    deadline = time.monotonic() + timeout_s
    while not all(w.has(*acked) for w in watchers):
        assert time.monotonic() < deadline, (
            f"message {acked} never reached every subscriber; last held: "
            + "; ".join(
                f"#{i}: {[(m['stock'], m['offset'], m['epoch']) for m in w.messages[-6:]]}"
                for i, w in enumerate(watchers)
            )
        )
        await asyncio.sleep(0.05)


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=180)
async def test_a_reshard_of_a_hot_streams_slot_loses_no_message(
    services: Services,
    settings: Settings,
    http_port: int,
    http_server: Any,
    infra_env: dict[str, str],
    valkey_nodes: list[ValkeyServer],
    cluster: RedisCluster,
) -> None:
    """`valkey-cli --cluster reshard` moves the stream's slot (and its offset, history and
    epoch keys) to another master while messages flow every 20 ms: subscribers on two nodes
    get every message, in order, in one epoch (the sharded subscriptions follow the slot)."""
    source = next(node for node in masters(valkey_nodes) if node is not valkey_nodes[0])
    target = next(node for node in masters(valkey_nodes) if node not in (source,))
    slot = lowest_slot(source)  # what `reshard --cluster-slots 1` moves
    product_id = product_in_slot(infra_env["FM_CATALOG_DSN"], slot)
    node_b = await start_node(settings)
    publisher = Publisher(services, product_id, retry=True)
    watchers: list[Watcher] = []
    try:
        watchers = [
            await Watcher.on(f"ws://127.0.0.1:{http_port}/cable", product_id),
            await Watcher.on(node_b.url("/cable"), product_id),
        ]
        publisher.start()
        await publisher.until_acked(25)
        output = await asyncio.to_thread(reshard, valkey_nodes[0], source, target, 1)
        assert master_of(valkey_nodes, cluster, stream_tag(product_id)) is target, output
        await publisher.until_acked(25)
        await publisher.stop()
        await delivered(watchers, publisher.acked[-1])
        for watcher in watchers:
            watcher.check(publisher.acked, may_resync=False)
        assert len({epoch for _, _, epoch in publisher.acked}) == 1
        offsets = [offset for _, offset, _ in publisher.acked]
        assert offsets == sorted(offsets)
        assert max(publisher.durations) < COMMAND_BOUND_S, max(publisher.durations)
        # Node B's sharded subscription followed the slot to its new master.
        assert node_b.services.cable.broker.reconnects >= 1
        # Its cluster probe saw the slot move (not a failover), and it never lost writes.
        health = node_b.services.cluster_health
        assert health is not None
        await health.probe()
        assert health.slots_moved >= 1 and health.failovers == {"planned": 0, "unplanned": 0}
        assert node_b.services.cable.epochs_rotated == 0
    finally:
        await publisher.stop()
        for watcher in watchers:
            await watcher.stop()
        await node_b.stop()


@pytest.mark.gen_test(timeout=240)
async def test_a_master_killed_during_a_broadcast(
    services: Services,
    settings: Settings,
    http_port: int,
    http: AsyncHTTPClient,
    infra_env: dict[str, str],
    valkey_nodes: list[ValkeyServer],
    cluster: RedisCluster,
) -> None:
    """SIGKILL the stream's master while it streams to subscribers on two nodes, its replica
    paused just before so the last acknowledged messages are lost with the master: each
    subscriber holds every acknowledged message or got an epoch change and a fresh state;
    publishes fail fast while the slot has no master; `/readyz` says which slots and recovers;
    `/metrics` counts an unplanned failover and the resubscriptions; a session revoked in the
    lost writes stays revoked."""
    product_id = product_on(infra_env["FM_CATALOG_DSN"], valkey_nodes, cluster)
    victim = master_of(valkey_nodes, cluster, stream_tag(product_id))
    replica = replica_of(valkey_nodes, victim)
    node_b = await start_node(settings)
    readyz, metrics = (
        f"http://127.0.0.1:{node_b.port}/readyz",
        f"http://127.0.0.1:{node_b.port}/metrics",
    )
    publisher = Publisher(services, product_id)
    watchers: list[Watcher] = []
    try:
        assert (await get(http, readyz))[0] == 200
        text = (await get(http, metrics))[1]
        assert metric(text, "fm_redis_cluster_unreachable_slots") == 0
        failovers_before = metric(text, "fm_redis_cluster_failovers_total", kind="unplanned")
        watchers = [
            await Watcher.on(f"ws://127.0.0.1:{http_port}/cable", product_id),
            await Watcher.on(node_b.url("/cable"), product_id),
        ]
        # A cache entry on the same master, cached before and bumped after the replica stops.
        cached = next(
            str(n)
            for n in range(1, 10_000)
            if cluster.get_node_from_key(cache_keys.prefix(NS_PRODUCT, str(n))).port == victim.port
        )
        loads = CountingLoader(cached)
        assert (await services.cache.get_or_load(NS_PRODUCT, cached, loads, 300))["n"] == 1
        # A stream on the same master that no node follows, published to before and after the
        # replica stops: a client holding its old position must not be replayed the offsets
        # the promoted master hands out again.
        quiet = next(
            f"inventory:product:{n}"
            for n in range(1, 10_000)
            if cluster.get_node_from_key(stream_tag(n)).port == victim.port and n != product_id
        )
        broker = services.cable.broker
        await broker.publish(quiet, stock_event(0, 1))
        quiet_epoch = (await broker.position(quiet))[1]
        # A session whose copy lives on the same master, revoked after the replica stops: the
        # tombstone is lost with the master, and the promoted one holds the copy it replaced.
        token = ""
        while not token or (
            cluster.get_node_from_key(f"{{session:{token_digest(token)}}}").port != victim.port
        ):
            token = await services.sessions.create(user_id=7)
        signed_in_at = time.monotonic()
        publisher.start()
        await publisher.until_acked(20)
        # The replica stops taking the master's writes; the master acknowledges a few more
        # (subscribers get them) and dies: the promoted replica lacks them, and would hand
        # their offsets out again.
        await asyncio.to_thread(pause, replica)
        try:
            # ... and its link is cut (else what sits in its socket buffer would still reach
            # it): from now on the master's writes exist on the master alone.
            victim.command("CLIENT", "KILL", "TYPE", "replica")
            await services.cache.bump(NS_PRODUCT, cached)
            await broker.publish(quiet, stock_event(0, 2))
            await services.sessions.revoke(token)
            assert await services.sessions.resolve(token) is None
            await publisher.until_acked(10)
            lost = publisher.acked[-10:]
            await asyncio.to_thread(sigkill, victim)
        finally:
            await asyncio.to_thread(pause, replica, False)
        # Until the replica takes over, node B is not ready, and says which slots are gone.
        deadline = time.monotonic() + 20
        while True:
            status, body = await get(http, readyz)
            if status == 503:
                break
            assert time.monotonic() < deadline, "readyz never noticed the dead master"
            await asyncio.sleep(0.1)
        assert "slots unreachable" in body and f"127.0.0.1:{victim.port}" in body, body
        assert metric((await get(http, metrics))[1], "fm_redis_cluster_unreachable_slots") > 0
        await asyncio.to_thread(wait_until, lambda: promoted(replica), 60.0, "a promotion")
        deadline = time.monotonic() + 30
        while (await get(http, readyz))[0] != 200:
            assert time.monotonic() < deadline, "readyz never recovered"
            await asyncio.sleep(0.2)
        await publisher.until_acked(20)
        await publisher.stop()
        await delivered(watchers, publisher.acked[-1])
        # The stream nobody follows got a new epoch too, once however many nodes noticed.
        deadline = time.monotonic() + 20
        while (await broker.position(quiet))[1] == quiet_epoch:
            assert time.monotonic() < deadline, "the unfollowed stream kept its epoch"
            await asyncio.sleep(0.1)
        rotated = (await broker.position(quiet))[1]
        await asyncio.sleep(2 * TIMEOUT_S)
        assert (await broker.position(quiet))[1] == rotated
        # The lost revocation does not come back: the copy it had replaced was dropped after
        # the failover, well before its TTL would have ended it.
        deadline = time.monotonic() + 10
        while await services.sessions.resolve(token) is not None:
            assert time.monotonic() < deadline, "a revoked session came back after the failover"
            await asyncio.sleep(0.1)
        assert time.monotonic() - signed_in_at < COPY_TTL_S - 5
        # The writes were lost indeed: the promoted master had handed their offsets out again.
        reused = {offset for _, offset, _ in lost} & {
            offset for _, offset, epoch in publisher.acked if epoch != lost[0][2]
        }
        assert reused, (lost, publisher.acked[-3:])
        # The lost writes were noticed: the stream went on in a new epoch ...
        epochs = [epoch for _, _, epoch in publisher.acked]
        assert epochs[-1] != lost[0][2], (lost, publisher.acked[-3:])
        for watcher in watchers:
            watcher.check(publisher.acked, may_resync=True)
            # ... and every subscriber got a fresh state in it.
            assert any(
                m["stock"] == DB_STOCK and m["epoch"] == epochs[-1] for m in watcher.messages
            ), watcher.messages[-5:]
        # The cache bump was lost with the master, but no node serves the old value again: a
        # miss (node A's probe bumped the buckets of the promoted slots).
        health_a = services.cluster_health
        assert health_a is not None and health_a.failovers["unplanned"] >= 1
        services.cache.invalidate_all_local()
        assert (await services.cache.get_or_load(NS_PRODUCT, cached, loads, 300))["n"] == 2
        # No publish waited past the bound, however its master fared.
        assert max(publisher.durations) < COMMAND_BOUND_S, sorted(publisher.durations)[-5:]
        text = (await get(http, metrics))[1]
        assert metric(text, "fm_redis_cluster_unreachable_slots") == 0
        assert metric(text, "fm_redis_cluster_failovers_total", kind="unplanned") > (
            failovers_before
        )
        assert metric(text, "fm_redis_resubscriptions_total", subscription="broker") >= 1
    finally:
        await publisher.stop()
        for watcher in watchers:
            await watcher.stop()
        await node_b.stop()
        await asyncio.to_thread(heal, valkey_nodes, victim)


@pytest.mark.gen_test(timeout=240)
async def test_a_master_killed_during_rate_limited_traffic(
    settings: Settings,
    http: AsyncHTTPClient,
    infra_env: dict[str, str],
    valkey_nodes: list[ValkeyServer],
    cluster: RedisCluster,
    tmp_path: Path,
) -> None:
    """SIGKILL the master of the per-IP bucket while two nodes serve a steady stream of
    requests from one address: every request is answered in bounded time (503 while the
    bucket's slot has no master), and after the failover the limit holds again; the bucket
    may have reset (one burst more), never more."""
    rate, burst = 4.0, 8
    bucket = b"{rl:ip:ip:127.0.0.1}"
    victim = master_of(valkey_nodes, cluster, bucket)
    replica = replica_of(valkey_nodes, victim)
    seed = next(node for node in masters(valkey_nodes) if node is not victim)
    limited = settings.model_copy(
        update={
            "ratelimit_ip_per_second": rate,
            "ratelimit_ip_burst": burst,
            "redis_url": seed.url,
        }
    )
    nodes = [await start_node(limited, "node-b"), await start_node(limited, "node-c")]
    answers: list[tuple[float, int, float]] = []  # (sent at, status, seconds)
    started = time.monotonic()

    async def traffic(until: float) -> None:
        n = 0
        while time.monotonic() < until:
            node = nodes[n % 2]
            n += 1
            sent = time.monotonic()
            status, _ = await get(http, f"http://127.0.0.1:{node.port}/api/v1/products?first=1")
            answers.append((sent - started, status, time.monotonic() - sent))
            await asyncio.sleep(0.05)

    try:
        await traffic(time.monotonic() + 3)
        killed_at = time.monotonic() - started
        await asyncio.to_thread(sigkill, victim)
        await asyncio.to_thread(wait_until, lambda: promoted(replica), 60.0, "a promotion")
        promoted_at = time.monotonic() - started
        await traffic(time.monotonic() + 5)
        statuses = {status for _, status, _ in answers}
        assert statuses <= {200, 429, 503}, answers
        assert max(seconds for _, _, seconds in answers) < COMMAND_BOUND_S, answers
        before = [status for at, status, _ in answers if at < killed_at]
        after = [status for at, status, _ in answers if at > promoted_at + 1]
        assert 429 in before and 429 in after, answers  # limited before and after
        assert 200 in after
        allowed = sum(1 for _, status, _ in answers if status == 200)
        span = answers[-1][0]
        assert allowed <= 2 * burst + rate * span + 2, (allowed, span, answers)
    finally:
        for node in nodes:
            await node.stop()
        await asyncio.to_thread(heal, valkey_nodes, victim)
