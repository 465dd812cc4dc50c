"""Live gap detection: node B follows a cart stream for an extended (`actioncable-v1-ext-json`)
and a plain (`actioncable-v1-json`) subscriber, and one pub/sub delivery is really lost on the
way to it (published by the broker's own script to a channel nobody follows, or with every
pub/sub connection killed in the same Redis transaction), or Redis loses the stream's data.

Invariant checked: each subscriber gets every offset of its stream at most once and in order;
the lost message arrives before the newer one (from history), or when history cannot supply
it a fresh state comes first, at the offset before the newer message, and after a data loss
under the new epoch, which the extended client reads beside the message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from realtime.broker import stream_keys
from server.wiring.services import Services
from tests.helpers.cable import (
    EXT_JSON,
    JSON,
    CableClient,
    ExtraNode,
    OwnRedis,
    identifier,
    publish_then_pause,
    publish_unheard,
)
from tests.helpers.commerce import make_user

pytestmark = pytest.mark.usefixtures("clean_data")

CART = identifier("CartChannel")


def change(n: int) -> dict[str, Any]:
    return {"event": "cart", "n": n}


class Subscribers:
    """One extended and one plain subscriber of the same cart on node B."""

    def __init__(self, ext: CableClient, plain: CableClient, stream: str) -> None:
        self.ext = ext
        self.plain = plain
        self.stream = stream

    async def read_both(self) -> list[tuple[Any, int, str]]:
        """The next stream message of each: (message, offset, epoch), extended first."""
        ext = await self.ext.read(10.0)
        assert ext is not None and ext["identifier"] == CART and ext["stream_id"] == self.stream
        plain = await self.plain.next_message(CART, 10.0)
        offset, epoch = plain.pop("offset"), plain.pop("epoch")
        assert (ext["message"], ext["offset"], ext["epoch"]) == (plain, offset, epoch)
        return [(ext["message"], ext["offset"], ext["epoch"])]

    def close(self) -> None:
        self.ext.close()
        self.plain.close()


async def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


class TestLostDelivery(OwnRedis):
    """Each test has a Valkey of its own: killing pub/sub connections disturbs nobody else."""

    async def _subscribers(self, services: Services, node_b: ExtraNode) -> Subscribers:
        user_id, token = await make_user(services, "ada@example.com")
        url = node_b.url(f"/cable?token={token}")
        ext, _welcome = await CableClient.connect_ext(url, EXT_JSON)
        await ext.send({"command": "subscribe", "identifier": CART})
        assert await ext.read() == {"identifier": CART, "type": "confirm_subscription"}
        plain = await CableClient.connect(url, JSON)
        await plain.subscribe(CART)
        subscribers = Subscribers(ext, plain, f"cart:user:{user_id}")
        (snapshot,) = await subscribers.read_both()
        assert snapshot[0]["event"] == "cart" and snapshot[0]["cart"]["items"] == []
        return subscribers

    @pytest.mark.gen_test(timeout=60)
    async def test_a_lost_message_is_filled_from_history_before_the_newer_one(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        subs = await self._subscribers(services, node_b)
        first, _epoch = await services.cable.publish(subs.stream, change(1))
        assert [m for m, _o, _e in await subs.read_both()] == [change(1)]
        lost = await publish_unheard(services.redis, subs.stream, change(2))
        newer, epoch = await services.cable.publish(subs.stream, change(3))
        assert (lost, newer) == (first + 1, first + 2)
        got = [*await subs.read_both(), *await subs.read_both()]
        assert got == [(change(2), lost, epoch), (change(3), newer, epoch)]
        cable = node_b.services.cable
        assert (cable.gaps_filled, cable.resyncs, cable.broker.reconnects) == (1, 0, 0)
        await services.cable.publish(subs.stream, change(4))
        assert await subs.read_both() == [(change(4), newer + 1, epoch)]
        subs.close()

    @pytest.mark.gen_test(timeout=60)
    async def test_a_lost_message_history_cannot_supply_is_replaced_by_a_fresh_state_first(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        subs = await self._subscribers(services, node_b)
        first, _epoch = await services.cable.publish(subs.stream, change(1))
        await subs.read_both()
        lost = await publish_unheard(services.redis, subs.stream, change(2), history=False)
        newer, epoch = await services.cable.publish(subs.stream, change(3))
        (fresh,) = await subs.read_both()
        assert fresh[0]["event"] == "cart" and fresh[0]["cart"]["items"] == []  # the database
        assert fresh[1:] == (lost, epoch)  # the state at the lost message's offset
        assert await subs.read_both() == [(change(3), newer, epoch)]
        cable = node_b.services.cable
        assert (cable.gaps_filled, cable.resyncs) == (0, 1)
        assert lost == first + 1
        subs.close()

    @pytest.mark.gen_test(timeout=60)
    async def test_a_gap_redis_cannot_fill_at_once_is_filled_when_it_answers_again(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        """Node B hears the newer message but its history read times out (every client of
        Redis paused, as while a master fails over): it tries again, and the lost message
        and the newer one arrive once Redis answers, with nothing else published."""
        subs = await self._subscribers(services, node_b)
        first, _epoch = await services.cable.publish(subs.stream, change(1))
        await subs.read_both()
        lost = await publish_unheard(services.redis, subs.stream, change(2))
        pause_ms = 4000  # past a command's timeout (1 s) and its retries
        started = time.monotonic()
        newer = await publish_then_pause(services.redis, subs.stream, change(3), pause_ms)
        got = [*await subs.read_both(), *await subs.read_both()]
        assert time.monotonic() - started >= pause_ms / 1000 - 0.5  # not before Redis answered
        epoch = got[0][2]
        assert got == [(change(2), lost, epoch), (change(3), newer, epoch)]
        assert lost == first + 1
        cable = node_b.services.cable
        assert (cable.gaps_filled, cable.resyncs) == (1, 0)
        subs.close()

    @pytest.mark.gen_test(timeout=60)
    async def test_a_message_published_while_the_pubsub_connection_is_killed_arrives_once(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        subs = await self._subscribers(services, node_b)
        first, _epoch = await services.cable.publish(subs.stream, change(1))
        await subs.read_both()
        lost = await publish_unheard(services.redis, subs.stream, change(2), kill_subscribers=True)
        newer, epoch = await services.cable.publish(subs.stream, change(3))
        got = [*await subs.read_both(), *await subs.read_both()]
        assert got == [(change(2), lost, epoch), (change(3), newer, epoch)]
        await _eventually(lambda: node_b.services.cable.broker.reconnects >= 1)
        assert node_b.services.cable.gaps_filled == 1  # by the reconnect's check or the gap
        await services.cable.publish(subs.stream, change(4))
        assert await subs.read_both() == [(change(4), newer + 1, epoch)]
        assert lost == first + 1
        subs.close()

    @pytest.mark.gen_test(timeout=60)
    async def test_after_redis_lost_the_stream_the_next_message_carries_the_new_epoch(
        self, services: Services, node_b: ExtraNode
    ) -> None:
        subs = await self._subscribers(services, node_b)
        _first, old_epoch = await services.cable.publish(subs.stream, change(1))
        await subs.read_both()
        # As after a failover to a replica that never had the stream: offset, history and
        # epoch are gone; the next publish starts a new epoch at offset 1.
        await services.redis.delete(*stream_keys(subs.stream)[:3])
        offset, epoch = await services.cable.publish(subs.stream, change(2))
        assert (offset, epoch != old_epoch) == (1, True)
        (fresh,) = await subs.read_both()
        assert fresh[0]["event"] == "cart" and fresh[1:] == (0, epoch)
        assert await subs.read_both() == [(change(2), 1, epoch)]
        subs.close()
