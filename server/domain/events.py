"""The events the domain publishes and the streams they travel on: one definition used by the
domain services, the cable channels, presence and GraphQL alike.

A stream is a name (`inventory:product:42`); an event is a small typed object whose
`to_message()` is the wire message clients receive in the `message` field (CONTRACT
"Realtime"). Ids go out as JSON strings of digits, as everywhere in the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.adapters.purge import page_keys
from server.common.logs import get_logger

# What the domain is handed to announce an event: `publish(stream, message)` (the realtime
# hub's, in a node); never a broker or a socket.
Publish = Callable[[str, dict[str, Any]], Awaitable[Any]]
# What the domain is handed to tell the edge caches which pages changed: `purge(keys)` with
# the pages' surrogate keys (`server.adapters.purge`); fire-and-forget, never an HTTP client.
Purge = Callable[[Sequence[str]], None]
_log = get_logger("finalmarket.events")


def stock_stream(product_id: int) -> str:
    """The stream of a product's stock and presence events."""
    return f"inventory:product:{product_id}"


def cart_stream(user_id: int) -> str:
    """The stream of one user's cart changes."""
    return f"cart:user:{user_id}"


def notification_stream(user_id: int) -> str:
    """The stream of one user's new notifications."""
    return f"notifications:user:{user_id}"


@dataclass(frozen=True, slots=True)
class StockChanged:
    """A product's stock count now (after a committed change, or the current count)."""

    product_id: int
    stock: int

    @property
    def stream(self) -> str:
        return stock_stream(self.product_id)

    def to_message(self) -> dict[str, Any]:
        return {"event": "stock", "product_id": str(self.product_id), "stock": self.stock}


@dataclass(frozen=True, slots=True)
class ViewersChanged:
    """How many shoppers view a product now, across every node."""

    product_id: int
    viewers: int

    @property
    def stream(self) -> str:
        return stock_stream(self.product_id)

    def to_message(self) -> dict[str, Any]:
        return {"event": "presence", "product_id": str(self.product_id), "viewers": self.viewers}


@dataclass(frozen=True, slots=True)
class CartChanged:
    """A user's whole cart after a change (or as it is now)."""

    user_id: int
    cart: Mapping[str, Any]

    @property
    def stream(self) -> str:
        return cart_stream(self.user_id)

    def to_message(self) -> dict[str, Any]:
        return {"event": "cart", "cart": self.cart}


NOTIFICATION_FIELDS = ("id", "kind", "title", "body", "created_at")


@dataclass(frozen=True, slots=True)
class NotificationCreated:
    """A notification for a user (an order confirmation is one); only its public fields go out."""

    user_id: int
    notification: Mapping[str, Any]

    @property
    def stream(self) -> str:
        return notification_stream(self.user_id)

    def to_message(self) -> dict[str, Any]:
        fields = {name: self.notification[name] for name in NOTIFICATION_FIELDS}
        return {"event": "notification", "notification": fields}


Event = StockChanged | ViewersChanged | CartChanged | NotificationCreated


async def announce(publish: Publish | None, event: Event) -> None:
    """Publish an event after its change committed; a failure is logged, never raised.

    The change is already committed, so the request succeeded; subscribers that miss the
    event recover through the stream's offsets and the channel's snapshot.
    """
    if publish is None:
        return
    try:
        await publish(event.stream, event.to_message())
    except Exception as exc:  # the committed change stands either way
        _log.warning("publish_failed", stream=event.stream, error=repr(exc))


def pages_changed(purge: Purge | None, product_ids: Iterable[int]) -> None:
    """Tell the edge that the pages showing these products changed (their own and the list
    pages); a failure is logged, never raised: the write stands, the pages expire by their
    `s-maxage`."""
    if purge is None:
        return
    keys = page_keys(product_ids)
    try:
        purge(keys)
    except Exception as exc:
        _log.warning("edge_purge_submit_failed", keys=keys, error=repr(exc))
