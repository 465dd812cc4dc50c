"""Edge cache purges: tell the HTTP caches in front of the nodes which pages changed.

Cacheable storefront pages carry `Surrogate-Key`/`Cache-Tag` headers naming what they show
(`product-42`, and `products` on list pages). After a catalog write that changes a page (a
product's fields, a new image, a stock change by an admin or a checkout), the domain service
calls the purge callable it was given with those keys, like it calls `publish`: it knows no
HTTP.

That callable is `PurgeQueue.submit`: fire-and-forget for the writer (it never waits for an
edge and never fails a write), but owned by the node: a bounded queue drained by one
background task that the node starts and stops. Keys coalesce (one purge per key per
`FM_EDGE_PURGE_INTERVAL_S` however often it changes). A full queue drops the keys (counted and
logged; the pages then live until their `s-maxage`, the bound a lost purge costs anyway), and
a purge that fails is logged and counted, not retried.

Purgers, chosen by `FM_EDGE_PURGE`:

- `log` (default): logs `edge_purge` with the keys, one structured line per batch;
- `nginx`: the nginx of `config/nginx.conf` (its `/_edge/purge` location, the cache-purge
  module): one request per cached page and content coding to `FM_EDGE_PURGE_URL`;
- a CDN (Fastly's `POST /service/<id>/purge` with `Surrogate-Key`, Cloudflare's
  `purge_cache` with `tags`): implement `Purger.purge` with that API's request and add a
  choice to `FM_EDGE_PURGE`. Not shipped: there is no CDN account to test one against.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import CounterMetricFamily

from server.common.logs import get_logger

_log = get_logger("finalmarket.purge")

LIST_KEY = "products"


def product_key(product_id: int | str) -> str:
    """The surrogate key of one product's pages."""
    return f"product-{product_id}"


def page_keys(product_ids: Iterable[int]) -> list[str]:
    """The surrogate keys of the pages showing these products: theirs and the list pages'."""
    return [*(product_key(product_id) for product_id in product_ids), LIST_KEY]


class Purger(Protocol):
    """Removes the edge's cached pages tagged with any of `keys`."""

    async def purge(self, keys: Sequence[str]) -> None:
        """Purge `keys`; raise on failure (the queue logs and counts it)."""
        ...


class LogPurger:
    """Logs the keys (structured: `edge_purge keys=[...]`); no edge is told anything."""

    async def purge(self, keys: Sequence[str]) -> None:
        """Write one log line naming `keys`."""
        _log.info("edge_purge", keys=list(keys), purger="log")


class HttpPurgeFailed(RuntimeError):
    """The edge answered a purge with something other than 2xx or 404 (404: nothing cached)."""


# The page paths each surrogate key stands for at the edge (the storefront's routes: the
# product page, the first list page, the offline page). Other list pages (`/?after=...`,
# searches) are not purged: they live until their `s-maxage` (`FM_HTML_S_MAXAGE_S`).
_PRODUCT_PREFIX = "product-"
_PAGES_OF_KEY = {LIST_KEY: ("/",), "offline": ("/offline",)}
# The content codings the edge keeps one entry each for (config/nginx.conf, `$edge_coding`).
EDGE_CODINGS = ("br", "gzip", "")


def pages_of(key: str) -> tuple[str, ...]:
    """The page paths cached under surrogate key `key` (none for a key no page uses)."""
    if key.startswith(_PRODUCT_PREFIX) and key[len(_PRODUCT_PREFIX) :].isdigit():
        return (f"/products/{key[len(_PRODUCT_PREFIX) :]}",)
    return _PAGES_OF_KEY.get(key, ())


class NginxPurger:
    """Purges pages from the nginx of `config/nginx.conf`: one `GET <purge_url>` with
    `X-Purge-Key: <path>|<coding>` per page and coding, the exact cache key (the open-source
    cache-purge module purges keys, not tags)."""

    def __init__(self, purge_url: str, timeout_s: float = 2.0) -> None:
        self.purge_url = purge_url
        self.timeout_s = timeout_s

    def cache_keys(self, keys: Sequence[str]) -> list[str]:
        """The nginx cache keys of the pages tagged with `keys`, in order, once each."""
        pages = dict.fromkeys(page for key in keys for page in pages_of(key))
        return [f"{page}|{coding}" for page in pages for coding in EDGE_CODINGS]

    async def purge(self, keys: Sequence[str]) -> None:
        """One purge per cache key; a 404 is a key nothing was cached under. The first
        failure raises after trying them all."""
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        client = AsyncHTTPClient()
        failures: list[str] = []
        for cache_key in self.cache_keys(keys):
            try:
                await client.fetch(
                    self.purge_url,
                    headers={"X-Purge-Key": cache_key},
                    request_timeout=self.timeout_s,
                    connect_timeout=self.timeout_s,
                )
            except HTTPClientError as exc:
                if exc.code != 404:
                    failures.append(f"{cache_key}: {exc.code}")
            except OSError as exc:
                failures.append(f"{cache_key}: {exc!r}")
        if failures:
            raise HttpPurgeFailed("; ".join(failures))


@dataclass(slots=True)
class PurgeStats:
    """What the queue did (tests and `/metrics`)."""

    submitted: int = 0  # submits accepted (their keys were queued or already pending)
    purged: int = 0  # batches the purger finished
    failed: int = 0  # batches the purger raised on
    dropped: int = 0  # submits refused because the queue held its limit of keys


class PurgeQueue:
    """The keys waiting to be purged, and the task that hands them to a `Purger`.

    Keys coalesce: a key submitted while it is still waiting is not queued twice, and the
    drain task takes every waiting key as one batch, then rests `min_interval_s` before the
    next. So a page changing many times a second (a hot product selling out during a sale,
    every checkout changing its count) is purged at most once per interval instead of once per
    write, which would empty the edge of exactly the pages most people view; a write is at the
    edge within one interval plus a purge round trip. At most `max_keys` keys wait; past that
    a submit is dropped (logged and counted: those pages then live until their `s-maxage`).
    """

    def __init__(
        self, purger: Purger, max_keys: int = 1000, *, min_interval_s: float = 0.0
    ) -> None:
        self.purger = purger
        self.max_keys = max_keys
        self.min_interval_s = min_interval_s
        self.stats = PurgeStats()
        self._pending: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def submit(self, keys: Sequence[str]) -> None:
        """Queue `keys` for purging and return at once (drops them, logged, when full)."""
        if not keys:
            return
        fresh = [key for key in dict.fromkeys(keys) if key not in self._pending]
        if len(self._pending) + len(fresh) > self.max_keys:
            self.stats.dropped += 1
            _log.warning("edge_purge_dropped", keys=fresh, reason="queue full")
            return
        self.stats.submitted += 1
        if fresh:
            self._pending.update(dict.fromkeys(fresh))
            self._idle.clear()
            self._wake.set()

    def start(self) -> None:
        """Start draining (on the node's loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def stop(self) -> None:
        """Purge what is queued (briefly), then stop the task."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 1.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait_idle(self) -> None:
        """Wait until every waiting key was handed to the purger (tests)."""
        await self._idle.wait()

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = tuple(self._pending), {}
            try:
                await self.purger.purge(batch)
                self.stats.purged += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed += 1
                _log.warning("edge_purge_failed", keys=list(batch), error=repr(exc))
            if not self._pending:
                self._idle.set()
            if self.min_interval_s > 0:
                await asyncio.sleep(self.min_interval_s)


def make_purger(kind: str, purge_url: str | None) -> Purger:
    """The purger `FM_EDGE_PURGE` names."""
    if kind == "log":
        return LogPurger()
    if kind == "nginx":
        if not purge_url:
            raise ValueError("FM_EDGE_PURGE=nginx needs FM_EDGE_PURGE_URL")
        return NginxPurger(purge_url)
    raise ValueError(f"unknown edge purger {kind!r}")


class PurgeStatsCollector:
    """`/metrics` export of a queue's counters: `fm_edge_purges_total{outcome}`."""

    def __init__(self, queue: PurgeQueue) -> None:
        self._queue = queue

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counters as one family labelled by outcome."""
        family = CounterMetricFamily(
            "fm_edge_purges", "Edge purge batches, by outcome.", labels=["outcome"]
        )
        stats = self._queue.stats
        for outcome in ("submitted", "purged", "failed", "dropped"):
            family.add_metric([outcome], getattr(stats, outcome))
        yield family
