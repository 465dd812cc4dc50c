"""PostgreSQL primaries SIGKILLed (every process of them) and restarted under traffic, without
a failover (no Patroni: a standby stays a standby), in a replicated topology of the test's own
(a server per database, each with a streaming standby): first a shard's primary while
checkouts are mid-saga, then the catalog's.

Checkouts of buyers on that shard are held between their stock reservation and their order
(the saga's `after_reserve` hook) when the primary dies; answered once it is dead, they fail
fast with 503 and `Retry-After`. The shard's reads (a cart) are served by its standby, buyers
on the other shards keep checking out, and product reads keep answering. After the restart
every buyer retries with the key of their first attempt: a checkout acknowledged before the
kill answers its first order again, the others complete (after the sweeper has repaired what
the kill left), each buyer has exactly one order, and the stock adds up.

The shard runs with `synchronous_commit = on` here, as a production server does (the
embedded servers turn it off for speed, which lets a crash lose commits acknowledged in the
last fraction of a second: no database promises to keep those).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import psutil
import psycopg2
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from server.wiring.infra import PostgresServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers import commerce
from tests.helpers.accounts import token_for
from tests.helpers.catalog import add_product
from tests.helpers.commerce import accounting, buyer_with_cart, commerce_settings
from tests.helpers.replicas import Topology, blocking, replicated_topology, wait_caught_up

SHARDS = 4
VICTIM = 1  # the shard whose primary is killed
ACKNOWLEDGED_FIRST = 4  # victim-shard checkouts completed before the kill
HELD_AT_KILL = 4  # victim-shard checkouts held after their reservation when it dies
BYSTANDERS = 4  # buyers on other shards, checking out during the outage
STOCK = 100
FAIL_FAST_S = 5.0  # a request to the dead shard must be answered within this
RECOVER_S = 30.0

app = commerce.app
client = commerce.client


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Catalog + 4 shards, each with a standby, + Valkey of this module's own, migrated."""
    with replicated_topology(tmp_path_factory.mktemp("shard-kill")) as topology:
        yield topology


@pytest.fixture
def settings(topology: Topology) -> Settings:
    """Rate limits out of the way; a short sweeper bound, so the repair happens in the test."""
    return commerce_settings(topology.env).model_copy(
        update={"checkout_stale_after_s": 1.0, "checkout_sweep_period_s": 0.3}
    )


def kill_hard(server: PostgresServer) -> None:
    """SIGKILL the postmaster and every backend of `server`, as a machine crash would."""
    pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    postmaster = psutil.Process(pid)
    processes = [postmaster, *postmaster.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=10)
    assert not server.is_ready()


def orders_of(env: dict[str, str], user_id: int) -> list[tuple[str, str]]:
    """(order id, idempotency key) of every order the buyer's shard holds."""
    shards = json.loads(env["FM_SHARDS"])
    conn = psycopg2.connect(shards[user_id % len(shards)]["primary"], connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, idempotency_key FROM orders WHERE user_id = %s", (user_id,))
            return [(str(row[0]), str(row[1])) for row in cur.fetchall()]
    finally:
        conn.close()


async def checkout(http: AsyncHTTPClient, base_url: str, token: str, key: str) -> Any:
    """(status, body, headers, seconds taken) of one checkout."""
    began = time.monotonic()
    response = await http.fetch(
        base_url + "/api/v1/checkout",
        method="POST",
        body=b"",
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key},
        raise_error=False,
        request_timeout=30,
    )
    body = json.loads(response.body) if response.body else None
    return response.code, body, response.headers, time.monotonic() - began


async def buyers_by_shard(services: Services, product_id: int, count: int) -> dict[int, list[Any]]:
    """Buyers (user id, token) with one unit in the cart, grouped by shard, until the victim
    shard has `ACKNOWLEDGED_FIRST + HELD_AT_KILL` and the others `BYSTANDERS` in all."""
    found: dict[int, list[Any]] = {shard: [] for shard in range(SHARDS)}
    for n in range(count):
        user_id, token = await buyer_with_cart(services, f"b{n}@example.com", product_id)
        found[user_id % SHARDS].append((user_id, token))
        others = sum(len(v) for k, v in found.items() if k != VICTIM)
        if len(found[VICTIM]) >= ACKNOWLEDGED_FIRST + HELD_AT_KILL and others >= BYSTANDERS:
            break
    return found


@pytest.mark.gen_test(timeout=180)
async def test_a_killed_shard_primary_fails_fast_loses_no_acknowledged_order_and_recovers(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    env = topology.env
    victim, _ = topology.servers(f"shard{VICTIM}")
    await blocking(victim.psql, "ALTER SYSTEM SET synchronous_commit = on")
    await blocking(victim.psql, "SELECT pg_reload_conf()")
    product_id = add_product(env["FM_CATALOG_DSN"], stock=STOCK)
    groups = await buyers_by_shard(services, product_id, 200)
    on_victim = groups[VICTIM][: ACKNOWLEDGED_FIRST + HELD_AT_KILL]
    bystanders = [b for shard, bs in groups.items() if shard != VICTIM for b in bs][:BYSTANDERS]
    first, held = on_victim[:ACKNOWLEDGED_FIRST], on_victim[ACKNOWLEDGED_FIRST:]

    # Acknowledged before the fault.
    acknowledged: dict[int, str] = {}  # user id -> order id (ids are strings in JSON)
    for user_id, token in first:
        status, body, _, _ = await checkout(client, base_url, token, f"k-{user_id}")
        assert status == 201, body
        acknowledged[user_id] = body["order"]["id"]

    # Held between reservation and order when the primary dies.
    reserved = asyncio.Semaphore(0)
    release = asyncio.Event()

    async def hold() -> None:
        reserved.release()
        await release.wait()

    services.checkout.after_reserve = hold
    pending = [
        asyncio.ensure_future(checkout(client, base_url, token, f"k-{user_id}"))
        for user_id, token in held
    ]
    for _ in held:
        await asyncio.wait_for(reserved.acquire(), 20)
    services.checkout.after_reserve = None
    await blocking(kill_hard, victim)
    release.set()
    during = await asyncio.gather(*pending)
    for status, body, headers, seconds in during:
        assert status == 503, body
        assert body["type"] == "/problems/temporarily-unavailable"
        assert int(headers["Retry-After"]) >= 1
        assert seconds < 20 + FAIL_FAST_S

    # While it is down: a new write to the shard fails fast; others are served.
    user_id, token = held[0]
    status, body, headers, seconds = await checkout(client, base_url, token, f"k-{user_id}")
    assert status == 503 and "Retry-After" in headers and seconds < FAIL_FAST_S, (status, body)
    for user_id, token in bystanders:
        status, body, _, _ = await checkout(client, base_url, token, f"k-{user_id}")
        assert status == 201, body
        acknowledged[user_id] = body["order"]["id"]
    product = await client.fetch(f"{base_url}/api/v1/products/{product_id}")
    assert product.code == 200
    cart = await client.fetch(
        base_url + "/api/v1/cart", headers={"Authorization": f"Bearer {token}"}, raise_error=False
    )
    assert cart.code == 200, cart.body  # from the shard's standby

    await blocking(victim.start)

    # Every victim-shard buyer retries with the first attempt's key until it completes.
    deadline = time.monotonic() + RECOVER_S
    final: dict[int, str] = {}
    for user_id, token in on_victim + bystanders:
        while True:
            status, body, _, _ = await checkout(client, base_url, token, f"k-{user_id}")
            if status in (200, 201):
                final[user_id] = body["order"]["id"]
                break
            assert status in (409, 503), (status, body)  # in progress (swept soon), or down
            assert time.monotonic() < deadline, f"user {user_id} still refused: {body}"
            await asyncio.sleep(0.3)
    for user_id, order_id in acknowledged.items():
        assert final[user_id] == order_id, "a retry did not answer the first order"
    for user_id, _ in on_victim + bystanders:
        assert orders_of(env, user_id) == [(final[user_id], f"k-{user_id}")]

    deadline = time.monotonic() + RECOVER_S
    while (counts := accounting(env, product_id))[1]:  # held reservations swept
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.2)
    stock, held_units, ordered = counts
    assert ordered == len(on_victim) + len(bystanders)
    assert stock + held_units + ordered == STOCK, counts
    try:
        ready = await client.fetch(base_url + "/readyz")
    except HTTPClientError as error:  # pragma: no cover - the message says why
        raise AssertionError(error.response.body if error.response else error) from None
    assert ready.code == 200


@pytest.mark.gen_test(timeout=180)
async def test_a_killed_catalog_primary_keeps_reads_and_carts_and_refuses_writes_fast(
    client: Any, base_url: str, services: Services, topology: Topology
) -> None:
    """The catalog's primary SIGKILLed, then restarted: cached product reads keep answering
    (their stock from the catalog's standby), a cart can still be read; a stock change and a
    checkout (its reservation is a catalog write) fail fast with 503 and `Retry-After`, and
    the cart is kept. After the restart the same checkout key completes, and the stock adds
    up."""
    env = topology.env
    primary, standby = topology.servers("catalog")
    await blocking(primary.psql, "ALTER SYSTEM SET synchronous_commit = on")
    await blocking(primary.psql, "SELECT pg_reload_conf()")
    product_id = add_product(env["FM_CATALOG_DSN"], stock=10)
    admin = await token_for(services, "catalog-admin@example.com", admin=True)
    buyer_id, buyer = await buyer_with_cart(services, "catalog-buyer@example.com", product_id, 2)
    api = base_url + "/api/v1"
    product_url = f"{api}/products/{product_id}"
    before = await client.fetch(product_url)
    await client.fetch(f"{api}/products?first=20")  # cached (a fill needs the primary)
    await blocking(wait_caught_up, primary, standby)

    async def call(url: str, method: str = "GET", body: Any = None, token: str = "") -> Any:
        began = time.monotonic()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        response = await client.fetch(
            url,
            method=method,
            body=None if body is None and method == "GET" else json.dumps(body or {}),
            headers=headers,
            raise_error=False,
            request_timeout=30,
        )
        return response, time.monotonic() - began

    await blocking(kill_hard, primary)
    read, _ = await call(product_url)
    assert read.code == 200 and json.loads(read.body) == json.loads(before.body)
    listed, _ = await call(f"{api}/products?first=20")
    assert listed.code == 200, listed.body
    cart, _ = await call(f"{api}/cart", token=buyer)
    assert cart.code == 200 and json.loads(cart.body)["items"][0]["quantity"] == 2
    changed, seconds = await call(f"{product_url}/stock", "POST", {"delta": 5}, admin)
    assert changed.code == 503 and changed.headers["Retry-After"], changed.body
    assert seconds < FAIL_FAST_S
    status, body, headers, seconds = await checkout(client, base_url, buyer, "catalog-1")
    assert status == 503 and headers["Retry-After"] and seconds < FAIL_FAST_S, (status, body)
    cart, _ = await call(f"{api}/cart", token=buyer)
    assert json.loads(cart.body)["items"][0]["quantity"] == 2  # kept for the retry

    await blocking(primary.start)
    deadline = time.monotonic() + RECOVER_S
    while (
        changed := (await call(f"{product_url}/stock", "POST", {"delta": 5}, admin))[0]
    ).code != 200:
        assert changed.code == 503 and time.monotonic() < deadline, changed.body
        await asyncio.sleep(0.3)
    while True:
        status, body, _, _ = await checkout(client, base_url, buyer, "catalog-1")
        if status == 201:
            break
        assert status in (409, 503) and time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.3)
    assert orders_of(env, buyer_id) == [(body["order"]["id"], "catalog-1")]
    stock, held, ordered = accounting(env, product_id)
    assert (stock, held, ordered) == (10 + 5 - 2, 0, 2)
