"""What a node sees of its Redis Cluster: slots nobody serves, failovers, slot moves.

About once a second (`PROBE_INTERVAL_S`), and on every `/readyz`, the node asks one reachable
cluster node for `CLUSTER NODES` (the slot map and each node's role) and PINGs every master,
each on a connection of the probe's own with the readiness timeout. A slot is unreachable when
no master owns it, when its master is flagged failed, or when its master does not answer.
Comparing each map with the previous one counts:

- failovers: a node that was a replica is now a master. *Planned* when its old master is now
  its replica (`CLUSTER FAILOVER` waits for the replica to catch up: nothing is lost),
  *unplanned* otherwise (the old master died or was cut off): writes it acknowledged but had not
  replicated yet are gone, so `on_lost_writes` callbacks get the promoted master's slots, each
  with the failover's name (the promoted node's id and config epoch, the same on every node that
  sees it): the cable then starts a new epoch for the streams there, once per failover however
  many nodes notice it (see `realtime.delivery`);
- slot moves: a slot now owned by a master that did not take it over by a failover (a reshard).

`/readyz` lists unreachable slots as a reason (the node cannot serve keys there: sessions,
limits, cache and streams hashed to them fail until the cluster fails over), `/metrics` has
them as `fm_redis_cluster_unreachable_slots` beside the counters. Probes run one at a time, so
each map is compared with the one just before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from server.common.logs import get_logger

_log = get_logger("finalmarket.redis_cluster")

TOTAL_SLOTS = 16384
PROBE_INTERVAL_S = 1.0

# Slots whose writes an unplanned failover lost -> that failover's name ("<node id>:<config
# epoch>" of the promoted master).
LostWrites = Mapping[int, str]
OnLostWrites = Callable[[LostWrites], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Topology:
    """One `CLUSTER NODES` answer: the master of each slot, and each node's address and role."""

    owners: tuple[str | None, ...]  # node id of each slot's master (None: unassigned)
    addresses: dict[str, str]  # node id -> "host:port"
    masters: frozenset[str]
    replicas: dict[str, str]  # replica id -> its master's id
    failed: frozenset[str]  # flagged `fail` (the cluster agreed it is down)
    config_epochs: Mapping[str, int] = field(default_factory=dict)  # node id -> config epoch


def parse_cluster_nodes(text: str) -> Topology:
    """Parse `CLUSTER NODES` (one line per node: id, address, flags, master, ..., slots)."""
    owners: list[str | None] = [None] * TOTAL_SLOTS
    addresses: dict[str, str] = {}
    masters: set[str] = set()
    replicas: dict[str, str] = {}
    failed: set[str] = set()
    config_epochs: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node, address, flags, master = parts[0], parts[1], set(parts[2].split(",")), parts[3]
        addresses[node] = address.split("@")[0]
        if parts[6].isdigit():
            config_epochs[node] = int(parts[6])
        if "fail" in flags:
            failed.add(node)
        if "master" in flags:
            masters.add(node)
        elif "slave" in flags and master != "-":
            replicas[node] = master
        for item in parts[8:]:
            if item.startswith("["):  # a migration in progress: `[slot->-id]` / `[slot-<-id]`
                continue
            first, _, last = item.partition("-")
            for slot in range(int(first), int(last or first) + 1):
                owners[slot] = node
    return Topology(
        tuple(owners), addresses, frozenset(masters), replicas, frozenset(failed), config_epochs
    )


@dataclass
class ClusterReport:
    """The outcome of one probe."""

    unreachable_slots: int
    down: list[str] = field(default_factory=list)  # "host:port: why", masters that failed

    def reasons(self) -> list[str]:
        """Readiness reasons: one line when some slot is unreachable, else none."""
        if not self.unreachable_slots:
            return []
        detail = "; ".join(self.down) if self.down else "slots without a master"
        return [
            f"redis cluster: {self.unreachable_slots} of {TOTAL_SLOTS} slots unreachable ({detail})"
        ]


def _failovers(before: Topology, after: Topology) -> set[str]:
    """Nodes that were replicas in `before` and are masters in `after`."""
    return {node for node in after.masters if node in before.replicas}


def _planned(node: str, before: Topology, after: Topology, seen_down: set[str]) -> bool:
    """Whether `node`'s promotion was a planned failover: its old master was never seen down
    (flagged failed, or not answering a probe) around it. An automatic failover needs the
    cluster to flag the master failed first, so a crash is never taken for planned; a planned
    one may be seen half way (promoted, the old master not yet following) and stays planned."""
    old_master = before.replicas.get(node)
    return old_master is not None and old_master not in (before.failed | after.failed | seen_down)


def _moved_slots(before: Topology, after: Topology, promoted: set[str]) -> int:
    """Slots whose master changed other than by its replica taking over."""
    moved = 0
    for old, new in zip(before.owners, after.owners, strict=True):
        if old != new and new is not None and old is not None:
            if new in promoted and before.replicas.get(new) == old:
                continue
            moved += 1
    return moved


class ClusterHealth:
    """Probes a Redis Cluster for readiness and metrics; `start()`, `await stop()`.

    `cluster` is the node's `redis.asyncio.RedisCluster` (its known nodes are where the probe
    starts looking); the probe's own connections are made with `timeout_s`.
    """

    def __init__(self, cluster: Any, timeout_s: float) -> None:
        self._cluster = cluster
        self._timeout_s = timeout_s
        self._clients: dict[str, Redis] = {}
        self._lock = asyncio.Lock()
        self._last: Topology | None = None
        self._task: asyncio.Task[None] | None = None
        self.unreachable_slots = 0
        self.failovers = {"planned": 0, "unplanned": 0}
        self.slots_moved = 0
        self.probes = 0
        self.on_lost_writes: list[OnLostWrites] = []
        self._pending: dict[OnLostWrites, dict[int, str]] = {}  # lost slots not told yet
        self._seen_down: set[str] = set()  # nodes seen failed or silent, not healthy since
        self._answered: set[str] = set()  # masters that answered the last probe

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Probe every `PROBE_INTERVAL_S` in a task owned here."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop probing and close the probe's connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.probe()
            except Exception as exc:  # the task outlives anything; the next probe retries
                _log.warning("redis_cluster_probe_failed", error=repr(exc))
            await asyncio.sleep(PROBE_INTERVAL_S)

    # --- probing ------------------------------------------------------------------------------

    async def unready_reasons(self) -> list[str]:
        """A fresh probe's readiness reasons (`/readyz`)."""
        return (await self.probe()).reasons()

    async def probe(self) -> ClusterReport:
        """Read the slot map, PING every master, count what changed since the last probe."""
        async with self._lock:
            topology = await self._topology()
            if topology is None:
                report = ClusterReport(TOTAL_SLOTS, ["no cluster node answers CLUSTER NODES"])
            else:
                report = await self._check(topology)
                changed, lost = self._compare(topology)
                if changed:  # the node's own client learns the new map at once
                    with contextlib.suppress(Exception):
                        await self._cluster.nodes_manager.initialize()
                if lost:
                    for callback in self.on_lost_writes:
                        self._pending.setdefault(callback, {}).update(lost)
                await self._tell_lost_writes()
            self.unreachable_slots = report.unreachable_slots
            self.probes += 1
            return report

    async def _tell_lost_writes(self) -> None:
        """Hand each callback the slots it was not told of yet; one that fails is told
        again at the next probe (the slot map may still have been settling)."""
        for callback, slots in list(self._pending.items()):
            try:
                await callback(dict(slots))
            except Exception as exc:
                _log.warning("redis_lost_writes_callback_failed", error=repr(exc))
            else:
                del self._pending[callback]

    async def _topology(self) -> Topology | None:
        for address in self._candidates():
            with contextlib.suppress(Exception):
                text = await asyncio.wait_for(
                    self._client(address).execute_command("CLUSTER", "NODES"), self._timeout_s
                )
                return parse_cluster_nodes(text.decode() if isinstance(text, bytes) else str(text))
        return None

    def _candidates(self) -> list[str]:
        """Where to ask for the map: masters last seen, then every node the client knows."""
        found: list[str] = []
        if self._last is not None:
            found += [self._last.addresses[node] for node in sorted(self._last.masters)]
            found += [self._last.addresses[node] for node in sorted(self._last.replicas)]
        with contextlib.suppress(Exception):
            found += [node.name for node in self._cluster.get_nodes()]
        with contextlib.suppress(Exception):
            found += [node.name for node in self._cluster.nodes_manager.startup_nodes.values()]
        return list(dict.fromkeys(address for address in found if address))

    async def _check(self, topology: Topology) -> ClusterReport:
        serving = sorted({owner for owner in topology.owners if owner is not None})
        answers = await asyncio.gather(
            *(self._ping(topology.addresses[node]) for node in serving), return_exceptions=True
        )
        down: dict[str, str] = {}
        for node in topology.failed:
            self._seen_down.add(node)
        for node, answer in zip(serving, answers, strict=True):
            if node in topology.failed:
                down[node] = "flagged failed by the cluster"
            elif isinstance(answer, BaseException):
                down[node] = repr(answer) if str(answer) == "" else str(answer).splitlines()[0]
        self._seen_down.update(down)
        self._answered = {node for node in serving if node not in down}
        unreachable = sum(1 for owner in topology.owners if owner is None or owner in down)
        return ClusterReport(
            unreachable, [f"{topology.addresses[node]}: {why}" for node, why in down.items()]
        )

    async def _ping(self, address: str) -> None:
        try:
            await asyncio.wait_for(self._client(address).ping(), self._timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no answer within {self._timeout_s:g}s") from None

    def _compare(self, topology: Topology) -> tuple[bool, dict[int, str]]:
        """Count failovers and slot moves since the last map; whether any happened, and the
        slots of masters promoted by an unplanned failover (where writes may be lost)."""
        before, self._last = self._last, topology
        if before is None:
            return False, {}
        promoted = _failovers(before, topology)
        moved = _moved_slots(before, topology, promoted)
        lost: dict[int, str] = {}
        for node in sorted(promoted):
            kind = "planned" if _planned(node, before, topology, self._seen_down) else "unplanned"
            self.failovers[kind] += 1
            if kind == "unplanned":
                failover = f"{node}:{topology.config_epochs.get(node, 0)}"
                lost.update(
                    (slot, failover) for slot, owner in enumerate(topology.owners) if owner == node
                )
            _log.warning(
                "redis_cluster_failover",
                kind=kind,
                promoted=topology.addresses[node],
                was_replica_of=before.addresses.get(before.replicas[node], "?"),
            )
        # Back in health (answering as a master, or following one): no longer suspect.
        healthy = {node for node in topology.replicas if node not in topology.failed}
        self._seen_down -= healthy | self._answered
        if moved:
            self.slots_moved += moved
            _log.info("redis_cluster_slots_moved", slots=moved)
        return bool(promoted or moved), lost

    def _client(self, address: str) -> Redis:
        client = self._clients.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            client = Redis(
                host=host,
                port=int(port),
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                retry=Retry(NoBackoff(), 0),
                single_connection_client=True,
            )
            self._clients[address] = client
        return client
