"""The load tools' channels (`FM_BENCHMARK_CHANNEL=1`): `BenchmarkChannel` keeps no history,
`BenchmarkHistoryChannel` does, so an extended client that was away gets the broadcasts it
missed replayed (what the reconnect-storm benchmark measures at scale)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis

from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.cable import CableClient, identifier
from tests.helpers.deployment import make_settings

pytestmark = pytest.mark.usefixtures("clean_data")


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return make_settings(infra_env, benchmark_channel=True)


async def _broadcast(client: CableClient, ident: str, k: int) -> None:
    data = json.dumps({"action": "broadcast", "payload": {"k": k}})
    await client.send({"command": "message", "identifier": ident, "data": data})


async def _next_broadcast(client: CableClient) -> dict[str, Any]:
    while True:
        frame = await client.read(10.0)
        assert frame is not None
        if frame.get("message", {}).get("action") == "broadcast":
            return frame  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("channel", "replayed"), [("BenchmarkHistoryChannel", [1, 2]), ("BenchmarkChannel", [])]
)
@pytest.mark.gen_test(timeout=30)
async def test_broadcasts_missed_are_replayed_only_on_the_history_channel(
    http_server: Any, services: Services, base_url: str, channel: str, replayed: list[int]
) -> None:
    url = base_url.replace("http://", "ws://") + "/cable"
    ident = identifier(channel)
    sender, _ = await CableClient.connect_ext(url)
    await sender.send({"command": "subscribe", "identifier": ident})
    assert await sender.read() == {"identifier": ident, "type": "confirm_subscription"}
    await _broadcast(sender, ident, 0)
    seen = await _next_broadcast(sender)
    position = {seen["stream_id"]: {"epoch": seen["epoch"], "offset": seen["offset"]}}
    for k in (1, 2):
        await _broadcast(sender, ident, k)
        await _next_broadcast(sender)
    back, _ = await CableClient.connect_ext(url)
    history = {"since": int(time.time()) - 60, "streams": position}
    await back.send({"command": "subscribe", "identifier": ident, "history": history})
    assert await back.read() == {"identifier": ident, "type": "confirm_subscription"}
    frames = [await back.read() for _ in range(len(replayed) + 1)]
    assert [f["message"]["payload"]["k"] for f in frames[:-1] if f] == replayed
    expected = "confirm_history" if replayed else "reject_history"
    assert frames[-1] == {"type": expected, "identifier": ident}
    sender.close()
    back.close()


@pytest.mark.gen_test(timeout=60)
async def test_clients_that_missed_the_same_messages_cost_one_history_read(
    http_server: Any, services: Services, base_url: str, infra_env: dict[str, str]
) -> None:
    """Twenty clients coming back at once from the same position are replayed the same run
    of history, read from Redis once (a reconnect storm's cost grows with its clients' sockets,
    not with their history reads), each getting it whole and once."""
    url = base_url.replace("http://", "ws://") + "/cable"
    ident = identifier("BenchmarkHistoryChannel")
    sender, _ = await CableClient.connect_ext(url)
    await sender.send({"command": "subscribe", "identifier": ident})
    assert await sender.read() == {"identifier": ident, "type": "confirm_subscription"}
    await _broadcast(sender, ident, 0)
    seen = await _next_broadcast(sender)
    position = {seen["stream_id"]: {"epoch": seen["epoch"], "offset": seen["offset"]}}
    for k in (1, 2, 3):
        await _broadcast(sender, ident, k)
        await _next_broadcast(sender)
    counter = redis.Redis.from_url(infra_env["FM_REDIS_URL"])
    xranges_before = _calls(counter, "xrange")
    back = [(await CableClient.connect_ext(url))[0] for _ in range(20)]
    history = {"since": int(time.time()) - 60, "streams": position}
    await asyncio.gather(
        *(c.send({"command": "subscribe", "identifier": ident, "history": history}) for c in back)
    )
    for client in back:
        frames = [await client.read() for _ in range(5)]
        assert frames[0] == {"identifier": ident, "type": "confirm_subscription"}
        assert [f["message"]["payload"]["k"] for f in frames[1:4] if f] == [1, 2, 3]
        assert frames[4] == {"type": "confirm_history", "identifier": ident}
        client.close()
    assert _calls(counter, "xrange") - xranges_before == 1
    counter.close()
    sender.close()


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
