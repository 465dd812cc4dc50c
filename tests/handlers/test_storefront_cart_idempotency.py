"""`Idempotency-Key` on the cart's change endpoints (offline replays from the service
worker's queue): a replay by the same user within the TTL answers the first answer and
applies once; keys are per user; a different request under a used key is refused; a failed
request frees its key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.commerce import commerce_settings, make_user
from tests.helpers.storefront import fetch, insert_products

pytestmark = pytest.mark.usefixtures("clean_data")


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return commerce_settings(infra_env)


@pytest.fixture
def lamp(infra_env: dict[str, str]) -> int:
    return insert_products(infra_env["FM_CATALOG_DSN"], [("Desk Lamp", "", 1234, 10)])[0]


async def cart_call(
    client: Any, url: str, method: str, token: str, body: Any = None, key: str | None = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Idempotency-Key"] = key
    return await fetch(
        client, url, method, None if body is None else json.dumps(body).encode(), **headers
    )


@pytest.mark.gen_test(timeout=30)
async def test_replayed_add_applies_once(
    http_client: Any, base_url: str, services: Services, lamp: int
) -> None:
    _user, token = await make_user(services, "ada@example.com")
    url = base_url + "/api/v1/cart/items"
    item = {"product_id": lamp, "quantity": 2}
    first = await cart_call(http_client, url, "POST", token, item, key="k-1")
    assert first.code == 200 and "Idempotent-Replayed" not in first.headers
    replay = await cart_call(http_client, url, "POST", token, item, key="k-1")
    assert replay.code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert json.loads(replay.body) == json.loads(first.body)
    cart = json.loads((await cart_call(http_client, base_url + "/api/v1/cart", "GET", token)).body)
    assert [{k: v for k, v in item.items() if k != "available"} for item in cart["items"]] == [
        {"product_id": str(lamp), "quantity": 2, "unit_price_cents": 1234}
    ]

    another = await cart_call(http_client, url, "POST", token, item, key="k-2")
    assert json.loads(another.body)["items"][0]["quantity"] == 4
    unkeyed = await cart_call(http_client, url, "POST", token, item)
    assert json.loads(unkeyed.body)["items"][0]["quantity"] == 6

    reused = await cart_call(
        http_client, url, "POST", token, {"product_id": lamp, "quantity": 1}, key="k-1"
    )
    assert reused.code == 422
    assert json.loads(reused.body)["type"] == "/problems/idempotency-key-reused"


@pytest.mark.gen_test(timeout=30)
async def test_patch_and_delete_replays(
    http_client: Any, base_url: str, services: Services, lamp: int
) -> None:
    _user, token = await make_user(services, "ada@example.com")
    await cart_call(
        http_client, base_url + "/api/v1/cart/items", "POST", token, {"product_id": lamp}
    )
    line = f"{base_url}/api/v1/cart/items/{lamp}"
    patched = await cart_call(http_client, line, "PATCH", token, {"quantity": 5}, key="p-1")
    assert patched.code == 200
    assert (
        await cart_call(http_client, line, "PATCH", token, {"quantity": 5}, key="p-1")
    ).code == 200
    removed = await cart_call(http_client, line, "DELETE", token, key="d-1")
    assert removed.code == 200 and json.loads(removed.body)["items"] == []
    replay = await cart_call(http_client, line, "DELETE", token, key="d-1")
    assert replay.code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    # without the key, deleting a line that is gone is a 404: the replay did not run again
    assert (await cart_call(http_client, line, "DELETE", token)).code == 404


@pytest.mark.gen_test(timeout=30)
async def test_keys_are_per_user_and_failures_free_them(
    http_client: Any, base_url: str, services: Services, lamp: int
) -> None:
    _ada, ada = await make_user(services, "ada@example.com")
    _bob, bob = await make_user(services, "bob@example.com")
    url = base_url + "/api/v1/cart/items"
    item = {"product_id": lamp, "quantity": 1}
    assert (await cart_call(http_client, url, "POST", ada, item, key="same")).code == 200
    bobs = await cart_call(http_client, url, "POST", bob, item, key="same")
    assert bobs.code == 200 and "Idempotent-Replayed" not in bobs.headers

    missing = {"product_id": 999999, "quantity": 1}
    failed = await cart_call(http_client, url, "POST", ada, missing, key="f-1")
    assert failed.code == 404
    retried = await cart_call(http_client, url, "POST", ada, missing, key="f-1")
    assert retried.code == 404 and "Idempotent-Replayed" not in retried.headers

    too_long = await cart_call(http_client, url, "POST", ada, item, key="x" * 256)
    assert too_long.code == 400
    assert json.loads(too_long.body)["type"] == "/problems/invalid-idempotency-key"
    anonymous = await fetch(
        http_client,
        url,
        "POST",
        json.dumps(item).encode(),
        **{"Content-Type": "application/json", "Idempotency-Key": "k"},
    )
    assert anonymous.code == 401


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_replays_apply_once(
    http_client: Any, base_url: str, services: Services, lamp: int
) -> None:
    import asyncio

    _user, token = await make_user(services, "ada@example.com")
    url = base_url + "/api/v1/cart/items"
    item = {"product_id": lamp, "quantity": 1}
    answers = await asyncio.gather(
        *(cart_call(http_client, url, "POST", token, item, key="race") for _ in range(5))
    )
    codes = sorted(answer.code for answer in answers)
    assert set(codes) <= {200, 409} and 200 in codes
    for answer in answers:
        if answer.code == 409:
            assert answer.headers["Retry-After"] == "1"
    cart = json.loads((await cart_call(http_client, base_url + "/api/v1/cart", "GET", token)).body)
    assert cart["items"][0]["quantity"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_replay_applies_once_even_when_redis_lost_the_key(
    http_client: Any, base_url: str, services: Services, lamp: int
) -> None:
    """Redis loses keys a master acknowledged but had not replicated when it died; here
    they are deleted, the same loss. The shard recorded the key with the change, so the
    replay is answered with the first answer and the units are added once, not twice."""
    _user, token = await make_user(services, "ada@example.com")
    url = base_url + "/api/v1/cart/items"
    item = {"product_id": lamp, "quantity": 2}
    first = await cart_call(http_client, url, "POST", token, item, key="k-lost")
    assert first.code == 200
    deleted = [key async for key in services.redis.scan_iter(match="{idem}:cart:*")]
    assert deleted
    await services.redis.delete(*deleted)
    replay = await cart_call(http_client, url, "POST", token, item, key="k-lost")
    assert replay.code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert json.loads(replay.body) == json.loads(first.body)
    cart = json.loads((await cart_call(http_client, base_url + "/api/v1/cart", "GET", token)).body)
    assert [(i["product_id"], i["quantity"]) for i in cart["items"]] == [(str(lamp), 2)]
    # The same key with another request is still refused, by the shard this time.
    await services.redis.delete(*deleted)
    other = await cart_call(http_client, url, "POST", token, {**item, "quantity": 3}, key="k-lost")
    assert other.code == 422 and json.loads(other.body)["type"].endswith("idempotency-key-reused")
