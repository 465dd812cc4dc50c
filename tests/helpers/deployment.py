"""The test deployment: settings for its nodes, its primary DSNs, migrating its databases, and
running a coroutine on a loop of its own (the session fixtures in tests/conftest.py use these
too)."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from server.adapters.db.migrate import migrate_all
from server.adapters.db.pools import Database
from server.wiring.settings import Settings

TEST_SECRET_KEY = secrets.token_urlsafe(48)


def quiet(_line: str) -> None:
    """Log sink for in-process `infra` calls and embedded servers (keeps pytest output short)."""


def make_settings(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings for a node of the test deployment (port 0: the OS picks one)."""
    values: dict[str, Any] = {
        "catalog_dsn": env["FM_CATALOG_DSN"],
        "catalog_replica_dsn": env.get("FM_CATALOG_REPLICA_DSN"),
        "shards": json.loads(env["FM_SHARDS"]),
        "redis_url": env["FM_REDIS_URL"],
        "redis_cluster": env.get("FM_REDIS_CLUSTER") == "1",
        "secret_key": TEST_SECRET_KEY,
        "port": 0,
        "drain_delay_s": 0.0,
        "log_format": "console",
    }
    values.update(overrides)
    return Settings(**values)


def primary_dsns(env: dict[str, str]) -> list[str]:
    """The catalog's and each shard's primary DSN."""
    return [env["FM_CATALOG_DSN"]] + [shard["primary"] for shard in json.loads(env["FM_SHARDS"])]


def run_in_private_loop(coro: Any) -> Any:
    """Run `coro` on a loop of its own without touching the thread's current loop.

    (`asyncio.run` would set the current loop to None afterwards, and pytest-tornado then
    schedules test coroutines on a loop nobody runs.)
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def migrate(env: dict[str, str]) -> None:
    """Apply every migration to the catalog and every shard of `env`."""
    db = await Database.open(make_settings(env))
    try:
        await migrate_all(db)
    finally:
        await db.close()
