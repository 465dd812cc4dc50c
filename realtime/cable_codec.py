"""Action Cable wire messages, encoded for the two subprotocols a connection may speak.

`actioncable-v1-json` carries JSON text frames; `actioncable-v1-msgpack` carries the same
messages as msgpack binary frames. A codec turns server messages into complete WebSocket frames
(so a broadcast is framed once per codec and the same bytes go to every subscriber) and client
frames into commands.

Broadcast frames are built from two parts: a per-subscription prefix holding the identifier
(echoed byte for byte as the client sent it) and the message body, encoded once per broadcast.
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
UNSUPPORTED_PROTOCOL = "actioncable-unsupported"

_json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_msgpack_pack = msgpack.Packer(use_bin_type=True).pack


class CommandError(ValueError):
    """A client frame that is not a well-formed Action Cable command; `str()` says why."""


@dataclass(frozen=True, slots=True)
class Command:
    """One client command: `subscribe`, `unsubscribe` or `message` (with `data`)."""

    command: str
    identifier: str
    data: str | None = None


_COMMANDS = frozenset({"subscribe", "unsubscribe", "message"})
_MAX_IDENTIFIER_CHARS = 1024


def _command_from(obj: Any) -> Command:
    if not isinstance(obj, dict):
        raise CommandError("a command must be an object")
    command, identifier, data = obj.get("command"), obj.get("identifier"), obj.get("data")
    if command not in _COMMANDS:
        raise CommandError(f"unknown command {command!r}")
    if not isinstance(identifier, str) or not identifier:
        raise CommandError("identifier must be a non-empty JSON string")
    if len(identifier) > _MAX_IDENTIFIER_CHARS:
        raise CommandError(f"identifier longer than {_MAX_IDENTIFIER_CHARS} characters")
    if command == "message" and not isinstance(data, str):
        raise CommandError("message command needs data as a JSON string")
    return Command(command, identifier, data if isinstance(data, str) else None)


class CableCodec:
    """Encoding of one subprotocol. Instances are shared by every connection speaking it."""

    protocol: str
    opcode: int

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


class JsonCodec(CableCodec):
    """`actioncable-v1-json`: what the official `@rails/actioncable` client speaks."""

    protocol = JSON_PROTOCOL
    opcode = OP_TEXT

    def dumps(self, obj: Any) -> bytes:
        return _json_dumps(obj).encode()

    def parse(self, opcode: int, payload: bytes) -> Command:
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
        return _command_from(obj)

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
        return _command_from(obj)

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


CODECS: dict[str, CableCodec] = {JSON_PROTOCOL: JsonCodec(), MSGPACK_PROTOCOL: MsgpackCodec()}


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


def welcome() -> dict[str, Any]:
    """The first message of every accepted connection."""
    return {"type": "welcome"}


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
