"""One embedded PostgreSQL 16 cluster run from the ``pgserver`` wheel's binaries.

These servers are for local development and tests only: they listen on 127.0.0.1, have no
unix sockets, and use ``trust`` authentication for every local TCP connection (the default
``pg_hba.conf`` written by ``initdb --auth=trust``), so anyone on this machine can connect as
the ``postgres`` superuser. Never expose them or reuse them for real data.

When the current process is root, PostgreSQL refuses to run, so every PostgreSQL binary is run
as the unprivileged system user ``finalmarket-pg`` (see :mod:`server.wiring.infra.common`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from server.wiring.infra.common import (
    InfraError,
    LogFn,
    OsUser,
    default_pg_os_user,
    ensure_traversable,
    log_tail_text,
    make_owned_dir,
    pg_bin,
    pg_bin_dir,
    pid_alive,
    port_frees_up,
    read_pidfile,
    run,
    touch_owned_file,
    wait_until,
)

SUPERUSER = "postgres"
CONF_NAME = "finalmarket.conf"
_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _server_conf(port: int) -> str:
    """Settings for a small embedded server that can be a streaming-replication primary."""
    return "\n".join(
        [
            "# Written by server/infra (Final Market embedded dev/test server).",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            "unix_socket_directories = ''",
            "max_connections = 60",
            "shared_buffers = 16MB",
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            "hot_standby_feedback = on",
            "synchronous_commit = off",
            "wal_receiver_status_interval = 1s",
            "",
        ]
    )


class PostgresServer:
    """A single PostgreSQL cluster (data directory + port) managed with ``pg_ctl``.

    The server is started detached (it outlives this Python process) so that ``up`` from a CLI
    keeps it running; ``stop()`` or ``server.wiring.infra.down`` stops it. All methods are idempotent.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        log_file: Path | None = None,
        os_user: OsUser | None = None,
        log: LogFn = print,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.log_file = log_file or self.data_dir.with_name(self.data_dir.name + ".log")
        self.os_user = os_user if os_user is not None else default_pg_os_user()
        self.log = log
        self.name = self.data_dir.name

    def __repr__(self) -> str:
        return f"PostgresServer({str(self.data_dir)!r}, port={self.port})"

    # -- paths / state -------------------------------------------------------------------

    @property
    def _partial_marker(self) -> Path:
        """Exists while init/basebackup is in progress; a leftover means "redo from scratch"."""
        return self.data_dir.with_name(f".{self.data_dir.name}.partial")

    def is_initialized(self) -> bool:
        """True once ``init()`` (or ``make_replica``) completed for this data directory."""
        return (self.data_dir / "PG_VERSION").exists() and not self._partial_marker.exists()

    def _ensure_access(self) -> None:
        """Let the unprivileged PostgreSQL user traverse to the data dir and binaries."""
        if self.os_user is not None:
            ensure_traversable(self.data_dir.parent)
            ensure_traversable(pg_bin_dir())

    def _begin_create(self) -> None:
        """Prepare an empty data directory, discarding a half-created one from a crash."""
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            if not self._partial_marker.exists():
                raise InfraError(
                    f"{self.data_dir} is not empty but is not a Final Market PostgreSQL data "
                    "directory; remove it or choose another data dir"
                )
            shutil.rmtree(self.data_dir)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_access()
        self._partial_marker.touch()
        make_owned_dir(self.data_dir, self.os_user, 0o700)
        touch_owned_file(self.log_file, self.os_user)

    def _write_conf(self) -> None:
        """(Re)write our settings file and make postgresql.conf include it."""
        conf = self.data_dir / CONF_NAME
        conf.write_text(_server_conf(self.port))
        main = self.data_dir / "postgresql.conf"
        include = f"include_if_exists = '{CONF_NAME}'"
        text = main.read_text()
        if include not in text:
            main.write_text(text.rstrip("\n") + f"\n\n{include}\n")
        if self.os_user is not None:
            for path in (conf, main):
                os.chown(path, self.os_user.uid, self.os_user.gid)

    # -- lifecycle -----------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster with ``initdb`` (superuser ``postgres``, trust auth, UTF8/C)."""
        if self.is_initialized():
            return
        self.log(f"postgres {self.name}: initdb")
        self._begin_create()
        run(
            [
                pg_bin("initdb"),
                "-D",
                self.data_dir,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            as_user=self.os_user,
            what=f"initdb {self.data_dir}",
        )
        self._write_conf()
        self._partial_marker.unlink()

    def _postmaster_pid(self) -> int | None:
        return read_pidfile(self.data_dir / "postmaster.pid")

    def is_running(self) -> bool:
        """True if this data directory's postmaster process is alive."""
        pid = self._postmaster_pid()
        if pid is None or not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True  # no /proc: trust the pid
        return b"postgres" in cmdline

    def _wait_stale_postmaster_gone(self, timeout: float = 10.0) -> None:
        """After a crash, wait until the dead postmaster's pid is really gone (reaped).

        postgres treats a pid that still exists (e.g. an unreaped zombie) as a running
        postmaster and refuses to start; pg_ctl handles a stale pid file once it is gone.
        """
        pid = self._postmaster_pid()
        if pid is None:
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False

        wait_until(gone, timeout=timeout, interval=0.05)

    def is_ready(self) -> bool:
        """True if the server accepts connections (``pg_isready``)."""
        proc = run(
            [pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
            check=False,
        )
        return proc.returncode == 0

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the server (no-op if running) and wait until it accepts connections."""
        if self.is_running():
            return
        if not self.is_initialized():
            raise InfraError(f"{self.data_dir} is not initialized; call init() first")
        self._wait_stale_postmaster_gone()
        if not port_frees_up(self.port):
            raise InfraError(
                f"cannot start postgres {self.name}: port 127.0.0.1:{self.port} is used by "
                "another process; stop it, or `down` and use another data dir"
            )
        self.log(f"postgres {self.name}: start on 127.0.0.1:{self.port}")
        self._ensure_access()
        self._write_conf()  # keeps the configured port in sync with self.port
        touch_owned_file(self.log_file, self.os_user)
        run(
            [
                pg_bin("pg_ctl"),
                "start",
                "-D",
                self.data_dir,
                "-l",
                self.log_file,
                "-w",
                "-t",
                str(int(timeout)),
            ],
            as_user=self.os_user,
            timeout=timeout + 10,
            what=f"pg_ctl start ({self.name})",
            log_file=self.log_file,
        )
        if not wait_until(self.is_ready, timeout=timeout, interval=0.1):
            raise InfraError(
                f"postgres {self.name} on port {self.port} did not become ready "
                f"within {timeout:.0f}s" + log_tail_text(self.log_file)
            )

    def stop(self, *, timeout: float = 60.0) -> None:
        """Stop the server with ``pg_ctl stop -m fast`` (no-op if not running)."""
        if not self.is_running():
            return
        self.log(f"postgres {self.name}: stop")
        run(
            [
                pg_bin("pg_ctl"),
                "stop",
                "-D",
                self.data_dir,
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
            ],
            as_user=self.os_user,
            timeout=timeout + 10,
            what=f"pg_ctl stop ({self.name})",
            log_file=self.log_file,
        )

    def promote(self, *, timeout: float = 60.0) -> None:
        """Turn this standby into a read-write primary (``pg_ctl promote``)."""
        self.log(f"postgres {self.name}: promote")
        run(
            [pg_bin("pg_ctl"), "promote", "-D", self.data_dir, "-w", "-t", str(int(timeout))],
            as_user=self.os_user,
            timeout=timeout + 10,
            what=f"pg_ctl promote ({self.name})",
            log_file=self.log_file,
        )

    # -- SQL helpers ---------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq URI for ``dbname`` on this server as the ``postgres`` superuser."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run one SQL command with ``psql`` and return its unaligned, tuples-only output."""
        proc = run(
            [
                pg_bin("psql"),
                "-X",
                "-w",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            what=f"psql on {self.name}",
        )
        return proc.stdout.strip()

    def databases(self) -> set[str]:
        """Names of the non-template databases."""
        out = self.psql("SELECT datname FROM pg_database WHERE NOT datistemplate")
        return set(out.splitlines())

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists (``name`` must be a plain identifier)."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"invalid database name {name!r}")
        if name in self.databases():
            return
        self.log(f"postgres {self.name}: create database {name}")
        self.psql(f'CREATE DATABASE "{name}"')

    def is_in_recovery(self) -> bool:
        """True if this server is a (hot) standby."""
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    # -- replication ---------------------------------------------------------------------

    def _ensure_slot(self, slot: str) -> None:
        self.psql(
            f"SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS "
            f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
        )

    def make_replica(self, data_dir: Path, port: int) -> PostgresServer:
        """Create (not start) a streaming hot-standby of this running server.

        Uses ``pg_basebackup -R -X stream`` with a physical replication slot so the primary
        keeps the WAL the standby still needs while it is stopped. No-op if ``data_dir``
        already holds a completed replica. Returns the replica's ``PostgresServer``.
        """
        replica = PostgresServer(data_dir, port, os_user=self.os_user, log=self.log)
        if replica.is_initialized():
            return replica
        slot = "fm_" + re.sub(r"[^a-z0-9_]", "_", replica.name.lower())[:50]
        self.log(f"postgres {replica.name}: pg_basebackup from {self.name}")
        self._ensure_slot(slot)
        replica._begin_create()
        run(
            [
                pg_bin("pg_basebackup"),
                "-D",
                replica.data_dir,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-w",
                "-R",
                "-X",
                "stream",
                "-S",
                slot,
                "--checkpoint=fast",
            ],
            as_user=self.os_user,
            timeout=300,
            what=f"pg_basebackup {self.name} -> {replica.name}",
            log_file=self.log_file,
        )
        if not (replica.data_dir / "standby.signal").exists():
            raise InfraError(f"pg_basebackup -R did not write {replica.data_dir}/standby.signal")
        replica._write_conf()
        replica._partial_marker.unlink()
        return replica
