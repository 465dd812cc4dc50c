"""Connection pools for the catalog database and the user shards, and shard routing.

One aiopg pool per database role (primary, replica). Connections carry no session state
(no SET, no prepared statements, no temp tables) so the pools work behind PgBouncer in
transaction mode; per-connection options are passed in the startup packet instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiopg

from server.adapters.db import aiopg_fix
from server.wiring.settings import Settings, ShardDsn

aiopg_fix.install()

POOL_CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """How every pool of a node opens and bounds its connections."""

    min_size: int = 0
    max_size: int = 10
    acquire_timeout_s: float = 5.0
    connect_timeout_s: int = 3
    statement_timeout_ms: int = 5000

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolOptions:
        """The pool options a node's settings ask for."""
        return cls(
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            acquire_timeout_s=settings.pool_acquire_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            statement_timeout_ms=settings.statement_timeout_ms,
        )


async def open_pool(dsn: str, options: PoolOptions) -> aiopg.Pool:
    """An aiopg pool on `dsn`; with `min_size=0` it connects lazily, so a down server
    does not stop the node from starting."""
    return await aiopg.create_pool(
        dsn,
        minsize=options.min_size,
        maxsize=options.max_size,
        timeout=options.acquire_timeout_s,
        enable_hstore=False,
        enable_uuid=False,
        connect_timeout=options.connect_timeout_s,
        options=f"-c statement_timeout={options.statement_timeout_ms}",
        application_name="finalmarket",
    )


@dataclass(slots=True)
class RolePools:
    """The pools of one database: its primary and, when configured, a replica."""

    name: str
    primary: aiopg.Pool
    replica: aiopg.Pool | None

    @classmethod
    async def open(cls, name: str, dsn: ShardDsn, options: PoolOptions) -> RolePools:
        """Open the primary pool and, if the database has one, the replica pool."""
        primary = await open_pool(dsn.primary, options)
        replica = await open_pool(dsn.replica, options) if dsn.replica else None
        return cls(name=name, primary=primary, replica=replica)

    def pools(self) -> list[aiopg.Pool]:
        """Every pool of this database, primary first."""
        return [self.primary] + ([self.replica] if self.replica is not None else [])

    async def close(self, timeout_s: float = POOL_CLOSE_TIMEOUT_S) -> None:
        """Close both pools, waiting up to `timeout_s` for connections in use to come back;
        then terminate the rest (a stuck statement must not hold shutdown forever)."""
        for pool in self.pools():
            pool.close()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(pool.wait_closed() for pool in self.pools())), timeout_s
            )
        except TimeoutError:
            for pool in self.pools():
                pool.terminate()
            await asyncio.gather(*(pool.wait_closed() for pool in self.pools()))


def shard_index(user_id: int, shard_count: int) -> int:
    """The shard that holds `user_id`: user ids are global, so the id alone decides."""
    if user_id <= 0:
        raise ValueError(f"user id must be positive, got {user_id}")
    return user_id % shard_count


@dataclass(slots=True)
class Database:
    """The catalog database and the user shards of one deployment, open as pools."""

    catalog: RolePools
    shards: Sequence[RolePools]

    @classmethod
    async def open(cls, settings: Settings) -> Database:
        """Open every pool the settings name (lazily connecting with `pool_min_size=0`)."""
        options = PoolOptions.from_settings(settings)
        catalog_dsn = ShardDsn(primary=settings.catalog_dsn, replica=settings.catalog_replica_dsn)
        catalog = await RolePools.open("catalog", catalog_dsn, options)
        shards = [
            await RolePools.open(f"shard_{index}", dsn, options)
            for index, dsn in enumerate(settings.shards)
        ]
        return cls(catalog=catalog, shards=shards)

    def shard_for(self, user_id: int) -> RolePools:
        """The pools of the shard holding `user_id`."""
        return self.shards[shard_index(user_id, len(self.shards))]

    def all_databases(self) -> list[RolePools]:
        """The catalog, then each shard in order."""
        return [self.catalog, *self.shards]

    async def close(self) -> None:
        """Close every pool."""
        await asyncio.gather(*(db.close() for db in self.all_databases()))
