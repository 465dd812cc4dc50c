"""PgBouncer in transaction mode in front of the embedded PostgreSQL
(``server.wiring.infra.pgbouncer``).

The statement-timeout tests run their own PostgreSQL and PgBouncer (a second PgBouncer behind
the session's one would share server connections between its clients' settings). The session
tests check what ``FM_TEST_PGBOUNCER=1`` (scripts/test's second pass) hands the suite.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

from server.adapters.db.pools import Database, PoolOptions, open_pool
from server.adapters.db.router import ShardRouter
from server.wiring.infra.common import pick_free_port
from server.wiring.infra.pgbouncer import (
    Backend,
    PgBouncer,
    backends_for,
    fronted_settings,
    pgbouncer_binary,
)
from server.wiring.infra.postgres import PostgresServer
from server.wiring.infra.topology import InfraState, PgGroup, settings_for
from tests.helpers.deployment import make_settings

TIMEOUT_MS = 300
needs_pgbouncer = pytest.mark.skipif(
    pgbouncer_binary() is None, reason="pgbouncer is not installed (apt-get install pgbouncer)"
)
through_session_pgbouncer = pytest.mark.skipif(
    os.environ.get("FM_TEST_PGBOUNCER") != "1", reason="FM_TEST_PGBOUNCER=1 not set"
)


def quiet(_line: str) -> None:
    """Log sink for tests."""


def admin_rows(port: int, command: str) -> list[dict[str, object]]:
    """Rows of a PgBouncer admin console command as dicts."""
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="pgbouncer")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(command)
            names = [column.name for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def test_replicated_settings_map_every_server_and_drop_multi_host() -> None:
    state = InfraState(
        replicas=True,
        redis_cluster=False,
        pg_groups=(
            PgGroup("catalog", 5001, 5002, ("fm_catalog",)),
            *(
                PgGroup(f"shard{i}", 5010 + 2 * i, 5011 + 2 * i, (f"fm_shard_{i}",))
                for i in range(4)
            ),
        ),
        valkey_ports=(6379,),
    )
    settings = settings_for(state)
    backends, _ = backends_for(settings)
    assert Backend("fm_catalog", "127.0.0.1", 5001, "fm_catalog") in backends
    assert Backend("fm_catalog_5002", "127.0.0.1", 5002, "fm_catalog") in backends
    assert len(backends) == 10
    bouncer = PgBouncer(Path("/nonexistent"), backends, ["postgres"], port=6432)
    fronted = fronted_settings(settings, bouncer)
    assert fronted["FM_CATALOG_DSN"] == "postgresql://postgres@127.0.0.1:6432/fm_catalog"
    assert fronted["FM_CATALOG_REPLICA_DSN"].endswith("@127.0.0.1:6432/fm_catalog_5002")
    assert fronted["FM_REDIS_URL"] == settings["FM_REDIS_URL"]
    shard = json.loads(fronted["FM_SHARDS"])[3]
    assert shard == {
        "primary": "postgresql://postgres@127.0.0.1:6432/fm_shard_3",
        "replica": "postgresql://postgres@127.0.0.1:6432/fm_shard_3_5017",
    }
    config = bouncer.config_text()
    assert "pool_mode = transaction" in config
    assert "ignore_startup_parameters = options,extra_float_digits" in config


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own (fronted by `bouncer`, or used directly)."""
    server = PostgresServer(
        tmp_path_factory.mktemp("pgbouncer-pg") / "pg", pick_free_port(), log=quiet
    )
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bouncer(
    tmp_path_factory: pytest.TempPathFactory, own_server: PostgresServer
) -> Iterator[PgBouncer]:
    """A PgBouncer in front of `own_server` that re-applies a short statement timeout."""
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    backends = [Backend("fm_test", "127.0.0.1", own_server.port, "postgres")]
    directory = tmp_path_factory.mktemp("pgbouncer-own")
    bouncer = PgBouncer(
        directory, backends, ["postgres"], statement_timeout_ms=TIMEOUT_MS, log=quiet
    )
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()


@needs_pgbouncer
def test_a_statement_longer_than_the_timeout_is_cancelled(bouncer: PgBouncer) -> None:
    # The client asks for a longer timeout in its startup packet: PgBouncer ignores it.
    conn = psycopg2.connect(
        bouncer.dsn("fm_test", "postgres"), options="-c statement_timeout=60000"
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone() == (f"{TIMEOUT_MS}ms",)
            started = time.monotonic()
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(3)")
            assert time.monotonic() - started < 2.0
            cur.execute("SELECT 1")  # the connection survives the cancelled statement
    finally:
        conn.close()
    config = {row["key"]: row["value"] for row in admin_rows(bouncer.port, "SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"


@needs_pgbouncer
@pytest.mark.gen_test(timeout=30)
async def test_node_pools_connect_through_pgbouncer_with_its_timeout(
    bouncer: PgBouncer,
) -> None:
    # The pool asks for a longer timeout in the startup packet; PgBouncer ignores it.
    pool = await open_pool(bouncer.dsn("fm_test", "postgres"), PoolOptions())
    try:
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SHOW statement_timeout")
            assert await cur.fetchone() == (f"{TIMEOUT_MS}ms",)
    finally:
        pool.close()
        await pool.wait_closed()


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
@pytest.mark.gen_test(timeout=30)
async def test_a_statement_timeout_reaches_router_callers_as_query_canceled(
    request: pytest.FixtureRequest, own_server: PostgresServer, through: str
) -> None:
    """Not as the bare `CancelledError` aiopg makes of it, which `except Exception` misses."""
    if through == "pgbouncer":
        dsn = request.getfixturevalue("bouncer").dsn("fm_test", "postgres")
    else:
        dsn = own_server.dsn()
    env = {
        "FM_CATALOG_DSN": dsn,
        "FM_SHARDS": json.dumps([{"primary": dsn, "replica": None}]),
        "FM_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    settings = make_settings(env, statement_timeout_ms=TIMEOUT_MS)
    db = await Database.open(settings)
    router = ShardRouter.for_settings(db, settings)
    try:
        with pytest.raises(psycopg2.errors.QueryCanceled):
            async with router.catalog_write() as cur:
                await cur.execute("SELECT pg_sleep(3)")
        with pytest.raises(psycopg2.errors.QueryCanceled):
            async with router.read(1) as read:
                await read.execute("SELECT pg_sleep(3)")
        async with router.catalog_write() as cur:  # the connections are still good
            await cur.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
    finally:
        await router.close()
        await db.close()


@pytest.mark.gen_test(timeout=30)
async def test_node_connections_have_the_configured_statement_timeout(
    infra_env: dict[str, str],
) -> None:
    """Directly (startup `options`) or through PgBouncer (its `connect_query`): the same."""
    settings = make_settings(infra_env)
    db = await Database.open(settings)
    try:
        for role in db.all_databases():
            async with role.primary.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SHOW statement_timeout")
                assert await cur.fetchone() == (f"{settings.statement_timeout_ms // 1000}s",)
    finally:
        await db.close()


@through_session_pgbouncer
def test_the_session_dsns_go_through_pgbouncer(infra_env: dict[str, str]) -> None:
    port = int(psycopg2.extensions.parse_dsn(infra_env["FM_CATALOG_DSN"])["port"])
    with psycopg2.connect(infra_env["FM_CATALOG_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    databases = {row["name"] for row in admin_rows(port, "SHOW DATABASES")}
    assert {"fm_catalog", *(f"fm_shard_{i}" for i in range(4))} <= databases
    for shard in json.loads(infra_env["FM_SHARDS"]):
        assert int(psycopg2.extensions.parse_dsn(shard["primary"])["port"]) == port
    # PgBouncer keeps the server connection it opened for that query.
    assert "fm_catalog" in {row["database"] for row in admin_rows(port, "SHOW SERVERS")}
