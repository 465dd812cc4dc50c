"""Real-server tests for ``server.wiring.infra``: embedded PostgreSQL + Valkey topologies.

Every fixture brings servers up in a pytest tmp dir and always calls ``down`` afterwards.
When run as root, ``up`` itself adds ``o+x`` to the tmp dir's ancestors (e.g. the 0700
``/tmp/pytest-of-root``) so the ``finalmarket-pg`` user can reach its data directories.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from server.wiring.infra import InfraError, PostgresServer, ValkeyServer, down, env_lines, up
from server.wiring.infra.common import pick_free_port, pid_alive, wait_until
from server.wiring.infra.valkey import parse_info, valkey_command

DATABASES = ["fm_catalog", *(f"fm_shard_{i}" for i in range(4))]


def quiet(_line: str) -> None:
    """Log sink for tests (keeps pytest output short)."""


def query(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement in autocommit mode and return its rows (empty if none)."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def dead(pid: int) -> bool:
    """True once process ``pid`` has exited."""
    return not pid_alive(pid)


def redis_port(settings: dict[str, str]) -> int:
    """Port from ``FM_REDIS_URL`` (``redis://127.0.0.1:PORT/0``)."""
    return int(settings["FM_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])


def all_dsns(settings: dict[str, str]) -> list[tuple[str, str | None]]:
    """(primary, replica) DSN pairs for the catalog and the four shards."""
    pairs = [(settings["FM_CATALOG_DSN"], settings.get("FM_CATALOG_REPLICA_DSN"))]
    pairs += [(s["primary"], s["replica"]) for s in json.loads(settings["FM_SHARDS"])]
    return pairs


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """Default topology: one PostgreSQL with all five databases, one Valkey."""
    data_dir = tmp_path_factory.mktemp("infra-light")
    try:
        yield data_dir, up(data_dir, log=quiet)
    finally:
        down(data_dir, log=quiet)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """Catalog + 4 shards, each a primary with a streaming hot standby."""
    data_dir = tmp_path_factory.mktemp("infra-replicas")
    try:
        yield data_dir, up(data_dir, replicas=True, log=quiet)
    finally:
        down(data_dir, log=quiet)


# -- light topology ------------------------------------------------------------------------


def test_light_settings_and_connect(light: tuple[Path, dict[str, str]]) -> None:
    _, settings = light
    assert set(settings) == {"FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL"}
    shards = json.loads(settings["FM_SHARDS"])
    assert len(shards) == 4
    assert all(shard["replica"] is None for shard in shards)
    assert settings["FM_SHARDS"] == json.dumps(shards, separators=(",", ":"))
    for (dsn, _replica), dbname in zip(all_dsns(settings), DATABASES, strict=True):
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert query(dsn, "SELECT current_database()") == [(dbname,)]
    assert valkey_command(redis_port(settings), "PING") == "PONG"
    assert settings["FM_REDIS_URL"].endswith("/0")


def test_up_again_is_idempotent_and_fast(light: tuple[Path, dict[str, str]]) -> None:
    data_dir, settings = light
    started = time.monotonic()
    again = up(data_dir, log=quiet)
    assert time.monotonic() - started < 1.0
    assert again == settings


def test_env_lines_quote_values(light: tuple[Path, dict[str, str]]) -> None:
    _, settings = light
    lines = env_lines(settings)
    assert len(lines) == len(settings)
    shards_line = next(line for line in lines if line.startswith("export FM_SHARDS="))
    assert shards_line == f"export FM_SHARDS='{settings['FM_SHARDS']}'"


def test_other_topology_on_same_data_dir_is_refused(light: tuple[Path, dict[str, str]]) -> None:
    data_dir, _ = light
    with pytest.raises(InfraError, match="another data dir"):
        up(data_dir, replicas=True, log=quiet)


def test_data_survives_down_up(light: tuple[Path, dict[str, str]]) -> None:
    data_dir, settings = light
    dsn = json.loads(settings["FM_SHARDS"])[0]["primary"]
    query(dsn, "CREATE TABLE IF NOT EXISTS survive (v text)")
    query(dsn, "INSERT INTO survive VALUES ('kept')")
    valkey_command(redis_port(settings), "SET", "survive", "kept")

    down(data_dir, log=quiet)
    with pytest.raises(psycopg2.OperationalError):
        query(dsn, "SELECT 1")
    assert up(data_dir, log=quiet) == settings

    assert query(dsn, "SELECT v FROM survive") == [("kept",)]
    assert valkey_command(redis_port(settings), "GET", "survive") == "kept"


def test_up_recovers_after_crash(light: tuple[Path, dict[str, str]]) -> None:
    data_dir, settings = light
    pg_pid = int((data_dir / "postgres/main/postmaster.pid").read_text().split()[0])
    valkey_pid = int((data_dir / "valkey/node0/valkey.pid").read_text())
    os.kill(pg_pid, signal.SIGKILL)
    os.kill(valkey_pid, signal.SIGKILL)  # both leave stale pid files behind
    for pid in (pg_pid, valkey_pid):
        assert wait_until(partial(dead, pid), timeout=10)

    assert up(data_dir, log=quiet) == settings
    assert query(settings["FM_CATALOG_DSN"], "SELECT 1") == [(1,)]
    assert valkey_command(redis_port(settings), "PING") == "PONG"


# -- single servers ------------------------------------------------------------------------


def test_valkey_stop_start_same_port(tmp_path: Path) -> None:
    server = ValkeyServer(tmp_path / "vk", pick_free_port(), log=quiet)
    try:
        server.start()
        server.start()  # idempotent
        assert server.command("SET", "k", "v") == "OK"
        server.stop()
        assert not server.is_running()
        assert not server.ping()
        server.stop()  # idempotent
        server.start()
        assert server.is_running()
        assert server.command("GET", "k") == "v"
    finally:
        server.stop()


def test_port_taken_by_other_process_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = ValkeyServer(tmp_path / "vk", port, log=quiet)
        with pytest.raises(InfraError, match="used by another process"):
            server.start()
        pg = PostgresServer(tmp_path / "pg", port, log=quiet)
        pg.init()
        with pytest.raises(InfraError, match="used by another process"):
            pg.start()
        assert not pg.is_running()


def test_picked_ports_are_below_the_kernels_ephemeral_range() -> None:
    """A server's port must not be one the kernel may give a client while the server is down
    (a restart after a crash would find it taken)."""
    low, _high = (
        int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    )
    ports = {pick_free_port() for _ in range(50)}
    assert all(10000 <= port < low for port in ports)
    assert len(ports) > 1  # drawn, not fixed
    for _ in range(20):
        port = pick_free_port(bus_offset=10000)
        assert port + 10000 < low


def test_down_is_idempotent(tmp_path: Path) -> None:
    down(tmp_path / "never-used", log=quiet)
    data_dir = tmp_path / "fm"
    up(data_dir, log=quiet)
    try:
        down(data_dir, log=quiet)
        down(data_dir, log=quiet)
        assert not PostgresServer(data_dir / "postgres" / "main", 1, log=quiet).is_running()
        assert not ValkeyServer(data_dir / "valkey" / "node0", 1, log=quiet).is_running()
    finally:
        down(data_dir, log=quiet)


# -- replicas topology ---------------------------------------------------------------------


def wait_for_row(dsn: str, table: str, value: str, timeout: float = 10.0) -> bool:
    """Poll a standby until ``value`` shows up in ``table``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if query(dsn, f"SELECT 1 FROM {table} WHERE v = %s", (value,)):
                return True
        except psycopg2.errors.UndefinedTable:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_replicas_stream_from_primaries(replicated: tuple[Path, dict[str, str]]) -> None:
    _, settings = replicated
    assert "FM_REDIS_CLUSTER" not in settings
    pairs = all_dsns(settings)
    for primary, replica in pairs:
        assert "target_session_attrs=read-write" in primary
        assert replica is not None and replica.endswith("target_session_attrs=prefer-standby")
        assert sorted(replica.split("@")[1].split("/")[0].split(",")) == sorted(
            primary.split("@")[1].split("/")[0].split(",")
        )
        query(primary, "CREATE TABLE IF NOT EXISTS repl (v text)")
        query(primary, "INSERT INTO repl VALUES (%s)", (primary,))
    for primary, replica in pairs:
        assert replica is not None
        assert wait_for_row(replica, "repl", primary), f"row not replicated to {replica}"
        assert query(replica, "SELECT pg_is_in_recovery()") == [(True,)]
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            query(replica, "INSERT INTO repl VALUES ('nope')")


@pytest.mark.slow
def test_primary_dsn_follows_promoted_replica(
    replicated: tuple[Path, dict[str, str]],
) -> None:
    data_dir, settings = replicated
    state = json.loads((data_dir / "infra.json").read_text())
    group = next(g for g in state["postgres"] if g["name"] == "shard3")
    primary = PostgresServer(data_dir / group["data_dir"], group["port"], log=quiet)
    replica = PostgresServer(data_dir / group["replica_data_dir"], group["replica_port"], log=quiet)
    primary.stop()
    replica.promote()
    assert not replica.is_in_recovery()
    dsn = json.loads(settings["FM_SHARDS"])[3]["primary"]
    query(dsn, "CREATE TABLE IF NOT EXISTS after_failover (v text)")
    assert query(dsn, "SELECT inet_server_port()") == [(group["replica_port"],)]


# -- valkey cluster ------------------------------------------------------------------------


@pytest.mark.slow
def test_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = tmp_path_factory.mktemp("infra-cluster")
    try:
        settings = up(data_dir, redis_cluster=True, log=quiet)
        assert settings["FM_REDIS_CLUSTER"] == "1"
        port = redis_port(settings)
        info = parse_info(str(valkey_command(port, "CLUSTER", "INFO")))
        assert info["cluster_state"] == "ok"
        assert info["cluster_size"] == "3"
        assert info["cluster_known_nodes"] == "6"
        nodes = str(valkey_command(port, "CLUSTER", "NODES")).splitlines()
        assert sum("master" in line.split()[2] for line in nodes) == 3
    finally:
        down(data_dir, log=quiet)
