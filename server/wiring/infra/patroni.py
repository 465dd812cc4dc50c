"""Patroni-managed PostgreSQL (``infra up --ha``): one local etcd and two-member Patroni clusters.

Final Market writes no election, consensus or fencing of its own: etcd (Debian's
``etcd-server``) holds each cluster's leader key, Patroni (``patroni[etcd3]``, 4.x) runs one
PostgreSQL per member from the ``pgserver`` wheel's binaries (``bin_dir``), promotes the
replica when the leader key expires or the primary's PostgreSQL dies, and rejoins the old
primary as a replica with ``pg_rewind``. This module only writes their configuration files and
starts, watches and stops the processes, detached like the other embedded servers.

Timings (Patroni's dynamic configuration, written at bootstrap): ``ttl`` 20 s (Patroni's
minimum), ``loop_wait`` 1 s, ``retry_timeout`` 5 s (``loop_wait + 2 * retry_timeout <= ttl``),
``primary_start_timeout`` 0 (a crashed primary PostgreSQL fails over at once instead of being
restarted in place for up to 5 minutes). A killed primary PostgreSQL is therefore replaced in a
few seconds; a dead primary Patroni only once its leader key expires (``ttl``).

Like every embedded server these are dev/test servers: 127.0.0.1 only, ``trust`` auth, and no
watchdog (so nothing fences a PostgreSQL whose Patroni died; see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

from server.wiring.infra.common import (
    InfraError,
    LogFn,
    OsUser,
    clean_env,
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

#: Key prefix of every Final Market cluster in etcd.
NAMESPACE = "/finalmarket/"
#: Patroni's dynamic timings for the embedded topology (seconds); see the module docstring.
TTL_S = 20
LOOP_WAIT_S = 1
RETRY_TIMEOUT_S = 5


def etcd_binary() -> Path:
    """The etcd daemon on PATH (Debian's ``etcd-server`` installs ``/usr/bin/etcd``).

    Raises :class:`InfraError` naming the package when there is none: the HA topology cannot
    run without its consensus store.
    """
    found = shutil.which("etcd")
    if not found:
        raise InfraError(
            "`infra up --ha` needs etcd, which is not installed (no `etcd` on PATH): install "
            "Debian's etcd-server (`apt-get install -y etcd-server`, which provides /usr/bin/etcd)"
        )
    return Path(found)


def _http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, parsed JSON body or None) of a GET; status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def _spawn(
    args: list[str], *, log_file: Path, pid_file: Path, as_user: OsUser | None, cwd: Path
) -> int:
    """Start a detached daemon (own session, output appended to ``log_file``); return its pid."""
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=clean_env(),
            start_new_session=True,
            user=None if as_user is None else as_user.uid,
            group=None if as_user is None else as_user.gid,
            extra_groups=None if as_user is None else [],
        )
    pid_file.write_text(f"{proc.pid}\n")
    # Not waited for: the daemon outlives us. Our child is reaped by Popen's own bookkeeping
    # (a later Popen call) or by init once we exit.
    return proc.pid


def _child_exited(pid: int) -> bool:
    """Whether our child `pid` (just spawned by `_spawn`) has exited; reaps it if so. Asked of
    the kernel directly, not through the pid file and /proc, so nothing else can make a live
    child look dead."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not waitable here (reaped elsewhere): ask whether it exists
        return not pid_alive(pid)
    return done == pid


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _stop_pid(pid: int | None, marker: bytes, timeout: float) -> None:
    """SIGTERM process ``pid`` if it is still ours (``marker`` in its command line); wait."""
    if pid is None or not pid_alive(pid) or marker not in _cmdline(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not pid_alive(pid), timeout=timeout, interval=0.1):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), timeout=5.0, interval=0.05)


class EtcdServer:
    """One single-member etcd (v3 API) on 127.0.0.1: the Patroni clusters' consensus store."""

    def __init__(self, root: Path, client_port: int, peer_port: int, *, log: LogFn) -> None:
        self.root = Path(root)
        self.client_port = client_port
        self.peer_port = peer_port
        self.log = log
        self.data_dir = self.root / "data"
        self.log_file = self.root / "etcd.log"
        self.pid_file = self.root / "etcd.pid"

    @property
    def url(self) -> str:
        """Client URL (what Patroni's ``etcd3.hosts`` names)."""
        return f"http://127.0.0.1:{self.client_port}"

    def is_running(self) -> bool:
        """True if our etcd process is alive."""
        pid = read_pidfile(self.pid_file)
        return pid is not None and pid_alive(pid) and b"etcd" in _cmdline(pid)

    def is_healthy(self) -> bool:
        """True if etcd answers ``/health`` with ``"health": "true"``."""
        status, body = _http_json(self.url + "/health")
        return status == 200 and isinstance(body, dict) and body.get("health") == "true"

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd (no-op if running) and wait until it is healthy."""
        if self.is_running():
            return
        binary = etcd_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        for port in (self.client_port, self.peer_port):
            if not port_frees_up(port):
                raise InfraError(f"cannot start etcd: port 127.0.0.1:{port} is in use")
        self.log(f"etcd: start on 127.0.0.1:{self.client_port}")
        peer = f"http://127.0.0.1:{self.peer_port}"
        pid = _spawn(
            [
                str(binary),
                "--name=fm",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=fm={peer}",
                "--initial-cluster-state=new",
                "--log-level=warn",
            ],
            log_file=self.log_file,
            pid_file=self.pid_file,
            as_user=None,
            cwd=self.root,
        )
        died = partial(_child_exited, pid)
        if not wait_until(self.is_healthy, timeout=timeout, interval=0.1, failed=died):
            what = "exited at start" if died() else f"not healthy within {timeout:.0f}s"
            raise InfraError(
                f"etcd ({binary}, 127.0.0.1:{self.client_port}, pid {pid}) {what}"
                + log_tail_text(self.log_file)
            )

    def stop(self, timeout: float = 20.0) -> None:
        """Stop etcd (SIGTERM; no-op if not running)."""
        if self.is_running():
            self.log("etcd: stop")
            _stop_pid(read_pidfile(self.pid_file), b"etcd", timeout)


@dataclass(frozen=True)
class MemberSpec:
    """One Patroni member: cluster (``scope``) and member name, its PostgreSQL and REST ports."""

    scope: str
    name: str
    pg_port: int
    api_port: int


class PatroniMember:
    """A Patroni process managing one PostgreSQL data directory.

    Files: ``<root>/<name>.yml`` (configuration), ``.log`` (Patroni's log), ``.pid``; the data
    directory is ``<pg_root>/<name>`` with PostgreSQL's own log in its ``log/``.
    """

    def __init__(
        self,
        spec: MemberSpec,
        *,
        root: Path,
        pg_root: Path,
        etcd: EtcdServer,
        synchronous_mode: bool,
        os_user: OsUser | None,
        log: LogFn,
    ) -> None:
        self.spec = spec
        self.root = Path(root)
        self.data_dir = Path(pg_root) / spec.name
        self.etcd = etcd
        self.synchronous_mode = synchronous_mode
        self.os_user = os_user
        self.log = log
        self.conf_file = self.root / f"{spec.name}.yml"
        self.log_file = self.root / f"{spec.name}.log"
        self.pid_file = self.root / f"{spec.name}.pid"

    def __repr__(self) -> str:
        return f"PatroniMember({self.spec.scope}/{self.spec.name}, port={self.spec.pg_port})"

    @property
    def api_url(self) -> str:
        """Base URL of this member's Patroni REST API."""
        return f"http://127.0.0.1:{self.spec.api_port}"

    def config(self) -> dict[str, Any]:
        """Patroni's YAML configuration for this member, as a dict (JSON is valid YAML)."""
        # PostgreSQL settings every member shares (Patroni keeps them in the DCS).
        parameters = {
            "max_connections": 60,
            "shared_buffers": "16MB",
            "wal_level": "replica",
            "wal_log_hints": "on",  # pg_rewind needs hint bits in the WAL (or data checksums)
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_receiver_status_interval": "1s",
            "wal_keep_size": "128MB",
        }
        return {
            "scope": self.spec.scope,
            "namespace": NAMESPACE,
            "name": self.spec.name,
            # Warnings only, but the etcd client's INFO lines too: "waiting on etcd" is the one
            # line a Patroni stuck before its REST API would otherwise never write.
            "log": {
                "level": "WARNING",
                "loggers": {"patroni.dcs.etcd": "INFO", "patroni.dcs.etcd3": "INFO"},
            },
            "restapi": {
                "listen": f"127.0.0.1:{self.spec.api_port}",
                "connect_address": f"127.0.0.1:{self.spec.api_port}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd.client_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_S,
                    "loop_wait": LOOP_WAIT_S,
                    "retry_timeout": RETRY_TIMEOUT_S,
                    "primary_start_timeout": 0,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": parameters,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.spec.pg_port}",
                "connect_address": f"127.0.0.1:{self.spec.pg_port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(pg_bin_dir()),
                "pgpass": str(self.root / f"{self.spec.name}.pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "postgres"},
                    "rewind": {"username": "postgres"},
                },
                "pg_hba": [
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
                "parameters": {
                    "unix_socket_directories": "",
                    "logging_collector": "on",
                    "log_directory": "log",
                    "log_filename": "postgresql.log",
                },
                # A replica that cannot follow the new timeline is rebuilt from the primary.
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "nosync": False},
        }

    def _write_config(self) -> None:
        self.conf_file.write_text(json.dumps(self.config(), indent=2) + "\n")
        if self.os_user is not None:
            os.chown(self.conf_file, self.os_user.uid, self.os_user.gid)

    def is_running(self) -> bool:
        """True if this member's Patroni process is alive."""
        pid = read_pidfile(self.pid_file)
        return pid is not None and pid_alive(pid) and b"patroni" in _cmdline(pid)

    def patroni_pid(self) -> int | None:
        """Pid of the Patroni process (None if not running)."""
        return read_pidfile(self.pid_file) if self.is_running() else None

    def postmaster_pid(self) -> int | None:
        """Pid of this member's PostgreSQL postmaster (None if not running)."""
        pid = read_pidfile(self.data_dir / "postmaster.pid")
        return pid if pid is not None and pid_alive(pid) else None

    def status(self) -> dict[str, Any]:
        """Patroni's ``GET /patroni`` answer (``{}`` if its REST API does not answer)."""
        _, body = _http_json(self.api_url + "/patroni")
        return body if isinstance(body, dict) else {}

    def role(self) -> str:
        """``primary``, ``replica`` or ``""`` (unknown/down), from Patroni's REST API."""
        role = str(self.status().get("role", ""))
        return "primary" if role in ("primary", "master") else role

    def is_streaming(self) -> bool:
        """True if this member is a replica streaming WAL from the primary."""
        status = self.status()
        return status.get("role") == "replica" and status.get("replication_state") == "streaming"

    def has_sync_standby(self) -> bool:
        """True if this member is the primary, a replica is its synchronous standby, and
        Patroni's `/sync` key says so. PostgreSQL reports the standby synchronous a loop
        before Patroni records it; until then Patroni would not fail over to it, and a
        primary that crashed meanwhile is restarted in place rather than replaced."""
        status = self.status()
        replication = status.get("replication") or []
        if status.get("role") != "primary" or not any(
            isinstance(r, dict) and r.get("sync_state") in ("sync", "quorum") for r in replication
        ):
            return False
        _, cluster = _http_json(self.api_url + "/cluster")
        members = cluster.get("members", []) if isinstance(cluster, dict) else []
        return any(
            isinstance(m, dict) and m.get("role") in ("sync_standby", "quorum_standby")
            for m in members
        )

    def start(self) -> None:
        """Start Patroni (no-op if running); it starts (or bootstraps) PostgreSQL itself."""
        if self.is_running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.os_user is not None:
            ensure_traversable(self.root)
            ensure_traversable(self.data_dir.parent)
            ensure_traversable(pg_bin_dir())
            # Patroni is a Python program run as the PostgreSQL user: that user must reach
            # the interpreter (a venv's links to, e.g., a pyenv build under /root) and its
            # libraries. Search permission only, as for the data directories.
            for path in {Path(sys.executable).parent, Path(sys.executable).resolve().parent}:
                ensure_traversable(path)
            if self.root.stat().st_uid != self.os_user.uid:
                make_owned_dir(self.root, self.os_user, 0o700)
            check_patroni_runs_as(self.os_user)
        if not self.data_dir.exists():
            make_owned_dir(self.data_dir, self.os_user, 0o700)
        # A PostgreSQL left running by a Patroni that died holds its port: Patroni adopts it.
        ports = [self.spec.api_port]
        if self.postmaster_pid() is None:
            ports.append(self.spec.pg_port)
        for port in ports:
            if not port_frees_up(port):
                raise InfraError(
                    f"cannot start Patroni {self.spec.name}: port 127.0.0.1:{port} is in use"
                )
        self._write_config()
        touch_owned_file(self.log_file, self.os_user)
        self.log(f"patroni {self.spec.name}: start (postgres on 127.0.0.1:{self.spec.pg_port})")
        _spawn(
            # faulthandler: a Patroni that hangs can be asked where (SIGABRT, see wait_running)
            [sys.executable, "-X", "faulthandler", "-m", "patroni", str(self.conf_file)],
            log_file=self.log_file,
            pid_file=self.pid_file,
            as_user=self.os_user,
            cwd=self.root,
        )

    def wait_running(self, timeout: float) -> None:
        """Wait until Patroni reports PostgreSQL running (as primary or streaming replica)."""

        def running() -> bool:
            status = self.status()
            return status.get("state") in ("running", "streaming")

        started = time.monotonic()
        if not wait_until(running, timeout=timeout, interval=0.2, failed=self._died):
            waited = time.monotonic() - started
            if self._died():
                what = f"exited after {waited:.1f}s"
            else:
                what = (
                    f"did not run PostgreSQL within {waited:.0f}s "
                    f"(REST API state {self.status().get('state')!r}, "
                    f"etcd {'healthy' if self.etcd.is_healthy() else 'NOT healthy'}; "
                    "its threads' stacks follow)"
                )
                self._dump_stacks_and_stop()
            raise InfraError(
                f"Patroni {self.spec.name} {what}"
                + log_tail_text(self.log_file, lines=80)
                + log_tail_text(self.data_dir / "log" / "postgresql.log")
                + log_tail_text(self.etcd.log_file)
            )

    def _died(self) -> bool:
        return not self.is_running()

    def _dump_stacks_and_stop(self) -> None:
        """Make a hung Patroni write every thread's stack to its log and exit (faulthandler
        answers SIGABRT); its PostgreSQL, if any, is left to ``stop``."""
        pid = self.patroni_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
        wait_until(self._died, timeout=5.0, interval=0.1)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop Patroni with SIGTERM: it stops its PostgreSQL (fast) and then exits. A
        PostgreSQL left running by a Patroni that died is stopped with ``pg_ctl``."""
        if self.is_running():
            self.log(f"patroni {self.spec.name}: stop")
            _stop_pid(read_pidfile(self.pid_file), b"patroni", timeout)
        if self.postmaster_pid() is not None:
            self.log(f"postgres {self.spec.name}: stop (its Patroni was gone)")
            run(
                [pg_bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", "fast", "-w"],
                as_user=self.os_user,
                timeout=timeout,
                check=False,
                what=f"pg_ctl stop ({self.spec.name})",
            )

    def follows(self, leader: PatroniMember) -> bool:
        """True if this member is a replica streaming from ``leader`` on its timeline (a
        demoted primary streams briefly on its old timeline before Patroni rewinds it)."""
        mine, theirs = self.status(), leader.status()
        return (
            mine.get("role") == "replica"
            and mine.get("replication_state") == "streaming"
            and theirs.get("role") in ("primary", "master")
            and mine.get("timeline") is not None
            and mine.get("timeline") == theirs.get("timeline")
        )


def cluster_members(api_url: str) -> list[dict[str, Any]]:
    """Members of a Patroni cluster as its REST ``GET /cluster`` lists them ([] if down)."""
    _, body = _http_json(api_url + "/cluster")
    if not isinstance(body, dict):
        return []
    return [m for m in body.get("members", []) if isinstance(m, dict)]


@cache
def check_patroni_runs_as(user: OsUser) -> None:
    """Fail with the interpreter's own words if ``user`` cannot import Patroni (and psycopg2)
    from our environment, e.g. a virtualenv it may not read. Without this check Patroni would
    just not start, and the only symptom would be a REST API that never answers."""
    run(
        [sys.executable, "-c", "import patroni.__main__, psycopg2"],
        as_user=user,
        timeout=60,
        what=f"importing Patroni as the {user.name} user ({sys.executable})",
    )


def write_ctl_config(path: Path, etcd: EtcdServer) -> None:
    """Write the ``patronictl -c PATH`` configuration of every cluster of this etcd."""
    config = {"namespace": NAMESPACE, "etcd3": {"hosts": [f"127.0.0.1:{etcd.client_port}"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
