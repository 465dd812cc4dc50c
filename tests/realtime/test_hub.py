"""The hub's fan-out contract, on subscribers that record what they are sent: each broadcast is
encoded once per codec and framed once per group, every member of a group gets the same bytes,
and whatever one connection is due within a loop iteration leaves in one write, in order.

(The hub does no I/O itself; the cable tests cover it on real sockets.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from realtime.cable_codec import CODECS, JSON_PROTOCOL, MSGPACK_PROTOCOL, CableCodec, StreamMessage
from realtime.hub import Hub
from realtime.wsframe import encode_frame

JSON = CODECS[JSON_PROTOCOL]
MSGPACK = CODECS[MSGPACK_PROTOCOL]


class Recorder:
    """A subscriber that keeps every write it is given."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.writes.append(data)


class CountingCodec:
    """Wraps a codec and counts `encode_body` calls (a codec's only per-message work)."""

    def __init__(self, codec: CableCodec) -> None:
        self.codec = codec
        self.encoded = 0

    def __enter__(self) -> CountingCodec:
        self._original = self.codec.encode_body

        def counted(message: Any) -> bytes:
            self.encoded += 1
            return self._original(message)

        self.codec.encode_body = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        del self.codec.encode_body


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = asyncio.new_event_loop()  # broadcast schedules its flush here; tests flush by hand
    yield Hub(loop)
    loop.close()


def at(payload: dict[str, Any], offset: int = 1) -> StreamMessage:
    """`payload` as a stream message at `offset` (the stream name plays no part here)."""
    return StreamMessage("s", payload, offset, "e")


def frame(codec: CableCodec, identifier: str, message: dict[str, Any], offset: int = 1) -> bytes:
    stamped = {**message, "offset": offset, "epoch": "e"}
    return encode_frame(
        codec.opcode, codec.broadcast_prefix(identifier) + codec.encode_body(stamped)
    )


def test_a_broadcast_is_encoded_once_per_codec_and_framed_once_per_group(hub: Hub) -> None:
    json_members = [Recorder() for _ in range(3)]
    msgpack_members = [Recorder() for _ in range(2)]
    for member in json_members:
        hub.add("s", "id", JSON, member)
    for member in msgpack_members:
        hub.add("s", "id", MSGPACK, member)
    with CountingCodec(JSON) as json_count, CountingCodec(MSGPACK) as msgpack_count:
        hub.broadcast("s", at({"stock": 3}))
        hub.flush()
    assert (json_count.encoded, msgpack_count.encoded) == (1, 1)
    assert [m.writes for m in json_members] == [[frame(JSON, "id", {"stock": 3})]] * 3
    assert len({id(m.writes[0]) for m in json_members}) == 1  # the very same bytes object
    (written,) = {m.writes[0] for m in msgpack_members}
    assert msgpack.unpackb(written[2:]) == {
        "identifier": "id",
        "message": {"stock": 3, "offset": 1, "epoch": "e"},
    }
    assert hub.delivered == 5


def test_a_burst_on_one_stream_leaves_as_one_write_per_member_in_order(hub: Hub) -> None:
    members = [Recorder() for _ in range(2)]
    for member in members:
        hub.add("s", "id", JSON, member)
    for n in range(5):
        hub.broadcast("s", at({"n": n}))
    hub.flush()
    expected = b"".join(frame(JSON, "id", {"n": n}) for n in range(5))
    assert [m.writes for m in members] == [[expected], [expected]]


def test_a_connection_on_several_streams_gets_one_write_per_iteration(hub: Hub) -> None:
    shopper, other = Recorder(), Recorder()
    for stream in ("inventory:1", "inventory:2", "cart:7"):
        hub.add(stream, f"id-{stream}", JSON, shopper)
    hub.add("inventory:2", "id-inventory:2", JSON, other)
    hub.broadcast("inventory:1", at({"stock": 1}))
    hub.broadcast("inventory:2", at({"stock": 2}))
    hub.broadcast("cart:7", at({"items": 0}))
    hub.broadcast("inventory:2", at({"stock": 3}))
    hub.flush()
    assert shopper.writes == [
        frame(JSON, "id-inventory:1", {"stock": 1})
        + frame(JSON, "id-inventory:2", {"stock": 2})
        + frame(JSON, "id-inventory:2", {"stock": 3})
        + frame(JSON, "id-cart:7", {"items": 0})
    ]
    assert other.writes == [
        frame(JSON, "id-inventory:2", {"stock": 2}) + frame(JSON, "id-inventory:2", {"stock": 3})
    ]
    assert hub.delivered == 6


def test_each_message_reports_its_fanout_latency(hub: Hub) -> None:
    latencies: list[float] = []
    hub.observe_fanout = latencies.append
    hub.add("a", "id", JSON, Recorder())
    hub.add("b", "id", JSON, Recorder())
    hub.broadcast("a", at({"n": 1}))
    hub.broadcast("a", at({"n": 2}))
    hub.broadcast("b", at({"n": 3}))
    hub.broadcast("nobody-listens", at({"n": 4}))
    hub.flush()
    assert len(latencies) == 3 and all(0 <= latency < 1 for latency in latencies)
