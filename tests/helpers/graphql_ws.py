"""A small GraphQL WebSocket client over a real socket (Tornado's), for both subprotocols,
and a driver for the official `graphql-ws` npm client (tests/js/graphql-ws-client.mjs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
JS_CLIENT = Path(__file__).resolve().parents[1] / "js" / "graphql-ws-client.mjs"


class WsClient:
    """Speaks either subprotocol; `read` skips legacy keep-alives."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, subprotocol: str = TRANSPORT_WS, **headers: str) -> WsClient:
        request = HTTPRequest(url, headers=headers)
        ws = await websocket_connect(request, subprotocols=[subprotocol])
        assert ws.selected_subprotocol == subprotocol
        return cls(ws)

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.write_message(message if isinstance(message, str) else json.dumps(message))

    async def read(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next message (None once the socket closed: see `close_code`)."""
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), timeout)
            if raw is None:
                return None
            message: dict[str, Any] = json.loads(raw)
            if message.get("type") != "ka":
                return message

    async def init(self, payload: dict[str, Any] | None = None) -> None:
        """`connection_init`, then expect `connection_ack`."""
        message: dict[str, Any] = {"type": "connection_init"}
        if payload is not None:
            message["payload"] = payload
        await self.send(message)
        ack = await self.read()
        assert ack == {"type": "connection_ack"}, ack

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes the socket; its close code."""
        while await self.read(timeout) is not None:
            pass
        return self.ws.close_code

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def close(self) -> None:
        self.ws.close()


async def js_client(
    url: str,
    query: str,
    *,
    variables: dict[str, Any] | None = None,
    token: str | None = None,
    count: int = 2,
    timeout_ms: int = 20000,
) -> asyncio.subprocess.Process:
    """Spawn the official graphql-ws client; read its events with `js_events`."""
    assert (JS_CLIENT.parent / "node_modules" / "graphql-ws").is_dir(), (
        "run `npm ci --prefix tests/js` (scripts/test does)"
    )
    args = ["--url", url, "--query", query, "--count", str(count), "--timeout-ms", str(timeout_ms)]
    if token is not None:
        args += ["--token", token]
    if variables is not None:
        args += ["--variables", json.dumps(variables)]
    return await asyncio.create_subprocess_exec(
        "node", str(JS_CLIENT), *args, stdout=asyncio.subprocess.PIPE
    )


async def js_events(proc: asyncio.subprocess.Process) -> AsyncIterator[dict[str, Any]]:
    """The JSON event lines the driver prints."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        yield json.loads(line)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Kill the driver if it still runs."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
