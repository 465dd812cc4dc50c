"""`finalmarket cluster`: N nodes behind a real load balancer on one machine.

Brings up the servers as `finalmarket dev` does (embedded ones unless `FM_*` names external
ones; migrations; demo data into an empty catalog), starts N `finalmarket serve` children on
the ports after the public one, and nginx (or HAProxy) in front on the public port. The nodes
trust the balancer's forwarded headers and listen on 127.0.0.1 only, where nothing but the
balancer reaches them.

About once a second the supervisor asks every node's `/readyz`; a node that answers anything
but 200 within `READYZ_TIMEOUT_S` (draining, lost Redis or a database primary, stopped) is
marked `down` in nginx's configuration and nginx reloaded, and put back when it answers 200
again. The nodes' drain delay (`CLUSTER_DRAIN_DELAY_S`) outlasts one missed check plus the
reload, so a node that gets SIGTERM is out of the rotation before it stops listening.
HAProxy checks `/readyz` by itself.

Ctrl-C (or SIGTERM) drains the nodes, then stops the balancer and the servers it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.common.logs import configure_logging, get_logger
from server.wiring import infra
from server.wiring.balancer import Balancer, make_balancer
from server.wiring.children import signal_child, spawn, wait_or_kill
from server.wiring.dev import (
    admin_command,
    ensure_servers,
    prepare_data,
    server_env_lines,
    will_start_servers,
)
from server.wiring.edge import Upstream
from server.wiring.node import run_event_loop
from server.wiring.settings import load_settings

CLUSTER_PORT = 8888
NODE_HOST = "127.0.0.1"
POLL_INTERVAL_S = 1.0
READYZ_TIMEOUT_S = 2.0
# One missed check (interval + timeout) plus a reload fits in it, so nginx stops sending
# work to a draining node before its listener closes.
CLUSTER_DRAIN_DELAY_S = 4.0
# A node's drain delay plus its shutdown timeout (10 s by default) and some slack.
NODE_STOP_TIMEOUT_S = 30.0
_log = get_logger("finalmarket.cluster")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class NodeProcess:
    """One `finalmarket serve` child of the cluster."""

    node_id: str
    port: int
    proc: subprocess.Popen[bytes]
    was_ready: bool = False

    @property
    def address(self) -> str:
        """host:port the balancer reaches it at."""
        return f"{NODE_HOST}:{self.port}"


def node_env(node_id: str, port: int, purge_url: str | None = None) -> dict[str, str]:
    """A node's environment: the supervisor's (servers, secret key, any `FM_*` the operator
    set) plus its port and name; it listens on 127.0.0.1 and trusts the balancer's headers.
    With `purge_url` (nginx in front) catalog writes purge the edge's pages there."""
    env = dict(os.environ)
    env.setdefault("FM_DRAIN_DELAY_S", str(CLUSTER_DRAIN_DELAY_S))
    env.setdefault("FM_LOG_FORMAT", "console")
    if purge_url is not None and "FM_EDGE_PURGE" not in env:
        env.update(FM_EDGE_PURGE="nginx", FM_EDGE_PURGE_URL=purge_url)
    env.update(
        FM_HOST=NODE_HOST,
        FM_PORT=str(port),
        FM_NODE_ID=node_id,
        FM_TRUST_FORWARDED_HEADERS="1",
    )
    return env


def start_node(node_id: str, port: int, purge_url: str | None = None) -> NodeProcess:
    """Start one node (`python -m server serve`) as an owned child."""
    argv = [sys.executable, "-m", "server", "serve"]
    node = NodeProcess(node_id, port, spawn(argv, env=node_env(node_id, port, purge_url)))
    _log.info("node_started", node=node_id, address=node.address, pid=node.proc.pid)
    return node


async def answers_ready(address: str, within_s: float = READYZ_TIMEOUT_S) -> bool:
    """Whether `GET /readyz` on `address` answers 200 within `within_s` seconds (refused,
    timed out, 503 or garbage: not ready)."""
    host, _, port = address.rpartition(":")

    async def ask() -> bool:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
            status_line = await reader.readline()
        finally:
            writer.close()
        return status_line.split(b" ")[1:2] == [b"200"]

    try:
        return await asyncio.wait_for(ask(), within_s)
    except (OSError, TimeoutError):
        return False


class ReadinessWatch:
    """Which nodes answer `/readyz` with 200; every node starts out not ready."""

    def __init__(self, addresses: Sequence[str], timeout: float = READYZ_TIMEOUT_S) -> None:
        self.ready = dict.fromkeys(addresses, False)
        self.timeout = timeout

    async def poll(self) -> list[tuple[str, bool]]:
        """Ask every node at once; returns the (address, now ready) of those that changed."""
        addresses = list(self.ready)
        answers = await asyncio.gather(*(answers_ready(a, self.timeout) for a in addresses))
        changed = [(a, ok) for a, ok in zip(addresses, answers, strict=True) if self.ready[a] != ok]
        self.ready.update(changed)
        return changed

    def upstreams(self) -> list[Upstream]:
        """The balancer's view: every node, those not ready marked `down`."""
        return [Upstream(address, down=not ok) for address, ok in self.ready.items()]


async def supervise(nodes: list[NodeProcess], balancer: Balancer, banner: str) -> None:
    """Start the balancer once every node is ready (printing `banner`), then keep its view of
    `nodes` current until SIGINT or SIGTERM. Fails if the balancer dies, or a node exits
    before it was ever ready (a port taken, bad settings)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    watch = ReadinessWatch([node.address for node in nodes])
    by_address = {node.address: node for node in nodes}
    try:
        while not stop.is_set():
            changed = await watch.poll()
            for address, ok in changed:
                node = by_address[address]
                node.was_ready |= ok
                _log.info("node_ready" if ok else "node_unready", node=node.node_id)
            for node in nodes:
                if (code := node.proc.poll()) is not None and not node.was_ready:
                    raise infra.InfraError(f"{node.node_id} exited with {code} before it was ready")
            if balancer.exit_code() is None and not balancer.started:
                if all(watch.ready.values()):  # so its first answers come from the nodes
                    balancer.start(watch.upstreams())
                    _log.info(
                        "balancer_started", balancer=balancer.name, config=balancer.config_path
                    )
                    _say(banner)
            elif (code := balancer.exit_code()) is not None:
                raise infra.InfraError(f"{balancer.name} exited with {code}")
            elif changed:
                balancer.apply(watch.upstreams())
                down = [u.address for u in watch.upstreams() if u.down]
                _log.info("balancer_reloaded", balancer=balancer.name, down=down)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL_S)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def stop_nodes(nodes: Sequence[NodeProcess]) -> None:
    """SIGTERM every node at once (each drains), then wait for all of them."""
    for node in nodes:
        signal_child(node.proc, signal.SIGTERM)
    for node in nodes:
        code = wait_or_kill(node.proc, NODE_STOP_TIMEOUT_S)
        _log.info("node_stopped", node=node.node_id, exit_code=code)


def run_cluster(
    data_dir: Path,
    *,
    nodes: int,
    port: int,
    products: int,
    balancer_name: str = "nginx",
    data_dir_flag: bool = False,
) -> int:
    """Run the cluster until Ctrl-C; returns the exit code. The balancer listens on
    127.0.0.1:`port`, the nodes on the `nodes` ports after it."""
    if nodes < 1:
        raise ValueError("a cluster needs at least one node")
    listen = f"{NODE_HOST}:{port}"
    balancer = make_balancer(balancer_name, data_dir / balancer_name, listen)  # binary first
    started_infra = will_start_servers(data_dir)
    children: list[NodeProcess] = []
    try:
        ensure_servers(data_dir)
        log_format = os.environ.get("FM_LOG_FORMAT", "console")
        settings = load_settings(log_format=log_format, node_id="cluster")
        configure_logging(settings.log_level, settings.log_format, settings.node_id)
        for line in server_env_lines():
            _say(line)

        async def main() -> None:
            await prepare_data(settings, products)
            purge_url = f"http://{listen}/_edge/purge" if balancer.name == "nginx" else None
            children.extend(
                start_node(f"node{i}", port + i, purge_url) for i in range(1, nodes + 1)
            )
            where = ", ".join(node.address for node in children)
            banner = (
                f"Final Market is running at http://{listen}/  ({balancer.name} in front of "
                f"{nodes} node{'s' if nodes > 1 else ''}: {where}; Ctrl-C stops it)\n"
                f"make an admin: {admin_command(data_dir if data_dir_flag else None)}"
            )
            await supervise(children, balancer, banner)

        run_event_loop(main())
    finally:
        stop_nodes(children)
        if balancer.exit_code() is None:
            balancer.stop()
            _log.info("balancer_stopped", balancer=balancer.name)
        if started_infra:
            infra.down(data_dir, log=_say)
    return 0
