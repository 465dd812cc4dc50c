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

While it runs, `finalmarket cluster add-node` / `remove-node` (SIGUSR1 / SIGUSR2 to the
supervisor, whose pid and nodes are in `<data-dir>/cluster.json`) add a node on the next free
port (in the rotation once ready) or retire the newest one: taken out of the rotation first,
then drained (its cable clients reconnect through the balancer to the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.common.logs import get_logger
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
from server.wiring.infra.common import port_is_free
from server.wiring.node import run_event_loop
from server.wiring.settings import configure_logging_for, load_settings

CLUSTER_PORT = 8888
NODE_HOST = "127.0.0.1"
POLL_INTERVAL_S = 1.0
READYZ_TIMEOUT_S = 2.0
# One missed check (interval + timeout) plus a reload fits in it, so nginx stops sending
# work to a draining node before its listener closes.
CLUSTER_DRAIN_DELAY_S = 4.0
# A node's drain delay plus its shutdown timeout (10 s by default) and some slack.
NODE_STOP_TIMEOUT_S = 30.0
STATE_FILE = "cluster.json"
SCALE_SIGNALS = {"add-node": signal.SIGUSR1, "remove-node": signal.SIGUSR2}
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

    def add(self, address: str) -> None:
        """Watch one more node (not ready until it answers)."""
        self.ready[address] = False

    def remove(self, address: str) -> None:
        """Stop watching a node (it leaves the balancer's view)."""
        self.ready.pop(address, None)

    def upstreams(self) -> list[Upstream]:
        """The balancer's view: every node, those not ready marked `down`."""
        return [Upstream(address, down=not ok) for address, ok in self.ready.items()]


class Scaling:
    """Adds and retires nodes of a running cluster (the supervisor's SIGUSR1 and SIGUSR2), and
    writes `cluster.json` (pid, nodes and whether each is ready) after every change."""

    def __init__(
        self, nodes: list[NodeProcess], state_path: Path, purge_url: str | None = None
    ) -> None:
        self.nodes = nodes
        self.state_path = state_path
        self.purge_url = purge_url
        self.requests: list[str] = []
        self.retiring: list[tuple[NodeProcess, asyncio.Future[int]]] = []

    def next_port(self) -> int:
        """The first free port after every node's."""
        port = max(node.port for node in self.nodes) + 1
        while not port_is_free(port):
            port += 1
        return port

    def add(self, watch: ReadinessWatch) -> NodeProcess:
        """Start a node; it joins the rotation once its /readyz answers 200."""
        used = {node.node_id for node in self.nodes}
        number = len(self.nodes) + 1
        while f"node{number}" in used:
            number += 1
        node = start_node(f"node{number}", self.next_port(), self.purge_url)
        self.nodes.append(node)
        watch.add(node.address)
        return node

    def retire(self, watch: ReadinessWatch) -> NodeProcess | None:
        """Take the newest node out of the rotation (the caller reloads the balancer), then
        drain it in the background; None when it is the last one."""
        if len(self.nodes) < 2:
            _log.warning("remove_node_refused", reason="the last node stays")
            return None
        node = self.nodes.pop()
        watch.remove(node.address)
        return node

    def drain(self, node: NodeProcess) -> None:
        """SIGTERM a node the balancer no longer sends work to; wait for it off the loop."""
        signal_child(node.proc, signal.SIGTERM)
        waiting = asyncio.get_running_loop().run_in_executor(
            None, wait_or_kill, node.proc, NODE_STOP_TIMEOUT_S
        )
        self.retiring.append((node, waiting))

    def reap(self) -> None:
        """Log the retired nodes that have exited."""
        for node, waiting in list(self.retiring):
            if waiting.done():
                self.retiring.remove((node, waiting))
                _log.info("node_stopped", node=node.node_id, exit_code=waiting.result())

    def write_state(self, watch: ReadinessWatch) -> None:
        """`cluster.json`: what `add-node` and `remove-node` read and wait on."""
        state = {
            "pid": os.getpid(),
            "nodes": [
                {
                    "node": node.node_id,
                    "address": node.address,
                    "ready": watch.ready.get(node.address, False),
                }
                for node in self.nodes
            ],
            "retiring": [node.node_id for node, _ in self.retiring],
        }
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.state_path)


async def supervise(
    nodes: list[NodeProcess], balancer: Balancer, banner: str, scaling: Scaling | None = None
) -> None:
    """Start the balancer once every node is ready (printing `banner`), then keep its view of
    `nodes` current until SIGINT or SIGTERM, adding and retiring nodes as `scaling` is asked.
    Fails if the balancer dies, or a node exits before it was ever ready (a port taken, bad
    settings)."""
    stop = asyncio.Event()
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if scaling is not None:

        def asked(action: str) -> None:
            scaling.requests.append(action)
            wake.set()

        for action, signum in SCALE_SIGNALS.items():
            loop.add_signal_handler(signum, asked, action)
    watch = ReadinessWatch([node.address for node in nodes])
    try:
        while not stop.is_set():
            wake.clear()
            retired: list[NodeProcess] = []
            if scaling is not None and balancer.started:
                while scaling.requests:
                    if scaling.requests.pop(0) == "add-node":
                        added = scaling.add(watch)
                        _log.info("node_adding", node=added.node_id, address=added.address)
                    elif (node := scaling.retire(watch)) is not None:
                        retired.append(node)
            by_address = {node.address: node for node in nodes}
            changed = [c for c in await watch.poll() if c[0] in by_address]
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
            elif changed or retired:
                balancer.apply(watch.upstreams())
                down = [u.address for u in watch.upstreams() if u.down]
                _log.info("balancer_reloaded", balancer=balancer.name, down=down)
            if scaling is not None:
                for node in retired:  # out of the rotation first, then drained
                    _log.info("node_retiring", node=node.node_id, address=node.address)
                    scaling.drain(node)
                scaling.reap()
                scaling.write_state(watch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, wake), POLL_INTERVAL_S)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, *SCALE_SIGNALS.values()):
            loop.remove_signal_handler(signum)


async def _first(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


def scale(data_dir: Path, action: str, timeout_s: float = 90.0) -> str:
    """Ask the cluster running from `data_dir` to add or retire a node and wait until it has:
    the added node ready, or the retired one gone. Returns a line saying what happened."""
    state_path = data_dir / STATE_FILE
    try:
        before = json.loads(state_path.read_text())
    except (OSError, ValueError):
        raise infra.InfraError(f"no cluster is running from {data_dir} ({STATE_FILE})") from None
    pid = int(before["pid"])
    try:
        os.kill(pid, SCALE_SIGNALS[action])
    except ProcessLookupError:
        raise infra.InfraError(f"the cluster of {data_dir} (pid {pid}) is not running") from None
    known = {node["node"] for node in before["nodes"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(OSError, ValueError):
            now = json.loads(state_path.read_text())
            names = {node["node"] for node in now["nodes"]}
            if action == "add-node":
                new = [n for n in now["nodes"] if n["node"] not in known and n["ready"]]
                if new:
                    return f"added {new[0]['node']} at {new[0]['address']} (ready, in rotation)"
            elif len(names) < len(known) and not now["retiring"]:
                gone = ", ".join(sorted(known - names))
                return f"removed {gone} (out of rotation, drained, stopped)"
            elif len(known) < 2:
                raise infra.InfraError("the last node of a cluster is not removed")
    raise infra.InfraError(f"{action}: the cluster did not finish within {timeout_s:.0f} s")


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
        configure_logging_for(settings)
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
            scaling = Scaling(children, data_dir / STATE_FILE, purge_url)
            try:
                await supervise(children, balancer, banner, scaling)
            finally:
                (data_dir / STATE_FILE).unlink(missing_ok=True)
                for node, waiting in scaling.retiring:
                    _log.info("node_stopped", node=node.node_id, exit_code=await waiting)

        run_event_loop(main())
    finally:
        stop_nodes(children)
        if balancer.exit_code() is None:
            balancer.stop()
            _log.info("balancer_stopped", balancer=balancer.name)
        if started_infra:
            infra.down(data_dir, log=_say)
    return 0
