"""`CachedLoader`: read-through caching in Redis with stampede protection on three levels.

`get_or_load(ns, key, loader, ttl_s)` answers, cheapest first:

1. from the node's in-memory LRU (`local.py`), within its freshness bound;
2. from Redis, with one round trip (`store.py`). Concurrent callers on this node for the same
   key share one fetch (single flight): 1,000 requests for a hot key cost one Redis read;
3. on a miss, from `loader()`, by exactly one caller across all nodes when things go well: the
   read that misses also tries a short Redis lock (`SET NX PX`). The node that gets it loads and
   stores; the others poll the key briefly (each poll also retries the lock, so a holder that
   died or failed hands over as soon as its lock expires or is released), and after
   `lock_wait_s` load by themselves: a stuck holder can delay a read, never stall it.

Hot keys are refreshed before they expire (XFetch, `xfetch.py`): a read that decides to
refresh still answers with the current value at once, and one background refresh (guarded by
the same lock, so one per key across nodes) stores the new value.

Invalidation is by version (`versions.py`): `bump` changes the key names, publishes the bump to
the other nodes and clears this node's local copies. Values and load durations travel as
msgpack, so a loader must return msgpack-serialisable data (tuples come back as lists).

If Redis is unreachable the loader is called directly (still single-flighted on this node):
the cache degrades to no cache instead of failing requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from server.adapters.cache import keys
from server.adapters.cache.local import LocalLRU
from server.adapters.cache.stats import CacheStats
from server.adapters.cache.store import RedisStore, pack
from server.adapters.cache.versions import MAX_VALUE_TTL_S, Versions
from server.adapters.cache.xfetch import Random, should_refresh_early
from server.common.logs import get_logger

_log = get_logger("finalmarket.cache")

Loader = Callable[[], Awaitable[Any]]
_HIT, _MISS = "hit", "miss"
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.05
# RedisClusterException: a slot no reachable master serves (a master died, no failover yet).
_REDIS_DOWN = (RedisError, RedisClusterException, OSError)


class CachedLoader:
    """Per-node cache front: local LRU, Redis, single-flighted loads, versions, counters."""

    def __init__(
        self,
        redis: Any,
        *,
        node_id: str | None = None,
        local_max_entries: int = 10_000,
        local_max_staleness_s: float = 1.0,
        lock_ttl_s: float = 2.0,
        lock_wait_s: float = 1.0,
        beta: float = 1.0,
        rand: Random = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`lock_ttl_s` bounds how long a dead loader's lock blocks others; `lock_wait_s`
        how long a caller waits for another node's load before loading itself. `rand` and
        `clock` are injectable for tests (XFetch draws, load durations, local freshness)."""
        self.node_id = node_id or f"cache-{secrets.token_hex(4)}"
        self.local = LocalLRU(local_max_entries, local_max_staleness_s, clock)
        self._redis = redis
        self._store = RedisStore(redis)
        self._versions = Versions(redis, self.node_id)
        self._lock_ms = max(1, int(lock_ttl_s * 1000))
        self._lock_wait_s = lock_wait_s
        self._beta = beta
        self._rand = rand
        self._clock = clock
        self._stats: dict[str, CacheStats] = {}
        self._in_flight: dict[tuple[str, str, bool], asyncio.Task[tuple[Any, str]]] = {}
        self._refreshing: dict[tuple[str, str], asyncio.Task[None]] = {}

    # --- reading ------------------------------------------------------------------------------

    async def get_or_load(
        self, ns: str, key: str | int, loader: Loader, ttl_s: float, *, local: bool = True
    ) -> Any:
        """The cached value of `key` in `ns`, calling `loader()` to compute it on a miss.

        `ttl_s` is the value's lifetime in Redis (at most `MAX_VALUE_TTL_S`). `local=False`
        skips the in-memory layer (reads always reach Redis): for data that must not lag a
        bump by even the freshness bound, such as resolved sessions after a revocation.
        """
        keys.check_namespace(ns)
        if not 0 < ttl_s <= MAX_VALUE_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_VALUE_TTL_S}]")
        ident = keys.id_part(key)
        stats = self.stats(ns)
        if local:
            found, value = self.local.get(ns, ident)
            if found:
                stats.local_hits += 1
                return value
        flight = (ns, ident, local)
        task = self._in_flight.get(flight)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch(ns, ident, loader, ttl_s, self.local.ticket() if local else None)
            )
            self._in_flight[flight] = task
            task.add_done_callback(self._fetch_done(flight))
        else:
            stats.coalesced += 1
        # Shielded: a caller that gives up (client gone) must not cancel the others' fetch.
        value, outcome = await asyncio.shield(task)
        if outcome == _HIT:
            stats.hits += 1
        else:
            stats.misses += 1
        return value

    def _fetch_done(self, flight: tuple[str, str, bool]) -> Callable[[asyncio.Task[Any]], None]:
        def done(task: asyncio.Task[Any]) -> None:
            if self._in_flight.get(flight) is task:
                del self._in_flight[flight]
            if not task.cancelled():
                task.exception()  # retrieved here, so nobody left waiting is not an error

        return done

    async def _fetch(
        self, ns: str, ident: str, loader: Loader, ttl_s: float, ticket: int | None
    ) -> tuple[Any, str]:
        """One fetch shared by this node's concurrent callers; `ticket` None: no local copy."""
        token = secrets.token_hex(8)
        try:
            read = await self._store.read(ns, ident, token, self._lock_ms)
        except _REDIS_DOWN as exc:
            self.stats(ns).redis_errors += 1
            _log.warning("cache_redis_unavailable", ns=ns, error=repr(exc))
            value, _delta_s = await self._call_loader(ns, loader)
            return value, _MISS
        if read.found is not None:
            found = read.found
            if should_refresh_early(found.delta_s, found.ttl_left_s, self._beta, self._rand):
                self._refresh_in_background(ns, ident, read.version, loader, ttl_s, ticket)
            if ticket is not None:
                self.local.put(ns, ident, found.value, ticket, found.ttl_left_s)
            return found.value, _HIT
        if read.locked:
            value = await self._load_and_store(ns, ident, read.version, loader, ttl_s, token)
        else:
            value = await self._wait_for_other_node(ns, ident, read.version, loader, ttl_s, token)
        if ticket is not None:
            self.local.put(ns, ident, value, ticket, ttl_s)
        return value, _MISS

    async def _wait_for_other_node(
        self, ns: str, ident: str, version: str, loader: Loader, ttl_s: float, token: str
    ) -> Any:
        """Another node holds the load lock: poll for its value, take over the lock if it is
        released or expires, and load regardless after `lock_wait_s`."""
        stats = self.stats(ns)
        stats.lock_waits += 1
        deadline = self._clock() + self._lock_wait_s
        pause = _POLL_FIRST_S
        while self._clock() < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)
            found, locked = await self._store.poll(ns, ident, version, token, self._lock_ms)
            if found is not None:
                return found.value
            if locked:
                return await self._load_and_store(ns, ident, version, loader, ttl_s, token)
        stats.lock_wait_timeouts += 1
        return await self._load_and_store(ns, ident, version, loader, ttl_s, token)

    async def _call_loader(self, ns: str, loader: Loader) -> tuple[Any, float]:
        stats = self.stats(ns)
        stats.loads += 1
        started = self._clock()
        try:
            value = await loader()
        except Exception:
            stats.load_errors += 1
            raise
        return value, self._clock() - started

    async def _load_and_store(
        self, ns: str, ident: str, version: str, loader: Loader, ttl_s: float, token: str
    ) -> Any:
        """Load, store at `version` (the one read before loading: if a bump happened
        meanwhile, the possibly stale value lands where nobody reads) and release the lock."""
        try:
            value, delta_s = await self._call_loader(ns, loader)
        except BaseException:
            with contextlib.suppress(*_REDIS_DOWN):
                await self._store.unlock(ns, ident, version, token)
            raise
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        try:
            await self._store.store(ns, ident, version, pack(value, delta_s), ttl_ms, token)
        except _REDIS_DOWN as exc:
            self.stats(ns).redis_errors += 1
            _log.warning("cache_store_failed", ns=ns, error=repr(exc))
        return value

    def _refresh_in_background(
        self, ns: str, ident: str, version: str, loader: Loader, ttl_s: float, ticket: int | None
    ) -> None:
        flight = (ns, ident)
        if flight in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(
            self._refresh(ns, ident, version, loader, ttl_s, ticket)
        )
        self._refreshing[flight] = task
        task.add_done_callback(lambda _task: self._refreshing.pop(flight, None))

    async def _refresh(
        self, ns: str, ident: str, version: str, loader: Loader, ttl_s: float, ticket: int | None
    ) -> None:
        token = secrets.token_hex(8)
        try:
            if not await self._store.try_lock(ns, ident, version, token, self._lock_ms):
                return  # another node is refreshing it
            self.stats(ns).early_refreshes += 1
            value = await self._load_and_store(ns, ident, version, loader, ttl_s, token)
        except Exception as exc:
            _log.warning("cache_refresh_failed", ns=ns, error=repr(exc))
            return
        if ticket is not None:  # the refreshed value replaces this node's copy too
            self.local.put(ns, ident, value, ticket, ttl_s)

    async def wait_refreshes(self) -> None:
        """Wait for the background refreshes running now (tests, shutdown)."""
        if self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)

    # --- invalidation -------------------------------------------------------------------------

    async def bump(self, ns: str, key: str | int | None = None) -> int:
        """Invalidate `ns` (or one `key` of it) on every node; returns the new version.

        Call it after the database write commits. This node forgets its copies at once; other
        nodes on the bump message, or at the latest when their freshness bound passes.
        """
        version = await self._versions.bump(ns, key)
        self.invalidate(ns, None if key is None else keys.id_part(key))
        return version

    def invalidate(self, ns: str, ident: str | None = None) -> None:
        """Forget this node's in-memory copies of `ns` (or of one id); Redis is untouched.

        Fetches in flight for them are detached, so later callers read the new version.
        """
        self.local.invalidate(ns, ident)
        if ident is None:
            for flight in [flight for flight in self._in_flight if flight[0] == ns]:
                del self._in_flight[flight]
        else:
            self._in_flight.pop((ns, ident, True), None)
            self._in_flight.pop((ns, ident, False), None)

    def on_remote_bump(self, ns: str, ident: str | None = None) -> None:
        """Hook for the invalidation listener: another node bumped `ns` (or one id of it)."""
        self.invalidate(ns, ident)

    async def redis_lost_writes(self, slots: Collection[int]) -> None:
        """Redis lost the last writes of `slots` (their master failed over unplanned), bumps
        among them: bump the namespace version of every bucket there, of every namespace used
        on this node, so no value a lost bump had invalidated is served again (a miss
        instead). Other nodes do the same for theirs; a bucket bumped twice costs one more miss."""
        self.invalidate_all_local()
        pipe = self._redis.pipeline(transaction=False)
        bumped = 0
        for ns in list(self._stats):
            for number in range(keys.BUCKETS):
                if keys.bucket_slot(ns, number) in slots:
                    pipe.incr(keys.bucket_prefix(ns, number) + "version")
                    bumped += 1
        if bumped:
            await pipe.execute()
        _log.warning("cache_buckets_bumped_after_lost_writes", buckets=bumped)

    def invalidate_all_local(self) -> None:
        """Forget every in-memory copy (bump messages may have been missed)."""
        self.local.clear()
        self._in_flight.clear()

    # --- counters and shutdown ----------------------------------------------------------------

    def stats(self, ns: str) -> CacheStats:
        """The counters of `ns` on this node (created on first use)."""
        stats = self._stats.get(ns)
        if stats is None:
            stats = self._stats[ns] = CacheStats()
        return stats

    def all_stats(self) -> dict[str, CacheStats]:
        """Counters of every namespace used on this node."""
        return dict(self._stats)

    async def aclose(self) -> None:
        """Cancel background refreshes (the Redis client belongs to the caller)."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
