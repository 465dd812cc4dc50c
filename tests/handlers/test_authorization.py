"""The authorization review (docs/security.md) as tests: every REST route, GraphQL root field
and cable channel is in the review's table, so a new one cannot go unreviewed; and another
user's cart, orders and notifications are refused by REST, GraphQL and the cable, as the table
says (404 for a per-user id that is not the caller's, never 403: an id of someone else's must
not be told apart from one that does not exist).

Ada and Bob are on the same shard (the ids of Ada's order and notification are not Bob's own
ids by accident); Ada has an order, a notification and a cart line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tornado.web import Application

from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers import commerce
from tests.helpers.cable import CableClient, identifier
from tests.helpers.catalog import add_product
from tests.helpers.commerce import call, make_user, ok, problem
from tests.helpers.graphql import codes, gql, result

pytestmark = pytest.mark.usefixtures("clean_data")

REVIEW = Path(__file__).resolve().parents[2] / "docs" / "security.md"
SHARDS = 4

settings = commerce.settings
app = commerce.app
client = commerce.client


def review_text() -> str:
    """The review, with the table cells' escaped bars (`\\|`) as the routes have them."""
    return REVIEW.read_text().replace("\\|", "|")


def route_patterns(application: Application) -> list[str]:
    """The path pattern of every route the node serves (the last, catch-all 404 aside)."""
    patterns = []
    for rule in application.wildcard_router.rules:
        regex = getattr(rule.matcher, "regex", None)
        if regex is not None:
            patterns.append(regex.pattern.removesuffix("$"))
    return patterns


def root_fields() -> list[str]:
    """`Query.x`, `Mutation.x` and `Subscription.x` for every root field of the schema."""
    sdl = "\n".join(
        path.read_text()
        for path in sorted(
            (Path(__file__).resolve().parents[2] / "server/graphql/resolvers").glob("*.graphql")
        )
    )
    found = []
    for block in re.finditer(
        r"(?:extend )?type (Query|Mutation|Subscription) \{(.*?)\n\}", sdl, re.S
    ):
        for field in re.finditer(r"^  ([a-zA-Z]+)[(:]", block.group(2), re.M):
            found.append(f"{block.group(1)}.{field.group(1)}")
    return found


def test_every_route_field_and_channel_is_in_the_review(
    app: Application, services: Services
) -> None:
    text = review_text()
    routes = route_patterns(app)
    assert len(routes) >= 30, routes
    assert [r for r in routes if f"`{r}`" not in text] == []
    fields = root_fields()
    assert {"Query.cart", "Mutation.checkout", "Subscription.cartUpdated"} <= set(fields)
    assert [f for f in fields if f"`{f}`" not in text] == []
    channels = ("InventoryChannel", "CartChannel", "NotificationsChannel", "BenchmarkChannel")
    assert [c for c in channels if f"`{c}`" not in text] == []


async def same_shard_users(services: Services) -> tuple[tuple[int, str], tuple[int, str]]:
    """Two users whose ids fall on the same shard."""
    made: dict[int, tuple[int, str]] = {}
    for n in range(2 * SHARDS + 1):
        user_id, token = await make_user(services, f"user{n}@example.com")
        if user_id % SHARDS in made:
            return made[user_id % SHARDS], (user_id, token)
        made[user_id % SHARDS] = (user_id, token)
    raise AssertionError("no two users on one shard")


@pytest.mark.gen_test(timeout=60)
async def test_another_users_cart_orders_and_notifications_are_refused_everywhere(
    client: Any, base_url: str, services: Services, settings: Settings, infra_env: dict[str, str]
) -> None:
    (ada_id, ada), (bob_id, bob) = await same_shard_users(services)
    product = add_product(infra_env["FM_CATALOG_DSN"], stock=10)
    api = base_url + "/api/v1"
    ok(await call(client, api + "/cart/items", "POST", {"product_id": product, "quantity": 1}, ada))
    order = ok(
        await call(client, api + "/checkout", "POST", token=ada, **{"Idempotency-Key": "ada-1"}),
        201,
    )["order"]
    [note] = ok(await call(client, api + "/notifications", token=ada))["items"]
    ok(await call(client, api + "/cart/items", "POST", {"product_id": product, "quantity": 2}, ada))

    # REST: Bob sees only his own; Ada's ids are "not found" for him, and stay untouched.
    assert ok(await call(client, api + "/cart", token=bob))["items"] == []
    assert ok(await call(client, api + "/orders", token=bob))["items"] == []
    assert ok(await call(client, api + "/notifications", token=bob))["items"] == []
    problem(await call(client, f"{api}/orders/{order['id']}", token=bob), 404, "not-found")
    read = await call(client, f"{api}/notifications/{note['id']}/read", "POST", token=bob)
    problem(read, 404, "not-found")
    for method, body in (("PATCH", {"quantity": 5}), ("DELETE", None)):
        changed = await call(client, f"{api}/cart/items/{product}", method, body, bob)
        problem(changed, 404, "not-found")
    # An idempotency key is the caller's own: Ada's key names nothing of Bob's.
    replay = await call(
        client, api + "/checkout", "POST", token=bob, **{"Idempotency-Key": "ada-1"}
    )
    assert replay.code == 422 and problem(replay, 422, "cart-empty")
    assert ok(await call(client, api + "/cart", token=ada))["items"][0]["quantity"] == 2
    [still] = ok(await call(client, api + "/notifications", token=ada))["items"]
    assert still["id"] == note["id"] and not still.get("read_at")
    assert ok(await call(client, f"{api}/orders/{order['id']}", token=ada))["id"] == order["id"]

    # GraphQL: the same answers, in GraphQL's words.
    mine = """{ cart { items { productId } } orders { edges { node { id } } }
        notifications { edges { node { id } } } }"""
    seen = result(await gql(client, base_url, mine, token=bob))["data"]
    assert seen == {"cart": {"items": []}, "orders": {"edges": []}, "notifications": {"edges": []}}
    mark = "mutation($id: ID!) { markNotificationRead(id: $id) { id } }"
    refused = result(await gql(client, base_url, mark, {"id": note["id"]}, token=bob))
    assert codes(refused) == ["NOT_FOUND"]
    remove = "mutation($id: ID!) { removeFromCart(productId: $id) { version } }"
    assert codes(result(await gql(client, base_url, remove, {"id": str(product)}, token=bob))) == [
        "NOT_FOUND"
    ]

    # Cable: naming Ada in the params is refused, Bob's own channels are his.
    cable = await CableClient.connect(base_url.replace("http://", "ws://") + f"/cable?token={bob}")
    for channel in ("CartChannel", "NotificationsChannel"):
        for user in (ada_id, str(ada_id)):
            ident = identifier(channel, user_id=user)
            await cable.send({"command": "subscribe", "identifier": ident})
            assert await cable.read() == {"identifier": ident, "type": "reject_subscription"}
    own = identifier("CartChannel")
    await cable.subscribe(own)
    first = await cable.next_message(own)
    assert first["event"] == "cart" and first["cart"]["items"] == []
    cable.close()
    assert bob_id != ada_id and bob_id % SHARDS == ada_id % SHARDS
