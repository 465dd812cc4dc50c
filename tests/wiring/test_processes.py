"""The real `finalmarket` command, run as child processes against real embedded servers.

Every process is started in a session of its own (so a "Ctrl-C" can go to its process group
exactly as a terminal sends it) and is killed in a finaliser if a test leaves it running;
every data directory a test brings up is taken down again, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from server.wiring import infra
from tests.helpers.deployment import quiet
from tests.helpers.processes import (
    PROJECT_ROOT,
    SECRET_KEY,
    cli_env,
    free_port,
    http_get,
    run_cli,
    server_settings,
    started,
    wait_for_line,
    wait_ready,
)

DEV_PRODUCTS = 40
# Well-formed but never contacted: the settings tests fail before any connection is made.
FAKE_SERVER_ENV = {
    "FM_CATALOG_DSN": "postgresql://postgres@127.0.0.1:1/fm_catalog",
    "FM_SHARDS": '[{"primary": "postgresql://postgres@127.0.0.1:1/fm_shard_0"}]',
    "FM_REDIS_URL": "redis://127.0.0.1:1/0",
    "FM_SECRET_KEY": SECRET_KEY,
}


# --- helpers ----------------------------------------------------------------------------------


def listening_ports(data_dir: Path) -> list[int]:
    """Ports of the embedded servers recorded in `data_dir` that accept connections now."""
    state = json.loads((data_dir / "infra.json").read_text())
    ports = [g["port"] for g in state["postgres"]] + [v["port"] for v in state["valkey"]]
    answering = []
    for port in ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            answering.append(port)
    return answering


def exported(text: str) -> dict[str, str]:
    """The settings in `export KEY=VALUE` lines (values shell-quoted), other lines ignored."""
    settings = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = shlex.split(line)[1].partition("=")
            settings[key] = value
    return settings


def count_products(catalog_dsn: str) -> int:
    """How many products the catalog database holds."""
    conn = psycopg2.connect(catalog_dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM products")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """An empty config directory, so no `config/*.toml` applies."""
    path = tmp_path / "config"
    path.mkdir()
    return path


# --- dev --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevRun:
    """What one `finalmarket dev` run showed: while serving, and after Ctrl-C."""

    data_dir: Path
    products_while_serving: int
    exit_code: int
    infra_up_after_exit: bool
    stderr: str


def run_dev_until_ctrl_c(data_dir: Path, config_dir: Path, stderr_path: Path) -> DevRun:
    """Run `dev` on `data_dir` until ready, count the catalog, Ctrl-C it and wait for it."""
    port = free_port()
    env = cli_env(config_dir)
    args = ("dev", "--data-dir", str(data_dir), "--port", str(port))
    with started(*args, "--products", str(DEV_PRODUCTS), env=env, stderr_path=stderr_path) as dev:
        wait_ready(f"http://127.0.0.1:{port}", dev)
        products = count_products(exported(dev.stderr())["FM_CATALOG_DSN"])
        dev.ctrl_c()
        exit_code = dev.wait()
    return DevRun(data_dir, products, exit_code, infra.is_up(data_dir), dev.stderr())


@pytest.fixture(scope="module")
def dev_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory shared by this module's `dev` runs; its servers are stopped after."""
    data_dir = tmp_path_factory.mktemp("dev") / "data"
    try:
        yield data_dir
    finally:
        infra.down(data_dir, log=quiet)


@pytest.fixture(scope="module")
def first_dev_run(dev_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevRun:
    """`dev` on an empty data directory, from launch to Ctrl-C (run once for the module)."""
    work = tmp_path_factory.mktemp("dev-first")
    (work / "config").mkdir()
    return run_dev_until_ctrl_c(dev_data_dir, work / "config", work / "stderr.log")


def test_dev_seeds_the_requested_number_of_products(first_dev_run: DevRun) -> None:
    assert first_dev_run.products_while_serving == DEV_PRODUCTS, first_dev_run.stderr
    assert "seeding catalog" in first_dev_run.stderr


def test_dev_exits_0_on_ctrl_c(first_dev_run: DevRun) -> None:
    assert first_dev_run.exit_code == 0, first_dev_run.stderr


def test_dev_stops_the_servers_it_started_on_ctrl_c(first_dev_run: DevRun) -> None:
    assert not first_dev_run.infra_up_after_exit, first_dev_run.stderr
    assert "infra: down" in first_dev_run.stderr


def test_dev_does_not_seed_an_existing_catalog_again(
    first_dev_run: DevRun, config_dir: Path, tmp_path: Path
) -> None:
    second = run_dev_until_ctrl_c(first_dev_run.data_dir, config_dir, tmp_path / "stderr.log")
    assert second.products_while_serving == DEV_PRODUCTS, second.stderr
    assert "seeding catalog" not in second.stderr
    assert second.exit_code == 0, second.stderr


def test_dev_ctrl_c_while_starting_servers_leaves_none_running(
    tmp_path: Path, config_dir: Path
) -> None:
    # Not under pytest's tmp dir, like the HA tests' data: PostgreSQL runs as its own OS user
    # and must reach the data directory by path all along; a pytest session starting on the
    # machine meanwhile sets /tmp/pytest-of-<user> back to 0700 (a `pg_ctl stop` here once
    # failed with "Permission denied" and left the server running).
    work = Path(tempfile.mkdtemp(prefix="fm-dev-ctrl-c-"))
    data_dir = work / "data"
    args = ("dev", "--data-dir", str(data_dir), "--port", str(free_port()))
    env = cli_env(config_dir)
    try:
        with started(*args, env=env, stderr_path=tmp_path / "stderr.log") as dev:
            wait_for_line(dev, "valkey node0: start")  # initdb is running meanwhile
            dev.ctrl_c()
            dev.wait(timeout=30)  # 1-3 s here; initdb, in its own session, is not cut short
        assert listening_ports(data_dir) == [], dev.stderr()
    finally:
        infra.down(data_dir, log=quiet)
        shutil.rmtree(work, ignore_errors=True)


# --- serve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainedNode:
    """What a `serve` node showed between SIGTERM and its exit."""

    readyz_while_draining: tuple[int, dict[str, Any]]
    healthz_while_draining: int
    seconds_into_drain: float
    exit_code: int
    seconds_to_exit: float
    stderr: str
    cable_messages: list[dict[str, Any]]


DRAIN_DELAY_S = 1.5


def open_cable(port: int) -> socket.socket:
    """A raw Action Cable (JSON) connection; returns once the 101 answer has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Protocol: actioncable-v1-json\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_text_frames(sock: socket.socket) -> list[dict[str, Any]]:
    """Every text frame the server sends until it closes (server frames are unmasked)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    messages, at = [], 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if opcode == 1:
            messages.append(json.loads(data[at : at + length]))
        at += length
    return messages


@pytest.fixture(scope="module")
def drained_node(
    infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> DrainedNode:
    """`serve` until ready, then SIGTERM, probing it during its drain delay until it exits."""
    work = tmp_path_factory.mktemp("serve")
    (work / "config").mkdir()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = cli_env(
        work / "config",
        {
            **server_settings(infra_env),
            "FM_SECRET_KEY": SECRET_KEY,
            "FM_PORT": str(port),
            "FM_DRAIN_DELAY_S": str(DRAIN_DELAY_S),
        },
    )
    with started("serve", env=env, stderr_path=work / "stderr.log") as node:
        wait_ready(base_url, node)
        cable = open_cable(port)
        node.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        readyz = http_get(base_url + "/readyz")
        while readyz[0] == 200 and time.monotonic() - sent < DRAIN_DELAY_S:
            readyz = http_get(base_url + "/readyz")  # until the loop has seen the signal
        healthz, _ = http_get(base_url + "/healthz")
        probed = time.monotonic() - sent
        cable_messages = read_text_frames(cable)
        cable.close()
        exit_code = node.wait(timeout=DRAIN_DELAY_S + 10)
        return DrainedNode(
            readyz,
            healthz,
            probed,
            exit_code,
            time.monotonic() - sent,
            node.stderr(),
            [m for m in cable_messages if m.get("type") != "ping"],
        )


def test_serve_readyz_answers_503_draining_after_sigterm(drained_node: DrainedNode) -> None:
    code, body = drained_node.readyz_while_draining
    assert code == 503, body
    assert body["reasons"] == ["draining: node is shutting down"]
    assert drained_node.seconds_into_drain < DRAIN_DELAY_S  # both probes were in the window


def test_serve_healthz_stays_200_while_draining(drained_node: DrainedNode) -> None:
    assert drained_node.healthz_while_draining == 200


def test_serve_exits_0_soon_after_the_drain_delay(drained_node: DrainedNode) -> None:
    assert drained_node.exit_code == 0, drained_node.stderr
    assert DRAIN_DELAY_S <= drained_node.seconds_to_exit < DRAIN_DELAY_S + 5


def test_serve_tells_cable_clients_to_reconnect_when_draining(
    drained_node: DrainedNode,
) -> None:
    assert drained_node.cable_messages == [
        {"type": "welcome"},
        {"type": "disconnect", "reason": "server_restart", "reconnect": True},
    ]


def test_serve_logs_json_lines_ending_with_stopped(drained_node: DrainedNode) -> None:
    events = [json.loads(line) for line in drained_node.stderr.splitlines() if line.strip()]
    assert all(isinstance(event, dict) for event in events)
    names = [event["event"] for event in events]
    assert names[-1] == "stopped", names
    assert {"listening", "draining"} <= set(names)


# --- settings errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"FM_PORT": "abc"}, "FM_PORT: "),
        ({"FM_SECRET_KEY": None}, "FM_SECRET_KEY: required setting is missing"),
        ({"FM_SHARDS": "not json"}, "FM_SHARDS: "),
    ],
    ids=["port-not-a-number", "secret-key-missing", "shards-not-json"],
)
def test_serve_refuses_bad_settings_with_one_line_naming_it(
    change: dict[str, str | None], expected: str, config_dir: Path
) -> None:
    settings = {**FAKE_SERVER_ENV, **change}
    env = cli_env(config_dir, {k: v for k, v in settings.items() if v is not None})
    result = run_cli("serve", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0]


# --- infra ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory for `infra up` runs; its servers are stopped after the module."""
    data_dir = tmp_path_factory.mktemp("infra-cli") / "data"
    try:
        yield data_dir
    finally:
        infra.down(data_dir, log=quiet)


@pytest.fixture(scope="module")
def infra_up_stdout(infra_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """stdout of the first `finalmarket infra up` on `infra_dir`."""
    env = cli_env(tmp_path_factory.mktemp("infra-cli-config"))
    result = run_cli("infra", "up", "--data-dir", str(infra_dir), env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_infra_up_prints_only_export_lines(infra_up_stdout: str) -> None:
    lines = infra_up_stdout.splitlines()
    assert lines
    assert all(re.fullmatch(r"export FM_[A-Z_]+=\S.*", line) for line in lines), lines
    assert {"FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL"} <= exported(infra_up_stdout).keys()


def test_infra_up_prints_the_secret_key_kept_in_its_data_directory(
    infra_up_stdout: str, infra_dir: Path
) -> None:
    secret = exported(infra_up_stdout)["FM_SECRET_KEY"]
    assert len(secret) >= 32
    assert secret == (infra_dir / "secret_key").read_text().strip()


def test_migrate_runs_with_only_the_settings_infra_up_printed(
    infra_up_stdout: str, config_dir: Path, tmp_path: Path
) -> None:
    # --data-dir names an empty directory: nothing can come from the dev topology's files.
    env = cli_env(config_dir, exported(infra_up_stdout))
    result = run_cli("migrate", "--data-dir", str(tmp_path / "empty"), env=env)
    assert result.returncode == 0, result.stderr
    assert "using the dev servers" not in result.stderr


def test_infra_up_output_is_evaluable_by_bash(
    infra_up_stdout: str, infra_dir: Path, config_dir: Path
) -> None:
    command = shlex.join(
        [sys.executable, "-m", "server", "infra", "up", "--data-dir", str(infra_dir)]
    )
    script = f'eval "$({command})" && printf "%s\\n" "$FM_REDIS_URL" "$FM_SHARDS"'
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=PROJECT_ROOT,
        env=cli_env(config_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    settings = exported(infra_up_stdout)
    assert result.stdout.splitlines() == [settings["FM_REDIS_URL"], settings["FM_SHARDS"]]


def test_infra_up_again_is_idempotent(
    infra_up_stdout: str, infra_dir: Path, config_dir: Path
) -> None:
    again = run_cli("infra", "up", "--data-dir", str(infra_dir), env=cli_env(config_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout == infra_up_stdout
    assert "already running" in again.stderr
    assert infra.is_up(infra_dir)


def test_infra_down_stops_the_servers(tmp_path: Path, config_dir: Path) -> None:
    data_dir = tmp_path / "data"
    try:
        infra.up(data_dir, log=quiet)
        result = run_cli("infra", "down", "--data-dir", str(data_dir), env=cli_env(config_dir))
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert not infra.is_up(data_dir)
    finally:
        infra.down(data_dir, log=quiet)


# --- users ------------------------------------------------------------------------------------


def create_user(
    email: str, infra_env: Mapping[str, str], config_dir: Path
) -> subprocess.CompletedProcess[str]:
    """Run `finalmarket users create` for an admin with `email` against the test servers."""
    env = cli_env(config_dir, {**server_settings(infra_env), "FM_SECRET_KEY": SECRET_KEY})
    args = ("users", "create", "--email", email, "--password", "correct horse", "--admin")
    return run_cli(*args, env=env)


@pytest.mark.usefixtures("clean_data")
def test_users_create_makes_an_admin_account(infra_env: dict[str, str], config_dir: Path) -> None:
    result = create_user("Ada@Example.com", infra_env, config_dir)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"created user (\d+) <ada@example\.com> \(admin\)\n", result.stdout)
    assert match, result.stdout
    user_id = int(match[1])
    shards = json.loads(infra_env["FM_SHARDS"])
    conn = psycopg2.connect(shards[user_id % len(shards)]["primary"], connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT email, is_admin FROM users WHERE id = %s", (user_id,))
            assert cur.fetchall() == [("ada@example.com", True)]
    finally:
        conn.close()


@pytest.mark.usefixtures("clean_data")
def test_users_create_refuses_a_taken_email_with_exit_1(
    infra_env: dict[str, str], config_dir: Path
) -> None:
    assert create_user("bob@example.com", infra_env, config_dir).returncode == 0
    again = create_user("BOB@example.com", infra_env, config_dir)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.splitlines() == ["finalmarket: an account with this email exists"]


def test_serve_queues_a_burst_of_connections_while_busy(
    infra_env: dict[str, str], tmp_path: Path
) -> None:
    """400 clients connecting at once while the node cannot accept (stopped) all complete the
    TCP handshake: the listen backlog (`FM_LISTEN_BACKLOG`) holds them. With asyncio's 100
    most SYNs were dropped and retried a second or more later (a reconnect storm)."""
    (tmp_path / "config").mkdir()
    port = free_port()
    env = cli_env(
        tmp_path / "config",
        {**server_settings(infra_env), "FM_SECRET_KEY": SECRET_KEY, "FM_PORT": str(port)},
    )
    with started("serve", env=env, stderr_path=tmp_path / "stderr.log") as node:
        wait_ready(f"http://127.0.0.1:{port}", node)
        node.proc.send_signal(signal.SIGSTOP)
        clients = [socket.socket() for _ in range(400)]
        try:
            for client in clients:
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", port))
            deadline = time.monotonic() + 1.0
            pending = set(clients)
            while pending and time.monotonic() < deadline:
                _, writable, _ = select.select([], list(pending), [], 0.1)
                pending -= set(writable)
            connected = [c for c in clients if c not in pending]
            errors = [c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for c in connected]
        finally:
            node.proc.send_signal(signal.SIGCONT)
            for client in clients:
                client.close()
        assert (len(connected), set(errors)) == (400, {0})
