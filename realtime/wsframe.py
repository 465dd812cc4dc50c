"""RFC 6455 WebSocket framing for the server side of a connection, written by hand.

The realtime gateway keeps one lean ``asyncio.Protocol`` per connection with a budget of
about 1.5 KiB per idle connection. The per-connection objects of wsproto or websockets do
not fit that budget, so framing lives here: a stateless encoder (the server never masks)
and a :class:`FrameDecoder` with four slots whose buffers exist only while a frame or a
fragmented message is actually in flight.

What the decoder enforces, and the close code the connection should be closed with
(:attr:`ProtocolError.close_code`):

* 1002: unmasked client frame, RSV bits set (no extension is ever negotiated), unknown
  opcode, control frame over 125 bytes or fragmented, continuation without a message to
  continue, new data frame inside a fragmented message, 64-bit length with its top bit
  set, close frame with a 1-byte payload or an invalid close code.
* 1007: a complete TEXT message, or a close reason, that is not valid UTF-8.
* 1009: a message over ``max_message_bytes``, refused as soon as the frame header
  declaring it arrives, before any of its payload is buffered.

Unmasking uses Tornado's C speedup (``tornado.speedups.websocket_mask``) and falls back
to Tornado's pure-Python version when the extension is not built.
"""

from __future__ import annotations

import struct

try:
    from tornado.speedups import websocket_mask as _websocket_mask
except ImportError:  # pragma: no cover - only without Tornado's C extension
    from tornado.util import _websocket_mask_python as _websocket_mask

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_PROTOCOL_ERROR",
    "MAX_CONTROL_PAYLOAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameDecoder",
    "ProtocolError",
    "encode_close",
    "encode_frame",
    "is_valid_close_code",
    "parse_close",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

CLOSE_PROTOCOL_ERROR = 1002
"""Close code for a framing violation."""
CLOSE_INVALID_DATA = 1007
"""Close code for a TEXT message (or close reason) that is not valid UTF-8."""
CLOSE_MESSAGE_TOO_BIG = 1009
"""Close code for a message over the decoder's ``max_message_bytes``."""

MAX_CONTROL_PAYLOAD = 125
"""Largest payload a control frame (CLOSE, PING, PONG) may carry (RFC 6455 section 5.5)."""

_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
# Two-byte headers of every unmasked FIN frame with a 7-bit length, indexed [opcode][length]:
# the common case of encode_frame becomes two indexings and one concatenation.
_SMALL_HEADERS: tuple[tuple[bytes, ...], ...] = tuple(
    tuple(bytes((0x80 | op, n)) for n in range(126)) for op in range(16)
)


class ProtocolError(Exception):
    """The peer broke RFC 6455: close the connection with :attr:`close_code`.

    ``str(error)`` is a short reason, fit to be sent in the close frame. The decoder that
    raised it is left in an unspecified state and must not be fed again; messages decoded
    earlier in the same :meth:`FrameDecoder.feed` call are dropped with it.
    """

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        """1002 (protocol error), 1007 (invalid UTF-8) or 1009 (message too big)."""


def is_valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame on the wire.

    Registered codes 1000-1003 and 1007-1014, plus 3000-4999 (libraries and applications).
    1004-1006 and 1015 are reserved or never sent; anything else is unassigned.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One complete server-to-client frame: FIN set, unmasked, shortest length encoding.

    Servers never mask (RFC 6455 section 5.1), so this is a header plus ``payload``.
    Raises ``ValueError`` for an unknown opcode or a control payload over 125 bytes.
    """
    n = len(payload)
    if opcode not in _OPCODES:
        raise ValueError(f"unknown opcode {opcode}")
    if n < 126:
        return _SMALL_HEADERS[opcode][n] + payload
    if opcode >= OP_CLOSE:
        raise ValueError(f"control frame payload of {n} bytes (max {MAX_CONTROL_PAYLOAD})")
    if n < 0x10000:
        return _HEADER_16(0x80 | opcode, 126, n) + payload
    return _HEADER_64(0x80 | opcode, 127, n) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason``.

    The reason is cut to the 123 bytes a control frame leaves for it, never inside a UTF-8
    sequence, so the peer does not fail the close with 1007. Raises ``ValueError`` for a code
    that may not be sent (see :func:`is_valid_close_code`).
    """
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8", "replace")
    if len(raw) > _MAX_CLOSE_REASON:
        # The cut can only split the last character; "ignore" drops exactly that tail.
        raw = raw[:_MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The ``(code, reason)`` of a close frame's payload; ``(None, "")`` when it is empty.

    Raises :class:`ProtocolError`: 1002 for a 1-byte or over-long payload or a code that
    may not be sent, 1007 for a reason that is not valid UTF-8.
    """
    n = len(payload)
    if n == 0:
        return None, ""
    if n == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    if n > MAX_CONTROL_PAYLOAD:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame payload over 125 bytes")
    code = (payload[0] << 8) | payload[1]
    if not is_valid_close_code(code):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None


class FrameDecoder:
    """Incremental decoder of the frames a client sends on one connection.

    Feed it whatever the transport delivers; it returns each complete message as
    ``(opcode, payload)`` with the payload unmasked. TEXT and BINARY messages come out once
    all their fragments are in (with the opcode of the first fragment); PING, PONG and CLOSE
    come out as they arrive, even between fragments. TEXT payloads are validated UTF-8 but
    left as ``bytes``; CLOSE payloads are validated (decode them with :func:`parse_close`).

    State is four slots. ``_buf`` holds the bytes of an incomplete frame and is ``None``
    otherwise: when a ``feed`` ends on a frame boundary nothing is kept, and data that
    starts on a boundary is parsed in place without being copied into a buffer.
    ``_frag``/``_frag_op`` hold an open fragmented message and are ``None``/0 otherwise.
    The decoder does not stop at a CLOSE frame: stop feeding it once one comes out.
    """

    __slots__ = ("_buf", "_frag", "_frag_op", "_max")

    def __init__(self, max_message_bytes: int) -> None:
        """Refuse (1009) any message whose payload, all fragments together, exceeds
        ``max_message_bytes``."""
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        self._max = max_message_bytes
        self._buf: bytearray | None = None
        self._frag: bytearray | None = None
        self._frag_op = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame and an open fragmented message.

        0 exactly when the decoder holds no state, so a connection may drop it and make a new
        one for its next data: an open message counts as at least 1, even while empty.
        """
        frag = self._frag
        held = 0 if frag is None else len(frag) or 1
        return held if self._buf is None else held + len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Decode ``data``, the next bytes from the client; return the messages it completes.

        Raises :class:`ProtocolError` as soon as the bytes seen so far break the protocol,
        including a frame header that declares a message too big, before its payload.
        """
        buf = self._buf
        if buf is None and type(data) is bytes and 6 <= len(data) <= 131 and self._frag is None:
            # Fast path for the common case, worth ~40% of a small decode: ``data`` is exactly
            # one whole masked FIN TEXT/BINARY frame with a 7-bit length, within the limit.
            # Anything else (including every error) takes the general path in _parse.
            b0 = data[0]
            n = data[1] - 0x80  # the declared length if the mask bit is set, else negative
            if (b0 == 0x81 or b0 == 0x82) and 0 <= n <= self._max and len(data) == n + 6:
                payload = _websocket_mask(data[2:6], data[6:])
                if b0 == 0x81:
                    _check_utf8(payload)
                return [(b0 & 0x0F, payload)]
        out: list[tuple[int, bytes]] = []
        if buf is None:
            if type(data) is not bytes:
                data = bytes(data)
            pos = self._parse(data, out)
            if pos < len(data):
                self._buf = bytearray(memoryview(data)[pos:])
        else:
            buf += data
            pos = self._parse(buf, out)
            if pos == len(buf):
                self._buf = None
            elif pos:
                del buf[:pos]
        return out

    def _parse(self, buf: bytes | bytearray, out: list[tuple[int, bytes]]) -> int:
        """Append the messages of the complete frames at the start of ``buf`` to ``out``;
        return how many bytes they took."""
        pos = 0
        end = len(buf)
        in_place = type(buf) is bytes
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "RSV bits set, no extension in use")
            if not b1 & 0x80:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frame is not masked")
            op = b0 & 0x0F
            fin = b0 & 0x80
            n = b1 & 0x7F
            frag = self._frag
            if op >= OP_CLOSE:
                if op > OP_PONG:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                if not fin:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if n > MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
                key = pos + 2
            else:
                if op > OP_BINARY:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                if op == OP_CONT:
                    if frag is None:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a start")
                elif frag is not None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if n < 126:
                    key = pos + 2
                elif n == 126:
                    if end - pos < 4:
                        break
                    n = (buf[pos + 2] << 8) | buf[pos + 3]
                    key = pos + 4
                else:
                    if end - pos < 10:
                        break
                    n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    if n >> 63:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "64-bit length with top bit set")
                    key = pos + 10
                total = n if frag is None else n + len(frag)
                if total > self._max:
                    raise ProtocolError(
                        CLOSE_MESSAGE_TOO_BIG, f"message over {self._max} bytes ({total})"
                    )
            start = key + 4
            stop = start + n
            if stop > end:
                break
            if in_place:
                payload = _websocket_mask(buf[key:start], buf[start:stop])
            else:
                payload = _websocket_mask(bytes(buf[key:start]), bytes(buf[start:stop]))
            pos = stop
            if op >= OP_CLOSE:
                if op == OP_CLOSE:
                    parse_close(payload)
                out.append((op, payload))
            elif frag is not None:
                frag += payload
                if fin:
                    op = self._frag_op
                    payload = bytes(frag)
                    self._frag = None
                    self._frag_op = 0
                    if op == OP_TEXT:
                        _check_utf8(payload)
                    out.append((op, payload))
            elif fin:
                if op == OP_TEXT:
                    _check_utf8(payload)
                out.append((op, payload))
            else:
                self._frag = bytearray(payload)
                self._frag_op = op
        return pos
