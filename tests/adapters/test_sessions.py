"""Sessions recorded in PostgreSQL with copies in Redis (`server/adapters/sessions.py`), on the
real databases and Redis: a session outlives Redis losing its data, a revoked one stays revoked
whatever Redis brings back after its copy's TTL, a made-up token reaches the database once per
`UNKNOWN_TTL_S`, and `live` answers from the rows where Redis has no copy.
"""

from __future__ import annotations

import pytest

from server.adapters.sessions import COPY_TTL_S, UNKNOWN_TTL_S, _key_of_digest, token_digest
from server.wiring.services import Services

pytestmark = pytest.mark.usefixtures("clean_data")


def reads(services: Services) -> int:
    """Statements the node's router has read so far (replicas and primaries)."""
    return services.router.totals().read_statements


@pytest.mark.gen_test(timeout=30)
async def test_a_session_outlives_redis_losing_its_data(services: Services) -> None:
    token = await services.sessions.create(7, is_admin=True)
    key = _key_of_digest(token_digest(token))
    assert 0 < await services.redis.ttl(key) <= COPY_TTL_S  # a copy, trusted for a minute
    await services.redis.flushdb()
    session = await services.sessions.resolve(token)
    assert session is not None and (session.user_id, session.is_admin) == (7, True)
    assert 0 < await services.redis.ttl(key) <= COPY_TTL_S  # copied again


@pytest.mark.gen_test(timeout=30)
async def test_a_revoked_session_stays_revoked_whatever_redis_brings_back(
    services: Services,
) -> None:
    token = await services.sessions.create(8)
    digest = token_digest(token)
    key = _key_of_digest(digest)
    await services.sessions.revoke(token)
    assert await services.sessions.resolve(token) is None
    # A request that read the row just before the revoke cannot copy it over the tombstone.
    await services.sessions._copy(digest, 8, False, COPY_TTL_S, first=True)
    assert await services.sessions.resolve(token) is None
    # A failover that lost the revoke brings the old copy back: trusted no longer than a
    # copy's TTL (what Redis copies never outlive); once it is gone, the row decides.
    await services.redis.delete(key)
    await services.redis.hset(key, mapping={"u": 8, "a": 0})
    await services.redis.expire(key, COPY_TTL_S)
    assert await services.sessions.resolve(token) is not None
    await services.redis.delete(key)
    assert await services.sessions.resolve(token) is None


@pytest.mark.gen_test(timeout=30)
async def test_a_made_up_token_reaches_the_database_once_per_unknown_ttl(
    services: Services,
) -> None:
    made_up = "x" * 43
    before = reads(services)
    assert await services.sessions.resolve(made_up) is None
    assert reads(services) == before + 1
    for _ in range(20):
        assert await services.sessions.resolve(made_up) is None
    assert reads(services) == before + 1  # remembered as unknown
    ttl = await services.redis.ttl(_key_of_digest(token_digest(made_up)))
    assert 0 < ttl <= UNKNOWN_TTL_S


@pytest.mark.gen_test(timeout=30)
async def test_live_answers_from_the_rows_where_redis_has_no_copy(services: Services) -> None:
    kept, flushed, revoked = [await services.sessions.create(n) for n in (1, 2, 3)]
    await services.redis.delete(_key_of_digest(token_digest(flushed)))
    await services.sessions.revoke(revoked)
    digests = [token_digest(t) for t in (kept, flushed, revoked)] + ["0" * 64]
    assert await services.sessions.live(digests) == {token_digest(kept), token_digest(flushed)}
