"""Replicated topologies for the router and failover tests: their servers, waiting for a
standby to catch up, and blocking calls run off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors

from server.wiring import infra
from server.wiring.infra import PostgresServer
from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings, migrate, quiet, run_in_private_loop


@dataclass(frozen=True)
class Topology:
    """A replicated topology's servers: FM_* settings and the data directory `infra.up` used."""

    data_dir: Path
    env: dict[str, str]

    def settings(self) -> Settings:
        return make_settings(self.env)

    def servers(self, group: str) -> tuple[PostgresServer, PostgresServer]:
        """(primary, replica) of a group of `infra.json` ("catalog", "shard0", ...)."""
        state = json.loads((self.data_dir / "infra.json").read_text())
        entry = next(g for g in state["postgres"] if g["name"] == group)
        primary = PostgresServer(self.data_dir / entry["data_dir"], entry["port"], log=quiet)
        replica = PostgresServer(
            self.data_dir / entry["replica_data_dir"], entry["replica_port"], log=quiet
        )
        return primary, replica


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call (pg_ctl, psql) off the loop, so concurrent work keeps going."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


_markers = itertools.count(1)


def wait_caught_up(primary: PostgresServer, replica: PostgresServer) -> None:
    """Wait until the standby has applied every transaction committed on the primary so far.

    Commits a marker row (in the `postgres` database, not the product's) and waits until the
    standby shows it: WAL is replayed in order, so every commit acknowledged before is applied
    too. (Comparing LSNs is brittle here: the servers run with `synchronous_commit = off`, so
    `pg_current_wal_lsn()` can be short of an acknowledged commit.)
    """
    marker = next(_markers)
    primary.psql(
        "CREATE TABLE IF NOT EXISTS fm_test_marker (n bigint); "
        f"INSERT INTO fm_test_marker VALUES ({marker})"
    )
    deadline = time.monotonic() + 10.0
    while True:
        try:
            conn = psycopg2.connect(replica.dsn(), connect_timeout=5)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM fm_test_marker WHERE n = %s", (marker,))
                    if cur.fetchone()[0] == 1:
                        return
            finally:
                conn.close()
        except psycopg2.errors.UndefinedTable:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{replica} did not catch up with {primary}")
        time.sleep(0.02)


REPLICATED_GROUPS = ("catalog", *(f"shard{i}" for i in range(4)))


@contextlib.contextmanager
def replicated_topology(data_dir: Path) -> Iterator[Topology]:
    """`infra up --replicas` in `data_dir` (catalog + 4 shards, each with a standby, and
    Valkey), migrated, every standby caught up; stopped on exit whatever happened."""
    try:
        env = infra.up(data_dir, replicas=True, log=quiet)
        run_in_private_loop(migrate(env))
        topology = Topology(data_dir, env)
        for group in REPLICATED_GROUPS:
            wait_caught_up(*topology.servers(group))
        yield topology
    finally:
        infra.down(data_dir, log=quiet)
