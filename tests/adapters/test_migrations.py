"""Migrations: every database of each role gets its schema, once, also when run concurrently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from server.adapters.db.migrate import migrate_all, migrate_database, migrations_for
from server.adapters.db.pools import Database, PoolOptions, open_pool
from server.wiring.settings import Settings
from tests.helpers.deployment import primary_dsns


def _tables(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        names = {row[0] for row in cur.fetchall()}
    conn.close()
    return names


def test_catalog_and_every_shard_have_their_schema(infra_env: dict[str, str]) -> None:
    catalog, *shards = primary_dsns(infra_env)
    assert {"products", "inventory", "stock_reservations", "product_images", "user_directory"} <= (
        _tables(catalog)
    )
    assert len(shards) == 4
    for dsn in shards:
        tables = _tables(dsn)
        assert {"users", "carts", "cart_items", "orders", "order_items", "notifications"} <= tables
        assert "idempotency_keys" in tables
        assert "products" not in tables


@pytest.mark.gen_test(timeout=30)
async def test_migrating_again_applies_nothing(settings: Settings) -> None:
    db = await Database.open(settings)
    try:
        applied = await migrate_all(db)
    finally:
        await db.close()
    assert applied == {name: [] for name in ["catalog", "shard_0", "shard_1", "shard_2", "shard_3"]}


@pytest.fixture
def fresh_database(infra_env: dict[str, str]) -> Iterator[str]:
    """An empty database on the test server, dropped afterwards."""
    admin_dsn = infra_env["FM_CATALOG_DSN"].rsplit("/", 1)[0] + "/postgres"
    name = f"fm_scratch_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_migrations_apply_each_file_once(fresh_database: str) -> None:
    pools = [await open_pool(fresh_database, PoolOptions()) for _ in range(3)]
    try:
        results: list[Any] = await asyncio.gather(
            *(migrate_database(pool, "shard") for pool in pools)
        )
    finally:
        for pool in pools:
            pool.close()
            await pool.wait_closed()
    expected = [m.name for m in migrations_for("shard")]
    assert sorted(results, key=len) == [[], [], expected]
    with psycopg2.connect(fresh_database) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM schema_migrations ORDER BY version")
        assert [row[0] for row in cur.fetchall()] == expected
    conn.close()


def test_migration_files_are_numbered_in_order() -> None:
    for role in ("catalog", "shard"):
        versions = [m.version for m in migrations_for(role)]  # type: ignore[arg-type]
        assert versions == sorted(set(versions)) and versions[0] == 1
