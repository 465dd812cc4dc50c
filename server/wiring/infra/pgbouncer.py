"""A PgBouncer (Debian ``pgbouncer`` binary) in ``pool_mode = transaction`` in front of the
embedded PostgreSQL servers, for tests that prove nothing relies on session state.

Like the servers it fronts, it is for dev/test machines only: 127.0.0.1, no unix socket, and
``auth_type = trust`` (mirroring the embedded servers' ``trust`` pg_hba for 127.0.0.1), with the
users of the fronted DSNs listed, passwordless, in its ``auth_file``. ``config/pgbouncer.ini``
is the documented production example.

Statement timeouts. Our pools send ``options=-c statement_timeout=N`` in the startup packet,
which PgBouncer 1.18 refuses ("unsupported startup parameter") unless told to ignore it, and
then it is lost: server connections are shared by every client. So the ini ignores ``options``
and each database entry re-applies the timeout with ``connect_query`` on every server
connection PgBouncer opens. In transaction mode no reset query runs between clients, so the
value holds for the connection's life; it is the same for every client of the database, so it
is pool-wide configuration, not leaked session state.

When root, PgBouncer (which refuses root) runs as the unprivileged ``finalmarket-pg`` user, like
PostgreSQL. Typical use::

    bouncer, fronted = front(settings, Path("/tmp/pgb"), statement_timeout_ms=5000)
    ...  # fronted["FM_CATALOG_DSN"] now goes through PgBouncer
    bouncer.stop()
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import psycopg2.extensions

from server.wiring.infra.common import (
    InfraError,
    LogFn,
    OsUser,
    default_pg_os_user,
    ensure_traversable,
    log_tail_text,
    make_owned_dir,
    pick_free_port,
    pid_alive,
    read_pidfile,
    run,
    wait_until,
)

DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")
#: Startup parameters PgBouncer 1.18 cannot track; without this it refuses such clients.
IGNORED_STARTUP_PARAMETERS = ("options", "extra_float_digits")
# libpq parameters that name the server or its role; everything else is kept in the new DSN.
_ROUTING_KEYS = frozenset({"host", "hostaddr", "port", "dbname", "user", "target_session_attrs"})


def pgbouncer_binary() -> Path | None:
    """The ``pgbouncer`` executable (on PATH or Debian's ``/usr/sbin``), or None if missing."""
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    return DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None


@dataclass(frozen=True)
class Backend:
    """One PostgreSQL database as PgBouncer serves it: clients connect to ``alias``."""

    alias: str
    host: str
    port: int
    dbname: str


def _ini_quote(value: str) -> str:
    """A value for a ``[databases]`` connection string (single quotes, doubled inside)."""
    return "'" + value.replace("'", "''") + "'"


class PgBouncer:
    """One PgBouncer process with its config, auth file, log and pid file in ``directory``.

    ``start()`` and ``stop()`` are idempotent. ``port=None`` picks a free port at construction.
    """

    def __init__(
        self,
        directory: Path,
        backends: Sequence[Backend],
        users: Sequence[str],
        *,
        port: int | None = None,
        statement_timeout_ms: int | None = None,
        pool_size: int = 10,
        max_client_conn: int = 500,
        os_user: OsUser | None = None,
        log: LogFn = print,
    ) -> None:
        if not backends or not users:
            raise InfraError("PgBouncer needs at least one database and one user")
        self.directory = Path(directory).resolve()
        self.backends = tuple(backends)
        self.users = tuple(dict.fromkeys(users))
        self.port = port if port is not None else pick_free_port()
        self.statement_timeout_ms = statement_timeout_ms
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.os_user = os_user if os_user is not None else default_pg_os_user()
        self.log = log

    def __repr__(self) -> str:
        return f"PgBouncer({str(self.directory)!r}, port={self.port})"

    @property
    def config_file(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def log_file(self) -> Path:
        return self.directory / "pgbouncer.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "pgbouncer.pid"

    def dsn(self, alias: str, user: str, extra: Mapping[str, str] | None = None) -> str:
        """libpq URI of database ``alias`` through this PgBouncer, with ``extra`` parameters."""
        query = f"?{urlencode(dict(extra))}" if extra else ""
        return f"postgresql://{quote(user, safe='')}@127.0.0.1:{self.port}/{alias}{query}"

    # -- config --------------------------------------------------------------------------

    def config_text(self) -> str:
        """The ``pgbouncer.ini`` this instance runs with."""
        connect_query = ""
        if self.statement_timeout_ms is not None:
            sql = f"SET statement_timeout = {int(self.statement_timeout_ms)}"
            connect_query = f" connect_query={_ini_quote(sql)}"
        databases = [
            f"{b.alias} = host={b.host} port={b.port} dbname={b.dbname}{connect_query}"
            for b in self.backends
        ]
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.directory / "userlist.txt"),
            "admin_users": ",".join(self.users),
            "pool_mode": "transaction",
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": ",".join(IGNORED_STARTUP_PARAMETERS),
            # Never reset server connections between clients: the reset would also undo
            # connect_query's statement_timeout (and transaction mode needs no reset).
            "server_reset_query": "",
            "server_reset_query_always": "0",
            "query_wait_timeout": "30",
            "logfile": str(self.log_file),
            "pidfile": str(self.pid_file),
            "log_connections": "0",
            "log_disconnections": "0",
        }
        return "\n".join(
            [
                "; Written by server/infra/pgbouncer.py (Final Market dev/test PgBouncer).",
                "[databases]",
                *databases,
                "",
                "[pgbouncer]",
                *(f"{key} = {value}" for key, value in settings.items()),
                "",
            ]
        )

    def _write_files(self) -> None:
        make_owned_dir(self.directory, self.os_user)
        if self.os_user is not None:
            ensure_traversable(self.directory.parent)
        userlist = "".join(f'"{user.replace(chr(34), chr(34) * 2)}" ""\n' for user in self.users)
        for path, text in (
            (self.directory / "userlist.txt", userlist),
            (self.config_file, self.config_text()),
        ):
            path.write_text(text)
            path.chmod(0o600)
            if self.os_user is not None:
                os.chown(path, self.os_user.uid, self.os_user.gid)

    # -- lifecycle -----------------------------------------------------------------------

    def _pid(self) -> int | None:
        return read_pidfile(self.pid_file)

    def is_running(self) -> bool:
        """True if the process named by the pid file is alive."""
        pid = self._pid()
        return pid is not None and pid_alive(pid)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, *, timeout: float = 20.0) -> None:
        """Write the config and start PgBouncer as a daemon; wait until it accepts TCP."""
        if self.is_running():
            return
        binary = pgbouncer_binary()
        if binary is None:
            raise InfraError("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
        self._write_files()
        self.log(f"pgbouncer: start on 127.0.0.1:{self.port}")
        run(
            [binary, "-d", "-q", self.config_file],
            as_user=self.os_user,
            timeout=timeout,
            what="pgbouncer",
            log_file=self.log_file,
        )

        def died() -> bool:
            pid = self._pid()
            return pid is not None and not pid_alive(pid)

        if not wait_until(self._accepts, timeout=timeout, failed=died):
            self.stop()
            raise InfraError(
                f"pgbouncer on port {self.port} did not start within {timeout:.0f}s"
                + log_tail_text(self.log_file)
            )

    def stop(self, *, timeout: float = 10.0) -> None:
        """Shut PgBouncer down at once (SIGTERM; SIGKILL after ``timeout``)."""
        pid = self._pid()
        if pid is None or not pid_alive(pid):
            return
        self.log("pgbouncer: stop")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if wait_until(lambda: not pid_alive(pid), timeout=timeout):
                return
        raise InfraError(f"pgbouncer (pid {pid}) did not stop" + log_tail_text(self.log_file))


# -- fronting FM_* settings --------------------------------------------------------------


def _settings_dsns(settings: Mapping[str, str]) -> list[str]:
    """Every PostgreSQL DSN of ``FM_*`` settings: catalog, its replica, shards and replicas."""
    dsns = [settings["FM_CATALOG_DSN"]]
    if settings.get("FM_CATALOG_REPLICA_DSN"):
        dsns.append(settings["FM_CATALOG_REPLICA_DSN"])
    for shard in json.loads(settings["FM_SHARDS"]):
        dsns += [dsn for dsn in (shard["primary"], shard.get("replica")) if dsn]
    return dsns


@dataclass(frozen=True)
class _Target:
    """Where one DSN points: the first host of a multi-host DSN (as `infra up` lists them, the
    primary of a primary DSN, the standby of a replica DSN), and its user."""

    host: str
    port: int
    dbname: str
    user: str
    extra: dict[str, str]


def _target(dsn: str) -> _Target:
    params = psycopg2.extensions.parse_dsn(dsn)
    if params.get("password"):
        raise InfraError("PgBouncer fronting supports only passwordless (trust) DSNs")
    # PgBouncer 1.18 has no target_session_attrs: a multi-host DSN is fronted by its first
    # host (failover behind PgBouncer goes through HAProxy, config/haproxy-postgres.cfg).
    host = (params.get("host") or params.get("hostaddr") or "127.0.0.1").split(",")[0]
    port = int((params.get("port") or "5432").split(",")[0])
    extra = {key: value for key, value in params.items() if key not in _ROUTING_KEYS}
    user = params.get("user") or getpass.getuser()
    return _Target(host, port, params.get("dbname") or user, user, extra)


def backends_for(settings: Mapping[str, str]) -> tuple[list[Backend], dict[str, str]]:
    """PgBouncer databases for ``FM_*`` settings, and each original DSN's alias.

    A database keeps its own name as alias; the same name on another server (a replica)
    gets ``_<port>`` appended.
    """
    backends: dict[tuple[str, int, str], Backend] = {}
    aliases: dict[str, str] = {}
    taken: set[str] = set()
    for dsn in _settings_dsns(settings):
        target = _target(dsn)
        key = (target.host, target.port, target.dbname)
        if key not in backends:
            alias = (
                target.dbname if target.dbname not in taken else f"{target.dbname}_{target.port}"
            )
            backends[key] = Backend(alias, target.host, target.port, target.dbname)
            taken.add(alias)
        aliases[dsn] = backends[key].alias
    return list(backends.values()), aliases


def fronted_settings(settings: Mapping[str, str], bouncer: PgBouncer) -> dict[str, str]:
    """``settings`` with every PostgreSQL DSN replaced by its route through ``bouncer``."""
    _, aliases = backends_for(settings)

    def route(dsn: str) -> str:
        target = _target(dsn)
        return bouncer.dsn(aliases[dsn], target.user, target.extra)

    fronted = dict(settings)
    fronted["FM_CATALOG_DSN"] = route(settings["FM_CATALOG_DSN"])
    if settings.get("FM_CATALOG_REPLICA_DSN"):
        fronted["FM_CATALOG_REPLICA_DSN"] = route(settings["FM_CATALOG_REPLICA_DSN"])
    shards = [
        {
            "primary": route(shard["primary"]),
            "replica": route(shard["replica"]) if shard.get("replica") else None,
        }
        for shard in json.loads(settings["FM_SHARDS"])
    ]
    fronted["FM_SHARDS"] = json.dumps(shards, separators=(",", ":"))
    return fronted


def front(
    settings: Mapping[str, str],
    directory: Path,
    *,
    statement_timeout_ms: int | None,
    log: LogFn = print,
) -> tuple[PgBouncer, dict[str, str]]:
    """Start a PgBouncer in front of every database of ``settings``; return it and the
    settings whose DSNs go through it (Redis and other keys unchanged)."""
    backends, _ = backends_for(settings)
    users = [_target(dsn).user for dsn in _settings_dsns(settings)]
    bouncer = PgBouncer(
        directory, backends, users, statement_timeout_ms=statement_timeout_ms, log=log
    )
    bouncer.start()
    return bouncer, fronted_settings(settings, bouncer)
