"""The load balancer as a running process: nginx or HAProxy in the foreground, owned by
`finalmarket cluster` (or a test), with the configuration `server/wiring/edge.py` renders.

- **nginx** has only passive health checks, so whoever runs it decides which nodes are `down`
  and calls `apply`, which re-renders the configuration and reloads nginx (`nginx -s reload`:
  new workers take new connections, old ones finish theirs).
- **HAProxy** checks `/readyz` itself (`config/haproxy.cfg`), so `apply` has nothing to do.

A missing binary is an `InfraError` naming the Debian packages to install.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from server.wiring.children import signal_child, spawn, wait_or_kill
from server.wiring.edge import (
    DEBIAN_PURGE_MODULE,
    Upstream,
    haproxy_config,
    nginx_config,
)
from server.wiring.infra.common import InfraError, ensure_traversable

NGINX_PACKAGES = "nginx libnginx-mod-http-cache-purge"
HAPROXY_PACKAGES = "haproxy"
BALANCERS = ("nginx", "haproxy")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
_CHECK_TIMEOUT_S = 30.0
HAPROXY_MAXCONN = 20000  # config/haproxy.cfg's global maxconn
_HAPROXY_RESERVED_FDS = 100  # listeners, checks, logs


def _binary(name: str, packages: str) -> str:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):  # not on a user's PATH
        found = f"/usr/sbin/{name}"
    if found is None:
        raise InfraError(f"{name} is not installed (Debian: apt-get install {packages})")
    return found


def nginx_binary() -> str:
    """The `nginx` executable, with the cache purge module the configuration loads."""
    binary = _binary("nginx", NGINX_PACKAGES)
    if not Path(DEBIAN_PURGE_MODULE).is_file():
        raise InfraError(
            f"nginx's cache purge module {DEBIAN_PURGE_MODULE} is not installed "
            f"(Debian: apt-get install {NGINX_PACKAGES})"
        )
    return binary


def haproxy_binary() -> str:
    """The `haproxy` executable."""
    return _binary("haproxy", HAPROXY_PACKAGES)


class Balancer(Protocol):
    """A load balancer process in front of the nodes."""

    name: str
    config_path: Path

    @property
    def started(self) -> bool:
        """Whether `start` ran (it may have exited since)."""

    def start(self, upstreams: Sequence[Upstream]) -> None:
        """Write the configuration for `upstreams` and run the balancer until it listens."""

    def apply(self, upstreams: Sequence[Upstream]) -> None:
        """Route to `upstreams` from now on (nodes marked `down` get nothing new)."""

    def exit_code(self) -> int | None:
        """None while it runs, else how it ended."""

    def stop(self) -> None:
        """Stop it gracefully (connections finish), killing it after `STOP_TIMEOUT_S`."""


def _checked(argv: Sequence[str], what: str) -> None:
    """Run a balancer's own configuration check or control command; fail with its output."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_CHECK_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise InfraError(f"{what} failed ({' '.join(argv)}):\n{output}")


def _accepts(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


class _Process:
    """What both balancers share: a foreground child started once and stopped by a signal."""

    name = "balancer"
    graceful_stop = signal.SIGTERM

    def __init__(self, directory: Path, listen: str) -> None:
        self.directory = directory
        self.listen = listen
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def started(self) -> bool:
        """Whether `start` ran (it may have exited since)."""
        return self.proc is not None

    def _run(self, argv: Sequence[str]) -> None:
        self.proc = spawn(argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(self.listen):
            if (code := self.proc.poll()) is not None:
                raise InfraError(f"{self.name} exited with {code} at start (see above)")
            if time.monotonic() > deadline:
                self.stop()
                raise InfraError(f"{self.name} does not accept on {self.listen}")
            time.sleep(0.05)

    def exit_code(self) -> int | None:
        """None while it runs (or before it started), else its exit code."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """Graceful stop, then SIGKILL after `STOP_TIMEOUT_S`."""
        if self.proc is not None:
            signal_child(self.proc, self.graceful_stop)
            wait_or_kill(self.proc, STOP_TIMEOUT_S)


class Nginx(_Process):
    """nginx with its configuration, pid, logs, temporary files and cache in `directory`."""

    name = "nginx"
    graceful_stop = signal.SIGQUIT  # nginx's graceful shutdown (SIGTERM is its fast one)

    def __init__(self, directory: Path, listen: str) -> None:
        super().__init__(directory, listen)
        self.binary = nginx_binary()
        self.config_path = directory / "nginx.conf"

    def _write(self, upstreams: Sequence[Upstream]) -> list[str]:
        text = nginx_config(upstreams, listen=self.listen, directory=self.directory)
        self.config_path.write_text(text)
        return [self.binary, "-p", str(self.directory), "-c", str(self.config_path)]

    def start(self, upstreams: Sequence[Upstream]) -> None:
        """Render, check (`nginx -t`) and run nginx in the foreground until it listens."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the workers run as `nobody` and must reach their cache
            ensure_traversable(self.directory)
        argv = self._write(upstreams)
        _checked([*argv, "-q", "-t"], "nginx's configuration check")
        self._run([*argv, "-g", "daemon off;"])

    def apply(self, upstreams: Sequence[Upstream]) -> None:
        """Re-render, check and `nginx -s reload` (an error here, not just in nginx's log)."""
        argv = self._write(upstreams)
        _checked([*argv, "-q", "-t"], "nginx's configuration check")
        _checked([*argv, "-s", "reload"], "nginx reload")


class HAProxy(_Process):
    """HAProxy in the foreground (`-db`) with its configuration in `directory`."""

    name = "haproxy"
    graceful_stop = signal.SIGUSR1  # HAProxy's soft stop: finish connections, then exit

    def __init__(self, directory: Path, listen: str) -> None:
        super().__init__(directory, listen)
        self.binary = haproxy_binary()
        self.config_path = directory / "haproxy.cfg"

    def start(self, upstreams: Sequence[Upstream]) -> None:
        """Render, check (`haproxy -c`) and run HAProxy until it listens."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = haproxy_config(upstreams, listen=self.listen, directory=self.directory)
        self.config_path.write_text(text)
        argv = [self.binary, "-f", str(self.config_path), "-n", str(haproxy_maxconn())]
        _checked([*argv, "-c", "-q"], "HAProxy's configuration check")
        self._run([*argv, "-db"])

    def apply(self, upstreams: Sequence[Upstream]) -> None:
        """Nothing: HAProxy's own /readyz checks take unready nodes out and put them back."""


def haproxy_maxconn() -> int:
    """The configuration's `maxconn`, or less where the file descriptor limit is lower
    (HAProxy needs two per connection and refuses to start beyond the hard limit; production
    raises it in the service unit, `LimitNOFILE`)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return HAPROXY_MAXCONN
    return max(100, min(HAPROXY_MAXCONN, (hard - _HAPROXY_RESERVED_FDS) // 2))


def make_balancer(name: str, directory: Path, listen: str) -> Balancer:
    """The balancer called `name` (one of `BALANCERS`), binary checked, not yet started."""
    if name == "nginx":
        return Nginx(directory, listen)
    if name == "haproxy":
        return HAProxy(directory, listen)
    raise ValueError(f"unknown balancer {name!r}: choose one of {', '.join(BALANCERS)}")
