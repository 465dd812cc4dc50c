"""GCRA rate limiting against the real Redis: bursts, refusals, recovery, cost, concurrency,
and per-node leases (shared acquisitions, leftovers given back, two nodes on one bucket)."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server.adapters.ratelimit import (
    LEASE_TTL_S,
    Decision,
    LeasedRateLimiter,
    Limit,
    RateLimiter,
    limit_key,
)
from server.adapters.redis_client import open_redis
from server.wiring.settings import Settings


async def _with_limiter(settings: Settings) -> tuple[Any, RateLimiter]:
    redis = open_redis(settings)
    return redis, RateLimiter(redis)


def test_limit_validates_and_formats_policy() -> None:
    limit = Limit("api", rate_per_s=20, burst=10)
    assert limit.policy_header() == '"api";q=10;w=1'
    assert Limit("slow", rate_per_s=0.5, burst=30).policy_header() == '"slow";q=30;w=60'
    bad: list[tuple[str, float, int]] = [('a"b', 1, 1), ("a", 0, 1), ("a", 1, 0)]
    for name, rate, burst in bad:
        with pytest.raises(ValueError):
            Limit(name, rate, burst)
    assert limit_key(limit, "1.2.3.4") == "{rl:api:1.2.3.4}"
    assert limit_key(limit, "x}y").startswith("{rl:api:h:")


def test_header_values() -> None:
    limit = Limit("ip", rate_per_s=20, burst=10)
    allowed = Decision(limit, True, 7, 0.0, 0.15)
    assert allowed.headers() == {"RateLimit-Policy": '"ip";q=10;w=1', "RateLimit": '"ip";r=7;t=1'}
    refused = Decision(limit, False, 0, 0.05, 0.5)
    assert refused.headers() == {
        "RateLimit-Policy": '"ip";q=10;w=1',
        "RateLimit": '"ip";r=0;t=1',
        "Retry-After": "1",
    }
    assert Decision(limit, False, 0, 2.2, 3.0).headers()["Retry-After"] == "3"
    assert "Retry-After" not in Decision(limit, False, 10, math.inf, 0.0).headers()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_burst_then_refusal_then_recovery(settings: Settings) -> None:
    redis, limiter = await _with_limiter(settings)
    limit = Limit("burst", rate_per_s=5, burst=5)  # one unit back every 200 ms
    try:
        decisions = [await limiter.check(limit, "client") for _ in range(5)]
        assert all(d.allowed for d in decisions)
        assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
        refused = await limiter.check(limit, "client")
        assert not refused.allowed
        assert refused.remaining == 0
        # The wait is until one unit is back: under 200 ms since the first check.
        assert 0.0 < refused.retry_after_s <= 0.2
        assert 0.8 < refused.reset_after_s <= 1.0
        assert refused.headers() == {
            "RateLimit-Policy": '"burst";q=5;w=1',
            "RateLimit": '"burst";r=0;t=1',
            "Retry-After": "1",
        }

        await asyncio.sleep(refused.retry_after_s + 0.01)
        again = await limiter.check(limit, "client")
        assert again.allowed and again.remaining == 0
        assert not (await limiter.check(limit, "client")).allowed

        # A full bucket again after reset_after_s; the key then expires in Redis.
        await asyncio.sleep(1.01)
        assert await redis.exists(limit_key(limit, "client")) == 0
        assert (await limiter.check(limit, "client", cost=0)).remaining == 5
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_cost_spends_several_units_and_too_costly_consumes_nothing(
    settings: Settings,
) -> None:
    redis, limiter = await _with_limiter(settings)
    limit = Limit("cost", rate_per_s=20, burst=10)
    try:
        too_big = await limiter.check(limit, "gql", cost=11)
        assert not too_big.allowed and too_big.retry_after_s == math.inf
        assert too_big.remaining == 10
        assert await redis.exists(limit_key(limit, "gql")) == 0

        spent = await limiter.check(limit, "gql", cost=7)
        assert spent.allowed and spent.remaining == 3
        refused = await limiter.check(limit, "gql", cost=4)
        assert not refused.allowed and refused.remaining == 3
        assert 0.0 < refused.retry_after_s <= 0.05  # one unit short
        assert (await limiter.check(limit, "gql", cost=3)).allowed
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_keys_and_limits_are_independent(settings: Settings) -> None:
    redis, limiter = await _with_limiter(settings)
    per_ip = Limit("ip", rate_per_s=1, burst=2)
    per_user = Limit("user", rate_per_s=1, burst=2)
    try:
        for _ in range(2):
            assert (await limiter.check(per_ip, "a")).allowed
        assert not (await limiter.check(per_ip, "a")).allowed
        assert (await limiter.check(per_ip, "b")).allowed
        assert (await limiter.check(per_user, "a")).allowed
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_concurrent_checks_allow_exactly_the_burst(settings: Settings) -> None:
    # Two clients (two "nodes") so the checks also race across connections pools.
    redis_a, limiter_a = await _with_limiter(settings)
    redis_b, limiter_b = await _with_limiter(settings)
    limit = Limit("race", rate_per_s=0.1, burst=10)  # nothing refills during the test
    try:
        decisions = await asyncio.gather(
            *((limiter_a if n % 2 else limiter_b).check(limit, "hot") for n in range(100))
        )
        assert sum(d.allowed for d in decisions) == 10
        assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
        assert all(d.retry_after_s > 9 for d in decisions if not d.allowed)
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_leases_never_exceed_the_shared_limit_across_nodes(settings: Settings) -> None:
    """Two nodes lease units of one bucket (burst 200: leases of 10); together they never
    allow more than the burst, and lose at most one lease each to rounding."""
    redis_a, limiter_a = await _with_limiter(settings)
    redis_b, limiter_b = await _with_limiter(settings)
    nodes = [LeasedRateLimiter(limiter_a), LeasedRateLimiter(limiter_b)]
    limit = Limit("leased", rate_per_s=0.01, burst=200)  # nothing refills during the test
    try:
        allowed = 0
        for n in range(600):
            decision = await nodes[n % 2].check(limit, "busy")
            allowed += decision.allowed
            if not decision.allowed:
                assert decision.retry_after_s > 0 and "Retry-After" in decision.headers()
        assert 200 - 2 * 10 <= allowed <= 200
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_small_bursts_are_not_leased(settings: Settings) -> None:
    redis, limiter = await _with_limiter(settings)
    leased = LeasedRateLimiter(limiter)
    limit = Limit("tiny", rate_per_s=0.01, burst=3)
    try:
        decisions = [await leased.check(limit, "k") for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_leased_costs_and_refunds_never_exceed_the_shared_bucket(settings: Settings) -> None:
    """GraphQL's use: costs of several units and refunds of what was not used, on two nodes
    leasing from one bucket (1,000 units, leases of 50). Invariant: the units actually spent
    (charged minus refunded) never exceed the bucket, and at most one lease per node is lost."""
    redis_a, limiter_a = await _with_limiter(settings)
    redis_b, limiter_b = await _with_limiter(settings)
    nodes = [LeasedRateLimiter(limiter_a), LeasedRateLimiter(limiter_b)]
    limit = Limit("graphql-test", rate_per_s=0.01, burst=1000)  # nothing refills meanwhile
    try:
        spent = 0
        for n in range(400):
            node = nodes[n % 2]
            decision = await node.check(limit, "caller", cost=9)
            if decision.allowed:
                await node.refund(limit, "caller", 5)  # actual cost 4 of the 9 requested
                spent += 4
        assert 1000 - 2 * 50 <= spent <= 1000
        refused = await nodes[0].check(limit, "caller", cost=9)
        assert not refused.allowed and refused.retry_after_s > 0
        look = await nodes[1].check(limit, "caller", cost=0)
        assert look.allowed and look.remaining < 9
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


def _remaining_in_redis(limiter: RateLimiter, limit: Limit, key: str) -> Any:
    """What the shared bucket holds (a look: costs nothing)."""
    return limiter.check(limit, key, cost=0)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_concurrent_misses_on_one_node_share_one_lease_at_a_time(settings: Settings) -> None:
    """100 requests arriving together on a node with no lease (burst 200, leases of 10): all
    are allowed, and the node took exactly the 10 leases they spent, one after the other (the
    bug: each miss took a lease of its own, 100 x 10 units, and most were refused)."""
    redis, limiter = await _with_limiter(settings)
    node = LeasedRateLimiter(limiter)
    limit = Limit("together", rate_per_s=0.01, burst=200)  # nothing refills during the test
    try:
        decisions = await asyncio.gather(*(node.check(limit, "ip:1") for _ in range(100)))
        assert all(d.allowed for d in decisions)
        assert (await _remaining_in_redis(limiter, limit, "ip:1")).remaining == 100
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_a_concurrent_burst_over_the_limit_is_refused_for_exactly_the_excess(
    settings: Settings,
) -> None:
    """One node, 250 concurrent requests against a bucket of 200: exactly 200 allowed (the
    last units, less than a lease, are checked one by one), 50 refused with a wait."""
    redis, limiter = await _with_limiter(settings)
    node = LeasedRateLimiter(limiter)
    limit = Limit("over", rate_per_s=0.01, burst=200)
    try:
        decisions = await asyncio.gather(*(node.check(limit, "ip:1") for _ in range(250)))
        assert sum(d.allowed for d in decisions) == 200
        assert all(d.retry_after_s > 0 for d in decisions if not d.allowed)
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_concurrent_bursts_on_two_nodes_lose_at_most_one_lease_each(
    settings: Settings,
) -> None:
    """Two nodes share a bucket of 250 (leases of 12, which do not divide it). Under it (90
    each): all allowed. Over it (then 150 more each): the allowed total is the burst less at
    most one lease per node, never more."""
    redis_a, limiter_a = await _with_limiter(settings)
    redis_b, limiter_b = await _with_limiter(settings)
    nodes = [LeasedRateLimiter(limiter_a), LeasedRateLimiter(limiter_b)]
    limit = Limit("two-nodes", rate_per_s=0.01, burst=250)  # leases of 12
    try:
        under = await asyncio.gather(*(nodes[n % 2].check(limit, "ip:1") for n in range(180)))
        assert all(d.allowed for d in under)
        over = await asyncio.gather(*(nodes[n % 2].check(limit, "ip:1") for n in range(300)))
        allowed = 180 + sum(d.allowed for d in over)
        assert 250 - 2 * 12 <= allowed <= 250
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_an_expired_lease_gives_its_unused_units_back(settings: Settings) -> None:
    """A lease of 10 spent once, then left past its TTL: the next acquisition gives the 9
    unused units back to Redis, so the bucket is charged only for what was spent plus the
    new lease."""
    redis, limiter = await _with_limiter(settings)
    clock = [1000.0]
    node = LeasedRateLimiter(limiter, clock=lambda: clock[0])
    limit = Limit("expiry", rate_per_s=0.01, burst=200)
    try:
        assert (await node.check(limit, "ip:1")).allowed
        assert (await _remaining_in_redis(limiter, limit, "ip:1")).remaining == 190
        clock[0] += LEASE_TTL_S + 0.1
        assert (await node.check(limit, "ip:1")).allowed
        # 2 spent; the second lease holds 9: 200 - 1 (first) - 10 (second lease).
        assert (await _remaining_in_redis(limiter, limit, "ip:1")).remaining == 189
        look = await node.check(limit, "ip:1", cost=0)
        assert look.remaining == 198
    finally:
        await redis.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_misses_share_the_failure_of_an_unreachable_redis(
    settings: Settings,
) -> None:
    """Redis unreachable: every request waiting for the one acquisition fails with its error
    (a connection error the handlers answer as 503), and none hangs."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    redis = open_redis(dead)
    node = LeasedRateLimiter(RateLimiter(redis))
    limit = Limit("down", rate_per_s=1, burst=200)
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(node.check(limit, "ip:1") for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
        assert time.monotonic() - started < 3 * settings.redis_timeout_s + 5
    finally:
        await redis.aclose()


class _CountingLimiter(RateLimiter):
    """The real limiter, counting the checks that reach Redis."""

    calls = 0

    async def check(self, limit: Limit, key: str, cost: int = 1, returned: int = 0) -> Decision:
        self.calls += 1
        return await super().check(limit, key, cost=cost, returned=returned)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_a_flood_past_the_limit_is_refused_without_a_round_trip_each(
    settings: Settings,
) -> None:
    """Found by scripts/bench/floods: every refused request of a flooding address was one
    Redis check, so a flood kept Redis (and the node's connections to it) busy for everyone.
    Once Redis refuses, Redis would refuse the same until the wait it named has passed: those
    refusals are answered by the node, each with what is left of the wait; then Redis decides
    again, and the address is allowed as its bucket refills."""
    redis = open_redis(settings)
    limiter = _CountingLimiter(redis)
    node = LeasedRateLimiter(limiter)
    # Leases of 1 (every unit checked); a unit each 4 s, so a loaded machine's slowness does
    # not refill the bucket during the flood.
    limit = Limit("flood", rate_per_s=0.25, burst=20)
    try:
        burst = [await node.check(limit, "ip:9") for _ in range(20)]
        assert all(d.allowed for d in burst) and limiter.calls == 20
        flood = [await node.check(limit, "ip:9") for _ in range(500)]
        assert not any(d.allowed for d in flood)
        assert limiter.calls <= 22, limiter.calls  # one refusal asked, the rest answered here
        waits = [d.retry_after_s for d in flood]
        assert all(0 < w <= 4.0 + 1e-3 for w in waits) and waits[-1] <= waits[1]
        await asyncio.sleep(waits[-1] + 0.02)
        assert (await node.check(limit, "ip:9")).allowed  # refilled: Redis allows again
        assert (await node.check(limit, "ip:other")).allowed  # other addresses: untouched
    finally:
        await redis.aclose()
