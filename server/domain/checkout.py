"""Checkout: a saga across the catalog (stock) and the buyer's shard (order), with an
idempotency key, compensation, and a sweeper that repairs what a crash leaves behind.

The steps, each its own transaction on one database:

1. **Claim** the `Idempotency-Key` on the user's shard (`INSERT ... ON CONFLICT DO NOTHING`)
   and read the cart. A completed key returns its stored answer; a key another request is
   working on is waited for briefly, then answered `checkout-in-progress` (409). An empty cart
   rolls the claim back.
2. **Reserve** stock in the catalog: one conditional `UPDATE inventory ... WHERE stock >= q`
   per line plus a `stock_reservations` row in state `held`, all in one transaction. A line
   without stock rolls everything back (nothing stays reserved) and answers `out-of-stock`
   with `product_id` and `available`.
3. **Write the order** on the shard: first the key row is moved to `completed` (with the
   stored answer) — only if it is still `started` — then the order, its items, the order
   confirmation notification, and the emptied cart lines. The key update is the commit point
   of the saga: it takes the key row's lock, and the sweeper decides a saga's fate by
   deleting that same row only while it is still `started`, so exactly one of "order written"
   and "reservation released" can ever happen.
4. **Confirm** the reservations (`held` -> `committed`). Then events are published: the
   notification, the new stock levels, the emptied cart.

A failure after step 2 compensates (held reservations are released: stock returned, state
`released`, the claim removed so the key can be retried) unless the order was in fact
written. A crash between steps leaves `held` reservations (and a `started` key) behind; the
`CheckoutSweeper` commits the reservations of sagas whose order exists and releases the
others once they are older than a bound.

Invariant (tested): initial stock = stock left + quantity in `held` reservations + quantity
ordered, once every saga has reached a final state (between steps 3 and 4 an ordered
quantity is still `held` too).

Nothing here imports Tornado; events leave through an injected `publish(stream, message)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.adapters.db.router import ShardRouter
from server.common.errors import Conflict, InvalidInput, NotFound
from server.common.logs import get_logger
from server.domain.carts import load_cart
from server.domain.events import CartChanged, Publish, Purge, StockChanged, announce, pages_changed
from server.domain.inventory import OutOfStock
from server.domain.notifications import NotificationService, insert_notification
from server.domain.orders import order_dict

MAX_KEY_CHARS = 255
_log = get_logger("finalmarket.checkout")


class CheckoutInProgress(Conflict):
    """Another request with the same idempotency key has not finished yet."""

    kind = "checkout-in-progress"


class CartEmpty(InvalidInput):
    """There is nothing to check out."""

    kind = "cart-empty"


class IdempotencyKeyReused(InvalidInput):
    """The key was first used for a different request."""

    kind = "idempotency-key-reused"


class InvalidIdempotencyKey(InvalidInput):
    """The key is empty or longer than 255 characters."""

    kind = "invalid-idempotency-key"


@dataclass(frozen=True, slots=True)
class Line:
    """One cart line as checkout takes it: the quantity and the snapshot price."""

    product_id: int
    quantity: int
    unit_price_cents: int
    currency: str


@dataclass(frozen=True, slots=True)
class CheckoutResult:
    """The answer to a checkout: HTTP-free status and body, and whether it is a replay."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


def check_key(key: str) -> None:
    """Refuse idempotency keys outside 1..255 characters."""
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters", field="Idempotency-Key"
        )


# Returns the reserved quantities to stock in one statement per call. Quantities are summed
# per product first: `UPDATE ... FROM` applies at most one joined row to each target row.
_RELEASE_SQL = """
WITH released AS (
    UPDATE stock_reservations SET state = 'released', updated_at = now()
    WHERE user_id = %s AND idempotency_key = %s AND state = 'held'
    RETURNING product_id, quantity
), per_product AS (
    SELECT product_id, sum(quantity)::int AS quantity FROM released GROUP BY product_id
)
UPDATE inventory i SET stock = i.stock + p.quantity, updated_at = now()
FROM per_product p WHERE i.product_id = p.product_id
RETURNING i.product_id, i.stock
"""


async def release_reservations(router: ShardRouter, user_id: int, key: str) -> dict[int, int]:
    """Release a saga's `held` reservations (stock += q, state `released`); returns the new
    stock per product. Idempotent: released or committed reservations are left alone."""
    async with router.catalog_write() as cur:
        await cur.execute(_RELEASE_SQL, (user_id, key))
        return {int(pid): int(stock) for pid, stock in await cur.fetchall()}


async def commit_reservations(router: ShardRouter, user_id: int, key: str) -> int:
    """Mark a saga's `held` reservations `committed` (its order exists); returns how many."""
    async with router.catalog_write() as cur:
        await cur.execute(
            "UPDATE stock_reservations SET state = 'committed', updated_at = now() "
            "WHERE user_id = %s AND idempotency_key = %s AND state = 'held'",
            (user_id, key),
        )
        return int(cur.rowcount)


async def announce_stock(
    publish: Publish | None, purge: Purge | None, stock: dict[int, int]
) -> None:
    """After stock moved (`{product_id: left}`): the new counts on the products' streams, and
    the pages that show them purged from the edge (coalesced by the purge queue, so a product
    selling fast is purged at most once per `FM_EDGE_PURGE_INTERVAL_S`)."""
    if not stock:
        return
    pages_changed(purge, stock)
    for product_id, left in stock.items():
        await announce(publish, StockChanged(product_id, left))


class CheckoutService:
    """Runs the checkout saga for one request; see the module docstring for the steps.

    `in_progress_wait_s` is how long a request waits for another request holding the same
    key before answering `checkout-in-progress`. `after_reserve` is a test hook awaited
    between steps 2 and 3 (a crash test kills the process while it sleeps).
    """

    def __init__(
        self,
        router: ShardRouter,
        publish: Publish | None = None,
        *,
        purge: Purge | None = None,
        in_progress_wait_s: float = 3.0,
        poll_interval_s: float = 0.05,
        after_reserve: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.router = router
        self.publish = publish
        self.purge = purge
        self.in_progress_wait_s = in_progress_wait_s
        self.poll_interval_s = poll_interval_s
        self.after_reserve = after_reserve
        self.notifications = NotificationService(router, publish)

    async def checkout(self, user_id: int, key: str, request_hash: str = "") -> CheckoutResult:
        """Check out the user's cart under `key`: a new order (201), or the first answer
        again for a key used before. Raises `OutOfStock`, `CartEmpty`,
        `CheckoutInProgress`, `IdempotencyKeyReused`, `InvalidIdempotencyKey`."""
        check_key(key)
        deadline = time.monotonic() + self.in_progress_wait_s
        while True:
            claimed = await self.claim(user_id, key, request_hash)
            if isinstance(claimed, CheckoutResult):
                return claimed
            if claimed is not None:
                return await self._run(user_id, key, claimed)
            if time.monotonic() >= deadline:
                raise CheckoutInProgress(
                    "a checkout with this Idempotency-Key is still running; retry shortly",
                    retry_after_s=1,
                )
            await asyncio.sleep(self.poll_interval_s)

    # --- the steps (public so tests can run a saga part way, as a crash would) --------------

    async def claim(
        self, user_id: int, key: str, request_hash: str = ""
    ) -> list[Line] | CheckoutResult | None:
        """Step 1: claim `key` and read the cart lines. Returns the lines when claimed, the
        stored answer when the key completed before, None while another request holds it."""
        async with self.router.write(user_id) as cur:
            await cur.execute(
                "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (%s, %s, %s) "
                "ON CONFLICT (user_id, key) DO NOTHING RETURNING state",
                (user_id, key, request_hash),
            )
            if await cur.fetchone() is None:
                await cur.execute(
                    "SELECT state, status_code, response, request_hash FROM idempotency_keys "
                    "WHERE user_id = %s AND key = %s",
                    (user_id, key),
                )
                existing = await cur.fetchone()
                if existing is None:
                    return None  # removed since our INSERT looked (a failed attempt): retry
                state, status_code, response, stored_hash = existing
                if stored_hash != request_hash:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was used for a different request",
                        field="Idempotency-Key",
                    )
                if state == "completed":
                    return CheckoutResult(int(status_code), dict(response), replayed=True)
                return None
            await cur.execute(
                "SELECT product_id, quantity, unit_price_cents, currency FROM cart_items "
                "WHERE user_id = %s ORDER BY product_id",
                (user_id,),
            )
            lines = [
                Line(int(pid), int(qty), int(price), str(currency))
                for pid, qty, price, currency in await cur.fetchall()
            ]
            if not lines:
                raise CartEmpty("the cart is empty")  # rolls the claim back
            if len({line.currency for line in lines}) > 1:
                raise InvalidInput("the cart mixes currencies; check them out separately")
        return lines

    async def reserve(self, user_id: int, key: str, lines: list[Line]) -> dict[int, int]:
        """Step 2: reserve every line in one catalog transaction; returns the new stock per
        product. `OutOfStock` (nothing stays reserved) when a line lacks stock."""
        stock: dict[int, int] = {}
        # As the buyer: their next catalog reads (the cart's `available`) see this change.
        async with self.router.catalog_write(user_id) as cur:
            for line in lines:  # in product order: concurrent sagas lock rows in one order
                await cur.execute(
                    "UPDATE inventory SET stock = stock - %s, updated_at = now() "
                    "WHERE product_id = %s AND stock >= %s RETURNING stock",
                    (line.quantity, line.product_id, line.quantity),
                )
                row = await cur.fetchone()
                if row is None:
                    await cur.execute(
                        "SELECT stock FROM inventory WHERE product_id = %s", (line.product_id,)
                    )
                    found = await cur.fetchone()
                    if found is None:
                        raise NotFound(
                            f"product {line.product_id} no longer exists; remove it from the cart",
                            product_id=str(line.product_id),
                        )
                    available = int(found[0])
                    raise OutOfStock(line.product_id, available, line.quantity)
                stock[line.product_id] = int(row[0])
            # A key retried after a failed attempt finds that attempt's rows `released`.
            await cur.execute(
                "INSERT INTO stock_reservations (user_id, idempotency_key, product_id, quantity) "
                "SELECT %s, %s, p, q FROM unnest(%s::bigint[], %s::int[]) AS t(p, q) "
                "ON CONFLICT (user_id, idempotency_key, product_id) DO UPDATE "
                "SET quantity = EXCLUDED.quantity, state = 'held', created_at = now(), "
                "    updated_at = now() "
                "WHERE stock_reservations.state = 'released' RETURNING product_id",
                (
                    user_id,
                    key,
                    [line.product_id for line in lines],
                    [line.quantity for line in lines],
                ),
            )
            if len(await cur.fetchall()) != len(lines):
                raise CheckoutInProgress(
                    "an earlier attempt with this Idempotency-Key still holds stock; retry later"
                )
        return stock

    async def write_order(
        self, user_id: int, key: str, lines: list[Line]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Step 3: the order, its items, its notification, the emptied cart lines and the
        completed key, in one shard transaction. Returns (order, cart, notification).
        `CheckoutInProgress` when the key is no longer ours (the sweeper gave up on it)."""
        total = sum(line.quantity * line.unit_price_cents for line in lines)
        currency = lines[0].currency
        product_ids = [line.product_id for line in lines]
        async with self.router.write(user_id) as cur:
            # First: lock the key row, and make sure the sweeper has not released this saga.
            await cur.execute(
                "SELECT 1 FROM idempotency_keys WHERE user_id = %s AND key = %s "
                "AND state = 'started' FOR UPDATE",
                (user_id, key),
            )
            if await cur.fetchone() is None:
                raise CheckoutInProgress("this checkout was abandoned; retry it")
            await cur.execute(
                "INSERT INTO orders (user_id, idempotency_key, status, total_cents, currency) "
                "VALUES (%s, %s, 'confirmed', %s, %s) "
                "RETURNING id, status, total_cents, currency, created_at",
                (user_id, key, total, currency),
            )
            order_row = await cur.fetchone()
            order_id = int(order_row[0])
            await cur.execute(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price_cents) "
                "SELECT %s, p, q, c FROM unnest(%s::bigint[], %s::int[], %s::bigint[]) "
                "AS t(p, q, c)",
                (
                    order_id,
                    product_ids,
                    [line.quantity for line in lines],
                    [line.unit_price_cents for line in lines],
                ),
            )
            await cur.execute(
                "DELETE FROM cart_items WHERE user_id = %s AND product_id = ANY(%s::bigint[])",
                (user_id, product_ids),
            )
            await cur.execute(
                "UPDATE carts SET version = version + 1, updated_at = now() WHERE user_id = %s",
                (user_id,),
            )
            units = sum(line.quantity for line in lines)
            notification = await insert_notification(
                cur,
                user_id,
                "order_confirmed",
                f"Order {order_id} confirmed",
                f"{units} item{'s' if units != 1 else ''}, total {total / 100:.2f} {currency}",
            )
            order = order_dict(
                order_row,
                [
                    {
                        "product_id": str(line.product_id),
                        "quantity": line.quantity,
                        "unit_price_cents": line.unit_price_cents,
                    }
                    for line in lines
                ],
            )
            await cur.execute(
                "UPDATE idempotency_keys SET state = 'completed', status_code = 201, "
                "response = %s::jsonb, updated_at = now() WHERE user_id = %s AND key = %s",
                (json.dumps({"order": order}), user_id, key),
            )
            cart = await load_cart(cur, user_id)
        return order, cart, notification

    async def confirm(self, user_id: int, key: str) -> None:
        """Step 4: the reservations become `committed` (the sweeper retries it on failure)."""
        try:
            await commit_reservations(self.router, user_id, key)
        except Exception as exc:  # the order stands; the sweeper commits later
            _log.warning("confirm_failed", user_id=user_id, error=repr(exc))

    # --- the saga ---------------------------------------------------------------------------

    async def _run(self, user_id: int, key: str, lines: list[Line]) -> CheckoutResult:
        try:
            stock = await self.reserve(user_id, key, lines)
        except Exception:
            await self._abandon(user_id, key)
            raise
        if self.after_reserve is not None:
            await self.after_reserve()
        try:
            order, cart, notification = await self.write_order(user_id, key, lines)
        except Exception:
            await self._compensate(user_id, key)
            raise
        await self.confirm(user_id, key)
        await self.notifications.announce(user_id, notification)
        await self._publish_stock(stock)
        await announce(self.publish, CartChanged(user_id, cart))
        return CheckoutResult(201, {"order": order})

    async def _abandon(self, user_id: int, key: str) -> None:
        """Undo an attempt that wrote no order: release its held stock, then free the key.

        Failures here are logged: what remains (held stock, a `started` key) is the
        sweeper's to repair.
        """
        try:
            released = await release_reservations(self.router, user_id, key)
            async with self.router.write(user_id) as cur:
                await cur.execute(
                    "DELETE FROM idempotency_keys WHERE user_id = %s AND key = %s "
                    "AND state = 'started'",
                    (user_id, key),
                )
        except Exception as exc:  # the sweeper repairs it
            _log.warning("abandon_failed", user_id=user_id, error=repr(exc))
            return
        await self._publish_stock(released)

    async def _compensate(self, user_id: int, key: str) -> None:
        """After a failed step 3: release the stock unless the order was written after all
        (a COMMIT whose answer was lost); when that cannot be told, leave it to the sweeper."""
        try:
            async with self.router.read(user_id, fresh=True) as cur:
                await cur.execute(
                    "SELECT 1 FROM orders WHERE user_id = %s AND idempotency_key = %s",
                    (user_id, key),
                )
                written = await cur.fetchone() is not None
        except Exception as exc:  # the shard is unreachable: sweeper's job
            _log.warning("compensation_deferred", user_id=user_id, error=repr(exc))
            return
        if written:
            await self.confirm(user_id, key)
        else:
            await self._abandon(user_id, key)

    async def _publish_stock(self, stock: dict[int, int]) -> None:
        await announce_stock(self.publish, self.purge, stock)


@dataclass(slots=True)
class SweepReport:
    """What one sweep did."""

    committed: int = 0  # sagas whose held stock became committed (their order exists)
    released: int = 0  # sagas whose held stock went back (no order)
    keys_removed: int = 0  # stale `started` keys removed (no reservation, no order)
    cart_keys_removed: int = 0  # cart changes' keys older than the cart key TTL


class CheckoutSweeper:
    """Repairs sagas a crash left between steps, every `period_s` seconds.

    A saga whose reservations are still `held` after `stale_after_s` is decided on the
    buyer's shard by deleting its key row if it is still `started` (the same row step 3
    locks and completes first, so the two cannot both win): if the order exists, the
    reservations become `committed`; otherwise they are released and the key may be retried.
    `started` keys older than twice the bound with no order (a crash before any
    reservation) are removed too, and so are the keys of cart changes
    (`server.domain.carts.Once`) older than `cart_key_ttl_s`, after which a replay is a new
    change anyway (Redis has forgotten its answer too). Safe to run on every node at once:
    every change is conditional on the state it changes.
    """

    def __init__(
        self,
        router: ShardRouter,
        publish: Publish | None = None,
        *,
        purge: Purge | None = None,
        period_s: float = 30.0,
        stale_after_s: float = 60.0,
        cart_key_ttl_s: float | None = None,
        batch_size: int = 500,
    ) -> None:
        self.router = router
        self.cart_key_ttl_s = cart_key_ttl_s
        self.publish = publish
        self.purge = purge
        self.period_s = period_s
        self.stale_after_s = stale_after_s
        self.batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        """Start sweeping on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop sweeping: a sweep under way finishes first (cancelling one mid-transaction
        would only leave its work to the next node), then the task ends."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.period_s)
            if self._stopping.is_set():
                return
            try:
                report = await self.sweep_once()
            except Exception as exc:  # a database may be down: try next period
                _log.warning("sweep_failed", error=repr(exc))
                continue
            if report.committed or report.released or report.keys_removed:
                _log.info(
                    "sweep",
                    committed=report.committed,
                    released=report.released,
                    keys_removed=report.keys_removed,
                    cart_keys_removed=report.cart_keys_removed,
                )
            elif report.cart_keys_removed:
                _log.info("sweep", cart_keys_removed=report.cart_keys_removed)

    async def sweep_once(self) -> SweepReport:
        """One pass over stale held reservations and stale started keys."""
        report = SweepReport()
        async with self.router.catalog_read(fresh=True) as cur:
            await cur.execute(
                "SELECT DISTINCT user_id, idempotency_key FROM stock_reservations "
                "WHERE state = 'held' AND created_at < now() - make_interval(secs => %s) "
                "LIMIT %s",
                (self.stale_after_s, self.batch_size),
            )
            sagas = [(int(user_id), str(key)) for user_id, key in await cur.fetchall()]
        stock: dict[int, int] = {}
        for user_id, key in sagas:
            try:
                if await self._decide(user_id, key):
                    await commit_reservations(self.router, user_id, key)
                    report.committed += 1
                else:
                    stock.update(await release_reservations(self.router, user_id, key))
                    report.released += 1
            except Exception as exc:  # one shard down must not stop the others
                _log.warning("sweep_saga_failed", user_id=user_id, error=repr(exc))
        await announce_stock(self.publish, self.purge, stock)
        report.keys_removed = await self._remove_stale_keys()
        if self.cart_key_ttl_s is not None:
            report.cart_keys_removed = await self._remove_old_cart_keys(self.cart_key_ttl_s)
        return report

    async def _decide(self, user_id: int, key: str) -> bool:
        """True when the saga's order exists; otherwise the key is freed (if still
        `started`), after which step 3 of a still-running saga can no longer succeed."""
        async with self.router.write(user_id) as cur:
            await cur.execute(
                "DELETE FROM idempotency_keys WHERE user_id = %s AND key = %s "
                "AND state = 'started'",
                (user_id, key),
            )
            await cur.execute(
                "SELECT 1 FROM orders WHERE user_id = %s AND idempotency_key = %s",
                (user_id, key),
            )
            return await cur.fetchone() is not None

    async def _remove_stale_keys(self) -> int:
        return await self._delete_on_every_shard(
            "DELETE FROM idempotency_keys k WHERE k.state = 'started' "
            "AND k.created_at < now() - make_interval(secs => %s) "
            "AND NOT EXISTS (SELECT 1 FROM orders o "
            "    WHERE o.user_id = k.user_id AND o.idempotency_key = k.key)",
            (2 * self.stale_after_s,),
        )

    async def _remove_old_cart_keys(self, ttl_s: float) -> int:
        # At most `batch_size` per shard and sweep: a backlog drains over a few periods
        # instead of one long DELETE (the partial index keeps finding them cheap).
        return await self._delete_on_every_shard(
            "DELETE FROM idempotency_keys WHERE ctid IN ("
            "    SELECT ctid FROM idempotency_keys WHERE key LIKE 'cart:%%' "
            "    AND updated_at < now() - make_interval(secs => %s) LIMIT %s)",
            (ttl_s, self.batch_size),
        )

    async def _delete_on_every_shard(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one DELETE on every shard; how many rows went (a shard down is skipped)."""
        removed = 0
        shard_count = len(self.router.db.shards)
        for index in range(shard_count):
            # Routing takes a user id: the smallest positive id that lives on shard `index`.
            some_user_on_shard = index or shard_count
            try:
                async with self.router.write(some_user_on_shard) as cur:
                    await cur.execute(sql, params)
                    removed += int(cur.rowcount)
            except Exception as exc:  # next period
                _log.warning("sweep_keys_failed", shard=index, error=repr(exc))
        return removed


__all__ = [
    "CartEmpty",
    "CheckoutInProgress",
    "CheckoutResult",
    "CheckoutService",
    "CheckoutSweeper",
    "IdempotencyKeyReused",
    "InvalidIdempotencyKey",
    "Line",
    "OutOfStock",
    "SweepReport",
]
