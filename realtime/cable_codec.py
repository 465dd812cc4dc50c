"""Action Cable wire messages, encoded for the four subprotocols a connection may speak.

`actioncable-v1-json` carries JSON text frames; `actioncable-v1-msgpack` carries the same
messages as msgpack binary frames. `actioncable-v1-ext-json` and `actioncable-v1-ext-msgpack`
are AnyCable's extended protocol (docs/actioncable-protocol.md, section 6): the same frames plus
`stream_id`, `epoch` and `offset` at the top level of every stream message, `sid` in `welcome`,
and the `history`, `ping` and `pong` commands. A codec turns server messages into complete
WebSocket frames (so a broadcast is framed once per codec and the same bytes go to every
subscriber) and client frames into commands.

Broadcast frames are built from two parts: a per-subscription prefix holding the identifier
(echoed byte for byte as the client sent it) and the message body, encoded once per broadcast
and codec (for the extended codecs the body ends with the stream position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

from realtime.wsframe import OP_BINARY, OP_TEXT, encode_frame
from server.common import jsontext

JSON_PROTOCOL = "actioncable-v1-json"
MSGPACK_PROTOCOL = "actioncable-v1-msgpack"
EXT_JSON_PROTOCOL = "actioncable-v1-ext-json"
EXT_MSGPACK_PROTOCOL = "actioncable-v1-ext-msgpack"
UNSUPPORTED_PROTOCOL = "actioncable-unsupported"

_json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_msgpack_pack = msgpack.Packer(use_bin_type=True).pack


class CommandError(ValueError):
    """A client frame that is not a well-formed Action Cable command; `str()` says why."""


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """What an extended-protocol client asks to be replayed (`history` of `subscribe` and of the
    `history` command): per stream the last position it saw, `{stream_id: (epoch, offset)}`, and
    for streams it has no position of, `since` (Unix seconds; None when not given)."""

    since: int | None
    streams: dict[str, tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Command:
    """One client command: `subscribe`, `unsubscribe` or `message` (with `data`); on the
    extended protocol also `history`, `ping` and `pong` (these two without identifier)."""

    command: str
    identifier: str
    data: str | None = None
    history: HistoryRequest | None = None


_COMMANDS = frozenset({"subscribe", "unsubscribe", "message"})
_EXT_COMMANDS = _COMMANDS | {"history", "ping", "pong"}
_MAX_IDENTIFIER_CHARS = 1024
_MAX_HISTORY_STREAMS = 100
_MAX_STREAM_ID_CHARS = 256
_MAX_OFFSET = 2**63 - 1


def _history_from(value: Any) -> HistoryRequest | None:
    """Parse `history: {since, streams: {id: {epoch, offset}}}`; None when absent or null."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CommandError("history must be an object with since and streams")
    since = value.get("since")
    if since is False or since is None or since == 0:
        since = None
    elif isinstance(since, bool) or not isinstance(since, int | float) or since < 0:
        raise CommandError("history.since must be Unix seconds or false")
    raw_streams = value.get("streams")
    streams: dict[str, tuple[str, int]] = {}
    if raw_streams is not None:
        if not isinstance(raw_streams, dict) or len(raw_streams) > _MAX_HISTORY_STREAMS:
            raise CommandError(
                f"history.streams must be an object of at most {_MAX_HISTORY_STREAMS} streams"
            )
        for stream, position in raw_streams.items():
            if not isinstance(stream, str) or len(stream) > _MAX_STREAM_ID_CHARS:
                raise CommandError("history.streams keys must be stream ids")
            epoch = position.get("epoch") if isinstance(position, dict) else None
            offset = position.get("offset", 0) if isinstance(position, dict) else None
            if (
                not isinstance(epoch, str)
                or isinstance(offset, bool)
                or not isinstance(offset, int)
                or not 0 <= offset <= _MAX_OFFSET
            ):
                raise CommandError(
                    "history.streams entries must be {epoch: string, offset: integer >= 0}"
                )
            streams[stream] = (epoch, offset)
    return HistoryRequest(None if since is None else int(since), streams)


def _command_from(obj: Any, extended: bool = False) -> Command:
    if not isinstance(obj, dict):
        raise CommandError("a command must be an object")
    command, identifier, data = obj.get("command"), obj.get("identifier"), obj.get("data")
    if command not in (_EXT_COMMANDS if extended else _COMMANDS):
        raise CommandError(f"unknown command {command!r}")
    if command in ("ping", "pong"):
        return Command(command, "")
    if not isinstance(identifier, str) or not identifier:
        raise CommandError("identifier must be a non-empty JSON string")
    if len(identifier) > _MAX_IDENTIFIER_CHARS:
        raise CommandError(f"identifier longer than {_MAX_IDENTIFIER_CHARS} characters")
    if command == "message" and not isinstance(data, str):
        raise CommandError("message command needs data as a JSON string")
    history = _history_from(obj.get("history")) if extended else None
    return Command(command, identifier, data if isinstance(data, str) else None, history)


class StreamMessage:
    """One message of a stream at its position, as the hub fans it out: the published payload,
    its stream, offset and epoch. The plain dialects carry the position inside `message`
    (`stamped()`, built once per message), the extended ones beside it."""

    __slots__ = ("_stamped", "epoch", "offset", "payload", "stream")

    def __init__(self, stream: str, payload: Any, offset: int, epoch: str) -> None:
        self.stream = stream
        self.payload = payload
        self.offset = offset
        self.epoch = epoch
        self._stamped: dict[str, Any] | None = None

    def stamped(self) -> dict[str, Any]:
        """The payload with its offset and epoch (a non-object payload goes under `data`)."""
        stamped = self._stamped
        if stamped is None:
            payload = self.payload
            if isinstance(payload, dict):
                stamped = {**payload, "offset": self.offset, "epoch": self.epoch}
            else:
                stamped = {"data": payload, "offset": self.offset, "epoch": self.epoch}
            self._stamped = stamped
        return stamped


class CableCodec:
    """Encoding of one subprotocol. Instances are shared by every connection speaking it."""

    protocol: str
    opcode: int
    extended: bool = False  # AnyCable's extended protocol (sessions, history, pongs)

    def dumps(self, obj: Any) -> bytes:
        """Encode a whole message object."""
        raise NotImplementedError

    def frame(self, obj: Any) -> bytes:
        """A complete WebSocket frame carrying `obj`."""
        return encode_frame(self.opcode, self.dumps(obj))

    def parse(self, opcode: int, payload: bytes) -> Command:
        """Decode a client frame into a command; raises `CommandError`."""
        raise NotImplementedError

    def broadcast_prefix(self, identifier: str) -> bytes:
        """The bytes that precede an encoded message in `{identifier, message}`."""
        raise NotImplementedError

    def encode_body(self, message: Any) -> bytes:
        """The encoded `message` value, followed by whatever closes the envelope."""
        raise NotImplementedError

    def stream_body(self, message: StreamMessage) -> bytes:
        """What follows `broadcast_prefix` in a stream message's frame (encoded once per
        broadcast): here the stamped payload, closing the envelope."""
        return self.encode_body(message.stamped())


class JsonCodec(CableCodec):
    """`actioncable-v1-json`: what the official `@rails/actioncable` client speaks."""

    protocol = JSON_PROTOCOL
    opcode = OP_TEXT

    def dumps(self, obj: Any) -> bytes:
        return _json_dumps(obj).encode()

    def parse(self, opcode: int, payload: bytes) -> Command:
        return _command_from(self._decode(opcode, payload), self.extended)

    def _decode(self, opcode: int, payload: bytes) -> Any:
        if opcode != OP_TEXT:
            raise CommandError("this connection speaks JSON: send text frames")
        try:
            obj = jsontext.loads(payload)
        except json.JSONDecodeError as exc:
            raise CommandError(f"malformed JSON: {exc.msg} at position {exc.pos}") from None
        except jsontext.LoneSurrogate as exc:
            raise CommandError(f"malformed JSON: {exc}") from None
        except ValueError:
            raise CommandError("malformed JSON: not UTF-8") from None
        return obj

    def broadcast_prefix(self, identifier: str) -> bytes:
        return b'{"identifier":' + _json_dumps(identifier).encode() + b',"message":'

    def encode_body(self, message: Any) -> bytes:
        return _json_dumps(message).encode() + b"}"


class MsgpackCodec(CableCodec):
    """`actioncable-v1-msgpack`: the same messages as msgpack maps in binary frames."""

    protocol = MSGPACK_PROTOCOL
    opcode = OP_BINARY

    def dumps(self, obj: Any) -> bytes:
        return _msgpack_pack(obj)

    def parse(self, opcode: int, payload: bytes) -> Command:
        if opcode != OP_BINARY:
            raise CommandError("this connection speaks msgpack: send binary frames")
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise CommandError(f"malformed msgpack: {type(exc).__name__}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), dict):
            obj = {**obj, "data": _json_dumps(obj["data"])}  # AnyCable clients send a map
        return _command_from(obj, self.extended)

    def broadcast_prefix(self, identifier: str) -> bytes:
        # fixmap of 2 entries: "identifier" -> identifier, "message" -> (body)
        return (
            b"\x82"
            + _msgpack_pack("identifier")
            + _msgpack_pack(identifier)
            + (_msgpack_pack("message"))
        )

    def encode_body(self, message: Any) -> bytes:
        return _msgpack_pack(message)


class ExtJsonCodec(JsonCodec):
    """`actioncable-v1-ext-json`: AnyCable's extended protocol in JSON text frames (what
    `@anycable/core` speaks with `protocol: 'actioncable-v1-ext-json'`)."""

    protocol = EXT_JSON_PROTOCOL
    extended = True

    def stream_body(self, message: StreamMessage) -> bytes:
        # AnyCable's Reply field order: identifier, message, stream_id, epoch, offset.
        return b"".join(
            (
                _json_dumps(message.payload).encode(),
                b',"stream_id":',
                _json_dumps(message.stream).encode(),
                b',"epoch":',
                _json_dumps(message.epoch).encode(),
                b',"offset":',
                str(message.offset).encode(),
                b"}",
            )
        )


_MESSAGE_KEY = _msgpack_pack("message")
_STREAM_ID_KEY = _msgpack_pack("stream_id")
_EPOCH_KEY = _msgpack_pack("epoch")
_OFFSET_KEY = _msgpack_pack("offset")


class ExtMsgpackCodec(MsgpackCodec):
    """`actioncable-v1-ext-msgpack`: the extended protocol's messages as msgpack maps in binary
    frames (the same keys as its JSON)."""

    protocol = EXT_MSGPACK_PROTOCOL
    extended = True

    def broadcast_prefix(self, identifier: str) -> bytes:
        # fixmap of 5 entries: identifier, message, stream_id, epoch, offset
        return b"\x85" + _msgpack_pack("identifier") + _msgpack_pack(identifier) + _MESSAGE_KEY

    def stream_body(self, message: StreamMessage) -> bytes:
        return b"".join(
            (
                _msgpack_pack(message.payload),
                _STREAM_ID_KEY,
                _msgpack_pack(message.stream),
                _EPOCH_KEY,
                _msgpack_pack(message.epoch),
                _OFFSET_KEY,
                _msgpack_pack(message.offset),
            )
        )


CODECS: dict[str, CableCodec] = {
    JSON_PROTOCOL: JsonCodec(),
    MSGPACK_PROTOCOL: MsgpackCodec(),
    EXT_JSON_PROTOCOL: ExtJsonCodec(),
    EXT_MSGPACK_PROTOCOL: ExtMsgpackCodec(),
}


def choose_codec(offered: list[str]) -> CableCodec | None:
    """The codec for the first supported subprotocol the client offered, in its order.

    A client that offers no subprotocol at all gets JSON (tools like wscat); one that offers
    only unknown ones gets None.
    """
    if not offered:
        return CODECS[JSON_PROTOCOL]
    for name in offered:
        if name in CODECS:
            return CODECS[name]
    return None


def welcome(sid: str | None = None, restored_ids: list[str] | None = None) -> dict[str, Any]:
    """The first message of every accepted connection; on the extended protocol with the
    session id, and when a previous session was restored, the identifiers it brought back."""
    if sid is None:
        return {"type": "welcome"}
    if restored_ids is None:
        return {"type": "welcome", "sid": sid}
    return {"type": "welcome", "sid": sid, "restored": True, "restored_ids": restored_ids}


def pong() -> dict[str, Any]:
    """The answer to an extended-protocol client's `ping` command."""
    return {"type": "pong"}


def confirm_history(identifier: str) -> dict[str, Any]:
    """Everything the client asked for has been replayed (after the replayed messages)."""
    return {"type": "confirm_history", "identifier": identifier}


def reject_history(identifier: str) -> dict[str, Any]:
    """History cannot answer the request (another epoch, trimmed, or ahead of the stream);
    the subscription's current state follows if its channel has one."""
    return {"type": "reject_history", "identifier": identifier}


def ping(timestamp: int) -> dict[str, Any]:
    """Liveness ping; the client reconnects when it has seen none for 6 seconds."""
    return {"type": "ping", "message": timestamp}


def confirm(identifier: str) -> dict[str, Any]:
    """Subscription accepted."""
    return {"identifier": identifier, "type": "confirm_subscription"}


def reject(identifier: str) -> dict[str, Any]:
    """Subscription refused (unknown channel, bad params, not yours)."""
    return {"identifier": identifier, "type": "reject_subscription"}


def disconnect(reason: str, reconnect: bool) -> dict[str, Any]:
    """The server is closing the connection; `reconnect` tells the client whether to retry."""
    return {"type": "disconnect", "reason": reason, "reconnect": reconnect}


def error(reason: str, identifier: str | None = None) -> dict[str, Any]:
    """A command was refused without closing the connection (not part of Rails' protocol).

    The refused command's identifier goes under `command_identifier`, never `identifier`: the
    official client hands any frame of an unknown type that carries an `identifier` to that
    subscription's `received()`, where an application expects its own messages. Without it
    the client ignores the frame (its subscribe retries still run).
    """
    message: dict[str, Any] = {"type": "error", "message": reason}
    if identifier is not None:
        message["command_identifier"] = identifier
    return message
