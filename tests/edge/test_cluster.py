"""`finalmarket cluster` with nginx: requests spread over the nodes, the client address nginx
hands them cannot be forged, a node whose /readyz fails is taken out and put back, and Ctrl-C
stops everything. Also `finalmarket edge`, whose output nginx and HAProxy accept."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.wiring import balancer
from server.wiring.cluster import ReadinessWatch
from server.wiring.infra import InfraError
from server.wiring.infra.common import port_is_free
from tests.helpers.cluster import Cluster, get, node_answering, require_balancer, running_cluster
from tests.helpers.deployment import run_in_private_loop
from tests.helpers.processes import cli_env, run_cli

FORGED = "203.0.113.9"


@pytest.fixture(scope="module")
def cluster(
    infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two nodes behind nginx, shared by this module's tests (each leaves it healthy)."""
    with running_cluster(infra_env, tmp_path_factory.mktemp("cluster")) as running:
        yield running


def test_requests_through_nginx_are_spread_over_both_nodes(cluster: Cluster) -> None:
    answered = [node_answering(cluster) for _ in range(20)]
    assert set(answered) == {"node1", "node2"}, answered


def _remote_seen_for(cluster: Cluster, request_id: str) -> str:
    return str(cluster.wait_for_event("request", request_id=request_id)["remote"])


def test_a_forged_forwarded_address_does_not_reach_the_node(cluster: Cluster) -> None:
    """nginx replaces X-Forwarded-For and X-Real-IP with the connecting address. The nodes do
    trust those headers (sent to a node directly, the forged address is what it logs), so it
    is nginx's replacement that keeps a shopper from choosing the address rate limits see."""
    forged = {"X-Forwarded-For": FORGED, "X-Real-IP": FORGED}
    through_nginx, direct = f"edge-{uuid.uuid4().hex}", f"direct-{uuid.uuid4().hex}"
    # A query of its own: a cached answer would never reach a node.
    status, _, _ = get(
        cluster.url(f"/api/v1/products?first=1&probe={through_nginx}"),
        {**forged, "X-Request-Id": through_nginx},
    )
    assert status == 200
    node = cluster.nodes["node1"]
    status, _, _ = get(
        f"http://{node.address}/api/v1/products?first=1", {**forged, "X-Request-Id": direct}
    )
    assert status == 200
    assert _remote_seen_for(cluster, direct) == FORGED
    assert _remote_seen_for(cluster, through_nginx) == "127.0.0.1"


def _answers(cluster: Cluster, count: int) -> list[str]:
    """Which node answered each of `count` concurrent `GET /healthz` through nginx; "timeout"
    for one that got no answer within 3 s (a request sent to a stopped node hangs)."""

    def one(_: int) -> str:
        try:
            return node_answering(cluster, timeout=3.0)
        except TimeoutError:
            return "timeout"

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _wait_for_answers(
    cluster: Cluster, accept: Callable[[list[str]], bool], timeout: float = 30.0
) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        answers = _answers(cluster, 6)
        if accept(answers):
            return answers
        assert time.monotonic() < deadline, answers


def test_a_node_failing_readyz_is_taken_out_of_nginx_and_put_back(cluster: Cluster) -> None:
    """A stopped node (SIGSTOP) accepts connections in the kernel but never answers: nginx
    alone would send it requests that hang for a minute. The supervisor's /readyz check marks
    it `down` and reloads nginx, so every request gets answered by the other node; after
    SIGCONT it is put back."""
    node1 = cluster.nodes["node1"]
    config = cluster.data_dir / "nginx" / "nginx.conf"
    os.kill(node1.pid, signal.SIGSTOP)
    try:
        cluster.wait_for_event("node_unready", node="node1")
        reloaded = cluster.wait_for_event("balancer_reloaded", down=[node1.address])
        assert f"server {node1.address} max_fails=2 fail_timeout=5s down;" in config.read_text()
        assert reloaded["balancer"] == "nginx"
        # (Old nginx workers finish their connections after a reload: ask until new ones serve.)
        _wait_for_answers(cluster, lambda answers: set(answers) == {"node2"})
        assert set(_answers(cluster, 12)) == {"node2"}
    finally:
        os.kill(node1.pid, signal.SIGCONT)
    cluster.wait_for_event("node_ready", node="node1", count=2)
    assert f"server {node1.address} max_fails=2 fail_timeout=5s;" in config.read_text()
    _wait_for_answers(cluster, lambda answers: "node1" in answers and "timeout" not in answers)


def test_readiness_watch_reports_each_change_once(cluster: Cluster) -> None:
    """The supervisor's poller, against the cluster's real nodes and a port nobody serves."""
    node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
    closed = f"127.0.0.1:{_closed_port()}"
    watch = ReadinessWatch([node1.address, node2.address, closed], timeout=2.0)
    first = run_in_private_loop(watch.poll())
    assert first == [(node1.address, True), (node2.address, True)]
    assert run_in_private_loop(watch.poll()) == []
    os.kill(node2.pid, signal.SIGSTOP)
    try:
        assert run_in_private_loop(watch.poll()) == [(node2.address, False)]
        assert [u.down for u in watch.upstreams()] == [False, True, True]
    finally:
        os.kill(node2.pid, signal.SIGCONT)
    assert run_in_private_loop(watch.poll()) == [(node2.address, True)]


def _closed_port() -> int:
    for port in range(40000, 41000):
        if port_is_free(port):
            return port
    raise AssertionError("no free port")


def test_ctrl_c_drains_the_nodes_then_stops_nginx(
    infra_env: dict[str, str], tmp_path: Path
) -> None:
    with running_cluster(infra_env, tmp_path) as running:
        assert node_answering(running) in {"node1", "node2"}
        running.child.ctrl_c()
        assert running.child.wait(timeout=60) == 0, running.child.stderr()
    stopped = {e["node"]: e["exit_code"] for e in running.events("node_stopped")}
    assert stopped == {"node1": 0, "node2": 0}, running.child.stderr()
    drained = {e["node"] for e in running.events("draining")}
    assert drained == {"node1", "node2"}
    assert running.events("balancer_stopped")
    ports = [running.port, *(node.port for node in running.nodes.values())]
    assert all(port_is_free(port) for port in ports), ports


# --- finalmarket edge -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_edge_prints_a_config_the_balancer_accepts(
    name: str, tmp_path: Path, config_dir: Path
) -> None:
    require_balancer(name)
    upstreams = ["--upstream", "127.0.0.1:8001", "--upstream", "127.0.0.1:8002"]
    args = ("edge", name, *upstreams, "--listen", "127.0.0.1:8080", "--dir", str(tmp_path))
    result = run_cli(*args, env=cli_env(config_dir))
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:8002" in result.stdout and "127.0.0.1:8080" in result.stdout
    config = tmp_path / ("nginx.conf" if name == "nginx" else "haproxy.cfg")
    config.write_text(result.stdout)
    if name == "nginx":
        check = [balancer.nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(config)]
    else:
        check = [balancer.haproxy_binary(), "-c", "-f", str(config)]
    checked = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr


def test_edge_refuses_an_upstream_without_a_port(tmp_path: Path, config_dir: Path) -> None:
    args = ("edge", "nginx", "--upstream", "node-a", "--dir", str(tmp_path))
    result = run_cli(*args, env=cli_env(config_dir))
    assert result.returncode == 2
    assert "expected HOST:PORT, got 'node-a'" in result.stderr


def test_a_missing_nginx_is_named_with_its_debian_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(balancer.shutil, "which", lambda name: None)
    monkeypatch.setattr(balancer.os, "access", lambda path, mode: False)
    with pytest.raises(InfraError) as raised:
        balancer.nginx_binary()
    assert str(raised.value) == (
        "nginx is not installed (Debian: apt-get install nginx libnginx-mod-http-cache-purge)"
    )


def test_a_node_is_added_and_removed_while_the_cluster_runs(cluster: Cluster) -> None:
    """`cluster add-node` starts a third node, in the rotation once ready; `remove-node` takes
    the newest out of the rotation before draining it, so requests streaming through nginx
    meanwhile all get an answer, and afterwards only the first two answer."""
    env = cli_env(cluster.data_dir.parent / "config")
    added = run_cli("cluster", "add-node", "--data-dir", str(cluster.data_dir), env=env)
    assert added.returncode == 0, added.stderr
    assert "added node3 at 127.0.0.1:" in added.stderr, added.stderr
    answered = {node_answering(cluster) for _ in range(30)}
    assert answered == {"node1", "node2", "node3"}, answered

    failures: list[str] = []
    stop = False

    def stream() -> None:
        while not stop:
            try:
                node_answering(cluster, timeout=5.0)
            except Exception as exc:  # any failure counts: none is expected
                failures.append(repr(exc))

    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream) for _ in range(4)]
        removed = run_cli("cluster", "remove-node", "--data-dir", str(cluster.data_dir), env=env)
        stop = True
        for running in streams:
            running.result()
    assert removed.returncode == 0, removed.stderr
    assert "removed node3" in removed.stderr, removed.stderr
    assert failures == []
    assert {node_answering(cluster) for _ in range(20)} == {"node1", "node2"}
    cluster.wait_for_event("node_stopped", node="node3")
