"""Shard routing: globally allocated user ids put each user on shard `id % 4`, and only there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg2
import pytest

from server.adapters.db.pools import Database, shard_index
from server.adapters.db.router import ShardRouter
from server.common.errors import Conflict, InvalidInput
from server.domain.users import UserService
from server.wiring.settings import Settings
from tests.helpers.deployment import primary_dsns


def test_shard_index_is_id_modulo_shard_count() -> None:
    assert [shard_index(user_id, 4) for user_id in (1, 2, 3, 4, 5, 8, 13)] == [1, 2, 3, 0, 1, 0, 1]
    with pytest.raises(ValueError):
        shard_index(0, 4)


@asynccontextmanager
async def user_service(settings: Settings) -> AsyncIterator[UserService]:
    """A UserService on its own pools and router, closed afterwards."""
    db = await Database.open(settings)
    router = ShardRouter.for_settings(db, settings)
    try:
        yield UserService(router)
    finally:
        await router.close()
        await db.close()


def _emails_by_shard(dsns: list[str]) -> list[dict[int, str]]:
    found = []
    for dsn in dsns:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT id, email FROM users")
            found.append(dict(cur.fetchall()))
        conn.close()
    return found


@pytest.mark.gen_test(timeout=60)
@pytest.mark.usefixtures("clean_data")
async def test_each_user_lives_on_the_shard_its_id_names(
    settings: Settings, infra_env: dict[str, str]
) -> None:
    async with user_service(settings) as users:
        created = await asyncio.gather(
            *(users.create_user(f"shopper{n}@example.com", "correct horse") for n in range(12))
        )
    assert len({user.id for user in created}) == 12
    by_shard = _emails_by_shard(primary_dsns(infra_env)[1:])
    for user in created:
        holders = [index for index, rows in enumerate(by_shard) if user.id in rows]
        assert holders == [user.id % 4], f"user {user.id} found on shards {holders}"
    assert sum(len(rows) for rows in by_shard) == 12
    assert {len(rows) > 0 for rows in by_shard} == {True}, "12 consecutive ids use all 4 shards"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_taken_email_is_a_conflict_on_any_shard(settings: Settings) -> None:
    async with user_service(settings) as users:
        first = await users.create_user("Ada@Example.com", "correct horse", "Ada")
        with pytest.raises(Conflict):
            await users.create_user("ada@example.com", "another password")
    assert first.email == "ada@example.com"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_bad_email_or_password_is_refused_before_anything_is_written(
    settings: Settings, infra_env: dict[str, str]
) -> None:
    async with user_service(settings) as users:
        with pytest.raises(InvalidInput, match="email"):
            await users.create_user("not-an-address", "correct horse")
        with pytest.raises(InvalidInput, match="password"):
            await users.create_user("bob@example.com", "short")
    with psycopg2.connect(infra_env["FM_CATALOG_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM user_directory")
        assert cur.fetchone() == (0,)
    conn.close()


@pytest.mark.gen_test(timeout=30)
@pytest.mark.usefixtures("clean_data")
async def test_passwords_are_stored_as_argon2id_hashes(
    settings: Settings, infra_env: dict[str, str]
) -> None:
    async with user_service(settings) as users:
        user = await users.create_user("carol@example.com", "correct horse")
    dsn = primary_dsns(infra_env)[1 + user.id % 4]
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT password_hash FROM users WHERE id = %s", (user.id,))
        (stored,) = cur.fetchone()
    conn.close()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
