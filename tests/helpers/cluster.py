"""`finalmarket cluster` as a child process (its nodes, its real nginx or HAProxy) against the
suite's PostgreSQL and Valkey: starting and stopping it, its log events, requests through it,
and an admin made with the real CLI. Used by tests/edge and tests/browser.

A machine without nginx (and its cache purge module) or HAProxy fails these tests with the
Debian packages to install; `scripts/test` installs them when it runs as root.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.wiring.balancer import haproxy_binary, nginx_binary
from server.wiring.infra import InfraError
from server.wiring.infra.common import port_is_free
from tests.helpers.processes import (
    SECRET_KEY,
    Running,
    cli_env,
    run_cli,
    server_settings,
    started,
    wait_for_line,
)

CLUSTER_START_TIMEOUT_S = 120.0
CLUSTER_STOP_TIMEOUT_S = 60.0
BANNER = "Final Market is running at"
DEMO_PRODUCTS = 5
# Every request of a test comes from 127.0.0.1: the per-address limits are not under test here.
GENEROUS_LIMITS = {"FM_RATELIMIT_IP_PER_SECOND": "100000", "FM_RATELIMIT_IP_BURST": "100000"}


def require_balancer(name: str) -> None:
    """Fail (never skip) when the balancer's binary is missing, naming the packages."""
    try:
        nginx_binary() if name == "nginx" else haproxy_binary()
    except InfraError as exc:
        pytest.fail(f"{exc}; scripts/test installs it when run as root")


def free_port_run(length: int) -> int:
    """A port P with P..P+length-1 all free right now (the cluster's balancer and nodes)."""
    for base in range(20000 + os.getpid() % 20000, 60000, 97):
        if all(port_is_free(base + offset) for offset in range(length)):
            return base
    raise AssertionError("no run of free ports")


@dataclass
class Node:
    """One node of a running cluster, as the supervisor announced it."""

    node_id: str
    port: int
    pid: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """A running `finalmarket cluster`: its public port, nodes and log."""

    child: Running
    port: int
    nodes: dict[str, Node]
    data_dir: Path
    balancer: str

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (supervisor and nodes) written so far, those named `name`."""
        found = []
        for line in self.child.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        found.append(event)
        return found

    def wait_for_event(
        self, name: str, timeout: float = 30.0, count: int = 1, **fields: Any
    ) -> dict[str, Any]:
        """The `count`-th log event `name` whose fields include `fields`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            matching = [
                e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())
            ]
            if len(matching) >= count:
                return matching[count - 1]
            if time.monotonic() > deadline or self.child.proc.poll() is not None:
                pytest.fail(f"no {name} {fields} (x{count}) in the log:\n{self.child.stderr()}")
            time.sleep(0.05)


def get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of `GET url`; error statuses are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def node_answering(cluster: Cluster, timeout: float = 10.0) -> str:
    """The node that answers `GET /healthz` through the balancer."""
    status, _, body = get(cluster.url("/healthz"), timeout=timeout)
    assert status == 200, body
    return str(json.loads(body)["node"])


@contextlib.contextmanager
def running_cluster(
    infra_env: Mapping[str, str],
    work: Path,
    *,
    nodes: int = 2,
    balancer: str = "nginx",
    env: Mapping[str, str] | None = None,
) -> Iterator[Cluster]:
    """`finalmarket cluster` until its banner; Ctrl-C (to its own process group, as a terminal
    sends it) and wait for it afterwards, killing it if it does not stop."""
    require_balancer(balancer)
    (work / "config").mkdir(parents=True, exist_ok=True)
    port = free_port_run(nodes + 1)
    settings = {
        **server_settings(infra_env),
        "FM_SECRET_KEY": SECRET_KEY,
        "FM_LOG_FORMAT": "json",
        **GENEROUS_LIMITS,
        **(env or {}),
    }
    args = (
        *("cluster", "--nodes", str(nodes), "--port", str(port), "--balancer", balancer),
        *("--data-dir", str(work / "data"), "--products", str(DEMO_PRODUCTS)),
    )
    child_env = cli_env(work / "config", settings)
    with started(*args, env=child_env, stderr_path=work / "cluster.log") as child:
        cluster = Cluster(child, port, {}, work / "data", balancer)
        try:
            wait_for_line(child, BANNER, timeout=CLUSTER_START_TIMEOUT_S)
            for event in cluster.events("node_started"):
                address = event["address"]
                node_port = int(address.rpartition(":")[2])
                cluster.nodes[event["node"]] = Node(event["node"], node_port, int(event["pid"]))
            assert len(cluster.nodes) == nodes, child.stderr()
            yield cluster
        finally:
            for node in cluster.nodes.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)  # a test may have stopped one
            if child.proc.poll() is None:
                child.ctrl_c()
                with contextlib.suppress(Exception):
                    child.wait(timeout=CLUSTER_STOP_TIMEOUT_S)


def admin_token(cluster: Cluster, infra_env: dict[str, str], tmp_path: Path) -> str:
    """An admin account made with the real CLI, signed in through the edge."""
    email = f"edge-admin-{os.getpid()}-{time.monotonic_ns()}@example.com"
    password = "a long passphrase"
    (tmp_path / "config").mkdir(exist_ok=True)
    env = cli_env(tmp_path / "config", {**server_settings(infra_env), "FM_SECRET_KEY": SECRET_KEY})
    made = run_cli("users", "create", "--email", email, "--password", password, "--admin", env=env)
    assert made.returncode == 0, made.stderr
    credentials = {"email": email, "password": password}
    status, body = send(cluster, "POST", "/api/v1/sessions", credentials)
    assert status == 200, body
    return str(json.loads(body)["token"])


def send(
    cluster: Cluster, method: str, path: str, body: Any, token: str | None = None
) -> tuple[int, bytes]:
    """Status and body of a JSON request through the balancer (error statuses returned)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        cluster.url(path), data=json.dumps(body).encode(), headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
