"""`finalmarket cluster --balancer haproxy`: HAProxy's own /readyz checks over two nodes.

Invariant: while one node drains and stops, every request through HAProxy is answered 200
(the draining node's /readyz turns 503 before its listener closes, HAProxy's checks take it
out, and `retries`/`redispatch` cover a connection refused in between)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.helpers.cluster import get, node_answering, running_cluster


def test_requests_through_haproxy_keep_succeeding_while_a_node_stops(
    infra_env: dict[str, str], tmp_path: Path
) -> None:
    with running_cluster(infra_env, tmp_path, balancer="haproxy") as cluster:
        answered = {node_answering(cluster) for _ in range(20)}
        assert answered == {"node1", "node2"}
        node1 = cluster.nodes["node1"]
        os.kill(node1.pid, signal.SIGTERM)
        statuses, answered_after_exit = [], set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, _, _ = get(cluster.url(f"/api/v1/products?first=2&n={len(statuses)}"))
            statuses.append(status)
            if _exited(node1.pid):
                answered_after_exit.add(node_answering(cluster))
                if len(statuses) > 100:
                    break
            time.sleep(0.01)
        assert _exited(node1.pid), "node1 did not stop"
        assert set(statuses) == {200}, statuses
        assert answered_after_exit == {"node2"}
        assert "backend nodes" in (cluster.data_dir / "haproxy" / "haproxy.cfg").read_text()


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[-1].split()[0] == "Z"
