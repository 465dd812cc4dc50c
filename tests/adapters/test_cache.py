"""The Redis cache against the real Redis: read-through, versions, stampedes, XFetch, the
local layer and cross-node invalidation. Two `CachedLoader`s with their own Redis clients
stand for two nodes sharing one Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server.adapters.cache import (
    CachedLoader,
    CacheStats,
    CacheStatsCollector,
    LocalLRU,
    should_refresh_early,
)
from server.adapters.cache import keys as cache_keys
from server.adapters.redis_client import open_redis
from server.wiring.settings import Settings
from tests.helpers.caches import CountingLoader, Nodes
from tests.helpers.deployment import make_settings


@pytest.fixture
def nodes(io_loop: Any, settings: Settings, clean_data: None) -> Iterator[Nodes]:
    """A factory of cache "nodes" on the test's loop; closed after the test."""
    made = Nodes(settings)
    yield made
    io_loop.run_sync(made.close)


async def _eventually(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- pure parts -------------------------------------------------------------------------------


def test_keys_share_the_hash_tag_of_their_bucket() -> None:
    bucket = cache_keys.bucket("42")
    assert 0 <= bucket < cache_keys.BUCKETS
    assert cache_keys.version_key("product", "42") == f"{{cache:product:{bucket}}}:version"
    assert cache_keys.value_key("product", "3.1", "42") == f"{{cache:product:{bucket}}}:v3.1:42"
    assert len(cache_keys.bucket_version_keys("product")) == cache_keys.BUCKETS
    assert len({cache_keys.bucket(str(n)) for n in range(1000)}) == cache_keys.BUCKETS
    assert cache_keys.id_part(42) == "42"
    assert cache_keys.id_part("page?q={x}").startswith("h:")
    assert len(cache_keys.id_part("x" * 500)) == 66
    with pytest.raises(ValueError):
        cache_keys.check_namespace("a}b")


def test_xfetch_rule() -> None:
    # -delta * beta * ln(rand) >= ttl_left: a costly value near expiry is refreshed early.
    assert not should_refresh_early(0.05, 1.0, 1.0, lambda: 0.5)  # 0.035 s < 1 s
    assert should_refresh_early(0.05, 1.0, 1.0, lambda: 1e-12)  # 1.38 s >= 1 s
    assert should_refresh_early(0.05, 0.0, 1.0, lambda: 0.99)  # expired
    assert not should_refresh_early(0.05, 1.0, 0.0, lambda: 1e-12)  # beta 0: never early
    rng = random.Random(7)
    early = sum(should_refresh_early(0.1, 0.1, 1.0, rng.random) for _ in range(10_000))
    assert 3300 < early < 4100  # P = exp(-ttl_left / delta) = e^-1 ~ 0.37


def test_local_lru_bounds_entries_and_freshness() -> None:
    now = [0.0]
    lru = LocalLRU(max_entries=3, max_staleness_s=1.0, clock=lambda: now[0])
    for n in range(3):
        assert lru.put("p", str(n), n, lru.ticket())
    assert lru.get("p", "0") == (True, 0)  # 0 is now the most recently used
    lru.put("p", "3", 3, lru.ticket())
    assert len(lru) == 3
    assert lru.get("p", "1") == (False, None)  # least recently used went first
    assert [lru.get("p", str(n))[0] for n in (0, 2, 3)] == [True, True, True]

    now[0] = 0.999
    assert lru.get("p", "0") == (True, 0)
    now[0] = 1.0
    assert lru.get("p", "0") == (False, None)  # never older than the freshness bound

    lru.put("p", "short", "x", lru.ticket(), fresh_for_s=0.1)  # Redis TTL closer than bound
    now[0] = 1.1
    assert lru.get("p", "short") == (False, None)


def test_local_lru_invalidation() -> None:
    lru = LocalLRU(max_entries=10, max_staleness_s=10.0)
    lru.put("p", "1", "one", lru.ticket())
    lru.put("p", "2", "two", lru.ticket())
    lru.put("q", "1", "other", lru.ticket())
    lru.invalidate("p", "1")
    assert lru.get("p", "1")[0] is False and lru.get("p", "2")[0] is True
    lru.invalidate("p")
    assert lru.get("p", "2")[0] is False and lru.get("q", "1")[0] is True
    stale_ticket = lru.ticket()
    lru.invalidate("q")
    assert not lru.put("p", "3", "read before the invalidation", stale_ticket)
    assert LocalLRU(max_entries=0).put("p", "1", 1, 0) is False  # disabled layer


def test_counters_export_to_prometheus() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    stats = {"product": CacheStats(local_hits=5, hits=3, misses=2, loads=2)}
    registry = CollectorRegistry()
    registry.register(CacheStatsCollector(lambda: stats))
    text = generate_latest(registry).decode()
    assert 'fm_cache_lookups_total{ns="product",result="local_hit"} 5.0' in text
    assert 'fm_cache_lookups_total{ns="product",result="miss"} 2.0' in text
    assert 'fm_cache_events_total{event="loads",ns="product"} 2.0' in text


# --- against Redis ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_get_or_load_caches_equal_values(nodes: Nodes) -> None:
    a = nodes.cache()
    b = nodes.cache(local_max_entries=0)  # no local layer: every read goes to Redis
    loader = CountingLoader(key=42)
    first = await a.get_or_load("product", 42, loader, ttl_s=30)
    assert first == {"id": 42, "n": 1, "tags": ["a", "b"], "price": {"cents": 1999}}
    assert await a.get_or_load("product", 42, loader, ttl_s=30) == first  # local
    assert await b.get_or_load("product", 42, loader, ttl_s=30) == first  # Redis
    assert await b.get_or_load("product", "42", loader, ttl_s=30) == first  # same id
    assert loader.calls == 1
    stats_a = a.stats("product")
    assert (stats_a.local_hits, stats_a.hits, stats_a.misses, stats_a.loads) == (1, 0, 1, 1)
    assert (b.stats("product").hits, b.stats("product").misses) == (2, 0)

    none_calls = 0

    async def load_none() -> None:
        nonlocal none_calls
        none_calls += 1

    assert await b.get_or_load("product", 404, load_none, ttl_s=30) is None
    assert await b.get_or_load("product", 404, load_none, ttl_s=30) is None  # cached None
    assert none_calls == 1


@pytest.mark.gen_test(timeout=30)
async def test_values_expire_with_their_ttl(nodes: Nodes) -> None:
    cache = nodes.cache(local_max_entries=0)
    loader = CountingLoader()
    await cache.get_or_load("product", 1, loader, ttl_s=0.1)
    await asyncio.sleep(0.15)
    assert (await cache.get_or_load("product", 1, loader, ttl_s=0.1))["n"] == 2


@pytest.mark.gen_test(timeout=30)
async def test_bump_makes_the_next_read_reload_on_every_node(nodes: Nodes) -> None:
    a, b = nodes.cache(), nodes.cache()
    await nodes.listen(b)
    one, two = CountingLoader(1), CountingLoader(2)
    assert (await a.get_or_load("product", 1, one, 30))["n"] == 1
    assert (await b.get_or_load("product", 1, one, 30))["n"] == 1
    assert (await b.get_or_load("product", 2, two, 30))["n"] == 1

    # Per-entity bump: product 1 reloads, product 2 stays cached.
    assert await a.bump("product", 1) == 1
    assert (await a.get_or_load("product", 1, one, 30))["n"] == 2
    await _eventually(lambda: b.local.get("product", "1")[0] is False)
    assert (await b.get_or_load("product", 1, one, 30))["n"] == 2
    assert (await b.get_or_load("product", 2, two, 30))["n"] == 1
    assert one.calls == 2 and two.calls == 1

    # Namespace bump: everything in it reloads; other namespaces are untouched.
    listing = CountingLoader("page:1")
    assert (await a.get_or_load("product_list", "page:1", listing, 30))["n"] == 1
    assert await a.bump("product") == 1
    await _eventually(lambda: b.local.get("product", "2")[0] is False)
    assert (await b.get_or_load("product", 1, one, 30))["n"] == 3
    assert (await b.get_or_load("product", 2, two, 30))["n"] == 2
    assert (await b.get_or_load("product_list", "page:1", listing, 30))["n"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_load_racing_a_bump_cannot_store_a_stale_value(nodes: Nodes) -> None:
    a, b = nodes.cache(local_max_entries=0), nodes.cache(local_max_entries=0)
    release = asyncio.Event()
    calls = 0

    async def slow_old_read() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "read before the write"

    pending = asyncio.ensure_future(a.get_or_load("product", 7, slow_old_read, 30))
    await asyncio.sleep(0.05)  # the load is under way (it read the database "before" the write)
    await b.bump("product", 7)  # the write commits and invalidates
    release.set()
    assert await pending == "read before the write"

    async def fresh_read() -> str:
        return "read after the write"

    assert await b.get_or_load("product", 7, fresh_read, 30) == "read after the write"
    assert await a.get_or_load("product", 7, fresh_read, 30) == "read after the write"


@pytest.mark.gen_test(timeout=60)
async def test_stampede_on_an_expired_hot_key_across_two_nodes(nodes: Nodes) -> None:
    # lock_wait_s: a slow test machine must not make the waiting node give up and load.
    a, b = nodes.cache(lock_wait_s=10), nodes.cache(lock_wait_s=10)
    loader = CountingLoader(key=99, delay_s=0.05)  # a database read that takes 50 ms
    await a.get_or_load("product", 99, loader, ttl_s=0.1)
    await asyncio.sleep(0.2)  # expired in Redis and in both local layers
    loader.calls = 0

    results = await asyncio.gather(
        *((a if n % 2 else b).get_or_load("product", 99, loader, ttl_s=30) for n in range(1000))
    )
    assert loader.calls <= 2, f"{loader.calls} loads for one expired key"
    assert loader.calls == 1  # with the lock working, the other node waited for the first
    assert len({r["n"] for r in results}) == 1
    stats = [cache.stats("product") for cache in (a, b)]
    assert sum(s.misses for s in stats) == 1 + 1000  # the first fill, then the stampede
    assert sum(s.coalesced for s in stats) == 998  # one Redis read per node
    assert sum(s.lock_waits for s in stats) == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_dead_lock_holder_stalls_nobody_for_long(nodes: Nodes) -> None:
    cache = nodes.cache(lock_ttl_s=2.0, lock_wait_s=5.0)
    redis = nodes.clients[-1]
    # Another node took the lock for version 0.0 and died: its lock expires in 300 ms.
    await redis.set(cache_keys.lock_key("product", "0.0", "5"), "dead-node", px=300)
    loader = CountingLoader(5)
    started = time.monotonic()
    assert (await cache.get_or_load("product", 5, loader, 30))["n"] == 1
    waited = time.monotonic() - started
    assert 0.25 < waited < 1.0, waited  # taken over once the lock expired, not after 5 s
    assert cache.stats("product").lock_waits == 1

    # A lock that never goes away (a stuck holder): the bound applies.
    stuck = nodes.cache(lock_wait_s=0.2)
    await redis.set(cache_keys.lock_key("product", "0.0", "6"), "stuck-node", px=60_000)
    started = time.monotonic()
    assert (await stuck.get_or_load("product", 6, CountingLoader(6), 30))["n"] == 1
    assert 0.15 < time.monotonic() - started < 1.0
    assert stuck.stats("product").lock_wait_timeouts == 1


@pytest.mark.gen_test(timeout=30)
async def test_loader_errors_reach_every_waiter_and_release_the_lock(nodes: Nodes) -> None:
    cache = nodes.cache()
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        raise RuntimeError("database down")

    outcomes = await asyncio.gather(
        *(cache.get_or_load("product", 8, failing, 30) for _ in range(20)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
    assert cache.stats("product").load_errors == 1
    # The lock was released: another node loads at once instead of waiting.
    other = nodes.cache(lock_ttl_s=5, lock_wait_s=5)
    started = time.monotonic()
    assert (await other.get_or_load("product", 8, CountingLoader(8), 30))["n"] == 1
    assert time.monotonic() - started < 1.0
    assert other.stats("product").lock_waits == 0


@pytest.mark.gen_test(timeout=30)
async def test_xfetch_refreshes_early_with_injected_randomness(nodes: Nodes) -> None:
    draws = [0.5]
    cache = nodes.cache(local_max_entries=0, rand=lambda: draws[0])
    loader = CountingLoader(key=3, delay_s=0.05)  # delta ~ 0.05 s
    assert (await cache.get_or_load("product", 3, loader, ttl_s=1.0))["n"] == 1

    # -0.05 * ln(0.5) = 0.035 s, far below the ~1 s left: no early refresh.
    for _ in range(5):
        assert (await cache.get_or_load("product", 3, loader, ttl_s=1.0))["n"] == 1
    await cache.wait_refreshes()
    assert loader.calls == 1

    # -0.05 * ln(1e-12) = 1.38 s >= time left: this read answers at once with the current
    # value and one background refresh replaces it, well before expiry.
    draws[0] = 1e-12
    assert (await cache.get_or_load("product", 3, loader, ttl_s=1.0))["n"] == 1
    assert (await cache.get_or_load("product", 3, loader, ttl_s=1.0))["n"] == 1  # one refresh
    await cache.wait_refreshes()
    assert loader.calls == 2
    assert cache.stats("product").early_refreshes == 1
    draws[0] = 0.5
    assert (await cache.get_or_load("product", 3, loader, ttl_s=1.0))["n"] == 2
    assert cache.stats("product").misses == 1  # every read after the first was a hit


@pytest.mark.gen_test(timeout=30)
async def test_xfetch_keeps_a_hot_key_from_ever_missing(nodes: Nodes) -> None:
    """A key read every 10 ms with a seeded random source: refreshed before it expires."""
    cache = nodes.cache(local_max_entries=0, rand=random.Random(2015).random)
    loader = CountingLoader(key=4, delay_s=0.03)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        await cache.get_or_load("product", 4, loader, ttl_s=0.25)
        await asyncio.sleep(0.01)
    await cache.wait_refreshes()
    stats = cache.stats("product")
    assert stats.early_refreshes >= 3, stats  # 1 s of reads over a 0.25 s TTL
    # Loads after the first are early refreshes. (A read that comes after expiry while a late
    # refresh is still running waits for it: a miss, but no extra load.) One slack load for a
    # starved test machine, where a read may come only after expiry with no refresh running.
    assert 1 + stats.early_refreshes <= loader.calls <= 2 + stats.early_refreshes, stats


@pytest.mark.gen_test(timeout=30)
async def test_single_flight_within_a_node(nodes: Nodes) -> None:
    cache = nodes.cache(local_max_entries=0)
    loader = CountingLoader(key=10, delay_s=0.02)
    results = await asyncio.gather(
        *(cache.get_or_load("product", 10, loader, 30) for _ in range(200))
    )
    assert loader.calls == 1 and all(r == results[0] for r in results)
    assert cache.stats("product").coalesced == 199
    # A caller that gives up does not cancel the fetch the others wait for.
    slow = CountingLoader(key=11, delay_s=0.1)
    first = asyncio.ensure_future(cache.get_or_load("product", 11, slow, 30))
    second = asyncio.ensure_future(cache.get_or_load("product", 11, slow, 30))
    await asyncio.sleep(0.02)
    first.cancel()
    assert (await second)["n"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_local_layer_is_bounded_in_size_and_staleness(nodes: Nodes) -> None:
    a = nodes.cache(local_max_entries=5, local_max_staleness_s=0.5)
    b = nodes.cache(local_max_entries=0)
    loaders = {n: CountingLoader(n) for n in range(8)}
    for n in range(8):
        await a.get_or_load("product", n, loaders[n], 30)
    assert len(a.local) == 5
    assert [a.local.get("product", str(n))[0] for n in range(8)] == [False] * 3 + [True] * 5

    # Another node bumps product 7 and a's listener is not running (the message is "lost"):
    # a serves its copy only until the freshness bound passes, then reads the new version.
    await b.bump("product", 7)
    assert (await a.get_or_load("product", 7, loaders[7], 30))["n"] == 1  # local, stale
    await asyncio.sleep(0.55)
    assert (await a.get_or_load("product", 7, loaders[7], 30))["n"] == 2
    assert a.stats("product").local_hits == 1

    # local=False: always read through to Redis, so a bump is seen at once.
    session = CountingLoader("t")
    await a.get_or_load("session", "t", session, 30, local=False)
    await b.bump("session", "t")
    assert (await a.get_or_load("session", "t", session, 30, local=False))["n"] == 2
    assert a.stats("session").local_hits == 0 and len(a.local) <= 5


@pytest.mark.gen_test(timeout=30)
async def test_a_bump_from_one_node_clears_the_others_local_entry(nodes: Nodes) -> None:
    a, b = nodes.cache(), nodes.cache(local_max_staleness_s=60.0)
    listener = await nodes.listen(b)
    loader = CountingLoader(20)
    await b.get_or_load("product", 20, loader, 30)
    await b.get_or_load("product_list", "p1", loader, 30)
    assert b.local.get("product", "20")[0] is True

    await a.bump("product", 20)
    await _eventually(lambda: b.local.get("product", "20")[0] is False, timeout_s=1.0)
    assert b.local.get("product_list", "p1")[0] is True

    await a.bump("product_list")
    await _eventually(lambda: b.local.get("product_list", "p1")[0] is False, timeout_s=1.0)
    assert listener.reconnects == 0


@pytest.mark.gen_test(timeout=30)
async def test_listener_reconnects_and_clears_the_local_layer(nodes: Nodes) -> None:
    a, b = nodes.cache(), nodes.cache(local_max_staleness_s=60.0)
    listener = await nodes.listen(b)
    await b.get_or_load("product", 30, CountingLoader(30), 30)
    # Kill the listener's pub/sub connection from the server side.
    redis = nodes.clients[0]
    clients = await redis.client_list(_type="pubsub")
    assert clients
    for client in clients:
        await redis.client_kill_filter(_id=client["id"])
    await _eventually(lambda: listener.reconnects == 1, timeout_s=5.0)
    assert b.local.get("product", "30")[0] is False  # bumps may have been missed: all cleared
    await b.get_or_load("product", 30, CountingLoader(30), 30)
    await a.bump("product", 30)
    await _eventually(lambda: b.local.get("product", "30")[0] is False, timeout_s=1.0)


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_degrades_to_calling_the_loader(infra_env: dict[str, str]) -> None:
    redis = open_redis(make_settings(infra_env, redis_url="redis://127.0.0.1:1/0"))
    cache = CachedLoader(redis)
    loader = CountingLoader(1)
    try:
        results = await asyncio.gather(
            *(cache.get_or_load("product", 1, loader, 30) for _ in range(5))
        )
        assert [r["n"] for r in results] == [1] * 5
        assert cache.stats("product").redis_errors == 1
    finally:
        await cache.aclose()
        await redis.aclose()
