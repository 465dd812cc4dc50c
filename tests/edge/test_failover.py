"""A node of `finalmarket cluster` gets SIGTERM during a stream of cart changes.

Invariants: every cable subscriber (connected through nginx) sees every message of its
stream exactly once, in offset order: those on the stopped node get `disconnect` with
`reconnect: true`, reconnect through nginx to the other node and resubscribe with
`since`/`epoch`, which replays what they missed. Every GET sent through nginx meanwhile is
answered 200. (A cart's stream, whose recovery replays every message; a product's stock
recovers only its latest value, tests/realtime/test_cable_latest_value.py.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from server.wiring.services import Services
from tests.helpers.cable import CableClient, identifier
from tests.helpers.cluster import Cluster, running_cluster
from tests.helpers.commerce import make_user

PRODUCT_ID = 1  # seeded by the cluster into the emptied catalog (the GETs read it)
SUBSCRIBERS = 6
MESSAGES = 200
MESSAGE_INTERVAL_S = 0.03
SIGTERM_AFTER = 20  # messages


class ResumingSubscriber:
    """An Action Cable client that behaves as the official one does after a `disconnect`:
    reconnects (through nginx) and resubscribes from the last offset it saw."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.first_offset: int | None = None
        self.offsets: list[int] = []  # of every message after the first snapshot
        self.epoch: str | None = None
        self.changes: list[int] = []  # the numbers of the cart changes among them
        self.disconnects: list[dict[str, Any]] = []
        self.subscribed = asyncio.Event()

    @property
    def last_offset(self) -> int | None:
        return self.offsets[-1] if self.offsets else self.first_offset

    async def _connect(self, deadline: float) -> CableClient:
        while True:
            try:
                return await CableClient.connect(self.url)
            except (OSError, HTTPClientError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def follow(self, until_offset: asyncio.Future[int], timeout: float = 90.0) -> None:
        """Read until a message at or past `until_offset` (known once publishing ends) arrived.
        (Viewer counts share the stream, so offsets may go past the last stock change.)"""
        deadline = time.monotonic() + timeout
        while not self._reached(until_offset):
            client = await self._connect(deadline)
            params: dict[str, Any] = {}
            if self.last_offset is not None:
                params.update(since=self.last_offset, epoch=self.epoch)
            ident = identifier("CartChannel", **params)
            await client.subscribe(ident)
            try:
                while not self._reached(until_offset):
                    reading = asyncio.ensure_future(
                        client.read(timeout=deadline - time.monotonic())
                    )
                    await asyncio.wait({reading, until_offset}, return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done() and self._reached(until_offset):
                        reading.cancel()
                        return
                    message = await reading
                    if message is None:
                        break  # closed without a disconnect message: reconnect too
                    if message.get("type") == "disconnect":
                        self.disconnects.append(message)
                        break
                    self._record(message["message"])
            finally:
                client.close()

    def _reached(self, until_offset: asyncio.Future[int]) -> bool:
        last = self.last_offset
        return until_offset.done() and last is not None and last >= until_offset.result()

    def _record(self, data: dict[str, Any]) -> None:
        if self.first_offset is None:
            self.first_offset, self.epoch = data["offset"], data["epoch"]
            self.subscribed.set()
            return
        assert data["epoch"] == self.epoch, data
        self.offsets.append(data["offset"])
        if "n" in data:
            self.changes.append(data["n"])


async def _cable_connections(port: int) -> int:
    response = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/metrics")
    for family in text_string_to_metric_families(response.body.decode()):
        if family.name == "fm_cable_connections":
            return int(family.samples[0].value)
    raise AssertionError("no fm_cable_connections")


async def _get_until(url: str, stop: asyncio.Event, statuses: list[int], getter: int) -> None:
    """GET a product (a query of its own each time, so nginx's cache answers none of them)."""
    client = AsyncHTTPClient()
    n = 0
    while not stop.is_set():
        n += 1
        response = await client.fetch(
            f"{url}/api/v1/products/{PRODUCT_ID}?g={getter}&n={n}",
            raise_error=False,
            request_timeout=30,
        )
        statuses.append(response.code)
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=240)
async def test_sigterm_on_a_node_loses_no_message_and_fails_no_request(
    clean_data: None,
    infra_env: dict[str, str],
    services: Services,
    tmp_path: Path,
) -> None:
    with running_cluster(infra_env, tmp_path) as cluster:
        await _check_failover(cluster, services)


async def _check_failover(cluster: Cluster, services: Services) -> None:
    node1 = cluster.nodes["node1"]
    user_id, token = await make_user(services, "ada@example.com")
    url = cluster.ws_url(f"/cable?token={token}")
    subscribers = [ResumingSubscriber(url) for _ in range(SUBSCRIBERS)]
    last: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    following = [asyncio.ensure_future(s.follow(last)) for s in subscribers]
    await asyncio.wait_for(asyncio.gather(*(s.subscribed.wait() for s in subscribers)), 60)
    on_node1 = await _cable_connections(node1.port)
    assert on_node1 + await _cable_connections(cluster.nodes["node2"].port) == SUBSCRIBERS
    assert on_node1 >= 1  # least_conn spreads them

    stop_getting, statuses = asyncio.Event(), []
    base = cluster.url("").rstrip("/")
    getters = [
        asyncio.ensure_future(_get_until(base, stop_getting, statuses, getter))
        for getter in range(2)
    ]
    stream = f"cart:user:{user_id}"
    offset = 0
    for sent in range(MESSAGES):  # changes 0, 1, ... (published straight to the stream)
        offset, _ = await services.cable.publish(stream, {"event": "cart", "n": sent})
        if sent == SIGTERM_AFTER:
            os.kill(node1.pid, signal.SIGTERM)
        await asyncio.sleep(MESSAGE_INTERVAL_S)
    last.set_result(offset)
    await asyncio.wait_for(asyncio.gather(*following), 90)
    stop_getting.set()
    await asyncio.gather(*getters)

    stopped = cluster.wait_for_event("node_unready", node="node1")
    assert stopped, "the supervisor saw node1 drain"
    assert "node1" in {e["node"] for e in cluster.events("draining")}
    for s in subscribers:
        assert s.first_offset is not None and s.offsets[-1] >= offset
        assert s.offsets == list(range(s.first_offset + 1, s.offsets[-1] + 1)), s.disconnects
        assert s.changes == list(range(MESSAGES))
    disconnected = [s for s in subscribers if s.disconnects]
    assert len(disconnected) == on_node1
    assert all(
        d == {"type": "disconnect", "reason": "server_restart", "reconnect": True}
        for s in disconnected
        for d in s.disconnects
    )
    assert len(statuses) > 50 and set(statuses) == {200}, statuses
