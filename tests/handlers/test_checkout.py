"""Checkout, orders and notifications over real HTTP on two nodes: no overselling under a
race, one order per idempotency key, crash repair by the sweeper, precise problems."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from server.domain.checkout import CheckoutService, CheckoutSweeper
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers import commerce
from tests.helpers.cable import CableClient, identifier
from tests.helpers.catalog import add_product
from tests.helpers.commerce import (
    accounting,
    buyer_with_cart,
    call,
    make_user,
    ok,
    problem,
    start_node,
)
from tests.helpers.deployment import TEST_SECRET_KEY

pytestmark = pytest.mark.usefixtures("clean_data")

# The commerce fixtures (node with the commerce routes, relaxed limits, concurrent client).
settings = commerce.settings
app = commerce.app
client = commerce.client


def count_orders(env: dict[str, str]) -> int:
    total = 0
    for shard in json.loads(env["FM_SHARDS"]):
        with psycopg2.connect(shard["primary"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM orders")
            total += int(cur.fetchone()[0])
        conn.close()
    return total


@pytest.mark.gen_test(timeout=120)
async def test_120_buyers_race_for_25_units_through_two_nodes(
    client: Any, base_url: str, services: Services, settings: Settings, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=25)
    buyers = await asyncio.gather(
        *(make_user(services, f"buyer{i}@example.com") for i in range(120))
    )
    node_b = await start_node(settings)
    try:
        bases = [base_url, f"http://127.0.0.1:{node_b.port}"]

        async def buy(index: int, token: str) -> Any:
            base = bases[index % 2]
            added = await call(
                client, base + "/api/v1/cart/items", "POST", {"product_id": product_id}, token
            )
            assert added.code == 200, added.body
            return await call(
                client,
                base + "/api/v1/checkout",
                "POST",
                token=token,
                **{"Idempotency-Key": f"buy-{index}"},
            )

        answers = await asyncio.gather(*(buy(i, token) for i, (_, token) in enumerate(buyers)))
    finally:
        await node_b.stop()
    codes = sorted(a.code for a in answers)
    assert codes.count(201) == 25 and codes.count(409) == 95, codes
    for answer in answers:
        if answer.code == 409:
            body = problem(answer, 409, "out-of-stock")
            assert body["product_id"] == str(product_id) and body["available"] == 0
        else:
            order = ok(answer, 201)["order"]
            assert order["items"] == [
                {"product_id": str(product_id), "quantity": 1, "unit_price_cents": 1999}
            ]
    assert accounting(infra_env, product_id) == (0, 0, 25)
    assert count_orders(infra_env) == 25


@pytest.mark.gen_test(timeout=60)
async def test_ten_parallel_checkouts_with_one_key_on_two_nodes_make_one_order(
    client: Any, base_url: str, services: Services, settings: Settings, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    _, token = await buyer_with_cart(services, "ada@example.com", product_id, quantity=3)
    node_b = await start_node(settings)
    try:
        bases = [base_url, f"http://127.0.0.1:{node_b.port}"]
        answers = await asyncio.gather(
            *(
                call(
                    client,
                    bases[i % 2] + "/api/v1/checkout",
                    "POST",
                    token=token,
                    **{"Idempotency-Key": "one-key"},
                )
                for i in range(10)
            )
        )
    finally:
        await node_b.stop()
    good = [json.loads(a.body) for a in answers if 200 <= a.code < 300]
    assert good, [a.body for a in answers]
    assert all(body == good[0] for body in good)
    for answer in answers:
        if answer.code >= 300:
            problem(answer, 409, "checkout-in-progress")
    assert count_orders(infra_env) == 1
    assert accounting(infra_env, product_id) == (7, 0, 3)
    # later retries (any node) answer the same order, marked as a replay
    again = await call(
        client, base_url + "/api/v1/checkout", "POST", token=token, **{"Idempotency-Key": "one-key"}
    )
    assert ok(again, 201) == good[0] and again.headers["Idempotent-Replayed"] == "true"


@pytest.mark.gen_test(timeout=60)
async def test_checkout_writes_order_notification_and_events(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=5)
    _, token = await make_user(services, "ada@example.com")
    items = base_url + "/api/v1/cart/items"
    ok(await call(client, items, "POST", {"product_id": product_id, "quantity": 2}, token))
    cable = await CableClient.connect(base_url.replace("http", "ws") + f"/cable?token={token}")
    notes_id = identifier("NotificationsChannel")
    stock_id = identifier("InventoryChannel", product_id=str(product_id))
    await cable.subscribe(notes_id)
    await cable.subscribe(stock_id)
    assert (await cable.next_message(stock_id))["stock"] == 5
    answer = await call(
        client, base_url + "/api/v1/checkout", "POST", token=token, **{"Idempotency-Key": "k1"}
    )
    order = ok(answer, 201)["order"]
    assert order["total_cents"] == 3998 and order["status"] == "confirmed"
    seen: dict[str, Any] = {}
    for _ in range(2):
        try:
            reply = await asyncio.wait_for(cable.read(), 5)
        except TimeoutError:
            from realtime.broker import stream_keys

            keys = stream_keys(f"inventory:product:{product_id}")
            hist = [await services.redis.xrange(k) for k in keys if k.endswith("history")]
            raise AssertionError(f"only {seen} arrived; {keys} {hist}") from None
        seen[reply["identifier"]] = reply["message"]
    cable.close()
    assert seen[stock_id]["stock"] == 3
    note = seen[notes_id]["notification"]
    assert note["kind"] == "order_confirmed" and set(note) == {
        "id",
        "kind",
        "title",
        "body",
        "created_at",
    }
    cart = ok(await call(client, base_url + "/api/v1/cart", token=token))
    assert cart["items"] == [] and cart["version"] == 2

    listed = ok(await call(client, base_url + "/api/v1/orders", token=token))
    assert listed == {"items": [order], "next_cursor": None}
    assert ok(await call(client, f"{base_url}/api/v1/orders/{order['id']}", token=token)) == order
    notes = ok(await call(client, base_url + "/api/v1/notifications", token=token))
    assert notes["unread"] == 1 and notes["items"][0]["id"] == note["id"]
    read = ok(
        await call(
            client, f"{base_url}/api/v1/notifications/{note['id']}/read", "POST", token=token
        )
    )
    assert read["read_at"] is not None
    assert ok(await call(client, base_url + "/api/v1/notifications", token=token))["unread"] == 0


@pytest.mark.gen_test(timeout=60)
async def test_orders_paginate_with_cursors(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    _, token = await make_user(services, "ada@example.com")
    for n in range(3):
        ok(
            await call(
                client, base_url + "/api/v1/cart/items", "POST", {"product_id": product_id}, token
            )
        )
        ok(
            await call(
                client,
                base_url + "/api/v1/checkout",
                "POST",
                token=token,
                **{"Idempotency-Key": f"k{n}"},
            ),
            201,
        )
    first = ok(await call(client, base_url + "/api/v1/orders?first=2", token=token))
    assert len(first["items"]) == 2 and first["next_cursor"]
    rest = ok(
        await call(
            client, f"{base_url}/api/v1/orders?first=2&after={first['next_cursor']}", token=token
        )
    )
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    ids = [int(o["id"]) for o in first["items"] + rest["items"]]
    assert ids == sorted(ids, reverse=True)
    for query in ("first=0", "first=101", "first=abc", "after=bogus", "after=bm90aWZpY2F0aW9uOjE"):
        bad = await call(client, f"{base_url}/api/v1/orders?{query}", token=token)
        assert bad.code == 422, (query, bad.body)


@pytest.mark.gen_test(timeout=60)
async def test_bad_checkout_requests_get_precise_problems(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=1)
    _, ada = await buyer_with_cart(services, "ada@example.com", product_id, quantity=2)
    _, bob = await make_user(services, "bob@example.com")
    url = base_url + "/api/v1/checkout"
    problem(await call(client, url, "POST", **{"Idempotency-Key": "k"}), 401, "unauthorized")
    problem(await call(client, url, "POST", token=ada), 400, "idempotency-key-required")
    too_long = await call(client, url, "POST", token=ada, **{"Idempotency-Key": "k" * 256})
    problem(too_long, 400, "invalid-idempotency-key")
    short = await call(client, url, "POST", token=ada, **{"Idempotency-Key": "k"})
    body = problem(short, 409, "out-of-stock")
    assert body["product_id"] == str(product_id) and body["available"] == 1
    assert accounting(infra_env, product_id) == (1, 0, 0)  # nothing stays reserved
    empty = await call(client, url, "POST", token=bob, **{"Idempotency-Key": "k"})
    problem(empty, 422, "cart-empty")

    # the out-of-stock attempt freed its key: after fixing the cart the same key works
    ok(
        await call(
            client, f"{base_url}/api/v1/cart/items/{product_id}", "PATCH", {"quantity": 1}, ada
        )
    )
    order = ok(await call(client, url, "POST", token=ada, **{"Idempotency-Key": "k"}), 201)["order"]
    # bob cannot see ada's order or notifications
    problem(
        await call(client, f"{base_url}/api/v1/orders/{order['id']}", token=bob), 404, "not-found"
    )
    assert ok(await call(client, base_url + "/api/v1/orders", token=bob))["items"] == []
    problem(await call(client, f"{base_url}/api/v1/orders/{'9' * 25}", token=ada), 404, "not-found")
    problem(await call(client, base_url + "/api/v1/orders"), 401, "unauthorized")
    notes = ok(await call(client, base_url + "/api/v1/notifications", token=ada))["items"]
    foreign = await call(
        client, f"{base_url}/api/v1/notifications/{notes[0]['id']}/read", "POST", token=bob
    )
    problem(foreign, 404, "not-found")


# --- crashes between steps ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_sweeper_releases_stock_reserved_by_a_saga_that_died_before_its_order(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    user_id, token = await buyer_with_cart(services, "ada@example.com", product_id, quantity=4)
    saga = CheckoutService(services.router)
    lines = await saga.claim(user_id, "crash-1")
    assert isinstance(lines, list)
    await saga.reserve(user_id, "crash-1", lines)  # ... and the process dies here
    assert accounting(infra_env, product_id) == (6, 4, 0)
    # a retry meanwhile is told to wait, not given a second order
    busy = await call(
        client,
        base_url + "/api/v1/checkout",
        "POST",
        token=token,
        **{"Idempotency-Key": "crash-1"},
    )
    problem(busy, 409, "checkout-in-progress")
    assert busy.headers["Retry-After"] == "1"

    young = await CheckoutSweeper(services.router, stale_after_s=3600).sweep_once()
    assert (young.released, young.committed) == (0, 0)  # too young to be judged dead
    report = await CheckoutSweeper(services.router, stale_after_s=0).sweep_once()
    assert (report.released, report.committed) == (1, 0)
    assert accounting(infra_env, product_id) == (10, 0, 0)
    # the saga, should it wake up, can no longer write its order
    with pytest.raises(Exception, match="abandoned"):
        await saga.write_order(user_id, "crash-1", lines)
    # the key is free again: a retry checks out normally
    again = await call(
        client,
        base_url + "/api/v1/checkout",
        "POST",
        token=token,
        **{"Idempotency-Key": "crash-1"},
    )
    ok(again, 201)
    assert accounting(infra_env, product_id) == (6, 0, 4)


@pytest.mark.gen_test(timeout=60)
async def test_sweeper_commits_stock_of_a_saga_that_died_after_its_order(
    services: Services, infra_env: dict[str, str]
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    user_id, _ = await buyer_with_cart(services, "ada@example.com", product_id, quantity=3)
    saga = CheckoutService(services.router)
    lines = await saga.claim(user_id, "crash-2")
    assert isinstance(lines, list)
    await saga.reserve(user_id, "crash-2", lines)
    await saga.write_order(user_id, "crash-2", lines)  # ... dies before confirming
    report = await CheckoutSweeper(services.router, stale_after_s=0).sweep_once()
    assert (report.released, report.committed) == (0, 1)
    assert accounting(infra_env, product_id) == (7, 0, 3)


_CHILD = """
import asyncio, sys
from server.domain.checkout import CheckoutService
from server.wiring.services import Services
from server.wiring.settings import Settings

async def main() -> None:
    services = await Services.open(Settings())
    async def pause() -> None:
        print("reserved", flush=True)
        await asyncio.sleep(120)
    saga = CheckoutService(services.router, after_reserve=pause)
    await saga.checkout(int(sys.argv[1]), sys.argv[2])

asyncio.run(main())
"""


@pytest.mark.gen_test(timeout=90)
async def test_process_killed_between_reserve_and_order_is_repaired_by_the_sweeper(
    services: Services, infra_env: dict[str, str], tmp_path: Path, project_root: Path
) -> None:
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=8)
    user_id, _ = await buyer_with_cart(services, "ada@example.com", product_id, quantity=5)
    (tmp_path / "config").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FM_")}
    env.update({k: v for k, v in infra_env.items() if k.startswith("FM_")})
    env.update(FM_CONFIG_DIR=str(tmp_path / "config"), FM_SECRET_KEY=TEST_SECRET_KEY)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(user_id),
        "kill-me",
        cwd=project_root,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line == b"reserved\n", await child.stderr.read()
        child.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert accounting(infra_env, product_id) == (3, 5, 0)  # reserved by the dead process
    report = await CheckoutSweeper(services.router, stale_after_s=0).sweep_once()
    assert report.released == 1
    stock, held, ordered = accounting(infra_env, product_id)
    assert (stock, held, ordered) == (8, 0, 0) and stock + held + ordered == 8


@pytest.mark.gen_test(timeout=30)
async def test_sweeper_task_starts_and_stops(services: Services) -> None:
    sweeper = CheckoutSweeper(services.router, period_s=0.01, stale_after_s=0)
    sweeper.start()
    await asyncio.sleep(0.1)
    await sweeper.stop()
    await sweeper.stop()  # idempotent


def shard_rows(env: dict[str, str], user_id: int, sql: str, params: tuple[Any, ...]) -> Any:
    """Run `sql` on `user_id`'s shard primary (committed); its rows, if it returns any."""
    shard = json.loads(env["FM_SHARDS"])[user_id % 4]
    with psycopg2.connect(shard["primary"]) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall() if cur.description else None
    conn.close()
    return rows


@pytest.mark.gen_test(timeout=60)
async def test_sweeper_removes_cart_change_keys_older_than_their_ttl_and_nothing_else(
    client: Any, base_url: str, services: Services, infra_env: dict[str, str]
) -> None:
    user_id, token = await make_user(services, "keys@example.com")
    product_id = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    items = base_url + "/api/v1/cart/items"
    for key in ("old-change", "new-change"):
        ok(await call(client, items, "POST", {"product_id": product_id}, token,
                      **{"Idempotency-Key": key}))  # fmt: skip
    ok(await call(client, base_url + "/api/v1/checkout", "POST", token=token,
                  **{"Idempotency-Key": "old-order"}), 201)  # fmt: skip
    keys = "SELECT key FROM idempotency_keys WHERE user_id = %s ORDER BY key"
    before = [k for (k,) in shard_rows(infra_env, user_id, keys, (user_id,))]
    assert len(before) == 3 and sum(k.startswith("cart:") for k in before) == 2
    # Two days old: one cart change's key and the checkout's (which is not the sweeper's).
    aged = shard_rows(
        infra_env,
        user_id,
        "UPDATE idempotency_keys SET updated_at = now() - interval '2 days', "
        "created_at = now() - interval '2 days' "
        "WHERE user_id = %s AND (key = 'old-order' OR key = (SELECT min(key) FROM "
        "idempotency_keys WHERE user_id = %s AND key LIKE 'cart:%%')) RETURNING key",
        (user_id, user_id),
    )
    assert len(aged) == 2

    report = await CheckoutSweeper(services.router, cart_key_ttl_s=86400).sweep_once()

    assert report.cart_keys_removed == 1
    after = [k for (k,) in shard_rows(infra_env, user_id, keys, (user_id,))]
    assert after == [k for k in before if k not in {aged[0][0], aged[1][0]} or k == "old-order"]
    assert "old-order" in after and len(after) == 2
