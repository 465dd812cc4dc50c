"""The Patroni topology (`infra up --ha`) for the failover tests and benchmark: its members,
which one leads, killing and restarting their processes, `patronictl`, and a shopper that
retries the way the API documents (503 or 409 with `Retry-After`, same `Idempotency-Key`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from server.wiring import infra
from server.wiring.infra import PatroniMember, PostgresServer
from server.wiring.infra.common import wait_until
from tests.helpers.commerce import call
from tests.helpers.deployment import quiet
from tests.helpers.replicas import wait_caught_up

#: Answers the API asks clients to retry with the same Idempotency-Key: 503 (a database is
#: unavailable, e.g. during a failover) and 409 (the same key is still being processed).
RETRYABLE = frozenset({503, 409})


@dataclass(frozen=True)
class HaTopology:
    """An HA topology's data directory and FM_* settings."""

    data_dir: Path
    env: dict[str, str]

    def members(self, group: str) -> tuple[PatroniMember, PatroniMember]:
        """The two Patroni members of a group ("catalog", "shard0", ...)."""
        return infra.ha_members(self.data_dir)[group]

    def leader(self, group: str, timeout: float = 30.0) -> PatroniMember:
        """The member Patroni runs as primary now (waits up to `timeout` for one)."""
        found: list[PatroniMember] = []

        def has_leader() -> bool:
            found[:] = [m for m in self.members(group) if m.role() == "primary"]
            return len(found) == 1

        assert wait_until(has_leader, timeout=timeout, interval=0.1), f"{group}: no leader"
        return found[0]

    def other(self, group: str, member: PatroniMember) -> PatroniMember:
        """The group's member that is not `member`."""
        a, b = self.members(group)
        return b if member.spec.name == a.spec.name else a

    def postgres(self, member: PatroniMember) -> PostgresServer:
        """`PostgresServer` helpers (psql, dsn) for a member's PostgreSQL."""
        return PostgresServer(member.data_dir, member.spec.pg_port, log=quiet)

    def wait_caught_up(self, group: str) -> None:
        """Wait until the group's replica applied every commit of its primary so far."""
        leader = self.leader(group)
        wait_caught_up(self.postgres(leader), self.postgres(self.other(group, leader)))

    def patronictl(self, *args: str, timeout: float = 90.0) -> str:
        """Run `patronictl -c patroni/patronictl.yml ARGS`; its stdout (raises on failure)."""
        config = infra.patronictl_config(self.data_dir)
        cmd = [str(Path(sys.executable).parent / "patronictl"), "-c", str(config), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        assert proc.returncode == 0, f"patronictl {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def query(self, member: PatroniMember, dbname: str, sql: str) -> list[Any]:
        """Rows of `sql` run straight on `member`'s PostgreSQL (autocommit)."""
        conn = psycopg2.connect(self.postgres(member).dsn(dbname), connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()


def sigkill(pid: int | None, what: str) -> None:
    """SIGKILL process `pid` (asserting there is one)."""
    assert pid is not None, f"{what} is not running"
    os.kill(pid, signal.SIGKILL)


def wait_rejoined(member: PatroniMember, leader: PatroniMember, timeout: float = 90.0) -> None:
    """Wait until `member` (a failed old primary) streams from `leader` on its timeline."""
    assert wait_until(lambda: member.follows(leader), timeout=timeout, interval=0.2), (
        f"{member} did not rejoin as a replica of {leader}: {member.status()}"
    )


@dataclass
class Shopper:
    """One user buying in a loop through one or more nodes (one unit into the cart, check out),
    retrying answers in RETRYABLE with the same Idempotency-Key for up to `retry_for_s`.

    Records every answer; `acknowledged` maps each checkout key answered 201 to its order id,
    `retried` holds the keys that needed a retry.
    """

    user_id: int
    token: str
    base_urls: list[str]
    retry_for_s: float = 30.0
    acknowledged: dict[str, int] = field(default_factory=dict)
    retried: set[str] = field(default_factory=set)
    # (start, end, status, problem type or "") of each request; monotonic seconds
    requests: list[tuple[float, float, int, str]] = field(default_factory=list)
    # operations whose last answer was not 2xx: (what, status, problem type)
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    _turn: int = 0

    def ordered_since(self, after: float) -> bool:
        """Whether a checkout request begun at or after `after` got a 201."""
        return any(start >= after and code == 201 for start, _, code, _ in self.requests)

    def not_ok(self) -> list[tuple[float, float, int, str]]:
        """Every answer that was not 2xx (retried or not)."""
        return [r for r in self.requests if not 200 <= r[2] < 300]

    def _base(self) -> str:
        """The next node's base URL (the shopper's requests alternate between nodes)."""
        self._turn += 1
        return self.base_urls[self._turn % len(self.base_urls)]

    async def _with_retry(
        self, what: str, key: str, request: Callable[[str], Awaitable[Any]]
    ) -> Any:
        deadline = time.monotonic() + self.retry_for_s
        while True:
            started = time.monotonic()
            answer = await request(self._base())
            kind = ""
            if not 200 <= answer.code < 300:
                assert answer.headers["Content-Type"] == "application/problem+json", answer.body
                kind = json.loads(answer.body)["type"]
            self.requests.append((started, time.monotonic(), answer.code, kind))
            if answer.code in RETRYABLE and time.monotonic() < deadline:
                self.retried.add(key)
                await asyncio.sleep(0.2)
                continue
            if not 200 <= answer.code < 300:
                self.failed.append((what, answer.code, kind))
            return answer

    async def buy_once(self, client: Any, product_id: int) -> int | None:
        """Add one unit and check out (each retried as documented); the order id or None."""
        add_key = uuid.uuid4().hex
        body = {"product_id": product_id, "quantity": 1}
        added = await self._with_retry(
            "add",
            add_key,
            lambda base: call(
                client,
                base + "/api/v1/cart/items",
                "POST",
                body,
                self.token,
                **{"Idempotency-Key": add_key},
            ),
        )
        if added.code != 200:
            return None
        key = uuid.uuid4().hex
        answer = await self._with_retry(
            "checkout",
            key,
            lambda base: call(
                client,
                base + "/api/v1/checkout",
                "POST",
                token=self.token,
                **{"Idempotency-Key": key},
            ),
        )
        if answer.code != 201:
            return None
        order_id = int(json.loads(answer.body)["order"]["id"])
        self.acknowledged[key] = order_id
        return order_id

    async def shop(self, client: Any, product_id: int, stop: asyncio.Event) -> None:
        """Buy until `stop` is set."""
        while not stop.is_set():
            await self.buy_once(client, product_id)
            await asyncio.sleep(0.05)

    async def replay(self, client: Any, key: str) -> Any:
        """The answer to checking out again with an earlier key."""
        return await call(
            client,
            self._base() + "/api/v1/checkout",
            "POST",
            token=self.token,
            **{"Idempotency-Key": key},
        )


async def poll_ready(
    client: Any, url: str, stop: asyncio.Event, seen: list[tuple[float, int, str]]
) -> None:
    """Record (time, status, body) of `GET url` (a node's /readyz) every 0.1 s until `stop`."""
    while not stop.is_set():
        answer = await client.fetch(url, raise_error=False, request_timeout=10)
        seen.append((time.monotonic(), answer.code, answer.body.decode(errors="replace")))
        await asyncio.sleep(0.1)
