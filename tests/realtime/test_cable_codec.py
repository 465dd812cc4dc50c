"""Property tests of the cable codecs (`realtime/cable_codec.py`): for any identifier, payload,
stream, epoch and offset, the pre-built broadcast frame (per-identifier prefix + body encoded
once per codec, `realtime.hub.stream_frame`) decodes to exactly the message each dialect
promises; and any history request an extended client can send parses back to what it said.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.cable_codec import CODECS, StreamMessage
from realtime.hub import stream_frame
from realtime.wsframe import OP_BINARY, OP_TEXT
from tests.helpers.cable import EXT_JSON, EXT_MSGPACK, JSON, MSGPACK

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
payloads = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
identifiers = st.text(min_size=1, max_size=60)
streams = st.text(min_size=1, max_size=40)
epochs = st.text(min_size=1, max_size=16)
offsets = st.integers(0, 2**63 - 1)


def unframe(frame: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one unmasked, unfragmented server frame (RFC 6455 section 5.2)."""
    assert frame[0] & 0x80, "FIN set"
    opcode, length, at = frame[0] & 0x0F, frame[1] & 0x7F, 2
    assert not frame[1] & 0x80, "server frames are not masked"
    if length == 126:
        length, at = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, at = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == at + length
    return opcode, frame[at:]


def decoded(protocol: str, frame: bytes) -> Any:
    opcode, body = unframe(frame)
    if protocol in (JSON, EXT_JSON):
        assert opcode == OP_TEXT
        return json.loads(body)
    assert opcode == OP_BINARY
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def stamped(payload: Any, offset: int, epoch: str) -> dict[str, Any]:
    base = dict(payload) if isinstance(payload, dict) else {"data": payload}
    return {**base, "offset": offset, "epoch": epoch}


@PROPERTY_SETTINGS
@given(
    protocol=st.sampled_from([JSON, MSGPACK, EXT_JSON, EXT_MSGPACK]),
    ident=identifiers,
    payload=payloads,
    stream=streams,
    epoch=epochs,
    offset=offsets,
)
def test_a_broadcast_frame_carries_the_position_where_its_dialect_puts_it(
    protocol: str, ident: str, payload: Any, stream: str, epoch: str, offset: int
) -> None:
    codec = CODECS[protocol]
    message = decoded(
        protocol, stream_frame(codec, ident, StreamMessage(stream, payload, offset, epoch))
    )
    if codec.extended:  # AnyCable's: beside the message, in its Reply's field order
        assert list(message) == ["identifier", "message", "stream_id", "epoch", "offset"]
        assert message == {
            "identifier": ident,
            "message": payload,
            "stream_id": stream,
            "epoch": epoch,
            "offset": offset,
        }
    else:  # Final Market's plain dialects: inside the message, where received() sees it
        assert message == {"identifier": ident, "message": stamped(payload, offset, epoch)}


@PROPERTY_SETTINGS
@given(
    protocol=st.sampled_from([EXT_JSON, EXT_MSGPACK]),
    ident=identifiers,
    since=st.one_of(st.just(False), st.none(), st.integers(1, 2**40)),
    positions=st.dictionaries(streams, st.tuples(epochs, st.integers(0, 2**63 - 1)), max_size=5),
)
def test_a_history_request_parses_back_to_what_the_client_sent(
    protocol: str, ident: str, since: int | bool | None, positions: dict[str, tuple[str, int]]
) -> None:
    codec = CODECS[protocol]
    command = {
        "command": "history",
        "identifier": ident,
        "history": {
            "since": since,
            "streams": {s: {"epoch": e, "offset": o} for s, (e, o) in positions.items()},
        },
    }
    if protocol == EXT_JSON:
        parsed = codec.parse(OP_TEXT, json.dumps(command).encode())
    else:
        parsed = codec.parse(OP_BINARY, msgpack.packb(command))
    assert (parsed.command, parsed.identifier) == ("history", ident)
    assert parsed.history is not None
    assert parsed.history.since == (since or None)
    assert parsed.history.streams == positions
