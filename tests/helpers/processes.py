"""The real `finalmarket` command as a child process: its environment, running it to completion
or in a session of its own (killed on exit if still running), and waiting for it to be ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SECRET_KEY = "s" * 48
SERVER_KEYS = (
    "FM_CATALOG_DSN",
    "FM_CATALOG_REPLICA_DSN",
    "FM_SHARDS",
    "FM_REDIS_URL",
    "FM_REDIS_CLUSTER",
)


def cli_env(config_dir: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours minus every `FM_*`, plus `settings`.

    Dropping inherited `FM_*` keeps a developer's exported settings out of the test, and an
    empty `FM_CONFIG_DIR` keeps `config/*.toml` out of it too.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("FM_")}
    env["FM_CONFIG_DIR"] = str(config_dir)
    env.update(settings or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `finalmarket ARGS` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=PROJECT_ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Running:
    """A `finalmarket` child still running; its stderr goes to a file (no pipe to fill up)."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        """Everything the child has written to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def ctrl_c(self) -> None:
        """SIGINT to the child's whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """The exit code, waiting at most `timeout` seconds for it; a child still running
        then fails the test with what it was doing: its processes, and every thread's stack
        (the child runs with faulthandler, which answers SIGABRT), killing it."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            processes = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,etime,args", "--sid", str(self.proc.pid)],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            pytest.fail(
                f"{self.proc.args} still running {timeout:.0f}s later; its process group:\n"
                f"{processes}\nits stderr, stacks last:\n{self.stderr()[-12000:]}"
            )


def _as_a_terminal_starts_it() -> None:
    """In the child before exec: SIGINT and SIGQUIT at their defaults, as for a command a
    terminal runs in the foreground. A test suite started in the background by a
    non-interactive shell (`./scripts/test &`) runs with both ignored, the child would inherit
    that, and a Ctrl-C sent while it starts would be ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@contextlib.contextmanager
def started(*args: str, env: Mapping[str, str], stderr_path: Path) -> Iterator[Running]:
    """Start `finalmarket ARGS` in its own session, as a terminal would (SIGINT at its
    default); kill its group on exit if still running."""
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "server", *args],
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_as_a_terminal_starts_it,
        )
    try:
        yield Running(proc, stderr_path)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of `GET url`; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_ready(base_url: str, child: Running, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `/readyz` until it answers 200; fail early (with the child's stderr) if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            pytest.fail(f"exited with {child.proc.returncode} before ready:\n{child.stderr()}")
        with contextlib.suppress(OSError):  # refused until it listens; 503 while unready
            if http_get(base_url + "/readyz")[0] == 200:
                return
        time.sleep(0.05)
    pytest.fail(f"{base_url}/readyz not 200 within {timeout:.0f}s:\n{child.stderr()}")


def server_settings(infra_env: Mapping[str, str]) -> dict[str, str]:
    """Only the server locations from `infra_env` (which may carry every outer `FM_*`)."""
    return {key: infra_env[key] for key in SERVER_KEYS if key in infra_env}


def wait_for_line(child: Running, text: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll the child's stderr until a line contains `text`."""
    deadline = time.monotonic() + timeout
    while text not in child.stderr():
        if child.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in stderr:\n{child.stderr()}")
        time.sleep(0.02)
