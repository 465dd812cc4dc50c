"""The cache on a real 3-master Valkey cluster: one namespace's entries spread over every master
(`keys.BUCKETS` hash tags), and namespace and entity bumps still invalidate exactly what they
name, every bucket of a namespace at once."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from server.adapters.cache import NS_PRODUCT, CachedLoader, keys
from server.wiring.infra import ValkeyServer
from tests.helpers.caches import CountingLoader
from tests.helpers.redis_cluster import valkey_cluster

PRODUCTS = 300


@pytest.fixture(scope="module")
def three_masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ValkeyServer]]:
    """Three masters, no replicas (nothing here fails over)."""
    with valkey_cluster(tmp_path_factory.mktemp("cache-cluster"), masters=3, replicas=0) as nodes:
        yield nodes


@pytest.fixture
def cluster(io_loop: Any, three_masters: list[ValkeyServer]) -> Iterator[RedisCluster]:
    """An asyncio client of the emptied cluster."""
    for node in three_masters:
        with redis.Redis(port=node.port) as direct:
            direct.flushall()
    client = RedisCluster.from_url(three_masters[0].url)
    yield client
    io_loop.run_sync(client.aclose)


def _value_keys_per_master(nodes: list[ValkeyServer]) -> dict[int, int]:
    counts: dict[int, int] = collections.Counter()
    for node in nodes:
        with redis.Redis(port=node.port) as direct:
            counts[node.port] = sum(
                1 for _ in direct.scan_iter(match=f"{{cache:{NS_PRODUCT}:*}}:v*", count=1000)
            )
    return counts


@pytest.mark.gen_test(timeout=60)
async def test_product_entries_land_on_every_master(
    cluster: RedisCluster, three_masters: list[ValkeyServer]
) -> None:
    cache = CachedLoader(cluster, node_id="spread")
    for product_id in range(1, PRODUCTS + 1):
        await cache.get_or_load(NS_PRODUCT, product_id, CountingLoader(product_id), 60)
    per_master = _value_keys_per_master(three_masters)
    assert sum(per_master.values()) == PRODUCTS
    # Every master holds a share, none most of it (64 tags over 3 masters: about a third each).
    assert len(per_master) == 3 and min(per_master.values()) > PRODUCTS * 0.15, per_master
    assert max(per_master.values()) < PRODUCTS * 0.6, per_master
    await cache.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_bumps_on_a_cluster_invalidate_what_they_name(cluster: RedisCluster) -> None:
    cache = CachedLoader(cluster, node_id="bumps", local_max_entries=1)  # reads reach Redis
    loaders = {n: CountingLoader(n) for n in range(1, 41)}
    for n, loader in loaders.items():
        assert (await cache.get_or_load(NS_PRODUCT, n, loader, 60))["n"] == 1
    assert len({keys.bucket(str(n)) for n in loaders}) > 10  # the ids span many buckets
    # An entity bump reloads that id only.
    await cache.bump(NS_PRODUCT, 7)
    cache.invalidate_all_local()
    for n, loader in loaders.items():
        await cache.get_or_load(NS_PRODUCT, n, loader, 60)
    assert {n for n, loader in loaders.items() if loader.calls == 2} == {7}
    # A namespace bump reaches every bucket: every id reloads, in whichever slot it is.
    versions = {int(await cluster.get(key) or 0) for key in keys.bucket_version_keys(NS_PRODUCT)}
    assert versions == {0}
    assert await cache.bump(NS_PRODUCT) == 1
    versions = {int(await cluster.get(key)) for key in keys.bucket_version_keys(NS_PRODUCT)}
    assert versions == {1}
    cache.invalidate_all_local()
    for n, loader in loaders.items():
        await cache.get_or_load(NS_PRODUCT, n, loader, 60)
    assert all(loader.calls == (3 if n == 7 else 2) for n, loader in loaders.items())
    await cache.aclose()
