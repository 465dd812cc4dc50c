"""Checkout, orders and notifications (CONTRACT "REST": `/checkout`, `/orders`,
`/notifications`).

`POST /api/v1/checkout` needs an `Idempotency-Key` header (1..255 characters): the same key
returns the first answer again (with `Idempotent-Replayed: true`), also when the requests
race on several nodes. Lists are cursor-paginated: `?first=N&after=<next_cursor>`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from handlers.api import ApiHandler
from handlers.base import ApiError
from handlers.gate import Gate
from handlers.openapi import Operation, Query, page_size_schema
from server.domain.checkout import MAX_KEY_CHARS, CheckoutInProgress, CheckoutService
from server.domain.notifications import NotificationService
from server.domain.orders import DEFAULT_PAGE, MAX_PAGE, OrderService

IDEMPOTENCY_HEADER = "Idempotency-Key"


PAGE_QUERY: dict[str, str | Query] = {
    "first": Query("page size", page_size_schema(DEFAULT_PAGE, MAX_PAGE)),
    "after": "next_cursor of the previous page",
}


class _OrdersBase(ApiHandler):
    """Handlers of checkout, orders and notifications: they get those domain services."""

    checkout: CheckoutService
    orders: OrderService
    notifications: NotificationService

    def initialize(  # type: ignore[override]
        self,
        gate: Gate,
        checkout: CheckoutService,
        orders: OrderService,
        notifications: NotificationService,
    ) -> None:
        super().initialize(gate)
        self.checkout = checkout
        self.orders = orders
        self.notifications = notifications


class _Paged(_OrdersBase):
    def page_args(self) -> tuple[int, str | None]:
        """`first` (1..MAX_PAGE, default DEFAULT_PAGE) and `after` from the query string."""
        raw = self.get_query_argument("first", None)
        first = DEFAULT_PAGE
        if raw is not None:
            if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw[:6]) <= MAX_PAGE:
                raise ApiError(
                    422,
                    "invalid-query",
                    f"first must be an integer between 1 and {MAX_PAGE}",
                    field="first",
                )
            first = int(raw)
        return first, self.get_query_argument("after", None)


class CheckoutHandler(_OrdersBase):
    """`POST /api/v1/checkout`: turn the caller's cart into an order (201 `{order}`)."""

    openapi_path = "/api/v1/checkout"
    openapi = {
        "POST": Operation(
            "Check out the cart; answers {order}; the same key answers the same order",
            ok=201,
            auth="user",
            headers={IDEMPOTENCY_HEADER: "required, 1..255 characters, one per checkout"},
            problems={
                400: "Idempotency-Key missing or too long",
                409: "out-of-stock (product_id, available) or checkout-in-progress",
            },
        )
    }

    async def post(self) -> None:
        session = self.require_user()
        key = self.request.headers.get(IDEMPOTENCY_HEADER)
        if not key:
            raise ApiError(
                400,
                "idempotency-key-required",
                f"send an {IDEMPOTENCY_HEADER} header (1 to {MAX_KEY_CHARS} characters) so "
                "a retried checkout cannot order twice",
                field=IDEMPOTENCY_HEADER,
            )
        if len(key) > MAX_KEY_CHARS:
            raise ApiError(
                400,
                "invalid-idempotency-key",
                f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} characters",
                field=IDEMPOTENCY_HEADER,
            )
        service = self.checkout
        body = self.request.body
        request_hash = hashlib.sha256(body).hexdigest() if body else ""
        try:
            result = await service.checkout(session.user_id, key, request_hash)
        except CheckoutInProgress as exc:
            raise ApiError(
                409, exc.kind, exc.detail, headers={"Retry-After": "1"}, **exc.fields
            ) from None
        if result.replayed:
            self.set_header("Idempotent-Replayed", "true")
        self.write_json(result.body, status=result.status)


class OrdersHandler(_Paged):
    """`GET /api/v1/orders`: the caller's orders, newest first (`{items, next_cursor}`)."""

    openapi_path = "/api/v1/orders"
    openapi = {
        "GET": Operation(
            "The caller's orders, newest first",
            auth="user",
            query=PAGE_QUERY,
        )
    }

    async def get(self) -> None:
        session = self.require_user()
        first, after = self.page_args()
        orders = self.orders
        self.write_json(await orders.page(session.user_id, first, after))


class OrderHandler(_OrdersBase):
    """`GET /api/v1/orders/{id}`: one of the caller's orders (404 for anyone else's)."""

    openapi_path = "/api/v1/orders/{order_id}"
    openapi = {
        "GET": Operation("One of the caller's orders", auth="user", problems={404: "no such order"})
    }

    async def get(self, order_id: str) -> None:
        session = self.require_user()
        orders = self.orders
        self.write_json(await orders.get(session.user_id, int(order_id)))


class NotificationsHandler(_Paged):
    """`GET /api/v1/notifications`: the caller's notifications, newest first
    (`{items, next_cursor, unread}`)."""

    openapi_path = "/api/v1/notifications"
    openapi = {
        "GET": Operation(
            "The caller's notifications, newest first",
            auth="user",
            query=PAGE_QUERY,
        )
    }

    async def get(self) -> None:
        session = self.require_user()
        first, after = self.page_args()
        service = self.notifications
        self.write_json(await service.page(session.user_id, first, after))


class NotificationReadHandler(_OrdersBase):
    """`POST /api/v1/notifications/{id}/read`: mark one read; answers the notification."""

    openapi_path = "/api/v1/notifications/{notification_id}/read"
    openapi = {
        "POST": Operation(
            "Mark a notification read", auth="user", problems={404: "no such notification"}
        )
    }

    async def post(self, notification_id: str) -> None:
        session = self.require_user()
        service = self.notifications
        self.write_json(await service.mark_read(session.user_id, int(notification_id)))


def routes(
    gate: Gate,
    checkout: CheckoutService,
    orders: OrderService,
    notifications: NotificationService,
) -> list[Any]:
    """The checkout, order and notification routes, for `server.wiring.app.make_app`."""
    deps = {"gate": gate, "checkout": checkout, "orders": orders, "notifications": notifications}
    return [
        (r"/api/v1/checkout", CheckoutHandler, deps),
        (r"/api/v1/orders", OrdersHandler, deps),
        (r"/api/v1/orders/([0-9]+)", OrderHandler, deps),
        (r"/api/v1/notifications", NotificationsHandler, deps),
        (r"/api/v1/notifications/([0-9]+)/read", NotificationReadHandler, deps),
    ]
