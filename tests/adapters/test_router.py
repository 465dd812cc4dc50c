"""The shard router on real servers: catalog and four shards, each a primary with a streaming
replica (`infra.up(replicas=True)`), started once for this module in its own data directory.

Users of one shard are `n, n + 4, n + 8, ...`. Each test uses its own shard, because tests
pause replay, stop servers and (last) fail a primary over, which changes the topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from server.adapters.db.pools import Database, RolePools
from server.adapters.db.router import (
    PrimaryUnavailable,
    RecentWrites,
    ShardRouter,
    is_connection_error,
)
from server.wiring import infra
from server.wiring.infra import PostgresServer
from tests.helpers.deployment import migrate, quiet, run_in_private_loop
from tests.helpers.replicas import Topology, blocking, wait_caught_up

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Replicated catalog + 4 shards, migrated; always stopped at the end."""
    data_dir = tmp_path_factory.mktemp("router")
    try:
        env = infra.up(data_dir, replicas=True, log=quiet)
        run_in_private_loop(migrate(env))
        topology = Topology(data_dir, env)
        for group in ("catalog", "shard0", "shard1", "shard2", "shard3"):
            wait_caught_up(*topology.servers(group))
        yield topology
    finally:
        infra.down(data_dir, log=quiet)


@contextlib.asynccontextmanager
async def opened_router(topology: Topology, **options: Any) -> AsyncIterator[ShardRouter]:
    """A router over freshly opened pools (closed afterwards)."""
    settings = topology.settings()
    db = await Database.open(settings)
    router = ShardRouter.for_settings(db, settings, **options)
    try:
        yield router
    finally:
        await router.close()
        await db.close()


async def add_user(router: ShardRouter, user_id: int) -> None:
    async with router.write(user_id) as cur:
        await cur.execute(
            "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')",
            (user_id, f"user{user_id}@example.com"),
        )


async def read_user(router: ShardRouter, reader: int, wanted: int, **kw: Any) -> tuple[bool, bool]:
    """(whether `reader`'s read sees user `wanted`, whether it ran on a standby)."""
    async with router.read(reader, **kw) as cur:
        await cur.execute("SELECT count(*) FROM users WHERE id = %s", (wanted,))
        row = await cur.fetchone()
        await cur.execute("SELECT pg_is_in_recovery()")
        standby = await cur.fetchone()
    return row[0] == 1, standby[0]


async def pause_replay(topology: Topology, group: str) -> PostgresServer:
    """Stop `group`'s standby applying WAL once it has caught up (it keeps receiving WAL)."""
    primary, replica = topology.servers(group)
    await blocking(wait_caught_up, primary, replica)
    dbname = "fm_shard_" + group.removeprefix("shard")
    await blocking(replica.psql, "SELECT pg_wal_replay_pause()", dbname)
    for _ in range(100):
        if await blocking(replica.psql, "SELECT pg_get_wal_replay_pause_state()", dbname) == (
            "paused"
        ):
            return replica
        await asyncio.sleep(0.02)
    raise AssertionError("replay did not pause")


async def wait_replicated(replica: PostgresServer, dbname: str, user_id: int) -> None:
    """Wait until the standby has applied user `user_id`'s row."""
    sql = f"SELECT count(*) FROM users WHERE id = {int(user_id)}"
    for _ in range(200):
        if await blocking(replica.psql, sql, dbname) == "1":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"user {user_id} never reached the replica")


# -- pure -------------------------------------------------------------------------------------


def test_recent_writes_forget_old_entries_and_stay_bounded() -> None:
    now = [0.0]
    recent = RecentWrites(2.0, max_entries=3, clock=lambda: now[0])
    recent.note(1)
    now[0] = 1.0
    recent.note(2)
    assert recent.wrote_recently(1) and recent.wrote_recently(2) and not recent.wrote_recently(3)
    now[0] = 2.5
    assert not recent.wrote_recently(1)  # 2.5 s old
    assert recent.wrote_recently(2)
    assert len(recent) == 1  # the expired entry was dropped
    for key in (3, 4, 5, 6):
        recent.note(key)
    assert len(recent) == 3 and not recent.wrote_recently(2)  # the oldest made room
    recent.note(4)  # an update moves the key to the newest end
    recent.note(7)
    assert len(recent) == 3 and recent.wrote_recently(4) and not recent.wrote_recently(5)
    now[0] = 10.0
    recent.note(8)
    assert len(recent) == 1


def test_only_connection_failures_count_as_connection_errors() -> None:
    assert is_connection_error(psycopg2.OperationalError("server closed the connection"))
    assert is_connection_error(psycopg2.InterfaceError("connection already closed"))
    assert is_connection_error(PrimaryUnavailable("shard_3: no writable server"))
    assert is_connection_error(ConnectionRefusedError())
    assert not is_connection_error(psycopg2.errors.QueryCanceled("statement timeout"))
    assert not is_connection_error(psycopg2.errors.SerializationFailure("conflict"))
    assert not is_connection_error(psycopg2.errors.UniqueViolation("duplicate key"))
    assert not is_connection_error(TimeoutError())  # a busy pool, not a broken server


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_user_reads_own_write_while_others_read_the_paused_replica(
    topology: Topology,
) -> None:
    writer, other = 5, 9  # both on shard 1
    # A paused replica replays nothing, so its last replayed transaction ages: the lag bound
    # is lifted here so that only read-your-writes decides.
    async with opened_router(topology, max_replica_lag_s=3600) as router:
        replica = await pause_replay(topology, "shard1")
        try:
            await add_user(router, writer)
            assert await read_user(router, writer, writer) == (True, False)  # the primary
            assert await read_user(router, other, writer) == (False, True)  # the replica
            counters = router.counters["shard_1"]
            assert (counters.read_your_writes, counters.primary_reads) == (1, 1)
            assert counters.replica_reads == 1
            assert counters.primary_relocations == 1  # the first write located the primary
        finally:
            await blocking(replica.psql, "SELECT pg_wal_replay_resume()", "fm_shard_1")
        await wait_replicated(replica, "fm_shard_1", writer)
        assert await read_user(router, other, writer) == (True, True)


@pytest.mark.gen_test(timeout=30)
async def test_read_your_writes_expires(topology: Topology) -> None:
    async with opened_router(topology, read_your_writes_s=0.3) as router:
        async with router.catalog_write(actor=42) as cur:
            await cur.execute("INSERT INTO products (name, price_cents) VALUES ('Lamp', 1200)")
        for wait_s, on_replica in ((0.0, False), (0.4, True)):
            await asyncio.sleep(wait_s)
            async with router.catalog_read(actor=42) as cur:
                await cur.execute("SELECT pg_is_in_recovery()")
                assert (await cur.fetchone())[0] is on_replica
        async with router.catalog_read(actor=42, fresh=True) as cur:
            await cur.execute("SELECT pg_is_in_recovery()")
            assert (await cur.fetchone())[0] is False
        assert router.counters["catalog"].read_your_writes == 1


@pytest.mark.gen_test(timeout=30)
async def test_without_replica_reads_use_the_primary(topology: Topology) -> None:
    settings = topology.settings()
    db = await Database.open(settings)
    no_replica = Database(catalog=RolePools("catalog", db.catalog.primary, None), shards=db.shards)
    router = ShardRouter(no_replica)
    try:
        async with router.catalog_read() as cur:
            await cur.execute("SELECT pg_is_in_recovery()")
            assert (await cur.fetchone())[0] is False
        assert router.counters["catalog"].primary_reads == 1
        assert router.counters["catalog"].replica_fallbacks == 0
    finally:
        await db.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_write_that_reaches_a_standby_fails_as_primary_unavailable(
    topology: Topology,
) -> None:
    """A single-host primary DSN through a proxy (HAProxy, PgBouncer) can reach a server
    demoted a moment ago, until the proxy's checks notice: BEGIN READ WRITE is refused on both
    attempts, and the write fails as PrimaryUnavailable (a 503 at the API), not as the
    driver's FeatureNotSupported (a 500)."""
    db = await Database.open(topology.settings())
    standby = db.catalog.replica
    assert standby is not None
    router = ShardRouter(Database(catalog=RolePools("catalog", standby, None), shards=db.shards))
    try:
        with pytest.raises(PrimaryUnavailable, match="read-only server"):
            async with router.catalog_write() as cur:
                await cur.execute("SELECT 1")
        assert router.counters["catalog"].write_retries == 1
    finally:
        await db.close()


@pytest.mark.gen_test(timeout=30)
async def test_lagging_replica_is_skipped_until_it_catches_up(topology: Topology) -> None:
    writer, other = 2, 6
    interval = 0.2
    options = {"max_replica_lag_s": 0.5, "lag_check_interval_s": interval}
    async with opened_router(topology, **options) as router:
        counters = router.counters["shard_2"]
        assert (await read_user(router, other, writer))[1] is True  # caught up: the replica
        replica = await pause_replay(topology, "shard2")
        try:
            await add_user(router, writer)
            await asyncio.sleep(0.5 + interval + 0.1)
            assert await read_user(router, other, writer) == (True, False)  # the primary
            assert counters.lag_fallbacks >= 1
        finally:
            await blocking(replica.psql, "SELECT pg_wal_replay_resume()", "fm_shard_2")
        await wait_replicated(replica, "fm_shard_2", writer)
        await asyncio.sleep(interval + 0.05)
        assert await read_user(router, other, writer) == (True, True)  # back on the replica


@pytest.mark.gen_test(timeout=40)
async def test_stopped_replica_falls_back_to_primary_and_recovers(topology: Topology) -> None:
    _, replica = topology.servers("shard0")
    reader = 8
    # No lag checks after the first: the read after the stop meets the pool's now-broken
    # connection in `execute`, which must be retried on the primary.
    options = {"lag_check_interval_s": 60.0, "replica_backoff_s": 0.5}
    async with opened_router(topology, **options) as router:
        counters = router.counters["shard_0"]
        assert (await read_user(router, reader, reader))[1] is True
        replica.stop()  # not letting the loop run: the pooled connection breaks unnoticed
        try:
            assert (await read_user(router, reader, reader))[1] is False
            assert (counters.replica_errors, counters.read_retries) == (1, 1)
            assert counters.replica_fallbacks == 1
            # Within the backoff the replica is not tried again: no new error.
            assert (await read_user(router, reader, reader))[1] is False
            assert (counters.replica_errors, counters.replica_fallbacks) == (1, 2)
            # After the backoff it is tried (connection refused): fallback, new backoff.
            await asyncio.sleep(0.6)
            assert (await read_user(router, reader, reader))[1] is False
            assert (counters.replica_errors, counters.replica_fallbacks) == (2, 3)
        finally:
            await blocking(replica.start)
        await asyncio.sleep(0.6)
        assert (await read_user(router, reader, reader))[1] is True
        assert counters.replica_errors == 2


@pytest.mark.gen_test(timeout=40)
async def test_connections_broken_by_a_restart_cost_no_failed_request(topology: Topology) -> None:
    primary, _ = topology.servers("catalog")

    async def write_slowly() -> None:
        async with router.catalog_write() as cur:
            await cur.execute("SELECT pg_sleep(0.05)")

    async with opened_router(topology) as router:
        await asyncio.gather(*(write_slowly() for _ in range(3)))  # 3 pooled connections
        # Restarted without letting the loop run, so the pooled connections do not notice
        # before they are used: as when a network or a proxy drops connections silently.
        primary.stop()
        primary.start()
        async with router.catalog_read(fresh=True) as cur:
            await cur.execute("SELECT 1")  # a broken connection: re-run on a fresh one
            assert await cur.fetchone() == (1,)
        async with router.catalog_write() as write_cur:
            await write_cur.execute("SELECT 2")
            assert await write_cur.fetchone() == (2,)
        counters = router.counters["catalog"]
        assert (counters.read_retries, counters.primary_errors) == (1, 1)
        assert counters.write_retries == 0  # the failed read dropped the other idle ones
        await asyncio.gather(*(write_slowly() for _ in range(3)))
        primary.stop()
        primary.start()
        await write_slowly()  # BEGIN fails on a broken connection: begun again on a fresh one
        assert (counters.write_retries, counters.primary_errors) == (1, 2)


# -- failover (last: it leaves shard 3's replica promoted) -----------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_writes_follow_a_promoted_replica(topology: Topology) -> None:
    primary, replica = topology.servers("shard3")
    async with opened_router(topology) as router:
        await add_user(router, 3)  # acknowledged before the failover
        stop = asyncio.Event()
        outcomes = {"ok": 0, "failed": 0}

        async def other_shards_keep_writing() -> None:
            user_id = 1000
            while not stop.is_set():
                user_id += 1
                if user_id % 4 == 3:
                    continue
                try:
                    await add_user(router, user_id)
                    outcomes["ok"] += 1
                except Exception:
                    outcomes["failed"] += 1
                await asyncio.sleep(0.01)

        writer = asyncio.ensure_future(other_shards_keep_writing())
        try:
            await blocking(primary.stop)
            with pytest.raises(psycopg2.OperationalError):
                await add_user(router, 7)  # no writable server until the promotion
            await blocking(replica.promote)
            deadline = time.monotonic() + 15
            while True:
                try:
                    await add_user(router, 7)
                    break
                except psycopg2.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            async with router.write(11) as cur:
                await cur.execute("SELECT inet_server_port()")
                assert (await cur.fetchone())[0] == replica.port
        finally:
            stop.set()
            await writer
        assert outcomes["failed"] == 0 and outcomes["ok"] > 0
        assert await read_user(router, 11, 3, fresh=True) == (True, False)
        assert (await read_user(router, 11, 7))[0] is True
        assert router.counters["shard_3"].primary_relocations == 2
