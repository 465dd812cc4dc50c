"""Versioned SQL migrations, applied to every database of their role.

Files live in `server/db/migrations/<role>/NNNN_name.sql` (role `catalog` or `shard`). Each
file runs once per database, inside one transaction together with its row in
`schema_migrations`; a transaction-scoped advisory lock serialises nodes migrating at once,
so `finalmarket migrate` is idempotent and safe to run from several places.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import aiopg

from server.adapters.db.pools import Database

Role = Literal["catalog", "shard"]
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same for every node ("fm-migrate" in ASCII).
_ADVISORY_LOCK_KEY = 0x666D2D6D69677261

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    sql: str


def migrations_for(role: Role) -> list[Migration]:
    """The migrations of `role`, in version order; malformed file names are an error."""
    found = []
    for entry in resources.files("server.adapters.db").joinpath("migrations").joinpath(role).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise ValueError(f"migration file name {entry.name!r} is not NNNN_lowercase_name.sql")
        found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"two {role} migrations share a version: {versions}")
    return found


async def migrate_database(pool: aiopg.Pool, role: Role) -> list[str]:
    """Apply the pending migrations of `role` to the database behind `pool`.

    Returns the names applied now (empty when the database was up to date).
    """
    applied: list[str] = []
    async with pool.acquire() as conn, conn.cursor() as cur:
        for migration in migrations_for(role):
            await cur.execute("BEGIN")
            try:
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK_KEY,))
                await cur.execute(_CREATE_LEDGER)
                await cur.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                )
                if await cur.fetchone() is None:
                    await cur.execute(migration.sql)
                    await cur.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                    applied.append(migration.name)
                await cur.execute("COMMIT")
            except BaseException:
                await cur.execute("ROLLBACK")
                raise
    return applied


async def migrate_all(db: Database) -> dict[str, list[str]]:
    """Migrate the catalog and every shard primary; returns what each database applied."""
    result = {db.catalog.name: await migrate_database(db.catalog.primary, "catalog")}
    for shard in db.shards:
        result[shard.name] = await migrate_database(shard.primary, "shard")
    return result
