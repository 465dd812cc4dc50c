"""The pub/sub reader outlives failures of its own callbacks and of Redis (a real restart)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.adapters.pubsub import ResilientSubscription
from server.wiring.infra import ValkeyServer
from server.wiring.settings import Settings
from tests.helpers.cable import own_valkey
from tests.helpers.pubsub import racing_subscribes_all_receive


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ValkeyServer]:
    with own_valkey(tmp_path / "valkey") as server:
        yield server


async def _until(check: Any, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.gen_test(timeout=60)
async def test_reader_survives_failing_callbacks_and_a_redis_restart(valkey: ValkeyServer) -> None:
    received: list[bytes] = []
    reconnects: list[str] = []

    def on_message(_channel: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a subscriber's bug")
        received.append(data)

    async def on_reconnect() -> None:
        reconnects.append("called")
        if len(reconnects) == 1:
            raise ConnectionError("Redis went away again during the gap check")

    client = Redis.from_url(valkey.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    subscription = ResilientSubscription(client, on_message, on_reconnect, "t", channels=("c",))
    subscription.start()
    try:
        await subscription.wait_subscribed()
        for data in (b"boom", b"after the failing callback"):
            await client.publish("c", data)
        await _until(lambda: received == [b"after the failing callback"])

        await asyncio.to_thread(valkey.stop)
        await asyncio.to_thread(valkey.start)
        # The first gap check fails; the reader reconnects once more and checks again.
        await _until(lambda: len(reconnects) >= 2)

        async def delivered_after_restart() -> None:
            while b"after the restart" not in received:
                with contextlib.suppress(RedisConnectionError):  # the pool's old connection
                    await client.publish("c", b"after the restart")
                await asyncio.sleep(0.1)

        await asyncio.wait_for(delivered_after_restart(), 15)
    finally:
        await subscription.stop()
        await client.aclose()


@pytest.mark.gen_test(timeout=60)
async def test_channels_subscribed_while_the_first_connection_opens_all_receive(
    settings: Settings,
) -> None:
    client = Redis.from_url(settings.redis_url)
    try:
        await racing_subscribes_all_receive(
            lambda on_message, on_reconnect: ResilientSubscription(
                client, on_message, on_reconnect, "t"
            ),
            client.publish,
        )
    finally:
        await client.aclose()
