"""In-process stream watches (`CableServer.watch`): what GraphQL subscriptions ride on.

Invariant: a watch sees every message published to its stream on any node after it was
entered, once and in offset order; leaving the last watch of a stream releases the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from realtime.cable import WatchOverflow
from realtime.watch import StreamReset
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import ExtraNode, publish_unheard


@pytest.fixture
def node_b(io_loop: Any, settings: Settings) -> Iterator[ExtraNode]:
    node: ExtraNode = io_loop.run_sync(lambda: ExtraNode.start(settings))
    yield node
    io_loop.run_sync(node.stop)


@pytest.mark.gen_test(timeout=30)
async def test_watch_on_node_b_gets_messages_published_on_node_a_in_order(
    services: Services, node_b: ExtraNode, clean_data: None
) -> None:
    stream = "test:watch:order"
    async with node_b.services.cable.watch(stream) as events:
        for n in range(5):
            await services.cable.publish(stream, {"n": n})
        received = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(5)]
    assert [m["n"] for m in received] == [0, 1, 2, 3, 4]
    offsets = [m["offset"] for m in received]
    assert offsets == list(range(offsets[0], offsets[0] + 5))
    assert len({m["epoch"] for m in received}) == 1


@pytest.mark.gen_test(timeout=30)
async def test_leaving_the_last_watch_releases_the_stream(
    services: Services, clean_data: None
) -> None:
    cable = services.cable
    stream = "test:watch:release"
    async with cable.watch(stream), cable.watch(stream):
        assert cable.hub.subscriber_count(stream) == 2
    assert cable.hub.subscriber_count(stream) == 0
    assert stream not in cable.hub.streams()


@pytest.mark.gen_test(timeout=30)
async def test_watch_that_falls_behind_ends_with_overflow_and_others_go_on(
    services: Services, clean_data: None
) -> None:
    stream = "test:watch:overflow"
    cable = services.cable
    async with cable.watch(stream, max_pending=3) as slow, cable.watch(stream) as fast:
        for n in range(5):
            await cable.publish(stream, {"n": n})
        got = [await asyncio.wait_for(fast.__anext__(), 5) for _ in range(5)]
        assert [m["n"] for m in got] == [0, 1, 2, 3, 4]
        with pytest.raises(WatchOverflow):
            await asyncio.wait_for(slow.__anext__(), 5)


@pytest.mark.gen_test(timeout=30)
async def test_a_watch_is_told_of_messages_lost_for_good_before_the_next_one(
    services: Services, node_b: ExtraNode, clean_data: None
) -> None:
    """A message node B never heard that history cannot give back becomes a `StreamReset` at
    its offset, then the next message follows as usual."""
    stream = "test:watch:reset"
    async with node_b.services.cable.watch(stream) as events:
        first, epoch = await services.cable.publish(stream, {"n": 1})
        assert (await asyncio.wait_for(events.__anext__(), 5))["n"] == 1
        lost = await publish_unheard(services.redis, stream, {"n": 2}, history=False)
        newer, _ = await services.cable.publish(stream, {"n": 3})
        reset = await asyncio.wait_for(events.__anext__(), 5)
        assert reset == StreamReset(stream, epoch, lost)
        after = await asyncio.wait_for(events.__anext__(), 5)
        assert (after["n"], after["offset"], after["epoch"]) == (3, newer, epoch)
    assert (lost, newer) == (first + 1, first + 2)
