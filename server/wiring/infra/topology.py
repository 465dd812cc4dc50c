"""Start/stop the whole embedded topology under one data directory and describe it as env.

Layout of ``data_dir``::

    infra.json              persisted topology + ports (written on first ``up``)
    infra.lock              flock so two ``up``/``down`` calls do not interleave
    postgres/<name>/        PostgreSQL data directories (owned by finalmarket-pg when root)
    postgres/<name>.log     their server logs
    valkey/<name>/          Valkey directories (config, pid file, AOF, log, nodes.conf)

Topologies (chosen at the first ``up``; a later ``up`` must use the same flags):

* light (default): one PostgreSQL server with ``fm_catalog`` and ``fm_shard_0..3``, one Valkey.
* ``replicas=True``: catalog and each shard on its own primary, each with a streaming hot
  standby; primary DSNs are multi-host URIs with ``target_session_attrs=read-write`` so clients
  follow a promoted standby.
* ``ha=True``: catalog and each shard as a Patroni cluster of two members (primary + streaming
  replica, ``patroni/<group>-a|b.yml``; see ``patronictl -c patroni/patronictl.yml list``)
  coordinated by one local etcd (``etcd/``); Patroni
  promotes the replica when the primary dies and rejoins the old primary with ``pg_rewind``
  (:mod:`server.wiring.infra.patroni`). DSNs as with ``replicas=True``. ``synchronous_mode``
  makes Patroni keep the replica synchronous (no acknowledged commit lost on failover).
* ``redis_cluster=True``: six Valkey nodes in cluster mode (3 masters, 3 replicas).

All servers are embedded dev/test servers: 127.0.0.1 only, no passwords (trust auth).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from server.wiring.infra.common import (
    InfraError,
    LogFn,
    OsUser,
    default_pg_os_user,
    log_tail_text,
    pick_free_port,
    wait_until,
)
from server.wiring.infra.patroni import (
    EtcdServer,
    MemberSpec,
    PatroniMember,
    etcd_binary,
    write_ctl_config,
)
from server.wiring.infra.postgres import PostgresServer
from server.wiring.infra.valkey import CLUSTER_BUS_OFFSET, ValkeyServer, create_cluster

STATE_FILE = "infra.json"
STATE_VERSION = 1
SHARD_COUNT = 4
CATALOG_DB = "fm_catalog"
CLUSTER_NODES = 6


def shard_db(index: int) -> str:
    """Database name of shard ``index``."""
    return f"fm_shard_{index}"


# -- persisted state ---------------------------------------------------------------------


@dataclass(frozen=True)
class PgGroup:
    """A PostgreSQL primary (plus optional standby) and the databases it holds."""

    name: str
    port: int
    replica_port: int | None
    databases: tuple[str, ...]
    api_ports: tuple[int, int] | None = None  # Patroni REST APIs of members a, b (HA only)

    @property
    def members(self) -> tuple[MemberSpec, MemberSpec]:
        """The two Patroni members of an HA group (member a bootstraps, b starts as replica)."""
        if self.api_ports is None or self.replica_port is None:
            raise InfraError(f"postgres group {self.name} is not a Patroni cluster")
        scope = f"fm-{self.name}"
        return (
            MemberSpec(scope, f"{self.name}-a", self.port, self.api_ports[0]),
            MemberSpec(scope, f"{self.name}-b", self.replica_port, self.api_ports[1]),
        )


@dataclass(frozen=True)
class InfraState:
    """Everything persisted in ``infra.json``: topology flags and every server's port."""

    replicas: bool
    redis_cluster: bool
    pg_groups: tuple[PgGroup, ...]
    valkey_ports: tuple[int, ...]
    ha: bool = False
    synchronous_mode: bool = False
    etcd_ports: tuple[int, int] | None = None  # (client, peer), HA only

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "topology": {
                "replicas": self.replicas,
                "redis_cluster": self.redis_cluster,
                "ha": self.ha,
                "synchronous_mode": self.synchronous_mode,
            },
            "etcd": (
                None
                if self.etcd_ports is None
                else {"client_port": self.etcd_ports[0], "peer_port": self.etcd_ports[1]}
            ),
            "postgres": [
                {
                    "name": g.name,
                    "port": g.port,
                    "replica_port": g.replica_port,
                    "databases": list(g.databases),
                    "data_dir": f"postgres/{g.name}",
                    "replica_data_dir": _replica_dir(g),
                    **({"api_ports": list(g.api_ports)} if g.api_ports else {}),
                }
                for g in self.pg_groups
            ],
            "valkey": [
                {"name": f"node{i}", "port": port, "dir": f"valkey/node{i}"}
                for i, port in enumerate(self.valkey_ports)
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InfraState:
        if data.get("version") != STATE_VERSION:
            raise InfraError(f"unsupported {STATE_FILE} version {data.get('version')!r}")
        topo = data["topology"]
        groups = tuple(
            PgGroup(
                g["name"],
                int(g["port"]),
                g["replica_port"],
                tuple(g["databases"]),
                tuple(g["api_ports"]) if g.get("api_ports") else None,
            )
            for g in data["postgres"]
        )
        etcd = data.get("etcd")
        return cls(
            replicas=bool(topo["replicas"]),
            redis_cluster=bool(topo["redis_cluster"]),
            pg_groups=groups,
            valkey_ports=tuple(int(v["port"]) for v in data["valkey"]),
            ha=bool(topo.get("ha", False)),
            synchronous_mode=bool(topo.get("synchronous_mode", False)),
            etcd_ports=None if not etcd else (int(etcd["client_port"]), int(etcd["peer_port"])),
        )


def _replica_dir(group: PgGroup) -> str | None:
    """The standby's data directory (relative to the data dir), if the group has one."""
    if group.replica_port is None:
        return None
    if group.api_ports is not None:
        return f"postgres/{group.name}-b"
    return f"postgres/{group.name}-replica"


def _plan(
    replicas: bool, redis_cluster: bool, ha: bool = False, synchronous_mode: bool = False
) -> InfraState:
    """Choose server layout and free ports for a new data directory."""
    used: set[int] = set()

    def port(bus: bool = False) -> int:
        chosen = pick_free_port(exclude=used, bus_offset=CLUSTER_BUS_OFFSET if bus else None)
        used.update({chosen, chosen + CLUSTER_BUS_OFFSET} if bus else {chosen})
        return chosen

    layout = [("catalog", (CATALOG_DB,))]
    layout += [(f"shard{i}", (shard_db(i),)) for i in range(SHARD_COUNT)]
    etcd_ports = None
    if ha:
        groups = tuple(PgGroup(name, port(), port(), dbs, (port(), port())) for name, dbs in layout)
        etcd_ports = (port(), port())
    elif replicas:
        groups = tuple(PgGroup(name, port(), port(), dbs) for name, dbs in layout)
    else:
        all_dbs = (CATALOG_DB, *(shard_db(i) for i in range(SHARD_COUNT)))
        groups = (PgGroup("main", port(), None, all_dbs),)
    valkey = tuple(port(bus=redis_cluster) for _ in range(CLUSTER_NODES if redis_cluster else 1))
    return InfraState(replicas, redis_cluster, groups, valkey, ha, synchronous_mode, etcd_ports)


def _load_state(data_dir: Path) -> InfraState | None:
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return InfraState.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InfraError(f"corrupt {path}: {exc}") from exc


def _save_state(data_dir: Path, state: InfraState) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Exclusive lock on the data directory for the duration of ``up``/``down``."""
    with (data_dir / "infra.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- server objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Servers:
    pg: list[tuple[PgGroup, PostgresServer, PostgresServer | None]]
    valkey: list[ValkeyServer]
    etcd: EtcdServer | None = None
    patroni: tuple[tuple[PgGroup, PatroniMember, PatroniMember], ...] = ()


def etcd_of(data_dir: Path, state: InfraState, log: LogFn) -> EtcdServer:
    """The etcd of an HA topology."""
    if state.etcd_ports is None:
        raise InfraError(f"{data_dir} is not an HA topology (`infra up --ha`)")
    return EtcdServer(data_dir / "etcd", *state.etcd_ports, log=log)


def patronictl_config(data_dir: Path) -> Path:
    """The file for ``patronictl -c FILE list|switchover|...`` of an HA topology."""
    return Path(data_dir).resolve() / "patroni" / "patronictl.yml"


def ha_members(data_dir: Path) -> dict[str, tuple[PatroniMember, PatroniMember]]:
    """{group ("catalog", "shard0", ...): (member a, member b)} of the HA topology made in
    ``data_dir`` (running or not)."""
    data_dir = Path(data_dir).resolve()
    state = _load_state(data_dir)
    if state is None or not state.ha:
        raise InfraError(f"{data_dir} holds no HA topology (`infra up --ha`)")
    return patroni_members(data_dir, state, lambda line: None, default_pg_os_user())


def patroni_members(
    data_dir: Path, state: InfraState, log: LogFn, os_user: OsUser | None
) -> dict[str, tuple[PatroniMember, PatroniMember]]:
    """{group name: (member a, member b)} of an HA topology."""
    etcd = etcd_of(data_dir, state, log)
    return {
        group.name: tuple(  # type: ignore[misc]
            PatroniMember(
                spec,
                root=data_dir / "patroni",
                pg_root=data_dir / "postgres",
                etcd=etcd,
                synchronous_mode=state.synchronous_mode,
                os_user=os_user,
                log=log,
            )
            for spec in group.members
        )
        for group in state.pg_groups
    }


def _servers(data_dir: Path, state: InfraState, log: LogFn, os_user: OsUser | None) -> _Servers:
    valkey = [
        ValkeyServer(data_dir / "valkey" / f"node{i}", port, cluster=state.redis_cluster, log=log)
        for i, port in enumerate(state.valkey_ports)
    ]
    if state.ha:
        members = patroni_members(data_dir, state, log, os_user)
        patroni = tuple((g, *members[g.name]) for g in state.pg_groups)
        return _Servers([], valkey, etcd_of(data_dir, state, log), patroni)
    pg_root = data_dir / "postgres"
    pg = []
    for group in state.pg_groups:
        primary = PostgresServer(pg_root / group.name, group.port, os_user=os_user, log=log)
        replica = None
        if group.replica_port is not None:
            replica = PostgresServer(
                pg_root / f"{group.name}-replica", group.replica_port, os_user=os_user, log=log
            )
        pg.append((group, primary, replica))
    return _Servers(pg, valkey)


def _all_running(servers: _Servers) -> bool:
    for _, primary, replica in servers.pg:
        if not primary.is_running() or (replica is not None and not replica.is_running()):
            return False
    if servers.etcd is not None and not servers.etcd.is_running():
        return False
    for _, a, b in servers.patroni:
        if not (a.is_running() and b.is_running()):
            return False
    return all(node.is_running() for node in servers.valkey)


def _threadsafe(log: LogFn) -> LogFn:
    lock = threading.Lock()

    def locked_log(line: str) -> None:
        with lock:
            log(line)

    return locked_log


class _Cancelled(Exception):
    """A setup task stopped between two steps because the command was interrupted."""


def _go_on(cancelled: threading.Event | None) -> None:
    """Between two setup steps: stop here if the command was interrupted (Ctrl-C)."""
    if cancelled is not None and cancelled.is_set():
        raise _Cancelled


def _run_parallel(
    tasks: list[Callable[[], None]], cancelled: threading.Event | None = None
) -> None:
    """Run independent setup tasks concurrently; re-raise the first failure.

    Interrupted (Ctrl-C) or not, every running task finishes before this returns, so a `down`
    in the caller's cleanup never races a server that is still starting; interrupted, it sets
    `cancelled`, so tasks that check it between their steps (`_go_on`) end after the step
    they are in (an initdb cannot be cut short) instead of starting everything first. The wait
    is on the tasks' futures, not on the threads: Python 3.11's `Thread.join`, when a
    KeyboardInterrupt lands in it, marks the thread stopped while it still runs (the
    bpo-45274 handling), and a pool's `shutdown(wait=True)` then returns early.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, len(tasks)))
    futures: list[Future[None]] = []
    interrupted: KeyboardInterrupt | None = None
    try:
        for task in tasks:
            futures.append(pool.submit(task))
    except KeyboardInterrupt as stop:
        interrupted = stop
    while not all(future.done() for future in futures):
        try:
            wait(futures)
        except KeyboardInterrupt as stop:
            interrupted = stop
            if cancelled is not None:
                cancelled.set()
    pool.shutdown(wait=False)
    if interrupted is not None:
        raise interrupted
    errors = [
        exc
        for f in futures
        if (exc := f.exception()) is not None and not isinstance(exc, _Cancelled)
    ]
    if errors:
        raise errors[0]


# -- settings ----------------------------------------------------------------------------


def _pg_dsns(group: PgGroup, dbname: str) -> tuple[str, str | None]:
    """(primary DSN, replica DSN) for one database of a group.

    Both list both servers: the primary DSN with ``target_session_attrs=read-write``, the
    replica DSN (standby first) with ``prefer-standby``. libpq finds whichever server has that
    role now, also after a Patroni failover, and the router (server/adapters/db/router.py)
    re-points its pools at the server libpq chose; a replica pool that finds itself on a
    primary after a failover looks for the standby again.
    """
    if group.replica_port is None:
        return f"postgresql://postgres@127.0.0.1:{group.port}/{dbname}", None
    primary = (
        f"postgresql://postgres@127.0.0.1:{group.port},127.0.0.1:{group.replica_port}"
        f"/{dbname}?target_session_attrs=read-write"
    )
    replica = (
        f"postgresql://postgres@127.0.0.1:{group.replica_port},127.0.0.1:{group.port}"
        f"/{dbname}?target_session_attrs=prefer-standby"
    )
    return primary, replica


def settings_for(state: InfraState) -> dict[str, str]:
    """The ``FM_*`` environment settings describing a topology."""
    by_db = {db: group for group in state.pg_groups for db in group.databases}
    settings: dict[str, str] = {}
    catalog, catalog_replica = _pg_dsns(by_db[CATALOG_DB], CATALOG_DB)
    settings["FM_CATALOG_DSN"] = catalog
    if catalog_replica is not None:
        settings["FM_CATALOG_REPLICA_DSN"] = catalog_replica
    shards = []
    for i in range(SHARD_COUNT):
        primary, replica = _pg_dsns(by_db[shard_db(i)], shard_db(i))
        shards.append({"primary": primary, "replica": replica})
    settings["FM_SHARDS"] = json.dumps(shards, separators=(",", ":"))
    settings["FM_REDIS_URL"] = f"redis://127.0.0.1:{state.valkey_ports[0]}/0"
    if state.redis_cluster:
        settings["FM_REDIS_CLUSTER"] = "1"
    return settings


def env_lines(settings: dict[str, str]) -> list[str]:
    """Shell ``export`` lines for ``settings`` (values quoted with ``shlex.quote``)."""
    return [f"export {key}={shlex.quote(value)}" for key, value in settings.items()]


# -- up / down ---------------------------------------------------------------------------


def _bring_up_group(
    cancelled: threading.Event,
    group: PgGroup,
    primary: PostgresServer,
    replica: PostgresServer | None,
) -> None:
    primary.init()
    _go_on(cancelled)
    primary.start()
    for db in group.databases:
        _go_on(cancelled)
        primary.create_database(db)
    if replica is not None:
        _go_on(cancelled)
        primary.make_replica(replica.data_dir, replica.port)
        _go_on(cancelled)
        replica.start()


#: How long one Patroni member may take to bootstrap, clone or start its PostgreSQL.
HA_MEMBER_TIMEOUT_S = 90.0


def _bring_up_patroni_group(
    cancelled: threading.Event, group: PgGroup, a: PatroniMember, b: PatroniMember
) -> None:
    """Start a group's two members, create its databases on the leader, wait for the replica.

    A new group starts member a alone first, so it is a that runs initdb and b that clones it;
    an existing group starts both at once and Patroni elects whichever is healthiest.
    """
    new = not (a.data_dir / "PG_VERSION").exists() and not (b.data_dir / "PG_VERSION").exists()
    a.start()
    if new:
        a.wait_running(HA_MEMBER_TIMEOUT_S)
    _go_on(cancelled)
    b.start()
    a.wait_running(HA_MEMBER_TIMEOUT_S)
    b.wait_running(HA_MEMBER_TIMEOUT_S)
    leader: PatroniMember | None = None

    def found_leader() -> bool:
        nonlocal leader
        leader = next((m for m in (a, b) if m.role() == "primary"), None)
        return leader is not None

    if not wait_until(found_leader, timeout=HA_MEMBER_TIMEOUT_S, interval=0.2) or leader is None:
        raise InfraError(f"Patroni cluster {group.name} elected no leader")
    server = PostgresServer(leader.data_dir, leader.spec.pg_port, os_user=a.os_user, log=a.log)
    for db in group.databases:
        _go_on(cancelled)
        server.create_database(db)
    replica = b if leader is a else a
    if not wait_until(replica.is_streaming, timeout=HA_MEMBER_TIMEOUT_S, interval=0.2):
        raise InfraError(
            f"Patroni {replica.spec.name} does not stream from {leader.spec.name}"
            + log_tail_text(replica.log_file)
        )
    # In synchronous mode, return only once commits wait for the replica and Patroni would
    # fail over to it (it names it in synchronous_standby_names a loop or two after it
    # streams, and in its /sync key a loop after that).
    if leader.synchronous_mode and not wait_until(
        leader.has_sync_standby, timeout=HA_MEMBER_TIMEOUT_S, interval=0.2
    ):
        raise InfraError(
            f"Patroni {leader.spec.name} named no synchronous standby"
            + log_tail_text(leader.log_file)
        )


def _bring_up_valkey(
    cancelled: threading.Event, nodes: list[ValkeyServer], cluster: bool, log: LogFn
) -> None:
    for node in nodes:
        _go_on(cancelled)
        node.start()
    _go_on(cancelled)
    if cluster:
        create_cluster(nodes, replicas=1, log=log)


def _check_flags(
    data_dir: Path, state: InfraState, replicas: bool, redis_cluster: bool, ha: bool
) -> None:
    if (state.replicas, state.redis_cluster, state.ha) != (replicas, redis_cluster, ha):
        raise InfraError(
            f"{data_dir} was created with replicas={state.replicas}, "
            f"redis_cluster={state.redis_cluster}, ha={state.ha}, but replicas={replicas}, "
            f"redis_cluster={redis_cluster}, ha={ha} was requested; run `down` and use "
            "another data dir for a different topology (topologies are never mixed)"
        )


def up(
    data_dir: Path,
    *,
    replicas: bool = False,
    redis_cluster: bool = False,
    ha: bool = False,
    synchronous_mode: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Start the embedded PostgreSQL + Valkey servers under ``data_dir``; return FM_* settings.

    Idempotent: servers already running are left alone (then this takes well under a second),
    and data directories and ports from the first ``up`` are reused, so the returned settings
    are identical across ``down``/``up``. Raises :class:`InfraError` if the requested topology
    differs from the persisted one, if a port is taken by another process, or if a server does
    not become ready (the message includes the tail of its log).

    ``ha`` makes every PostgreSQL group a Patroni cluster over a local etcd (which must be
    installed: the error names the package otherwise); ``synchronous_mode`` (HA only, fixed at
    the first ``up``) turns on Patroni's synchronous replication.
    """
    if ha and replicas:
        raise InfraError("choose --ha or --replicas: the HA topology has its replicas already")
    if synchronous_mode and not ha:
        raise InfraError("synchronous mode is a setting of the HA topology (--ha)")
    if ha:
        etcd_binary()  # before anything is created: name what is missing
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir):
        state = _load_state(data_dir)
        if state is None:
            state = _plan(replicas, redis_cluster, ha, synchronous_mode)
            _save_state(data_dir, state)
            log(f"infra: new topology in {data_dir}")
        _check_flags(data_dir, state, replicas, redis_cluster, ha)
        os_user = default_pg_os_user()
        safe_log = _threadsafe(log)
        servers = _servers(data_dir, state, safe_log, os_user)
        if _all_running(servers):
            log("infra: already running")
            return settings_for(state)
        started = time.monotonic()
        if servers.etcd is not None:
            servers.etcd.start()
            write_ctl_config(patronictl_config(data_dir), servers.etcd)
        cancelled = threading.Event()
        tasks: list[Callable[[], None]] = [
            partial(_bring_up_group, cancelled, *entry) for entry in servers.pg
        ]
        tasks += [partial(_bring_up_patroni_group, cancelled, *entry) for entry in servers.patroni]
        tasks.append(
            partial(_bring_up_valkey, cancelled, servers.valkey, state.redis_cluster, safe_log)
        )
        _run_parallel(tasks, cancelled)
        log(f"infra: up in {time.monotonic() - started:.1f}s")
        return settings_for(state)


def settings_of(data_dir: Path) -> dict[str, str] | None:
    """The ``FM_*`` settings of the topology made in ``data_dir`` (running or not), without
    starting anything; None if ``up`` never ran there."""
    data_dir = Path(data_dir).resolve()
    state = _load_state(data_dir) if data_dir.is_dir() else None
    return None if state is None else settings_for(state)


def is_up(data_dir: Path) -> bool:
    """Whether every server of ``data_dir``'s topology is running (False if none was made)."""
    data_dir = Path(data_dir).resolve()
    state = _load_state(data_dir) if data_dir.is_dir() else None
    if state is None:
        return False
    return _all_running(_servers(data_dir, state, lambda line: None, default_pg_os_user()))


def down(data_dir: Path, *, log: Callable[[str], None] = print) -> None:
    """Stop every server started by :func:`up` for ``data_dir``; keep all data.

    Idempotent: does nothing (and raises nothing) if nothing is running or ``data_dir``
    was never used. PostgreSQL stops with ``pg_ctl stop -m fast``, Valkey with
    ``SHUTDOWN NOSAVE`` (the append-only file is still flushed).
    """
    data_dir = Path(data_dir).resolve()
    if not (data_dir / STATE_FILE).exists():
        log(f"infra: nothing to stop in {data_dir}")
        return
    with _locked(data_dir):
        state = _load_state(data_dir)
        if state is None:
            return
        safe_log = _threadsafe(log)
        servers = _servers(data_dir, state, safe_log, default_pg_os_user())

        def stop_group(primary: PostgresServer, replica: PostgresServer | None) -> None:
            primary.stop()  # primary first: the standby receives its shutdown checkpoint
            if replica is not None:
                replica.stop()

        def stop_patroni_group(a: PatroniMember, b: PatroniMember) -> None:
            # Replica first: a leader that stops while its replica runs hands over to it.
            members = sorted((a, b), key=lambda m: m.role() == "primary")
            for member in members:
                member.stop()

        tasks: list[Callable[[], None]] = [partial(stop_group, p, r) for _, p, r in servers.pg]
        tasks += [partial(stop_patroni_group, a, b) for _, a, b in servers.patroni]
        tasks += [node.stop for node in servers.valkey]
        _run_parallel(tasks)
        if servers.etcd is not None:
            servers.etcd.stop()  # last: Patroni needs it to stop cleanly
        log("infra: down")
