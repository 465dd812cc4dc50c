"""Channels: small declarative classes that turn subscription params into one stream.

A channel authorises a subscription (`stream_for` raises `Reject`), gives the subscriber its
first message (`snapshot`: the current state, so a client never shows a stale count), declares
what its stream's recovery needs (`recovery`: every missed message, or only the latest value)
and handles the actions a client performs. Channels are shared by all connections and keep no
per-connection state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from realtime.presence import Presence
from realtime.recovery import Recovery
from server.adapters.sessions import Session
from server.domain.events import (
    CartChanged,
    StockChanged,
    cart_stream,
    notification_stream,
    stock_stream,
)

MAX_PRODUCT_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class StateReaders:
    """The current state channels authorise by and send first, read through the domain.

    Passed in by the wiring (`server.domain.inventory.current_stock`,
    `server.domain.carts.cart_view` over the node's shard router), so the realtime layer
    holds no database handle and a test can hand channels any reader it likes.
    """

    stock: Callable[[int], Awaitable[int | None]]  # a product's stock (None: no such product)
    cart: Callable[[int], Awaitable[Mapping[str, Any]]]  # a user's cart, as the API shows it


class Reject(Exception):
    """The subscription is refused; `str()` says why (logged, not sent: Action Cable's
    `reject_subscription` has no reason field)."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One accepted subscription of one connection."""

    channel: Channel
    identifier: str
    stream: str
    params: dict[str, Any]


class Channel:
    """Base of all channels. Override `stream_for`; `snapshot` and `perform` are optional."""

    name: ClassVar[str]
    keeps_history: ClassVar[bool] = True
    # What a client that was away needs: every message it missed (replayed from history), or
    # for a stream whose newest state supersedes the rest, that state alone (`snapshot`).
    recovery: ClassVar[Recovery] = Recovery.EVERY_MESSAGE

    async def stream_for(self, params: dict[str, Any], user: Session | None) -> str:
        """The stream this subscription follows; raise `Reject` to refuse it."""
        raise NotImplementedError

    async def snapshot(self, params: dict[str, Any], user: Session | None) -> dict[str, Any] | None:
        """The first message of a new (or unrecoverable) subscription, or None."""
        return None

    def actions(self) -> frozenset[str]:
        """Actions clients may perform on this channel."""
        return frozenset()

    def joined(self, params: dict[str, Any]) -> None:
        """Invoked when a new subscription (a `subscribe` this channel authorised) starts
        receiving its stream on this node."""

    def restored(self, params: dict[str, Any]) -> None:
        """Invoked instead of `joined` when a subscription that came back with its session
        (the extended protocol's restore: no `subscribe`, no authorisation run again, possibly
        on another node than the one it was made on) starts receiving its stream here, once
        the client's `history` command has been answered. Override it to redo what `joined`
        does that the restored subscription needs (AnyCable runs nothing on a restore, its
        issue 208): a channel whose `left` undoes something of `joined` must."""

    def left(self, params: dict[str, Any]) -> None:
        """Invoked when a subscription that `joined` or was `restored` ends (unsubscribe or
        connection gone)."""


def product_id_param(params: dict[str, Any]) -> int:
    """`product_id` as a positive integer (JSON number or string of digits)."""
    value = params.get("product_id")
    if isinstance(value, bool):
        raise Reject("product_id must be an integer")
    if isinstance(value, str) and value.isdigit() and len(value) <= 19:
        value = int(value)
    if not isinstance(value, int) or not 0 < value <= MAX_PRODUCT_ID:
        raise Reject("product_id must be a positive integer")
    return value


class InventoryChannel(Channel):
    """Live stock of one product: the current count first, then every change. A client that
    was away needs only the current count (and the viewers' count comes within a second of
    its return), so its stream recovers the latest value, not every change."""

    name = "InventoryChannel"
    recovery = Recovery.LATEST_VALUE

    def __init__(self, readers: StateReaders, presence: Presence) -> None:
        self.readers = readers
        self.presence = presence

    def joined(self, params: dict[str, Any]) -> None:
        self.presence.viewer_joined(product_id_param(params))

    def restored(self, params: dict[str, Any]) -> None:
        # A viewer back from a tunnel (its `left` ran when the connection went) counts again.
        self.presence.viewer_joined(product_id_param(params))

    def left(self, params: dict[str, Any]) -> None:
        self.presence.viewer_left(product_id_param(params))

    async def stream_for(self, params: dict[str, Any], user: Session | None) -> str:
        product_id = product_id_param(params)
        if await self.readers.stock(product_id) is None:
            raise Reject(f"no product {product_id}")
        return stock_stream(product_id)

    async def snapshot(self, params: dict[str, Any], user: Session | None) -> dict[str, Any] | None:
        product_id = product_id_param(params)
        stock = await self.readers.stock(product_id)
        return StockChanged(product_id, stock or 0).to_message()


class CartChannel(Channel):
    """The caller's own cart: the cart first, then every change from any node or device."""

    name = "CartChannel"

    def __init__(self, readers: StateReaders) -> None:
        self.readers = readers

    async def stream_for(self, params: dict[str, Any], user: Session | None) -> str:
        if user is None:
            raise Reject("CartChannel needs a signed-in user")
        if "user_id" in params and str(params["user_id"]) != str(user.user_id):
            raise Reject("a cart can only be followed by its owner")
        return cart_stream(user.user_id)

    async def snapshot(self, params: dict[str, Any], user: Session | None) -> dict[str, Any] | None:
        assert user is not None  # stream_for refused anonymous callers
        return CartChanged(user.user_id, await self.readers.cart(user.user_id)).to_message()


class NotificationsChannel(Channel):
    """The caller's own notifications, as they happen."""

    name = "NotificationsChannel"

    async def stream_for(self, params: dict[str, Any], user: Session | None) -> str:
        if user is None:
            raise Reject("NotificationsChannel needs a signed-in user")
        if "user_id" in params and str(params["user_id"]) != str(user.user_id):
            raise Reject("notifications can only be followed by their owner")
        return notification_stream(user.user_id)


class BenchmarkChannel(Channel):
    """The contract of AnyCable's websocket-bench: `echo` to the sender, `broadcast` to all.

    Only registered when `FM_BENCHMARK_CHANNEL=1`. Its stream keeps no history.
    """

    name = "BenchmarkChannel"
    keeps_history = False
    STREAM = "benchmark:all"

    async def stream_for(self, params: dict[str, Any], user: Session | None) -> str:
        return self.STREAM

    def actions(self) -> frozenset[str]:
        return frozenset({"echo", "broadcast"})


class BenchmarkHistoryChannel(BenchmarkChannel):
    """`BenchmarkChannel` on a stream that keeps history (`benchmark:history`), so load tools
    can measure recovery: the extended protocol's replay after a reconnect (the reconnect
    storm in `scripts/bench/cable-storm`). Registered with `FM_BENCHMARK_CHANNEL=1` too."""

    name = "BenchmarkHistoryChannel"
    keeps_history = True
    STREAM = "benchmark:history"


def build_channels(
    readers: StateReaders, presence: Presence, *, benchmark: bool
) -> dict[str, Channel]:
    """The channels a node serves, by name."""
    channels: list[Channel] = [
        InventoryChannel(readers, presence),
        CartChannel(readers),
        NotificationsChannel(),
    ]
    if benchmark:
        channels += [BenchmarkChannel(), BenchmarkHistoryChannel()]
    return {channel.name: channel for channel in channels}
