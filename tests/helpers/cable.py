"""Helpers for cable tests: a small real WebSocket client speaking Action Cable, and a second
node in the same process (two nodes share Redis and the databases, as in production)."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from tornado.httpclient import HTTPRequest
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketClientConnection, websocket_connect

from realtime.broker import PUBLISH_SCRIPT, stream_keys
from server.adapters.http1 import HttpServerLike, make_http_server
from server.wiring.app import make_app
from server.wiring.infra import ValkeyServer
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings
from tests.helpers.processes import free_port

JSON = "actioncable-v1-json"
MSGPACK = "actioncable-v1-msgpack"
EXT_JSON = "actioncable-v1-ext-json"
EXT_MSGPACK = "actioncable-v1-ext-msgpack"


class CableClient:
    """An Action Cable client over a real WebSocket (JSON or msgpack), skipping pings."""

    def __init__(self, ws: WebSocketClientConnection, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol

    @classmethod
    async def connect(cls, url: str, protocol: str = JSON, **headers: str) -> CableClient:
        """Connect and consume the `welcome` message."""
        request = HTTPRequest(url, headers=headers)
        ws = await websocket_connect(request, subprotocols=[protocol])
        client = cls(ws, protocol)
        assert await client.read() == {"type": "welcome"}
        return client

    @classmethod
    async def connect_ext(
        cls, url: str, protocol: str = EXT_JSON, **headers: str
    ) -> tuple[CableClient, dict[str, Any]]:
        """Connect with the extended protocol; returns the client and its `welcome`."""
        request = HTTPRequest(url, headers=headers)
        ws = await websocket_connect(request, subprotocols=[protocol])
        assert ws.selected_subprotocol == protocol
        client = cls(ws, protocol)
        welcome = await client.read()
        assert welcome is not None and welcome["type"] == "welcome", welcome
        return client, welcome

    async def send(self, message: dict[str, Any]) -> None:
        """Send one command in this connection's encoding."""
        if self.protocol in (MSGPACK, EXT_MSGPACK):
            await self.ws.write_message(msgpack.packb(message), binary=True)
        else:
            await self.ws.write_message(json.dumps(message))

    async def read(self, timeout: float = 5.0) -> Any:
        """The next non-ping message (None when the connection closed)."""
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), timeout)
            if raw is None:
                return None
            message = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
            if message.get("type") != "ping":
                return message

    async def subscribe(self, identifier: str) -> None:
        """Subscribe and wait for the confirmation."""
        await self.send({"command": "subscribe", "identifier": identifier})
        reply = await self.read()
        assert reply == {"identifier": identifier, "type": "confirm_subscription"}, reply

    async def next_message(self, identifier: str, timeout: float = 5.0) -> dict[str, Any]:
        """The `message` of the next stream message for `identifier`."""
        reply = await self.read(timeout)
        assert reply is not None and reply.get("identifier") == identifier, reply
        return reply["message"]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the WebSocket."""
        self.ws.close()


class TcpProxy:
    """A TCP proxy a test controls, standing between a client and a node like a train tunnel:
    `cut()` drops every connection through it at once and refuses new ones until `mend()`
    (`hold()` only refuses new ones);
    `upstream` (a port on 127.0.0.1) may be changed meanwhile, so the client comes back to
    another node."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0  # connections forwarded so far
        self._cut = False
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._pairs.discard(pair)
        for writer in pair:
            writer.transport.abort()

    def cut(self) -> None:
        """Drop every connection (both sides see a reset) and refuse new ones."""
        self._cut = True
        for pair in list(self._pairs):
            self._drop(pair)

    def hold(self) -> None:
        """Refuse new connections but keep the open ones (what a node says on them, e.g. a
        drain's `disconnect`, still reaches the client)."""
        self._cut = True

    def mend(self) -> None:
        """Let connections through again."""
        self._cut = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def identifier(channel: str, **params: Any) -> str:
    """An identifier string as the official client builds it (JSON of channel + params)."""
    return json.dumps({"channel": channel, **params})


class ExtraNode:
    """Another node (its own services, app and HTTP server) on the test's loop."""

    def __init__(self, services: Services, server: HttpServerLike, port: int) -> None:
        self.services = services
        self.server = server
        self.port = port

    @classmethod
    async def start(cls, settings: Settings, node_id: str = "node-b") -> ExtraNode:
        services = await Services.open(settings.model_copy(update={"node_id": node_id}))
        services.start()
        server = make_http_server(make_app(services), services.settings)
        sockets = bind_sockets(0, "127.0.0.1")
        await server.listen_on(sockets)
        return cls(services, server, sockets[0].getsockname()[1])

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        self.server.stop()
        await self.services.close()


@contextmanager
def own_valkey(directory: Path) -> Iterator[ValkeyServer]:
    """A Valkey server for one test, so restarting it disturbs nobody else."""
    server = ValkeyServer(directory, port=free_port(), log=lambda line: None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def forget_data(server: ValkeyServer) -> None:
    """Delete a stopped Redis's persisted data (its next start has lost everything)."""
    for path in server.data_dir.iterdir():
        if path.name.startswith("appendonly") or path.suffix == ".rdb":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def restart_losing_data(server: ValkeyServer) -> None:
    """Stop Redis, delete its persisted data, start it again: a restart that loses history."""
    server.stop()
    forget_data(server)
    server.start()


class OwnRedis:
    """Mixin for test classes whose nodes use a Valkey of their own (`valkey`), so restarting
    it (`ValkeyServer.stop()` / `start()`, `restart_losing_data`) disturbs no other test."""

    @pytest.fixture
    def valkey(self, tmp_path: Path) -> Iterator[ValkeyServer]:
        with own_valkey(tmp_path / "valkey") as server:
            yield server

    @pytest.fixture
    def settings(self, infra_env: dict[str, str], valkey: ValkeyServer) -> Settings:
        return make_settings(infra_env, redis_url=valkey.url, redis_timeout_s=1.0)


def stock_event(product_id: int, stock: int) -> dict[str, Any]:
    """The inventory event the domain publishes when a product's stock changes."""
    return {"event": "stock", "product_id": str(product_id), "stock": stock}


async def read_stocks(
    client: CableClient, ident: str, count: int, timeout: float = 10.0
) -> tuple[list[dict[str, Any]], list[int]]:
    """The next `count` stock messages of `ident`, and the offsets of every message read
    meanwhile (presence counts share an inventory stream)."""
    stocks: list[dict[str, Any]] = []
    offsets: list[int] = []
    while len(stocks) < count:
        message = await client.next_message(ident, timeout)
        offsets.append(message["offset"])
        if message["event"] == "stock":
            stocks.append(message)
    return stocks, offsets


async def until_viewers(
    client: CableClient, ident: str, viewers: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Read `ident`'s frames until a presence message with `viewers` arrives."""
    while True:
        frame = await client.read(timeout)
        assert frame is not None and frame.get("identifier") == ident, frame
        message = frame.get("message")  # none in confirm_history and the like
        if (
            isinstance(message, dict)
            and message.get("event") == "presence"
            and (message["viewers"] == viewers)
        ):
            return message  # type: ignore[no-any-return]


async def publish_unheard(
    redis: Any,
    stream: str,
    message: Any,
    *,
    history: bool = True,
    kill_subscribers: bool = False,
) -> int:
    """Publish `message` on `stream` as a node does (the broker's own script: the next offset,
    a history entry unless `history` is false) so that no node hears it, as when a pub/sub
    delivery is lost. It goes to a channel nobody follows; or, with `kill_subscribers`, to the
    stream's channel in one transaction after `CLIENT KILL TYPE pubsub`, so every node's pub/sub
    connection is gone when it is published (they reconnect by themselves; use a Redis of the
    test's own). Returns the message's offset."""
    before = [("CLIENT", "KILL", "TYPE", "pubsub")] if kill_subscribers else []
    return await publish_as_broker(
        redis, stream, message, history=history, heard=kill_subscribers, before=before
    )


async def publish_then_pause(redis: Any, stream: str, message: Any, pause_ms: int) -> int:
    """Publish `message` on `stream` as a node does, and in the same transaction pause every
    client of Redis for `pause_ms` (`CLIENT PAUSE ... ALL`): the nodes hear the message, and
    whatever they ask Redis about it waits out the pause (use a Redis of the test's own).
    Returns the message's offset."""
    after = [("CLIENT", "PAUSE", str(pause_ms), "ALL")]
    return await publish_as_broker(redis, stream, message, after=after)


async def publish_as_broker(
    redis: Any,
    stream: str,
    message: Any,
    *,
    history: bool = True,
    heard: bool = True,
    before: list[tuple[str, ...]] | None = None,
    after: list[tuple[str, ...]] | None = None,
) -> int:
    """Publish `message` on `stream` with the broker's own script (the next offset, a history
    entry unless `history` is false), to the stream's channel or, unless `heard`, one nobody
    follows, in one transaction between the commands `before` and `after`. Returns the
    message's offset."""
    offset_key, history_key, epoch_key, channel = stream_keys(stream)
    if not heard:
        channel = "{" + stream + "}:heard-by-nobody"
    pipe = redis.pipeline(transaction=True)
    for command in before or ():
        pipe.execute_command(*command)
    pipe.eval(
        PUBLISH_SCRIPT,
        4,
        offset_key,
        history_key,
        epoch_key,
        channel,
        stream,
        msgpack.packb(message),
        secrets.token_hex(6),
        100 if history else 0,
        "test",
        "PUBLISH",
        300,
    )
    for command in after or ():
        pipe.execute_command(*command)
    results = await pipe.execute()
    return int(results[len(before or ())][0])
