"""Tests for ``realtime.wsframe`` on real wire bytes.

Client frames are built here with an independent pure-Python encoder and XOR masker (not the
code under test), then fed to :class:`FrameDecoder` whole, byte by byte, split at every
boundary and in random chunks.
"""

from __future__ import annotations

import random
import struct
import sys

import pytest

from realtime import wsframe
from realtime.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameDecoder,
    ProtocolError,
    encode_close,
    encode_frame,
    parse_close,
)
from tests.helpers.wsframes import ASCII, MASK, client_frame, xor_mask

MiB = 1 << 20


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def assert_protocol_error(data: bytes, code: int, *, max_bytes: int = MiB) -> ProtocolError:
    """Feeding ``data`` whole, and byte by byte to a fresh decoder, raises ``code``."""
    with pytest.raises(ProtocolError) as whole:
        FrameDecoder(max_bytes).feed(data)
    assert whole.value.close_code == code
    assert str(whole.value)
    assert len(str(whole.value).encode()) <= 123  # fits in a close frame as is
    with pytest.raises(ProtocolError) as split:
        feed_all(FrameDecoder(max_bytes), bytewise(data))
    assert split.value.close_code == code
    return whole.value


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_round_trip_length_classes(opcode: int, n: int) -> None:
    payload = random.Random(n).randbytes(n).translate(ASCII)  # valid UTF-8 for TEXT
    frame = client_frame(opcode, payload)
    assert FrameDecoder(MiB).feed(frame) == [(opcode, payload)]


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_round_trip_byte_by_byte(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    frame = client_frame(OP_BINARY, payload)
    decoder = FrameDecoder(MiB)
    out = feed_all(decoder, bytewise(frame))
    assert out == [(OP_BINARY, payload)]
    assert decoder.buffered == 0


def test_unicode_text_round_trip() -> None:
    text = "Prix: 12,50 € — 北京 🛒".encode()
    assert FrameDecoder(MiB).feed(client_frame(OP_TEXT, text)) == [(OP_TEXT, text)]


def test_control_frames_round_trip() -> None:
    wire = (
        client_frame(OP_PING, b"p" * 125)
        + client_frame(OP_PONG, b"")
        + client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    assert FrameDecoder(MiB).feed(wire) == [
        (OP_PING, b"p" * 125),
        (OP_PONG, b""),
        (OP_CLOSE, b"\x03\xe8bye"),
    ]


def test_every_mask_key_value() -> None:
    payload = bytes(range(256))
    for key in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x80\x7f\xfe"):
        frame = client_frame(OP_BINARY, payload, mask=key)
        assert FrameDecoder(MiB).feed(frame) == [(OP_BINARY, payload)]


def test_uses_tornado_c_speedup() -> None:
    # Tornado's Linux wheels ship the C extension; unmasking in Python would be ~50x slower.
    import tornado.speedups as speedups

    assert wsframe._websocket_mask is speedups.websocket_mask


# --- splitting and batching -------------------------------------------------------------

MIXED_WIRE = (
    client_frame(OP_TEXT, b"hello")
    + client_frame(OP_BINARY, bytes(300))
    + client_frame(OP_TEXT, b"caf", fin=False)
    + client_frame(OP_PING, b"are you there")
    + client_frame(OP_CONT, "é au lait".encode(), fin=False)
    + client_frame(OP_PONG, b"")
    + client_frame(OP_CONT, b"!", fin=True)
    + client_frame(OP_BINARY, bytes(70000))
    + client_frame(OP_CLOSE, struct.pack("!H", 1001) + "à+".encode())
)
MIXED_MESSAGES = [
    (OP_TEXT, b"hello"),
    (OP_BINARY, bytes(300)),
    (OP_PING, b"are you there"),
    (OP_PONG, b""),
    (OP_TEXT, "café au lait!".encode()),
    (OP_BINARY, bytes(70000)),
    (OP_CLOSE, struct.pack("!H", 1001) + "à+".encode()),
]


def test_several_frames_in_one_feed() -> None:
    decoder = FrameDecoder(MiB)
    assert decoder.feed(MIXED_WIRE) == MIXED_MESSAGES
    assert decoder.buffered == 0


def test_one_byte_at_a_time_gives_the_same_messages() -> None:
    decoder = FrameDecoder(MiB)
    assert feed_all(decoder, bytewise(MIXED_WIRE)) == MIXED_MESSAGES
    assert decoder.buffered == 0


def test_split_at_every_byte_boundary() -> None:
    # Everything but the 70000-byte frame, to keep the quadratic loop fast.
    wire = MIXED_WIRE.replace(client_frame(OP_BINARY, bytes(70000)), b"")
    expected = [m for m in MIXED_MESSAGES if m != (OP_BINARY, bytes(70000))]
    for i in range(len(wire) + 1):
        decoder = FrameDecoder(MiB)
        assert feed_all(decoder, [wire[:i], wire[i:]]) == expected, f"split at {i}"
        assert decoder.buffered == 0


def test_empty_feed_returns_nothing() -> None:
    decoder = FrameDecoder(MiB)
    assert decoder.feed(b"") == []
    frame = client_frame(OP_TEXT, b"hi")
    assert decoder.feed(frame[:3]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(frame[3:]) == [(OP_TEXT, b"hi")]


def test_accepts_bytearray_and_memoryview() -> None:
    frame = client_frame(OP_TEXT, b"hi")
    assert FrameDecoder(MiB).feed(bytearray(frame)) == [(OP_TEXT, b"hi")]
    assert FrameDecoder(MiB).feed(memoryview(frame)) == [(OP_TEXT, b"hi")]


# --- fragmentation ----------------------------------------------------------------------


def test_fragmented_text_with_ping_in_between() -> None:
    wire = (
        client_frame(OP_TEXT, b"Hel", fin=False)
        + client_frame(OP_PING, b"ping!")
        + client_frame(OP_CONT, b"lo", fin=False)
        + client_frame(OP_CONT, b"", fin=False)
        + client_frame(OP_CONT, b", world")
    )
    decoder = FrameDecoder(MiB)
    assert decoder.feed(wire) == [(OP_PING, b"ping!"), (OP_TEXT, b"Hello, world")]
    assert decoder.buffered == 0


def test_ping_comes_out_before_the_message_completes() -> None:
    decoder = FrameDecoder(MiB)
    assert decoder.feed(client_frame(OP_BINARY, b"\x00\x01", fin=False)) == []
    assert decoder.buffered == 2  # the open fragment, nothing else
    assert decoder.feed(client_frame(OP_PING, b"x")) == [(OP_PING, b"x")]
    assert decoder.feed(client_frame(OP_CONT, b"\x02")) == [(OP_BINARY, b"\x00\x01\x02")]
    assert decoder.buffered == 0


def test_empty_first_fragment_still_counts_as_state() -> None:
    """A connection drops its decoder when ``buffered`` is 0: an open message, even one with
    no payload yet, must keep it."""
    decoder = FrameDecoder(MiB)
    assert decoder.feed(client_frame(OP_TEXT, b"", fin=False)) == []
    assert decoder.buffered == 1
    assert decoder.feed(client_frame(OP_CONT, b"", fin=False)) == []
    assert decoder.buffered == 1
    assert decoder.feed(client_frame(OP_CONT, b"abc")) == [(OP_TEXT, b"abc")]
    assert decoder.buffered == 0


def test_message_after_fragmented_one() -> None:
    wire = (
        client_frame(OP_BINARY, b"a", fin=False)
        + client_frame(OP_CONT, b"b")
        + client_frame(OP_TEXT, b"c", fin=False)
        + client_frame(OP_CONT, b"d")
        + client_frame(OP_TEXT, b"e")
    )
    assert FrameDecoder(MiB).feed(wire) == [(OP_BINARY, b"ab"), (OP_TEXT, b"cd"), (OP_TEXT, b"e")]


def test_utf8_sequence_split_across_fragments_is_valid() -> None:
    euro = "€".encode()  # e2 82 ac
    wire = (
        client_frame(OP_TEXT, euro[:1], fin=False)
        + client_frame(OP_CONT, euro[1:2], fin=False)
        + client_frame(OP_CONT, euro[2:])
    )
    assert FrameDecoder(MiB).feed(wire) == [(OP_TEXT, euro)]


@pytest.mark.parametrize(
    "fragments",
    [
        [b"\xc3", b"("],  # lead byte, then a byte that is not a continuation
        [b"ok \xe2\x82", b""],  # message ends inside a sequence
        [b"\xed\xa0", b"\x80"],  # surrogate U+D800, split
        [b"\xf4", b"\x90\x80\x80"],  # above U+10FFFF, split
    ],
)
def test_invalid_utf8_split_across_fragments(fragments: list[bytes]) -> None:
    decoder = FrameDecoder(MiB)
    assert decoder.feed(client_frame(OP_TEXT, fragments[0], fin=False)) == []
    with pytest.raises(ProtocolError) as err:
        decoder.feed(client_frame(OP_CONT, fragments[1]))
    assert err.value.close_code == 1007


def test_binary_message_is_not_utf8_checked() -> None:
    wire = client_frame(OP_BINARY, b"\xff", fin=False) + client_frame(OP_CONT, b"\xfe")
    assert FrameDecoder(MiB).feed(wire) == [(OP_BINARY, b"\xff\xfe")]


# --- protocol errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(client_frame(OP_TEXT, b"hi", mask=None), 1002, id="unmasked"),
        pytest.param(client_frame(OP_TEXT, b"hi", rsv=4), 1002, id="rsv1"),
        pytest.param(client_frame(OP_TEXT, b"hi", rsv=2), 1002, id="rsv2"),
        pytest.param(client_frame(OP_TEXT, b"hi", rsv=1), 1002, id="rsv3"),
        *(
            pytest.param(client_frame(op, b""), 1002, id=f"opcode-{op}")
            for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
        ),
        pytest.param(client_frame(OP_PING, bytes(126)), 1002, id="ping-126"),
        pytest.param(client_frame(OP_CLOSE, bytes(126)), 1002, id="close-126"),
        pytest.param(client_frame(OP_PING, b"x", fin=False), 1002, id="fragmented-ping"),
        pytest.param(client_frame(OP_CONT, b"x"), 1002, id="continuation-without-start"),
        pytest.param(
            client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"),
            1002,
            id="text-inside-fragmented",
        ),
        pytest.param(
            client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_BINARY, b"b", fin=False),
            1002,
            id="binary-inside-fragmented",
        ),
        pytest.param(
            client_frame(OP_TEXT, b"a") + client_frame(OP_CONT, b"b"),
            1002,
            id="continuation-after-complete-message",
        ),
        pytest.param(
            struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + MASK, 1002, id="64-bit-length-top-bit"
        ),
        pytest.param(client_frame(OP_CLOSE, b"\x03"), 1002, id="close-1-byte"),
        pytest.param(client_frame(OP_TEXT, b"\xff"), 1007, id="text-invalid-utf8"),
        pytest.param(client_frame(OP_TEXT, b"\xed\xa0\x80"), 1007, id="text-surrogate"),
        pytest.param(
            client_frame(OP_CLOSE, b"\x03\xe8\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed"),
            1007,
            id="close-reason-invalid-utf8",
        ),
        pytest.param(client_frame(OP_BINARY, bytes(101)), 1009, id="frame-too-big"),
        pytest.param(
            client_frame(OP_TEXT, bytes(60), fin=False) + client_frame(OP_CONT, bytes(41)),
            1009,
            id="fragments-too-big",
        ),
    ],
)
def test_protocol_errors(wire: bytes, code: int) -> None:
    assert_protocol_error(wire, code, max_bytes=100)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000])
def test_invalid_close_codes(code: int) -> None:
    assert_protocol_error(client_frame(OP_CLOSE, struct.pack("!H", code)), 1002)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1013, 3000, 4999])
def test_valid_close_codes(code: int) -> None:
    payload = struct.pack("!H", code) + b"reason"
    assert FrameDecoder(MiB).feed(client_frame(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


def test_errors_detected_from_the_first_two_bytes() -> None:
    for wire in (
        client_frame(OP_TEXT, b"hi", mask=None),
        client_frame(OP_TEXT, b"hi", rsv=4),
        client_frame(5, b"hi"),
        client_frame(OP_PING, bytes(200)),
        client_frame(OP_CONT, b"hi"),
    ):
        decoder = FrameDecoder(MiB)
        assert decoder.feed(wire[:1]) == []
        with pytest.raises(ProtocolError) as err:
            decoder.feed(wire[1:2])
        assert err.value.close_code == 1002


def test_oversized_declared_length_refused_before_payload() -> None:
    header = struct.pack("!BBQ", 0x82, 0xFF, 4 * MiB)  # 10 bytes: no mask key, no payload
    with pytest.raises(ProtocolError) as err:
        FrameDecoder(MiB).feed(header)
    assert err.value.close_code == 1009
    # Byte by byte: it is refused the moment the length is complete.
    decoder = FrameDecoder(MiB)
    for byte in bytewise(header[:-1]):
        assert decoder.feed(byte) == []
    with pytest.raises(ProtocolError) as err:
        decoder.feed(header[-1:])
    assert err.value.close_code == 1009


def test_oversized_16_bit_length_refused_before_payload() -> None:
    with pytest.raises(ProtocolError) as err:
        FrameDecoder(1000).feed(struct.pack("!BBH", 0x81, 0xFE, 1001))
    assert err.value.close_code == 1009


def test_oversized_continuation_refused_before_payload() -> None:
    decoder = FrameDecoder(1000)
    assert decoder.feed(client_frame(OP_BINARY, bytes(600), fin=False)) == []
    with pytest.raises(ProtocolError) as err:
        decoder.feed(struct.pack("!BBH", 0x80, 0xFE, 401))
    assert err.value.close_code == 1009


def test_message_of_exactly_max_bytes_is_accepted() -> None:
    wire = client_frame(OP_BINARY, bytes(600), fin=False) + client_frame(OP_CONT, bytes(400))
    assert FrameDecoder(1000).feed(wire) == [(OP_BINARY, bytes(1000))]
    assert FrameDecoder(0).feed(client_frame(OP_TEXT)) == [(OP_TEXT, b"")]


def test_control_frames_are_not_limited_by_max_message_bytes() -> None:
    assert FrameDecoder(0).feed(client_frame(OP_PING, bytes(125))) == [(OP_PING, bytes(125))]


def test_negative_max_message_bytes_rejected() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(-1)


# --- memory -----------------------------------------------------------------------------


def test_decoder_is_small_and_slotted() -> None:
    decoder = FrameDecoder(MiB)
    assert not hasattr(decoder, "__dict__")
    assert sys.getsizeof(decoder) <= 80
    assert decoder.buffered == 0


def test_buffer_only_while_a_frame_is_incomplete() -> None:
    decoder = FrameDecoder(MiB)
    frame = client_frame(OP_TEXT, b"x" * 100)
    assert decoder.feed(frame) == [(OP_TEXT, b"x" * 100)]
    assert decoder._buf is None  # complete frame parsed in place: no buffer ever made
    assert decoder.feed(frame + frame[:10]) == [(OP_TEXT, b"x" * 100)]
    assert decoder.buffered == 10  # only the remainder is kept
    assert decoder.feed(frame[10:]) == [(OP_TEXT, b"x" * 100)]
    assert decoder._buf is None  # released when drained
    assert decoder._frag is None


# --- encoder ----------------------------------------------------------------------------


def test_encode_frame_7_bit_length() -> None:
    assert encode_frame(OP_TEXT, b"hello") == b"\x81\x05hello"
    assert encode_frame(OP_PONG, b"") == b"\x8a\x00"
    assert encode_frame(OP_BINARY, bytes(125))[:2] == b"\x82\x7d"


def test_encode_frame_16_bit_length() -> None:
    assert encode_frame(OP_BINARY, bytes(126))[:4] == b"\x82\x7e\x00\x7e"
    frame = encode_frame(OP_TEXT, b"a" * 65535)
    assert frame[:4] == b"\x81\x7e\xff\xff"
    assert frame[4:] == b"a" * 65535


def test_encode_frame_64_bit_length() -> None:
    frame = encode_frame(OP_BINARY, bytes(65536))
    assert frame[:10] == b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"
    assert len(frame) == 10 + 65536


def test_encode_frame_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_frame(OP_PING, bytes(126))
    with pytest.raises(ValueError):
        encode_frame(3, b"")


def test_encode_close() -> None:
    assert encode_close(1000) == b"\x88\x02\x03\xe8"
    assert encode_close(1001, "going away") == b"\x88\x0c\x03\xe9going away"
    with pytest.raises(ValueError):
        encode_close(1005)


@pytest.mark.parametrize("char", ["a", "é", "€", "🛒"])
@pytest.mark.parametrize("prefix", ["", "x", "xy"])
def test_encode_close_truncation_keeps_valid_utf8(prefix: str, char: str) -> None:
    reason = prefix + char * 200
    frame = encode_close(1011, reason)
    assert frame[0] == 0x88
    assert frame[1] == len(frame) - 2 <= 125
    code, parsed = parse_close(frame[2:])  # raises 1007 if the cut split a character
    assert code == 1011
    assert reason.startswith(parsed)
    assert 123 - len(char.encode()) < len(parsed.encode()) <= 123


def test_parse_close() -> None:
    assert parse_close(b"") == (None, "")
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(b"\x0f\xa0" + "sold out €".encode()) == (4000, "sold out €")
    for payload, code in [(b"\x03", 1002), (b"\x03\xed", 1002), (b"\x03\xe8\xff", 1007)]:
        with pytest.raises(ProtocolError) as err:
            parse_close(payload)
        assert err.value.close_code == code


def test_encoded_close_decodes_in_a_client_frame() -> None:
    payload = encode_close(4001, "cart expired")[2:]
    wire = client_frame(OP_CLOSE, payload)
    [(op, got)] = FrameDecoder(MiB).feed(wire)
    assert (op, parse_close(got)) == (OP_CLOSE, (4001, "cart expired"))


# --- randomised -------------------------------------------------------------------------


def random_conversation(rng: random.Random) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Wire bytes for a random run of messages (some fragmented, pings and pongs mixed in),
    and the messages a decoder must return for them."""
    wire: list[bytes] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(rng.randrange(1, 12)):
        size = rng.choice([0, 1, rng.randrange(126), 125, 126, rng.randrange(126, 2000), 65536])
        mask = rng.randbytes(4)
        if rng.random() < 0.5:
            opcode = OP_TEXT
            alphabet = "aZ9 é€🛒\n"
            payload = "".join(rng.choice(alphabet) for _ in range(size // 2)).encode()
        else:
            opcode = OP_BINARY
            payload = rng.randbytes(size)
        cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(rng.randrange(4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            wire.append(client_frame(OP_CONT if i else opcode, piece, fin=last, mask=mask))
            if last:
                expected.append((opcode, payload))
            if rng.random() < 0.3:  # a control frame, between fragments or after the message
                control = (rng.choice([OP_PING, OP_PONG]), rng.randbytes(rng.randrange(126)))
                wire.append(client_frame(*control, mask=rng.randbytes(4)))
                expected.append(control)
    return b"".join(wire), expected


def random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 2, rng.randrange(1, 16), rng.randrange(1, 4096), len(data)])
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


@pytest.mark.parametrize("seed", range(40))
def test_random_messages_and_chunkings(seed: int) -> None:
    rng = random.Random(seed)
    wire, expected = random_conversation(rng)
    whole = FrameDecoder(MiB)
    assert whole.feed(wire) == expected
    for _ in range(3):
        decoder = FrameDecoder(MiB)
        assert feed_all(decoder, random_chunks(rng, wire)) == expected
        assert decoder.buffered == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_encode_frame_headers(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        opcode = rng.choice([OP_TEXT, OP_BINARY])
        n = rng.choice(
            [rng.randrange(126), rng.randrange(126, 1 << 16), (1 << 16) + rng.randrange(9)]
        )
        payload = rng.randbytes(n)
        frame = encode_frame(opcode, payload)
        assert frame[0] == 0x80 | opcode
        assert not frame[1] & 0x80  # servers never mask
        if n < 126:
            header_len, declared = 2, frame[1]
        elif n < 0x10000:
            header_len, declared = 4, frame[1] == 126 and int.from_bytes(frame[2:4], "big")
        else:
            header_len, declared = 10, frame[1] == 127 and int.from_bytes(frame[2:10], "big")
        assert declared == n
        assert len(frame) == header_len + n
        assert frame[header_len:] == payload


def outcome(decoder: FrameDecoder, data: bytes | bytearray) -> object:
    """What ``feed`` does with ``data``: the messages, or the close code it raises."""
    try:
        return decoder.feed(data)
    except ProtocolError as err:
        return err.close_code


@pytest.mark.parametrize("seed", range(10))
def test_fast_path_agrees_with_general_path(seed: int) -> None:
    """``feed(bytes)`` of one small whole frame takes a fast path; ``feed(bytearray)`` never
    does. Both must agree on every frame, valid or not."""
    rng = random.Random(seed)
    for _ in range(300):
        b0 = rng.choice([0x81, 0x82, 0x01, 0x02, 0xC1, 0x89, rng.randrange(256)])
        n = rng.choice([0, 1, 5, rng.randrange(126), 125])
        payload = rng.randbytes(n) if rng.random() < 0.5 else rng.randbytes(n).translate(ASCII)
        mask = rng.randbytes(4)
        wire = bytes((b0, 0x80 | n)) + mask + xor_mask(mask, payload)
        unmasked = bytes((b0, n)) + payload
        wire = rng.choice([wire, wire, wire[:-1], wire + b"\x81", unmasked])
        max_bytes = rng.choice([0, 4, 100, 125, MiB])
        fast = outcome(FrameDecoder(max_bytes), wire)
        assert fast == outcome(FrameDecoder(max_bytes), bytearray(wire)), wire.hex()
