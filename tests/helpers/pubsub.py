"""A check both kinds of pub/sub subscription (plain and sharded) are held to."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from server.adapters.pubsub import OnMessage, OnReconnect, Subscription

MakeSubscription = Callable[[OnMessage, OnReconnect], Subscription]


async def racing_subscribes_all_receive(
    make: MakeSubscription, publish: Callable[[str, bytes], Awaitable[Any]]
) -> None:
    """Channels subscribed at once, at every point of the first connect, all hear their
    messages. (redis-py opens a second connection when two subscribes race a fresh pub/sub
    and forgets the first: a channel subscribed on it would never hear a thing.)"""

    async def no_gap_check() -> None:
        return None

    for yields in [*range(12), None]:  # None: the first subscribe is done before the others
        received: set[str] = set()
        subscription = make(_recorder(received), no_gap_check)
        subscription.start()
        channels = [f"test:race:{yields}:{n}" for n in range(6)]
        try:
            first = asyncio.ensure_future(subscription.subscribe(channels[0]))
            if yields is None:
                await first
            for _ in range(yields or 0):
                await asyncio.sleep(0)
            await asyncio.gather(first, *(subscription.subscribe(c) for c in channels[1:]))
            deadline = asyncio.get_running_loop().time() + 5
            while received != set(channels):
                assert asyncio.get_running_loop().time() < deadline, (
                    f"{yields} yields (None: first done), heard {sorted(received)} of {channels}"
                )
                for channel in set(channels) - received:
                    await publish(channel, b"x")
                await asyncio.sleep(0.05)
        finally:
            await subscription.stop()


def _recorder(received: set[str]) -> OnMessage:
    return lambda channel, _data: received.add(channel)
