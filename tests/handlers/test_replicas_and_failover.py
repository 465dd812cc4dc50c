"""Replicas and failover end to end: one real node answering the REST API over a catalog and four
user shards that each run as a streaming primary + hot standby (`infra.up(replicas=True)`).

What `tests/adapters/test_router.py` shows for the router alone, shown here through HTTP:

* a paused replica (lagging): a user reads their own cart change from the primary, while
  another user's read is served by the replica;
* stopped replicas: reads keep answering 200 from the primaries;
* a shard's primary stopped and its standby promoted: the shard's writes resume on the same
  node, users of the other shards see no failure, and every acknowledged order survives.

The topology is started once for the module (ten PostgreSQL servers and a Valkey of its own,
apart from the session's shared servers) and stopped at the end. Each test uses its own shard
and restores what it changed, except the failover test, which is last: it leaves shard 3's
standby promoted and its old primary stopped. Which server answered a read is told by the
node's router counters (`RouterCounters`), per database.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from tornado.web import Application

from server.adapters.db.pools import Database
from server.adapters.db.router import RouterCounters, ShardRouter
from server.wiring.infra import PostgresServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers import commerce
from tests.helpers.accounts import token_for
from tests.helpers.commerce import accounting, call, commerce_app, commerce_settings, ok
from tests.helpers.replicas import Topology, blocking, replicated_topology, wait_caught_up

pytestmark = pytest.mark.slow

SHARDS = 4
GROUPS = ("catalog", *(f"shard{i}" for i in range(SHARDS)))
PASSWORD = "correct horse battery"
# After a promotion, the shard's writes must succeed again within this many seconds (the
# router re-locates the primary at most every `primary_retry_backoff_s` = 0.5 s; the rest is
# margin for a loaded machine).
RESUME_BOUND_S = 10.0

client = commerce.client  # an HTTP client that allows many requests at once


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Replicated catalog + 4 shards (+ Valkey), migrated and caught up; always stopped."""
    with replicated_topology(tmp_path_factory.mktemp("failover")) as topology:
        yield topology


@pytest.fixture
def settings(topology: Topology) -> Settings:
    """The node's settings: the replicated topology, rate limits out of the way."""
    return commerce_settings(topology.env)


@pytest.fixture
def app(services: Services) -> Application:
    return commerce_app(services)


# --- helpers -----------------------------------------------------------------------------------

_emails = itertools.count()


async def sign_up(client: Any, base_url: str) -> tuple[int, str]:
    """A new account through `POST /api/v1/users`: (user id, bearer token)."""
    email = f"buyer{next(_emails)}-{uuid.uuid4().hex[:8]}@example.com"
    body = {"email": email, "password": PASSWORD, "name": "Buyer"}
    answer = ok(await call(client, base_url + "/api/v1/users", "POST", body), 201)
    return int(answer["user"]["id"]), str(answer["token"])


async def sign_up_on(client: Any, base_url: str, wanted: dict[int, int]) -> dict[int, list[Any]]:
    """Sign up accounts until shard `s` has `wanted[s]` of them; {shard: [(id, token)]}.

    Ids come from one sequence and users live on shard `id % 4`, so a few sign-ups suffice.
    """
    found: dict[int, list[Any]] = {shard: [] for shard in wanted}
    while any(len(found[s]) < n for s, n in wanted.items()):
        missing = sum(max(0, n - len(found[s])) for s, n in wanted.items())
        for user_id, token in await asyncio.gather(
            *(sign_up(client, base_url) for _ in range(missing))
        ):
            shard = user_id % SHARDS
            if shard in found and len(found[shard]) < wanted[shard]:
                found[shard].append((user_id, token))
    return found


async def new_product(
    client: Any, base_url: str, services: Services, topology: Topology, stock: int
) -> int:
    """A product created by an admin through `POST /api/v1/products`, once the catalog's
    standby has it (carts read prices from the catalog replica)."""
    admin = await token_for(services, f"admin-{uuid.uuid4().hex[:8]}@example.com", admin=True)
    body = {"name": "Brass Lamp", "price_cents": 1999, "stock": stock}
    product = ok(await call(client, base_url + "/api/v1/products", "POST", body, admin), 201)
    await blocking(wait_caught_up, *topology.servers("catalog"))
    return int(product["id"])


async def add_to_cart(
    client: Any, base_url: str, token: str, product_id: int, quantity: int = 1
) -> Any:
    body = {"product_id": product_id, "quantity": quantity}
    return await call(client, base_url + "/api/v1/cart/items", "POST", body, token)


async def checkout(client: Any, base_url: str, token: str) -> Any:
    key = uuid.uuid4().hex
    return await call(
        client, base_url + "/api/v1/checkout", "POST", token=token, **{"Idempotency-Key": key}
    )


async def all_order_ids(client: Any, base_url: str, token: str) -> set[int]:
    """Every order of the caller, through the paginated `GET /api/v1/orders`."""
    ids: set[int] = set()
    url = base_url + "/api/v1/orders?first=100"
    while True:
        page = ok(await call(client, url, token=token))
        ids.update(int(order["id"]) for order in page["items"])
        if page["next_cursor"] is None:
            return ids
        url = f"{base_url}/api/v1/orders?first=100&after={page['next_cursor']}"


def snapshot(services: Services, database: str) -> RouterCounters:
    """A copy of the router's counters for `database` ("catalog", "shard_1", ...)."""
    copy = RouterCounters()
    copy.add(services.router.counters[database])
    return copy


def delta(services: Services, database: str, before: RouterCounters) -> dict[str, int]:
    """How much each counter of `database` grew since `before`."""
    now = services.router.counters[database].as_dict()
    return {name: now[name] - value for name, value in before.as_dict().items()}


async def pause_replay(topology: Topology, shard: int) -> PostgresServer:
    """Stop shard `shard`'s standby applying WAL once it has caught up (it keeps receiving
    WAL); returns the standby."""
    primary, replica = topology.servers(f"shard{shard}")
    await blocking(wait_caught_up, primary, replica)
    await blocking(replica.psql, "SELECT pg_wal_replay_pause()")
    for _ in range(100):
        if await blocking(replica.psql, "SELECT pg_get_wal_replay_pause_state()") == "paused":
            return replica
        await asyncio.sleep(0.02)
    raise AssertionError("replay did not pause")


def shard_query(topology: Topology, shard: int, sql: str, replica: bool) -> list[Any]:
    """Rows of `sql` run straight on shard `shard`'s primary or standby (autocommit)."""
    primary, standby = topology.servers(f"shard{shard}")
    server = standby if replica else primary
    conn = psycopg2.connect(server.dsn(f"fm_shard_{shard}"), connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


# --- replica lag ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_product_created_moments_ago_can_be_carted_while_the_catalog_replica_lags(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    # Invariant: a shopper never gets 404 for a product that exists on the catalog primary.
    primary, replica = topology.servers("catalog")
    await blocking(wait_caught_up, primary, replica)
    await blocking(replica.psql, "SELECT pg_wal_replay_pause()")
    try:
        admin = await token_for(services, f"admin-{uuid.uuid4().hex[:8]}@example.com", admin=True)
        body = {"name": "Fresh Lamp", "price_cents": 2599, "stock": 3}
        product = ok(await call(client, base_url + "/api/v1/products", "POST", body, admin), 201)
        _user_id, token = await sign_up(client, base_url)
        cart = ok(await add_to_cart(client, base_url, token, int(product["id"])))
        assert [(i["product_id"], i["unit_price_cents"]) for i in cart["items"]] == [
            (product["id"], 2599)
        ]
    finally:
        await blocking(replica.psql, "SELECT pg_wal_replay_resume()")
    await blocking(wait_caught_up, primary, replica)


@pytest.mark.gen_test(timeout=60)
async def test_writer_reads_own_cart_from_primary_while_others_read_the_lagging_replica(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    """Invariant: while a shard's standby replays nothing, a user who just changed their cart
    gets that change back from `GET /api/v1/cart` (read from the primary, never the stale
    standby); another user of the shard, who wrote nothing lately, is served by the standby."""
    shard, database = 1, "shard_1"
    users = await sign_up_on(client, base_url, {shard: 2})
    (writer, writer_token), (_, other_token) = users[shard]
    product_id = await new_product(client, base_url, services, topology, stock=50)
    # Both sign-ups were writes: let their read-your-writes window pass, so that only the
    # writer's coming cart change keeps the writer on the primary.
    await asyncio.sleep(services.router.read_your_writes_s + 0.1)
    # A fresh write just before the pause keeps the standby's measured lag (time since its
    # last replayed commit) far below the router's bound while it is paused.
    ok(await add_to_cart(client, base_url, writer_token, product_id))
    replica = await pause_replay(topology, shard)
    try:
        changed = ok(await add_to_cart(client, base_url, writer_token, product_id, quantity=2))
        assert changed["version"] == 2 and changed["items"][0]["quantity"] == 3
        version_sql = f"SELECT version FROM carts WHERE user_id = {writer}"
        stale = await blocking(shard_query, topology, shard, version_sql, True)
        assert stale == [(1,)]  # the standby has not applied the change

        before = snapshot(services, database)
        seen = ok(await call(client, base_url + "/api/v1/cart", token=other_token))
        assert seen == {"items": [], "total_cents": 0, "version": 0, "warnings": []}
        other_read = delta(services, database, before)
        assert other_read["replica_reads"] >= 1 and other_read["primary_reads"] == 0, other_read

        before = snapshot(services, database)
        own = ok(await call(client, base_url + "/api/v1/cart", token=writer_token))
        assert own == changed  # the writer's own change, which the standby lacks
        own_read = delta(services, database, before)
        assert own_read["replica_reads"] == 0, own_read
        assert own_read["primary_reads"] >= 1 and own_read["read_your_writes"] >= 1, own_read
    finally:
        await blocking(replica.psql, "SELECT pg_wal_replay_resume()")
    await blocking(wait_caught_up, *topology.servers(f"shard{shard}"))
    assert await blocking(shard_query, topology, shard, version_sql, True) == [(2,)]


# --- replicas stopped --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_reads_answer_from_primaries_while_replicas_are_stopped(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    """Invariant: with a shard's standby and the catalog's standby stopped, every read
    (cart, orders, product, sign-in) answers 200 with the right data, served by a primary;
    once the standbys are back, the shard's reads return to its standby."""
    shard, database = 2, "shard_2"
    ((user_id, token),) = (await sign_up_on(client, base_url, {shard: 1}))[shard]
    product_id = await new_product(client, base_url, services, topology, stock=50)
    ok(await add_to_cart(client, base_url, token, product_id, quantity=2))
    order = ok(await checkout(client, base_url, token), 201)["order"]
    ok(await add_to_cart(client, base_url, token, product_id))
    cart = ok(await call(client, base_url + "/api/v1/cart", token=token))
    email = ok(await call(client, base_url + "/api/v1/me", token=token))["email"]

    _, shard_replica = topology.servers(f"shard{shard}")
    _, catalog_replica = topology.servers("catalog")
    shard_before, catalog_before = snapshot(services, database), snapshot(services, "catalog")
    await blocking(shard_replica.stop)
    await blocking(catalog_replica.stop)
    try:
        # Read for longer than the user's read-your-writes window (which sends their reads to
        # the primary anyway), so that later reads do try the stopped standby.
        deadline = time.monotonic() + services.router.read_your_writes_s + 1.0
        shard_gets = 0
        while time.monotonic() < deadline:
            assert ok(await call(client, base_url + "/api/v1/cart", token=token)) == cart
            orders = ok(await call(client, base_url + "/api/v1/orders", token=token))
            assert [o["id"] for o in orders["items"]] == [order["id"]]
            product = ok(await call(client, f"{base_url}/api/v1/products/{product_id}"))
            assert product["stock"] == 48
            shard_gets += 2  # the cart and the orders (the product is the catalog's)
            await asyncio.sleep(0.1)
        signed_in = await call(
            client, base_url + "/api/v1/sessions", "POST", {"email": email, "password": PASSWORD}
        )
        assert ok(signed_in)["user"]["id"] == str(user_id)
        shard_reads = delta(services, database, shard_before)
        assert shard_reads["replica_reads"] == 0, shard_reads
        assert shard_reads["primary_reads"] >= shard_gets, shard_reads
        assert shard_reads["replica_fallbacks"] >= 1, shard_reads
        catalog_reads = delta(services, "catalog", catalog_before)
        assert catalog_reads["replica_reads"] == 0, catalog_reads
        assert catalog_reads["replica_fallbacks"] >= 1, catalog_reads  # sign-in's lookup
    finally:
        await blocking(shard_replica.start)
        await blocking(catalog_replica.start)
    for group in ("catalog", f"shard{shard}"):
        await blocking(wait_caught_up, *topology.servers(group))
    # Back: after the router's replica backoff, the shard's reads use its standby again.
    deadline = time.monotonic() + services.router.replica_backoff_s + 5.0
    while True:
        before = snapshot(services, database)
        assert ok(await call(client, base_url + "/api/v1/cart", token=token)) == cart
        if delta(services, database, before)["replica_reads"] == 1:
            break
        assert time.monotonic() < deadline, "reads never returned to the restarted standby"
        await asyncio.sleep(0.2)


# --- multi-host replica DSNs --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_replica_dsn_listing_both_servers_reads_from_whichever_is_the_standby(
    topology: Topology,
) -> None:
    """`infra up` lists the standby first (`prefer-standby`); here shard 2's replica DSN names
    the primary first, and reads still land on the standby: the router follows libpq's
    choice, not the first host."""
    shard = 2
    primary, standby = topology.servers(f"shard{shard}")
    shards = json.loads(topology.env["FM_SHARDS"])
    shards[shard]["replica"] = (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
        f"/fm_shard_{shard}?target_session_attrs=prefer-standby"
    )
    settings = commerce_settings({**topology.env, "FM_SHARDS": json.dumps(shards)})
    db = await Database.open(settings)
    router = ShardRouter.for_settings(db, settings)
    try:
        async with router.read(shard) as cur:  # user id 2 lives on shard 2 and never wrote
            await cur.execute("SELECT pg_is_in_recovery(), inet_server_port()")
            assert await cur.fetchone() == (True, standby.port)
            assert cur.on_replica
        assert router.counters[f"shard_{shard}"].replica_relocations == 1
    finally:
        await router.close()
        await db.close()


# --- failover (last: it leaves shard 3's standby promoted) --------------------------------------


@dataclass
class Shopper:
    """One user buying in a loop (add one unit, check out, read their orders back)."""

    user_id: int
    token: str
    acknowledged: list[int] = field(default_factory=list)  # ids of orders answered 201
    # (start, end, status, problem type or "") of each request; times in monotonic seconds
    requests: list[tuple[float, float, int, str]] = field(default_factory=list)

    def ordered_since(self, after: float) -> bool:
        """Whether a checkout begun at or after `after` got a 201."""
        return any(start >= after and code == 201 for start, _, code, _ in self.requests)

    def failures(self) -> list[tuple[float, float, int, str]]:
        return [r for r in self.requests if not 200 <= r[2] < 300]

    async def shop(self, client: Any, base_url: str, product_id: int, stop: asyncio.Event) -> None:
        need_item = True
        while not stop.is_set():
            if need_item:
                added = await self._timed(add_to_cart(client, base_url, self.token, product_id))
                need_item = added.code != 200
            if not need_item:
                answer = await self._timed(checkout(client, base_url, self.token))
                if answer.code == 201:
                    order_id = int(json.loads(answer.body)["order"]["id"])
                    self.acknowledged.append(order_id)
                    need_item = True
                    newest = await self._timed(
                        call(client, base_url + "/api/v1/orders?first=1", token=self.token)
                    )
                    if newest.code == 200:  # read-your-writes: the new order is listed
                        assert json.loads(newest.body)["items"][0]["id"] == str(order_id)
                elif answer.code == 422:  # cart-empty: an unanswered checkout went through
                    need_item = True
            await asyncio.sleep(0.05)

    async def _timed(self, request: Any) -> Any:
        started = time.monotonic()
        answer = await request
        kind = ""
        if not 200 <= answer.code < 300:
            assert answer.headers["Content-Type"] == "application/problem+json", answer.body
            kind = json.loads(answer.body)["type"]
        self.requests.append((started, time.monotonic(), answer.code, kind))
        return answer


@pytest.mark.gen_test(timeout=90)
async def test_shard_writes_resume_after_promotion_others_unaffected_no_order_lost(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    """Invariants, with users of every shard buying throughout: after shard 3's primary stops
    and its standby is promoted, shard 3's checkouts succeed again on the same node within
    RESUME_BOUND_S; the users of shards 0-2 get only 2xx answers the whole time, also during
    the outage; shard 3's users get 503 problems (never another error) until the promotion;
    every order answered 201 is listed by `GET /api/v1/orders` afterwards; and no unit of
    stock is lost (stock left + held + ordered = initial stock)."""
    shard, database = 3, "shard_3"
    initial_stock = 100_000
    users = await sign_up_on(client, base_url, {0: 1, 1: 1, 2: 1, shard: 2})
    bystanders = [Shopper(*users[s][0]) for s in (0, 1, 2)]
    victims = [Shopper(*user) for user in users[shard]]
    product_id = await new_product(client, base_url, services, topology, stock=initial_stock)
    primary, standby = topology.servers(f"shard{shard}")
    relocations_before = services.router.counters[database].primary_relocations

    stop = asyncio.Event()
    shoppers = bystanders + victims
    tasks = [asyncio.ensure_future(s.shop(client, base_url, product_id, stop)) for s in shoppers]

    async def each_ordered(group: list[Shopper], after: float, timeout: float) -> None:
        """Wait until every shopper of `group` got a 201 for a checkout begun after `after`."""
        deadline = time.monotonic() + timeout
        while not all(s.ordered_since(after) for s in group):
            assert time.monotonic() < deadline, "no order within the bound"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks]
            await asyncio.sleep(0.02)

    try:
        await each_ordered(shoppers, 0.0, 15.0)  # everyone bought before the failure
        stopping = time.monotonic()
        await blocking(primary.stop)
        stopped = time.monotonic()
        await asyncio.sleep(1.0)  # the outage: nothing accepts shard 3's writes
        await blocking(standby.promote)
        promoted = time.monotonic()
        await each_ordered(victims, promoted, RESUME_BOUND_S)
        resumed = time.monotonic()
        await each_ordered(bystanders, resumed, 15.0)  # and the others still buy
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    # Shard 3's writes resumed in the same node, which now writes to the promoted server.
    first_ok = min(
        end
        for s in victims
        for start, end, code, _ in s.requests
        if start >= promoted and code == 201
    )
    assert first_ok - promoted < RESUME_BOUND_S
    assert services.router.counters[database].primary_relocations > relocations_before
    assert not await blocking(standby.is_in_recovery)
    # During the outage shard 3's writes failed, as 503 problems only (a 422 `cart-empty` may
    # follow a checkout whose order was written but whose answer was lost).
    outage = [r for s in victims for r in s.requests if stopped <= r[0] < promoted]
    assert outage and any(code == 503 for _, _, code, _ in outage)
    failures = {(code, kind) for s in victims for _, _, code, kind in s.failures()}
    assert failures <= {
        (503, "/problems/temporarily-unavailable"),
        (422, "/problems/cart-empty"),
    }, failures
    # The other shards never noticed: no failure at all, and requests kept completing while
    # shard 3 had no primary (none of them waited for the outage to end).
    for s in bystanders:
        assert s.failures() == [], s.failures()
        during = [r for r in s.requests if stopped <= r[0] and r[1] <= promoted]
        assert during, f"user {s.user_id} completed no request during the outage"
    # No acknowledged order is lost, on any shard.
    for s in shoppers:
        listed = await all_order_ids(client, base_url, s.token)
        assert set(s.acknowledged) <= listed, set(s.acknowledged) - listed
    stock, held, ordered = accounting(topology.env, product_id)
    assert stock + held + ordered == initial_stock, (stock, held, ordered)
    assert ordered >= sum(len(s.acknowledged) for s in shoppers)
    print(  # the measured figures (pytest -s), for the record
        f"resume {first_ok - promoted:.2f}s after promote; outage "
        f"{promoted - stopping:.2f}s; orders {[len(s.acknowledged) for s in shoppers]}; "
        f"bystander max latency {max(e - b for s in bystanders for b, e, _, _ in s.requests):.2f}s"
    )
