"""Plumbing shared by the benchmarks: embedded servers, a node process, users, machine facts.

Each benchmark (`scripts/bench/*`) starts its own deployment in a temporary directory with
`Deployment` (embedded PostgreSQL + Valkey, migrations, one `finalmarket serve` node) and
stops all of it at the end, also on Ctrl-C. The node runs at its shipped defaults (logging
included) except for what the benchmark asks for; `spawn_node` prints every setting it
changes, and `Deployment.changed` keeps them for the benchmark's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from argon2 import PasswordHasher  # noqa: E402

from server.wiring import infra  # noqa: E402

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def progress(line: str) -> None:
    """A progress line on stderr (stdout carries only the results)."""
    print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readyz_status(port: int) -> int | None:
    """Status of `GET /readyz`, or None while nothing accepts connections."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": list(os.getloadavg()),
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


# Raised by `spawn_node` unless told otherwise: one load generator is one IP and one user.
RAISED_LIMITS = {
    "FM_RATELIMIT_IP_PER_SECOND": "1000000",
    "FM_RATELIMIT_IP_BURST": "1000000",
    "FM_RATELIMIT_USER_PER_SECOND": "1000000",
    "FM_RATELIMIT_USER_BURST": "1000000",
}


def describe_changes(changed: dict[str, str]) -> str:
    """One line naming the settings a benchmark changed from the shipped defaults."""
    servers = "embedded servers and a generated FM_SECRET_KEY"
    if not changed:
        return f"every setting at its shipped default ({servers})"
    listed = ", ".join(f"{key}={value}" for key, value in sorted(changed.items()))
    return f"changed from the shipped defaults: {listed}; everything else at defaults ({servers})"


def _noteworthy(line: str) -> bool:
    if not line.strip():
        return False
    try:
        level = json.loads(line).get("level")
    except (ValueError, AttributeError):
        return True
    return level not in ("debug", "info")


def start_server(
    command: list[str], env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a server process in a session of its own (so it can be stopped with everything it
    starts), run from the project root, its output into `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT a process started in its own session (then SIGKILL); its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


class Deployment:
    """Embedded servers, migrations and one node process; `stop()` undoes all of it."""

    def __init__(
        self, work: Path, python: str, pool_max_size: int | None = None, *, ha: bool = False
    ) -> None:
        """`pool_max_size`: `FM_POOL_MAX_SIZE` for the nodes (None: the shipped default);
        `ha`: the Patroni topology (`infra up --ha`)."""
        self.work = work
        self.ha = ha  # `infra up --ha`: Patroni clusters over etcd
        self.python = python
        self.pool_max_size = pool_max_size
        self.changed: dict[str, dict[str, str]] = {}  # node id -> settings not at defaults
        self.data_dir = work / "data"
        self.env: dict[str, str] = {}
        self.node: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = work / "node.log"
        self.infra_started = False

    def child_env(self) -> dict[str, str]:
        """Our environment without `FM_*`, plus the deployment's servers and secret key
        (every other setting at its shipped default)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("FM_")}
        env.update(self.env)
        env["FM_SECRET_KEY"] = self.secret
        return env

    def up(self) -> None:
        """Start the servers and migrate."""
        self.secret = secrets.token_urlsafe(48)
        self.infra_started = True
        self.env = infra.up(self.data_dir, ha=self.ha, log=progress)
        run = subprocess.run(
            [self.python, "-m", "server", "migrate"],
            cwd=ROOT,
            env=self.child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"migrate failed: {run.stdout}{run.stderr}")

    def run_cli(self, *args: str) -> None:
        """`finalmarket ARGS` against the deployment (raises on failure)."""
        run = subprocess.run(
            [self.python, "-m", "server", *args],
            cwd=ROOT,
            env=self.child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {run.stdout}{run.stderr}")

    def start_node(self, extra_env: dict[str, str] | None = None) -> None:
        """`finalmarket serve` with rate limits raised (plus `extra_env`); waits for /readyz."""
        self.port = free_port()
        self.node = self.spawn_node(self.port, "bench", self.log_path, extra_env)

    def spawn_node(
        self,
        port: int,
        node_id: str,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        *,
        raise_limits: bool = True,
    ) -> subprocess.Popen[bytes]:
        """One more `finalmarket serve` process on `port`, ready when this returns; rate
        limits raised unless `raise_limits` is False (`extra_env` wins over both; "" unsets).
        Prints the settings that differ from the shipped defaults."""
        changed: dict[str, str] = {}
        if raise_limits:
            changed.update(RAISED_LIMITS)
        if self.pool_max_size is not None:
            changed["FM_POOL_MAX_SIZE"] = str(self.pool_max_size)
        changed.update(extra_env or {})
        changed = {key: value for key, value in changed.items() if value != ""}
        self.changed[node_id] = changed
        progress(f"node {node_id}: {describe_changes(changed)}")
        env = self.child_env() | changed
        command = [self.python, "-m", "server", "serve", "--port", str(port)]
        command += ["--node-id", node_id]
        node = start_server(command, env, log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if readyz_status(port) == 200:
                return node
            if node.poll() is not None:
                raise RuntimeError(f"node exited {node.returncode}; see {log_path}")
            time.sleep(0.05)
        stop_process(node)
        raise RuntimeError(f"node not ready within {READY_TIMEOUT_S:.0f}s; see {log_path}")

    def stop_node(self) -> int | None:
        """SIGINT the node (then SIGKILL); its exit code."""
        proc, self.node = self.node, None
        return None if proc is None else stop_process(proc)

    def node_log(self) -> list[str]:
        """The node's noteworthy log lines: warnings and worse, and anything not a JSON line
        (access and other `info` lines left out)."""
        with contextlib.suppress(OSError):
            return [line for line in self.log_path.read_text().splitlines() if _noteworthy(line)]
        return []

    def stop(self) -> None:
        """Stop the node and the servers."""
        self.stop_node()
        if self.infra_started:
            with contextlib.suppress(Exception):
                infra.down(self.data_dir, log=lambda line: None)

    def settings(self, **overrides: Any) -> Any:
        """Settings for in-process use of the deployment (small pools)."""
        from server.wiring.settings import Settings

        values: dict[str, Any] = {
            "catalog_dsn": self.env["FM_CATALOG_DSN"],
            "catalog_replica_dsn": self.env.get("FM_CATALOG_REPLICA_DSN"),
            "shards": json.loads(self.env["FM_SHARDS"]),
            "redis_url": self.env["FM_REDIS_URL"],
            "redis_cluster": self.env.get("FM_REDIS_CLUSTER") == "1",
            "secret_key": self.secret,
            "pool_max_size": 3,
        }
        values.update(overrides)
        return Settings(**values)

    def shard_dsns(self) -> list[str]:
        return [shard["primary"] for shard in json.loads(self.env["FM_SHARDS"])]


async def make_users(deploy: Deployment, count: int, admin: bool = False) -> list[tuple[int, str]]:
    """`count` users (cheap hashes) with session tokens, written directly (no HTTP)."""
    from server.adapters.db.pools import Database
    from server.adapters.db.router import ShardRouter
    from server.adapters.redis_client import open_redis
    from server.adapters.sessions import SessionStore
    from server.domain.users import UserService

    settings = deploy.settings()
    db = await Database.open(settings)
    redis = open_redis(settings)
    router = ShardRouter.for_settings(db, settings)
    try:
        users = UserService(router, CHEAP_HASHER)
        sessions = SessionStore(redis, router)
        gate = asyncio.Semaphore(20)

        async def one(index: int) -> tuple[int, str]:
            async with gate:
                prefix = "admin" if admin else "buyer"
                email = f"{prefix}{index}-{secrets.token_hex(4)}@example.com"
                user = await users.create_user(email, "correct horse battery", is_admin=admin)
                return user.id, await sessions.create(user.id, is_admin=admin)

        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        await router.close()
        await db.close()
        await redis.aclose()
