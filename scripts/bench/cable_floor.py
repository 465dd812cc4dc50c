#!/usr/bin/env python3
"""The measuring client's floor for `scripts/bench/cable`: the least a server can cost wsbench.

    .venv/bin/python scripts/bench/cable_floor.py PORT

A bare Action Cable endpoint serving `BenchmarkChannel` and nothing else, on uvloop: no Redis,
no history, no pings, no limits, no metrics, no per-subscription identifier. A `broadcast` is
one pre-built frame handed to every subscriber's transport in a tight loop, then
`broadcastResult` to the sender. The round trip wsbench measures against it is therefore the
client's own cost (one Node process reading N sockets) plus the kernel's, on the same 2 cores:
no server measured with this client can do better. `scripts/bench/cable` runs it in the same run
as Final Market and the peer, so each can be read against the floor (and the peer's p50 over
the floor's is the largest ratio this client can show that day). It is a measuring aid, not a
server: it trusts its client completely.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import cast

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from realtime.wsframe import OP_CLOSE, OP_TEXT, FrameDecoder, encode_frame

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PROTOCOL = "actioncable-v1-json"
_WELCOME = encode_frame(OP_TEXT, b'{"type":"welcome"}')


def _text(obj: object) -> bytes:
    return encode_frame(OP_TEXT, json.dumps(obj, separators=(",", ":")).encode())


class FloorConnection(asyncio.Protocol):
    """One client: the HTTP upgrade, then Action Cable commands for `BenchmarkChannel`."""

    __slots__ = ("_decoder", "_head", "_subscribers", "_transport")

    def __init__(self, subscribers: dict[asyncio.Transport, None]) -> None:
        self._subscribers = subscribers
        self._transport: asyncio.Transport | None = None
        self._head: bytes | None = b""
        self._decoder = FrameDecoder(1 << 20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return
            self._head = None
            self._upgrade(head[:end])
            data = head[end + 4 :]
            if not data:
                return
        for opcode, payload in self._decoder.feed(data):
            if opcode == OP_CLOSE:
                self._transport.close()
            elif opcode == OP_TEXT:
                self._command(json.loads(payload))

    def _upgrade(self, head: bytes) -> None:
        assert self._transport is not None
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n"
            b"Sec-WebSocket-Protocol: " + _PROTOCOL.encode() + b"\r\n\r\n" + _WELCOME
        )

    def _command(self, command: dict[str, str]) -> None:
        assert self._transport is not None
        identifier = command["identifier"]
        if command["command"] == "subscribe":
            self._subscribers[self._transport] = None
            self._transport.write(_text({"identifier": identifier, "type": "confirm_subscription"}))
        elif command["command"] == "message":
            data = json.loads(command["data"])
            if data.get("action") == "broadcast":
                frame = _text({"identifier": identifier, "message": data})
                for transport in self._subscribers:
                    transport.write(frame)
                data = {"action": "broadcastResult", "payload": data.get("payload")}
            self._transport.write(_text({"identifier": identifier, "message": data}))

    def connection_lost(self, exc: Exception | None) -> None:
        self._subscribers.pop(self._transport, None)  # type: ignore[arg-type]
        self._transport = None


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:`port` until killed."""
    subscribers: dict[asyncio.Transport, None] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FloorConnection(subscribers), "127.0.0.1", port, backlog=4096
    )
    print(f"floor: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
