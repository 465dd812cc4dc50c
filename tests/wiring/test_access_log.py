"""The access log of a real `finalmarket serve` process, over real HTTP, through the real log
pipeline (structlog, the bounded buffer, the writer thread, the process's stderr).

Invariants: one line per request, with its method, path, status, duration and request id and
never a credential; lines buffered when SIGTERM arrives are written before the process exits;
a stderr nobody reads (a real pipe, full) never delays a request, and the lines it cannot take
are counted in /metrics.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import (
    PROJECT_ROOT,
    SECRET_KEY,
    cli_env,
    free_port,
    server_settings,
    started,
    wait_ready,
)

ACCESS_KEYS = {
    "method",
    "path",
    "status",
    "duration_ms",
    "remote",
    "request_id",
    "event",
    "node",
    "level",
    "logger",
    "timestamp",
}
PASSWORD = "correct horse battery staple"
COOKIE_SECRET = "cookie-value-that-must-not-be-logged"


def node_env(infra_env: Mapping[str, str], config_dir: Path, **settings: str) -> dict[str, str]:
    """A `serve` environment on the suite's servers, with `settings` (`FM_*`) on top."""
    config_dir.mkdir(exist_ok=True)
    base = {
        **server_settings(infra_env),
        "FM_SECRET_KEY": SECRET_KEY,
        "FM_DRAIN_DELAY_S": "0",
        "FM_NODE_ID": "logged-node",
    }
    return cli_env(config_dir, {**base, **settings})


def call(
    port: int, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """Status and body of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        sent = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, path, body=payload, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a log (every line must be one)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class LoggedRun:
    """What a node logged for a few requests, read before and after its SIGTERM."""

    sent: dict[str, tuple[str, str, int]]  # request id -> method, path, status
    token: str
    log_before_sigterm: str
    log: str
    exit_code: int


@pytest.fixture(scope="module")
def logged_run(infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> LoggedRun:
    """A node whose writer waits an hour between writes (so only shutdown writes the lines),
    a sign-up, an authenticated read with the token as bearer and as cookie, a public read and
    a miss; then SIGTERM."""
    work = tmp_path_factory.mktemp("access-log")
    port = free_port()
    env = node_env(infra_env, work / "config", FM_PORT=str(port), FM_LOG_FLUSH_INTERVAL_S="3600")
    with started("serve", env=env, stderr_path=work / "stderr.log") as node:
        wait_ready(f"http://127.0.0.1:{port}", node)
        sent: dict[str, tuple[str, str, int]] = {}

        def request(method: str, path: str, body: Any = None, **headers: str) -> bytes:
            request_id = f"t-{uuid.uuid4().hex}"
            status, answer = call(port, method, path, body, {"X-Request-Id": request_id, **headers})
            sent[request_id] = (method, path, status)
            return answer

        email = f"log-{uuid.uuid4().hex[:12]}@example.com"
        signed_up = request("POST", "/api/v1/users", {"email": email, "password": PASSWORD})
        token = json.loads(signed_up)["token"]
        request("GET", "/api/v1/me", Authorization=f"Bearer {token}")
        request("GET", "/api/v1/me", Cookie=f"fm_session={token}; other={COOKIE_SECRET}")
        request("GET", "/api/v1/products?first=2&secret=query-never-logged")
        request("GET", "/api/v1/products/999999999")
        log_before = node.stderr()
        node.proc.send_signal(signal.SIGTERM)
        exit_code = node.wait(timeout=30)
        return LoggedRun(sent, token, log_before, node.stderr(), exit_code)


def test_each_request_has_one_access_line_with_its_fields(logged_run: LoggedRun) -> None:
    lines = [e for e in log_events(logged_run.log) if e["event"] == "request"]
    by_id = {e["request_id"]: e for e in lines if e["request_id"] in logged_run.sent}
    assert len(by_id) == len(logged_run.sent) == 5
    assert sum(e["request_id"] in logged_run.sent for e in lines) == 5  # one each, no more
    for request_id, (method, path, status) in logged_run.sent.items():
        line = by_id[request_id]
        assert set(line) == ACCESS_KEYS, line
        assert (line["method"], line["status"]) == (method, status)
        assert line["path"] == path.partition("?")[0]  # never the query string
        assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 10_000
        assert line["remote"] == "127.0.0.1"
        assert line["level"] == ("info" if status < 400 else "warning")
        assert (line["logger"], line["node"]) == ("finalmarket.access", "logged-node")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
    assert [status for _, _, status in logged_run.sent.values()] == [201, 200, 200, 200, 404]


def test_the_log_never_holds_a_token_password_cookie_or_query(logged_run: LoggedRun) -> None:
    for secret in (logged_run.token, PASSWORD, COOKIE_SECRET, "query-never-logged"):
        assert secret not in logged_run.log


def test_sigterm_writes_the_buffered_lines_before_the_process_exits(
    logged_run: LoggedRun,
) -> None:
    assert logged_run.exit_code == 0, logged_run.log
    assert '"request"' not in logged_run.log_before_sigterm  # still buffered when signalled
    names = [e["event"] for e in log_events(logged_run.log)]
    assert names.count("request") >= 5
    assert names[-1] == "stopped", names


# --- a stderr nobody reads ------------------------------------------------------------------

STALLED_REQUESTS = 1500  # ~400 KB of access lines: six times what a pipe holds
BUFFER_LINES = 50


@dataclass(frozen=True)
class StalledRun:
    """A node whose stderr is a pipe nobody read: what its requests and /metrics showed."""

    statuses: set[int]
    slowest_request_s: float
    dropped_lines: float
    exit_code: int
    seconds_to_exit: float


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric in a Prometheus exposition."""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def stalled_run(infra_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> StalledRun:
    """`serve` with stderr on a pipe that is never read, a small log buffer, many requests."""
    work = tmp_path_factory.mktemp("stalled-log")
    port = free_port()
    env = node_env(
        infra_env,
        work / "config",
        FM_PORT=str(port),
        FM_LOG_BUFFER_LINES=str(BUFFER_LINES),
        FM_LOG_FLUSH_INTERVAL_S="0.01",
        FM_RATELIMIT_IP_PER_SECOND="1000000",  # one client, many requests
        FM_RATELIMIT_IP_BURST="1000000",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        run = _stall(proc, port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    return run


def _stall(proc: subprocess.Popen[bytes], port: int) -> StalledRun:
    deadline = time.monotonic() + 60
    while call_status(port, "/readyz") != 200:
        assert proc.poll() is None and time.monotonic() < deadline, "node not ready"
        time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # a stalled loop: timeout
    statuses, slowest = set(), 0.0
    for _ in range(STALLED_REQUESTS):
        started_at = time.perf_counter()
        conn.request("GET", "/api/v1/products?first=1")
        response = conn.getresponse()
        response.read()
        slowest = max(slowest, time.perf_counter() - started_at)
        statuses.add(response.status)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # still nobody reads: the exit must not wait forever
    exit_code = proc.wait(timeout=30)
    return StalledRun(
        statuses,
        slowest,
        metric(metrics, "fm_log_lines_dropped_total"),
        exit_code,
        time.monotonic() - signalled,
    )


def call_status(port: int, path: str) -> int | None:
    """The status of `GET path`, None while nothing answers."""
    try:
        return call(port, "GET", path)[0]
    except OSError:
        return None


def test_a_stalled_stderr_never_delays_requests(stalled_run: StalledRun) -> None:
    assert stalled_run.statuses == {200}
    assert stalled_run.slowest_request_s < 1.0, stalled_run


def test_lines_a_stalled_stderr_cannot_take_are_counted_in_metrics(
    stalled_run: StalledRun,
) -> None:
    # The pipe takes ~250 lines and the buffer 50; the rest of 1,500 were dropped, counted.
    assert stalled_run.dropped_lines >= STALLED_REQUESTS - 500, stalled_run


def test_a_node_whose_stderr_nobody_reads_still_exits_on_sigterm(
    stalled_run: StalledRun,
) -> None:
    assert stalled_run.exit_code == 0
    assert stalled_run.seconds_to_exit < 10, stalled_run  # the log's close waits at most 5 s
