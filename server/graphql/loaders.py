"""Per-request DataLoaders: each resolver asks for one key; keys asked for in the same loop
iteration are fetched by one call of the batch function, and each key at most once per request.

`BatchLoader` is written here rather than taken from `aiodataloader` (see README, "Written by
hand"): it schedules one loop callback per batch instead of two tasks, and it has `prefetch`,
which list resolvers use to start the batch for all their rows at once. That keeps statements
per query independent of the number of rows even when the executor completes list items one
after another (tartiflette with `coerce_list_concurrently` off), where per-item `load` calls
would never meet in one batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from server.domain.carts import cart_view
from server.common.errors import NotFound
from server.domain.users import User, UserService

if TYPE_CHECKING:
    from server.wiring.services import Services

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

BatchFn = Callable[[list[K]], Awaitable[Mapping[K, V | None]]]


class BatchLoader(Generic[K, V]):
    """Loads values by key in batches, remembering each key's value for its lifetime (one
    request). The batch function gets the distinct keys of one loop iteration and returns a
    mapping; a key it leaves out reads as None."""

    __slots__ = ("_batch_fn", "_futures", "_loop", "_queue")

    def __init__(self, batch_fn: BatchFn[K, V]) -> None:
        self._batch_fn = batch_fn
        self._futures: dict[K, asyncio.Future[V | None]] = {}
        self._queue: list[K] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def load(self, key: K) -> asyncio.Future[V | None]:
        """The value of `key` (await it); fetched with the other keys of this iteration."""
        future = self._futures.get(key)
        if future is None:
            future = self._enqueue(key)
        return future

    async def load_many(self, keys: Iterable[K]) -> list[V | None]:
        """The values of `keys`, in order."""
        futures = [self.load(key) for key in keys]
        return [await future for future in futures]

    def prefetch(self, keys: Iterable[K]) -> None:
        """Start fetching `keys` without waiting (a list resolver, for its rows' fields)."""
        for key in keys:
            if key not in self._futures:
                self._enqueue(key)

    def prime(self, key: K, value: V) -> None:
        """Remember a value fetched some other way (a list page holds its products)."""
        future = self._futures.get(key)
        if future is None or future.done():  # a value already known is replaced too
            future = self._loop_now().create_future()
            self._futures[key] = future
        future.set_result(value)

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _enqueue(self, key: K) -> asyncio.Future[V | None]:
        loop = self._loop_now()
        future: asyncio.Future[V | None] = loop.create_future()
        self._futures[key] = future
        if not self._queue:
            loop.call_soon(self._dispatch)
        self._queue.append(key)
        return future

    def _dispatch(self) -> None:
        keys, self._queue = self._queue, []
        task = self._loop_now().create_task(self._run(keys))
        task.add_done_callback(_retrieve)

    async def _run(self, keys: list[K]) -> None:
        try:
            found = await self._batch_fn(keys)
        except BaseException as exc:
            for key in keys:
                future = self._futures.get(key)
                if future is not None and not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
                        future.exception()  # marked retrieved: a prefetch may have no waiter
                    # A failed key may be asked for again (and retried) later in the request.
                    del self._futures[key]
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for key in keys:
            future = self._futures.get(key)
            if future is not None and not future.done():
                future.set_result(found.get(key))


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Loaders:
    """The DataLoaders of one request, over the node's domain services.

    Keys are ids as the API shows them (strings of digits), so resolvers pass what they hold.
    """

    __slots__ = ("cart", "product", "stock", "user")

    def __init__(self, services: Services) -> None:
        catalog, router = services.catalog, services.router

        async def products(keys: list[str]) -> dict[str, dict[str, Any] | None]:
            ids = {key: int(key) for key in keys if _is_id(key)}
            found = await catalog.products_by_ids(list(ids.values()))
            return {key: found.get(product_id) for key, product_id in ids.items()}

        async def stock(keys: list[str]) -> dict[str, int]:
            ids = {key: int(key) for key in keys if _is_id(key)}
            counts = await catalog.stock.get_many(ids.values())
            return {key: counts.get(product_id, 0) for key, product_id in ids.items()}

        async def users(keys: list[int]) -> dict[int, User]:
            return await UserService(router).get_many(keys)

        async def carts(keys: list[int]) -> dict[int, dict[str, Any]]:
            views = await asyncio.gather(*(cart_view(router, user_id) for user_id in keys))
            return dict(zip(keys, views, strict=True))

        self.product: BatchLoader[str, dict[str, Any]] = BatchLoader(products)
        self.stock: BatchLoader[str, int] = BatchLoader(stock)
        self.user: BatchLoader[int, User] = BatchLoader(users)
        self.cart: BatchLoader[int, dict[str, Any]] = BatchLoader(carts)


MAX_ID = 2**63 - 1


def _is_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and len(key) <= 19 and 0 < int(key) <= MAX_ID


def parse_id(raw: Any, what: str = "product") -> int:
    """An `ID` argument as a positive bigint, or `NotFound` naming it (ids are digits)."""
    text = str(raw)
    if not _is_id(text):
        raise NotFound(f"no {what} {text!r}: {what} ids are digits", **{f"{what}_id": text})
    return int(text)
