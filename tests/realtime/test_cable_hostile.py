"""`/cable` against hostile and broken clients, over real sockets.

Well-behaved clients use Tornado's WebSocket client; clients that break RFC 6455 (unmasked
frames, RSV bits, absurd lengths) or must not read (slow consumers) use raw sockets with a
minimal masked-frame builder written here. Every test also checks that a well-behaved client
on the same node is still served promptly afterwards (`assert_node_serves`), and the heaviest
attacks (floods, oversized frames, junk) that a client connected all along kept its usual echo
latency while they ran (`Bystander`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import statistics
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import msgpack
import psycopg2
import pytest
import structlog
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from realtime.cable_codec import JsonCodec, disconnect
from realtime.wsframe import encode_close
from server.domain.users import UserService
from server.wiring.seed import seed_catalog
from server.wiring.services import Services
from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings
from tests.helpers.wsframes import client_frame

JSON = "actioncable-v1-json"
MSGPACK = "actioncable-v1-msgpack"
BENCH = '{"channel":"BenchmarkChannel"}'
BYSTANDER = '{"channel":"BenchmarkChannel","bystander":true}'
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 1, 2, 8, 9
READ_TIMEOUT_S = 5.0
SLOW_CONSUMER_WAIT_S = 10.0  # above the 5 s grace period plus sweeps
SERVE_BOUND_S = 1.0
MAX_FRAME_BYTES = 64 * 1024  # the default cable_max_frame_bytes


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def settings(request: pytest.FixtureRequest, infra_env: dict[str, str]) -> Settings:
    """A node with BenchmarkChannel; tests pass more overrides with indirect parametrisation."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    return make_settings(infra_env, benchmark_channel=True, **overrides)


@pytest.fixture(autouse=True)
def _empty_databases(clean_data: None) -> None:
    """Every test starts from empty tables and Redis (before the node's services open)."""


class Clients:
    """Closes every client a test opened, whatever the test's outcome."""

    def __init__(self) -> None:
        self.websockets: list[WebSocketClientConnection] = []
        self.sockets: list[socket.socket] = []

    def close_all(self) -> None:
        for ws in self.websockets:
            ws.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def clients(io_loop: Any) -> Iterator[Clients]:
    tracked = Clients()
    yield tracked
    tracked.close_all()


# --- well-behaved clients (Tornado's WebSocket client) -----------------------------------------


def cable_url(base_url: str, query: str = "") -> str:
    return base_url.replace("http://", "ws://", 1) + "/cable" + query


def decode(raw: str | bytes) -> Any:
    """A text frame is JSON, a binary one msgpack."""
    return msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else json.loads(raw)


async def open_ws(
    clients: Clients,
    base_url: str,
    protocol: str = JSON,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> WebSocketClientConnection:
    """Connect without reading anything."""
    request = HTTPRequest(cable_url(base_url, query), headers=headers, connect_timeout=5)
    ws = await websocket_connect(request, subprotocols=[protocol])
    clients.websockets.append(ws)
    return ws


async def read_raw(ws: WebSocketClientConnection) -> Any:
    """The next frame's data that is not a ping (None once the connection is closed)."""
    deadline = time.monotonic() + READ_TIMEOUT_S  # pings must not extend the wait
    while True:
        raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
        if raw is None or decode(raw).get("type") != "ping":
            return raw


async def read(ws: WebSocketClientConnection) -> Any:
    """The next message that is not a ping, decoded (None once the connection is closed)."""
    raw = await read_raw(ws)
    return None if raw is None else decode(raw)


async def read_n(ws: WebSocketClientConnection, count: int) -> list[Any]:
    return [await read(ws) for _ in range(count)]


async def connect(
    clients: Clients,
    base_url: str,
    protocol: str = JSON,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> WebSocketClientConnection:
    """Connect and consume `welcome`."""
    ws = await open_ws(clients, base_url, protocol, query=query, headers=headers)
    assert await read(ws) == {"type": "welcome"}
    return ws


async def send(ws: WebSocketClientConnection, command: dict[str, Any]) -> None:
    """Send a command in the connection's encoding."""
    if ws.selected_subprotocol == MSGPACK:
        await ws.write_message(msgpack.packb(command), binary=True)
    else:
        await ws.write_message(json.dumps(command))


def subscribe_command(identifier: str) -> dict[str, Any]:
    return {"command": "subscribe", "identifier": identifier}


def echo_command(nonce: str, identifier: str = BENCH) -> dict[str, Any]:
    data = json.dumps({"action": "echo", "nonce": nonce})
    return {"command": "message", "identifier": identifier, "data": data}


async def subscribe(ws: WebSocketClientConnection, identifier: str = BENCH) -> None:
    """Subscribe and expect the confirmation as the next message."""
    await send(ws, subscribe_command(identifier))
    assert await read(ws) == {"identifier": identifier, "type": "confirm_subscription"}


async def assert_echoes(ws: WebSocketClientConnection) -> float:
    """An echo round trip on BenchmarkChannel (already subscribed); returns its duration."""
    nonce = base64.b16encode(os.urandom(6)).decode()
    started = time.monotonic()
    await send(ws, echo_command(nonce))
    answer = await read(ws)
    elapsed = time.monotonic() - started
    assert answer == {"identifier": BENCH, "message": {"action": "echo", "nonce": nonce}}
    return elapsed


class Bystander:
    """A well-behaved client connected before an attack and echoing all through it: its round
    trips during the attack must stay close to its own usual ones measured just before."""

    BASELINE_ECHOES = 20

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.usual: list[float] = []
        self.during: list[float] = []
        self._task: asyncio.Future[None] | None = None

    @classmethod
    async def join(cls, clients: Clients, base_url: str) -> Bystander:
        ws = await connect(clients, base_url)
        await subscribe(ws, BYSTANDER)
        self = cls(ws)
        self.usual = [await self._echo() for _ in range(self.BASELINE_ECHOES)]
        self._task = asyncio.ensure_future(self._echo_forever())
        return self

    async def _echo(self) -> float:
        nonce = base64.b16encode(os.urandom(6)).decode()
        started = time.monotonic()
        await send(self.ws, echo_command(nonce, BYSTANDER))
        while True:  # broadcasts on the benchmark stream may arrive in between
            answer = await read(self.ws)
            assert answer is not None, "the bystander was disconnected"
            if answer.get("message") == {"action": "echo", "nonce": nonce}:
                return time.monotonic() - started

    async def _echo_forever(self) -> None:
        while True:
            self.during.append(await self._echo())
            await asyncio.sleep(0.002)

    async def assert_usual_latency(self) -> None:
        """Wait for a few more echoes, stop, and compare."""
        assert self._task is not None
        target = len(self.during) + 3
        deadline = time.monotonic() + 2
        while len(self.during) < target and not self._task.done():
            assert time.monotonic() < deadline, f"the bystander stalled: {self.during}"
            await asyncio.sleep(0.005)
        if self._task.done():
            self._task.result()  # its failure, if any
        self._task.cancel()
        assert len(self.during) >= 3
        usual, during = statistics.median(self.usual), statistics.median(self.during)
        assert during <= max(5 * usual, usual + 0.02), (usual, self.during)
        assert max(self.during) < 1.0, (usual, self.during)


@pytest.fixture
def bystander(io_loop: Any, http_server: Any, base_url: str, clients: Clients) -> Bystander:
    joined: Bystander = io_loop.run_sync(lambda: Bystander.join(clients, base_url))
    return joined


async def assert_node_serves(clients: Clients, base_url: str) -> None:
    """A fresh well-behaved client connects, subscribes and gets an echo, all within 1 s."""
    started = time.monotonic()
    ws = await connect(clients, base_url)
    await subscribe(ws)
    await assert_echoes(ws)
    assert time.monotonic() - started < SERVE_BOUND_S
    ws.close()


async def expect_http_error(request: HTTPRequest, protocols: list[str]) -> Any:
    """The upgrade is refused: the HTTP response of the refusal."""
    with pytest.raises(HTTPClientError) as caught:
        await websocket_connect(request, subprotocols=protocols)
    assert caught.value.response is not None
    return caught.value.response


async def connect_once_freed(clients: Clients, base_url: str) -> WebSocketClientConnection:
    """Connect as soon as the place of a connection just closed is free again (the server
    notices the close on its next loop iterations); fails if it never is."""
    for _ in range(50):
        try:
            return await connect(clients, base_url)
        except HTTPClientError:
            await asyncio.sleep(0.05)
    pytest.fail("the closed connection's place was never freed")


def problem_of(response: Any) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/problem+json"
    problem: dict[str, Any] = json.loads(response.body)
    return problem


# --- hostile clients (raw sockets) --------------------------------------------------------------


def text_frame(command: dict[str, Any]) -> bytes:
    return client_frame(OP_TEXT, json.dumps(command).encode())


class RawClient:
    """A WebSocket client on a bare non-blocking socket: it reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(
        cls, clients: Clients, port: int, protocol: str = JSON, *, rcvbuf: int | None = None
    ) -> RawClient:
        """Upgrade `/cable` and read `welcome`."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        clients.sockets.append(sock)
        if rcvbuf is not None:  # before connecting, so the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        client = cls(sock)
        await client.loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /cable HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        await client.send(request.encode())
        while b"\r\n\r\n" not in client.buffer:
            await client._fill()
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        client.buffer = bytearray(rest)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert f"Sec-WebSocket-Protocol: {protocol}".encode() in head
        opcode, payload = await client.read_frame()
        assert decode(payload if opcode == OP_BINARY else payload.decode()) == {"type": "welcome"}
        return client

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), READ_TIMEOUT_S)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    async def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            await self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (servers never mask), pings included."""
        b0, b1 = await self._take(2)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._take(8))
        return b0 & 0x0F, await self._take(n)

    async def read_message(self) -> Any:
        """The next decoded data message that is not a ping."""
        async with asyncio.timeout(READ_TIMEOUT_S):  # pings must not extend the wait
            return await self._read_message()

    async def _read_message(self) -> Any:
        while True:
            opcode, payload = await self.read_frame()
            assert opcode in (OP_TEXT, OP_BINARY), (opcode, payload)
            message = decode(payload if opcode == OP_BINARY else payload.decode())
            if message.get("type") != "ping":
                return message

    async def read_until_closed(self) -> tuple[list[Any], tuple[int, str]]:
        """Every data message up to the server's close frame, and that frame's (code, reason);
        then the server must end the TCP connection."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            return await self._read_until_closed()

    async def _read_until_closed(self) -> tuple[list[Any], tuple[int, str]]:
        messages: list[Any] = []
        while True:
            opcode, payload = await self.read_frame()
            if opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big")
                await self.expect_eof()
                return messages, (code, payload[2:].decode())
            message = decode(payload if opcode == OP_BINARY else payload.decode())
            if message.get("type") != "ping":
                messages.append(message)

    async def expect_eof(self, keep_tail: int = 0) -> int:
        """Drain until the server has closed or reset the connection; bytes drained. The
        last `keep_tail` bytes stay in `self.tail`."""
        drained = len(self.buffer)
        self.tail = bytes(self.buffer[-keep_tail:]) if keep_tail else b""
        self.buffer.clear()
        deadline = time.monotonic() + READ_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the server kept the connection open"
            try:
                chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), remaining)
            except ConnectionResetError:
                return drained
            if not chunk:
                return drained
            drained += len(chunk)
            if keep_tail:
                self.tail = (self.tail + chunk)[-keep_tail:]


# --- malformed commands ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_malformed_json_gets_an_error_frame_and_the_connection_stays_open(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url)
    await ws.write_message('{not json"')
    assert await read(ws) == {
        "type": "error",
        "message": "malformed JSON: Expecting property name enclosed in double quotes"
        " at position 1",
    }
    await subscribe(ws)
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_commands_of_the_wrong_shape_get_error_frames_and_the_connection_stays_open(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url)
    cases = [
        ("[1, 2]", {"type": "error", "message": "a command must be an object"}),
        ('"subscribe"', {"type": "error", "message": "a command must be an object"}),
        (
            json.dumps({"command": "dance", "identifier": BENCH}),
            {"type": "error", "message": "unknown command 'dance'"},
        ),
        (
            json.dumps({"command": "subscribe"}),
            {"type": "error", "message": "identifier must be a non-empty JSON string"},
        ),
        (
            json.dumps({"command": "subscribe", "identifier": {"channel": "BenchmarkChannel"}}),
            {"type": "error", "message": "identifier must be a non-empty JSON string"},
        ),
        (
            json.dumps({"command": "subscribe", "identifier": "not json"}),
            {
                "type": "error",
                "message": "identifier is not JSON",
                "command_identifier": "not json",
            },
        ),
        (
            json.dumps({"command": "subscribe", "identifier": '{"room":1}'}),
            {
                "type": "error",
                "message": "identifier must be a JSON object with a channel name",
                "command_identifier": '{"room":1}',
            },
        ),
        (
            json.dumps({"command": "message", "identifier": BENCH, "data": {"action": "echo"}}),
            {"type": "error", "message": "message command needs data as a JSON string"},
        ),
        (
            json.dumps(echo_command("x")),
            {
                "type": "error",
                "message": "not subscribed to this identifier",
                "command_identifier": BENCH,
            },
        ),
    ]
    for frame, expected in cases:
        await ws.write_message(frame)
        assert await read(ws) == expected, frame
    await subscribe(ws)
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_lone_surrogates_anywhere_get_error_frames_and_leave_nothing_behind(
    http_server: Any, base_url: str, clients: Clients, services: Services
) -> None:
    """`\\ud800` is valid JSON but no valid Unicode: echoing it (as an identifier, in a
    broadcast) would fail at encoding time, far from the door."""
    ws = await connect(clients, base_url)
    await ws.write_message('{"command":"subscribe","identifier":"\\ud800"}')
    assert await read(ws) == {
        "type": "error",
        "message": "malformed JSON: a string holds a lone UTF-16 surrogate"
        " (\\uD800-\\uDFFF escape)",
    }
    inner = '{"channel":"BenchmarkChannel","room":"\\udc00"}'  # escaped in the identifier's JSON
    await send(ws, subscribe_command(inner))
    answer = await read(ws)
    assert answer["command_identifier"] == inner and "lone UTF-16 surrogate" in answer["message"]
    await subscribe(ws)
    data = '{"action":"broadcast","payload":"\\ud800"}'
    await send(ws, {"command": "message", "identifier": BENCH, "data": data})
    answer = await read(ws)
    assert answer["command_identifier"] == BENCH and "lone UTF-16 surrogate" in answer["message"]
    assert [sorted(conn.subscriptions) for conn in services.cable.connections] == [[BENCH]]
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_every_refusal_is_logged_with_its_kind_and_the_client_address(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    with structlog.testing.capture_logs() as logs:
        ws = await connect(clients, base_url)
        await ws.write_message("{not json")
        await read(ws)
        await send(ws, subscribe_command('{"channel":"NoSuchChannel"}'))
        await read(ws)
        await send(ws, subscribe_command('{"channel":"InventoryChannel","product_id":-1}'))
        await read(ws)
        size = 4 * 1024 * 1024
        header = client_frame(OP_TEXT, length=size)
        reason = f"message over {MAX_FRAME_BYTES} bytes ({size})"
        await assert_closed_for(clients, http_port, header, 1009, reason)
    refusals = [entry for entry in logs if entry["event"] == "cable_refused"]
    assert [r["kind"] for r in refusals] == [
        "bad_command",
        "unknown_channel",
        "subscription_rejected",
        "protocol_error",
    ]
    assert all(r["log_level"] == "warning" for r in refusals)
    assert all(r["remote"] == "127.0.0.1" and r["reason"] for r in refusals)


@pytest.mark.gen_test(timeout=30)
async def test_unknown_action_and_non_json_data_get_error_frames(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url)
    await subscribe(ws)
    await send(ws, {"command": "message", "identifier": BENCH, "data": '{"action":"rm -rf"}'})
    assert await read(ws) == {
        "type": "error",
        "message": "unknown action 'rm -rf'",
        "command_identifier": BENCH,
    }
    await send(ws, {"command": "message", "identifier": BENCH, "data": "{oops"})
    assert await read(ws) == {
        "type": "error",
        "message": "data is not JSON",
        "command_identifier": BENCH,
    }
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_keeps_sending_bad_commands_is_disconnected(
    http_server: Any, base_url: str, clients: Clients, bystander: Bystander
) -> None:
    ws = await connect(clients, base_url)
    for _ in range(20):  # MAX_COMMAND_ERRORS are answered...
        await ws.write_message("[]")
    errors = await read_n(ws, 20)
    assert errors == [{"type": "error", "message": "a command must be an object"}] * 20
    await ws.write_message("[]")  # ...the next one is one too many
    assert await read(ws) == {
        "type": "disconnect",
        "reason": "too_many_errors",
        "reconnect": False,
    }
    assert await read(ws) is None
    assert ws.close_code == 1008
    await bystander.assert_usual_latency()
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_binary_frame_on_a_json_connection_gets_an_error_frame(
    http_server: Any, base_url: str, clients: Clients, bystander: Bystander
) -> None:
    ws = await connect(clients, base_url)
    await ws.write_message(b"\x00\xffjunk\x80", binary=True)
    raw = await read_raw(ws)
    assert isinstance(raw, str)
    assert json.loads(raw) == {
        "type": "error",
        "message": "this connection speaks JSON: send text frames",
    }
    await subscribe(ws)
    await assert_echoes(ws)
    await bystander.assert_usual_latency()
    await assert_node_serves(clients, base_url)


# --- msgpack ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_msgpack_welcome_is_a_binary_msgpack_frame(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await open_ws(clients, base_url, MSGPACK)
    assert ws.selected_subprotocol == MSGPACK
    raw = await read_raw(ws)
    assert isinstance(raw, bytes)
    assert msgpack.unpackb(raw) == {"type": "welcome"}
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_msgpack_subscribe_is_confirmed_and_echo_works(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url, MSGPACK)
    await send(ws, subscribe_command(BENCH))
    raw = await read_raw(ws)
    assert isinstance(raw, bytes)
    assert msgpack.unpackb(raw) == {"identifier": BENCH, "type": "confirm_subscription"}
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_malformed_msgpack_gets_a_msgpack_error_frame(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url, MSGPACK)
    cases = [
        (b"\xc1", "malformed msgpack: FormatError"),  # a byte msgpack never uses
        (b"\x93\x01", "malformed msgpack: ValueError"),  # truncated array
        (b"\x80\x01", "malformed msgpack: ExtraData"),  # trailing bytes
        (b"\x81\x01\x02", "malformed msgpack: ValueError"),  # integer map key
        (b"\x01", "a command must be an object"),
    ]
    for payload, reason in cases:
        await ws.write_message(payload, binary=True)
        raw = await read_raw(ws)
        assert isinstance(raw, bytes), payload
        assert msgpack.unpackb(raw) == {"type": "error", "message": reason}, payload
    await subscribe(ws)
    await assert_echoes(ws)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_text_frame_on_a_msgpack_connection_gets_an_error_frame(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url, MSGPACK)
    await ws.write_message(json.dumps(subscribe_command(BENCH)))
    raw = await read_raw(ws)
    assert isinstance(raw, bytes)
    assert msgpack.unpackb(raw) == {
        "type": "error",
        "message": "this connection speaks msgpack: send binary frames",
    }
    await subscribe(ws)
    await assert_node_serves(clients, base_url)


# --- framing violations ------------------------------------------------------------------------


async def assert_closed_for(
    clients: Clients, port: int, frame: bytes, code: int, reason: str
) -> None:
    raw = await RawClient.connect(clients, port)
    await raw.send(frame)
    messages, close = await raw.read_until_closed()
    assert (messages, close) == ([], (code, reason))


@pytest.mark.gen_test(timeout=30)
async def test_unmasked_frame_closes_the_connection_with_1002(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    frame = client_frame(OP_TEXT, json.dumps(subscribe_command(BENCH)).encode(), mask=None)
    await assert_closed_for(clients, http_port, frame, 1002, "client frame is not masked")
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_rsv_bits_close_the_connection_with_1002(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    frame = client_frame(OP_TEXT, json.dumps(subscribe_command(BENCH)).encode(), rsv=0b100)
    await assert_closed_for(clients, http_port, frame, 1002, "RSV bits set, no extension in use")
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_unknown_opcode_closes_the_connection_with_1002(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    await assert_closed_for(clients, http_port, client_frame(0x3, b"x"), 1002, "unknown opcode 3")
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_4_mib_frame_header_closes_the_connection_with_1009_before_the_payload(
    http_server: Any, http_port: int, base_url: str, clients: Clients, bystander: Bystander
) -> None:
    size = 4 * 1024 * 1024
    header = client_frame(OP_TEXT, length=size)  # a header and mask key, no payload
    reason = f"message over {MAX_FRAME_BYTES} bytes ({size})"
    await assert_closed_for(clients, http_port, header, 1009, reason)
    await bystander.assert_usual_latency()
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_invalid_utf8_text_closes_the_connection_with_1007(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    frame = client_frame(OP_TEXT, b'{"command":"\xff\xfe"}')
    await assert_closed_for(clients, http_port, frame, 1007, "text message is not valid UTF-8")
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_ping_is_answered_with_pong_and_close_with_close(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    raw = await RawClient.connect(clients, http_port)
    await raw.send(client_frame(OP_PING, b"are you there"))
    while (frame := await raw.read_frame()) != (0xA, b"are you there"):
        assert frame[0] == OP_TEXT  # only server pings may come first
    await raw.send(client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert await raw.read_until_closed() == ([], (1000, ""))
    await assert_node_serves(clients, base_url)


# --- flooding ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_5000_subscribes_at_once_disconnect_for_too_many_commands(
    http_server: Any,
    http_port: int,
    base_url: str,
    clients: Clients,
    services: Services,
    bystander: Bystander,
) -> None:
    raw = await RawClient.connect(clients, http_port)
    flood = b"".join(
        text_frame(subscribe_command(json.dumps({"channel": "BenchmarkChannel", "n": n})))
        for n in range(5000)
    )

    async def send_flood() -> None:
        with contextlib.suppress(OSError):  # the server closes while we are still sending
            await raw.send(flood)

    sending = asyncio.ensure_future(send_flood())
    messages, close = await raw.read_until_closed()
    await sending
    assert messages[-1] == {"type": "disconnect", "reason": "too_many_commands", "reconnect": False}
    assert close == (1008, "too_many_commands")
    kinds = [m.get("type") for m in messages[:-1]]
    assert set(kinds) <= {"confirm_subscription", "reject_subscription"}
    # The bucket refills while the burst is worked through, so on a slow run a few commands
    # past the burst are handled: past the subscription limit those are refused, never more
    # confirmed. A refusal is written at once while a confirmation waits for its stream, so the
    # disconnect may cut confirmations off: the invariant is which commands each answer is for.
    limits = services.settings
    numbers = {
        kind: [json.loads(m["identifier"])["n"] for m in messages[:-1] if m["type"] == kind]
        for kind in ("confirm_subscription", "reject_subscription")
    }
    assert len(numbers["confirm_subscription"]) <= min(
        limits.cable_command_burst, limits.cable_max_subscriptions
    )
    assert all(n < limits.cable_max_subscriptions for n in numbers["confirm_subscription"])
    assert all(n >= limits.cable_max_subscriptions for n in numbers["reject_subscription"])
    await bystander.assert_usual_latency()
    await assert_node_serves(clients, base_url)


@pytest.mark.parametrize("settings", [{"cable_max_subscriptions": 3}], indirect=True, ids=["3"])
@pytest.mark.gen_test(timeout=30)
async def test_subscriptions_beyond_the_limit_are_rejected(
    settings: Settings, http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url)
    identifiers = [json.dumps({"channel": "BenchmarkChannel", "n": n}) for n in range(5)]
    for identifier in identifiers:
        await send(ws, subscribe_command(identifier))
    answers = {m["identifier"]: m["type"] for m in await read_n(ws, 5)}
    assert answers == {
        identifiers[0]: "confirm_subscription",
        identifiers[1]: "confirm_subscription",
        identifiers[2]: "confirm_subscription",
        identifiers[3]: "reject_subscription",
        identifiers[4]: "reject_subscription",
    }
    await assert_node_serves(clients, base_url)


# --- subscriptions ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_unknown_channel_is_rejected_with_the_identifier_echoed_byte_for_byte(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url)
    identifier = '{ "zeta" : [1,2.50],\t"channel":  "NoSuchChannel" , "name":"caf\u00e9 \\u00e9" }'
    await send(ws, subscribe_command(identifier))
    raw = await read_raw(ws)
    assert json.loads(raw) == {"identifier": identifier, "type": "reject_subscription"}
    encoded = json.dumps(identifier, ensure_ascii=False, separators=(",", ":"))
    assert raw == '{"identifier":' + encoded + ',"type":"reject_subscription"}'
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_duplicate_subscribe_is_confirmed_once_and_otherwise_ignored(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    """The official client re-sends `subscribe` every 500 ms until answered: no error (which
    it would hand to the subscription's `received()`), no second confirm, no disconnect."""
    ws = await connect(clients, base_url)
    await send(ws, subscribe_command(BENCH))
    await send(ws, subscribe_command(BENCH))  # a retry while the first is pending
    assert await read(ws) == {"identifier": BENCH, "type": "confirm_subscription"}
    for _ in range(30):  # retries after the confirmation, more than the error allowance
        await send(ws, subscribe_command(BENCH))
    await assert_echoes(ws)  # nothing else (no error, no second confirm) came before the echo
    await assert_node_serves(clients, base_url)


def first_product(dsn: str) -> tuple[int, int]:
    """(product_id, stock) of the lowest product id in the catalog."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT product_id, stock FROM inventory ORDER BY product_id LIMIT 1")
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.gen_test(timeout=30)
async def test_inventory_channel_rejects_bad_product_ids(
    http_server: Any,
    base_url: str,
    clients: Clients,
    services: Services,
    infra_env: dict[str, str],
) -> None:
    assert await seed_catalog(services.db, 3, show_progress=False) == 3
    product_id, stock = first_product(infra_env["FM_CATALOG_DSN"])
    bad = [
        '{"channel":"InventoryChannel"}',
        '{"channel":"InventoryChannel","product_id":"abc"}',
        '{"channel":"InventoryChannel","product_id":-1}',
        '{"channel":"InventoryChannel","product_id":"-1"}',
        '{"channel":"InventoryChannel","product_id":0}',
        '{"channel":"InventoryChannel","product_id":1.5}',
        '{"channel":"InventoryChannel","product_id":true}',
        '{"channel":"InventoryChannel","product_id":null}',
        '{"channel":"InventoryChannel","product_id":[1]}',
        '{"channel":"InventoryChannel","product_id":1180591620717411303424}',
        '{"channel":"InventoryChannel","product_id":"99999999999999999999999"}',
        '{"channel":"InventoryChannel","product_id":"9223372036854775808"}',
        '{"channel":"InventoryChannel","product_id":9223372036854775807}',
        '{"channel":"InventoryChannel","product_id":999999999}',
        '{"channel":"InventoryChannel","product_id":"999999999"}',
    ]
    ws = await connect(clients, base_url)
    for identifier in bad:
        await send(ws, subscribe_command(identifier))
    answers = {m["identifier"]: m["type"] for m in await read_n(ws, len(bad))}
    assert answers == dict.fromkeys(bad, "reject_subscription")

    good = json.dumps({"channel": "InventoryChannel", "product_id": str(product_id)})
    await subscribe(ws, good)
    snapshot = await read(ws)
    assert snapshot == {
        "identifier": good,
        "message": {
            "event": "stock",
            "product_id": str(product_id),
            "stock": stock,
            "offset": 0,
            "epoch": snapshot["message"]["epoch"],
        },
    }
    assert isinstance(snapshot["message"]["epoch"], str) and snapshot["message"]["epoch"]
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_cart_channel_is_only_for_the_signed_in_owner(
    http_server: Any, base_url: str, clients: Clients, services: Services
) -> None:
    users = UserService(services.router)
    alice = await users.create_user("alice@example.com", "correct horse battery")
    bob = await users.create_user("bob@example.com", "correct horse battery")
    token = await services.sessions.create(alice.id)

    anonymous = await connect(clients, base_url)
    await send(anonymous, subscribe_command('{"channel":"CartChannel"}'))
    assert await read(anonymous) == {
        "identifier": '{"channel":"CartChannel"}',
        "type": "reject_subscription",
    }

    ws = await connect(clients, base_url, query=f"?token={token}")
    for other in (
        json.dumps({"channel": "CartChannel", "user_id": bob.id}),
        json.dumps({"channel": "CartChannel", "user_id": str(bob.id)}),
    ):
        await send(ws, subscribe_command(other))
        assert await read(ws) == {"identifier": other, "type": "reject_subscription"}

    own = json.dumps({"channel": "CartChannel", "user_id": alice.id})
    await subscribe(ws, own)
    first = await read(ws)
    assert first == {
        "identifier": own,
        "message": {
            "event": "cart",
            "cart": {"items": [], "total_cents": 0, "version": 0, "warnings": []},
            "offset": 0,
            "epoch": first["message"]["epoch"],
        },
    }
    assert isinstance(first["message"]["epoch"], str) and first["message"]["epoch"]
    await assert_node_serves(clients, base_url)


# --- the upgrade request ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_invalid_token_gets_unauthorized_disconnect_instead_of_welcome_and_close(
    http_server: Any, base_url: str, clients: Clients, services: Services
) -> None:
    ws = await open_ws(clients, base_url, JSON, query="?token=nope")
    assert await read(ws) == {"type": "disconnect", "reason": "unauthorized", "reconnect": False}
    assert await read(ws) is None
    assert ws.close_code == 1008
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_cross_site_origin_is_refused_with_403_problem(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    request = HTTPRequest(cable_url(base_url), headers={"Origin": "https://evil.example"})
    response = await expect_http_error(request, [JSON])
    assert response.code == 403
    problem = problem_of(response)
    assert problem["type"] == "/problems/origin-not-allowed"
    assert problem["origin"] == "https://evil.example"
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_same_host_origin_is_accepted(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    origin = "http://" + urlsplit(base_url).netloc
    ws = await connect(clients, base_url, headers={"Origin": origin})
    await subscribe(ws)
    await assert_echoes(ws)


@pytest.mark.parametrize(
    "settings", [{"cable_allowed_origins": ["https://shop.example"]}], indirect=True, ids=["shop"]
)
@pytest.mark.gen_test(timeout=30)
async def test_configured_origin_is_accepted_and_others_still_refused(
    settings: Settings, http_server: Any, base_url: str, clients: Clients
) -> None:
    ws = await connect(clients, base_url, headers={"Origin": "https://shop.example"})
    await subscribe(ws)
    request = HTTPRequest(cable_url(base_url), headers={"Origin": "https://shop.example.evil"})
    assert (await expect_http_error(request, [JSON])).code == 403
    await assert_echoes(ws)


@pytest.mark.gen_test(timeout=30)
async def test_plain_get_without_upgrade_is_426_problem(
    http_server: Any, http_client: Any, base_url: str, clients: Clients
) -> None:
    with pytest.raises(HTTPClientError) as caught:
        await http_client.fetch(base_url + "/cable")
    response = caught.value.response
    assert response is not None and response.code == 426
    assert response.headers["Upgrade"] == "websocket"
    problem = problem_of(response)
    assert (problem["type"], problem["status"]) == ("/problems/upgrade-required", 426)
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_only_unknown_subprotocols_is_400_problem(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    response = await expect_http_error(HTTPRequest(cable_url(base_url)), ["chat", "mqtt"])
    assert response.code == 400
    problem = problem_of(response)
    assert (problem["type"], problem["offered"]) == ("/problems/subprotocol", ["chat", "mqtt"])
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_a_client_of_another_protocol_version_is_told_unsupported_and_closed(
    http_server: Any, http_port: int, base_url: str, clients: Clients
) -> None:
    """The official client offers `actioncable-unsupported` last: picking it tells a client of
    a protocol version we do not speak to stop (it does not reconnect)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(
        b"GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Protocol: actioncable-v2-json, actioncable-unsupported\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"\r\nsec-websocket-protocol: actioncable-unsupported\r\n" in head.lower()
    rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)  # then the server closes
    assert rest == encode_close(1002, "unsupported subprotocol")
    writer.close()
    await assert_node_serves(clients, base_url)


# --- slow consumers and drain ------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{"cable_slow_consumer_bytes": 4096, "cable_max_frame_bytes": 256 * 1024}],
    indirect=True,
    ids=["4KiB"],
)
@pytest.mark.gen_test(timeout=30)
async def test_slow_consumer_is_cut_off_and_others_get_every_broadcast(
    settings: Settings,
    http_server: Any,
    http_port: int,
    base_url: str,
    clients: Clients,
    services: Services,
) -> None:
    slow = await RawClient.connect(clients, http_port, rcvbuf=4096)
    await slow.send(text_frame(subscribe_command(BENCH)))
    assert await slow.read_message() == {"identifier": BENCH, "type": "confirm_subscription"}
    # From now on `slow` reads nothing.

    watcher = await connect(clients, base_url)
    await subscribe(watcher)
    publisher = await connect(clients, base_url)
    await subscribe(publisher)
    # The kernel buffers ~4 MB per loopback connection before the server's own buffer grows
    # (SO_SNDBUF autotunes to tcp_wmem's maximum), so send well over that: 50 x 128 KiB.
    # Lock-step (each broadcast is read by both well-behaved clients before the next is
    # sent) keeps every write to them small: with a 4 KiB bound, a burst coalesced into one
    # multi-megabyte write would cut off even a client that reads at full speed.
    count, filler = 50, "x" * (128 * 1024)
    received = []
    for n in range(count):
        data = json.dumps({"action": "broadcast", "n": n, "filler": filler})
        await send(publisher, {"command": "message", "identifier": BENCH, "data": data})
        received.append(await read(watcher))
        echoed = await read_n(publisher, 2)  # the broadcast and its broadcastResult
        assert sorted(m["message"]["action"] for m in echoed) == ["broadcast", "broadcastResult"]
    assert [m["identifier"] for m in received] == [BENCH] * count
    bodies = [m["message"] for m in received]
    assert [b["n"] for b in bodies] == list(range(count))
    assert all(b["filler"] == filler and b["action"] == "broadcast" for b in bodies)
    offsets = [b["offset"] for b in bodies]
    assert offsets == list(range(offsets[0], offsets[0] + count))

    # `slow` still reads nothing: the sweep cuts it off (over the hard bound and not draining,
    # or at the latest when the grace period ends). Only then does the test drain its socket.
    for _ in range(int(SLOW_CONSUMER_WAIT_S / 0.05)):
        if services.cable.slow_consumers:
            break
        await asyncio.sleep(0.05)
    assert services.cable.slow_consumers == 1
    # Nothing more is queued for it (a broadcast after the cut reaches only the others); behind
    # what it had not read come the reason and a close frame, and then the connection ends.
    await send(publisher, {"command": "message", "identifier": BENCH, "data": data})
    assert (await read(watcher))["message"]["n"] == count - 1
    await slow.expect_eof(keep_tail=256)
    goodbye = JsonCodec().frame(disconnect("slow_consumer", reconnect=True))
    goodbye += encode_close(1000, "slow_consumer")
    assert slow.tail.endswith(goodbye)
    await assert_echoes(watcher)
    await assert_node_serves(clients, base_url)


@pytest.mark.parametrize(
    "settings",
    [
        {
            "cable_slow_consumer_bytes": 4096,
            "cable_max_frame_bytes": 256 * 1024,
            "cable_slow_consumer_grace_s": 1.0,
        }
    ],
    indirect=True,
    ids=["4KiB-1s"],
)
@pytest.mark.gen_test(timeout=30)
async def test_a_slow_consumer_that_never_reads_is_dropped_after_the_grace_period(
    settings: Settings,
    http_server: Any,
    http_port: int,
    base_url: str,
    clients: Clients,
    services: Services,
) -> None:
    """Its `disconnect` waits behind what it has not read; it does not read that either, so
    the node drops it and frees its buffers one grace period later."""
    stuck = await RawClient.connect(clients, http_port, rcvbuf=4096)
    await stuck.send(text_frame(subscribe_command(BENCH)))
    assert await stuck.read_message() == {"identifier": BENCH, "type": "confirm_subscription"}
    publisher = await connect(clients, base_url)
    await subscribe(publisher)
    data = json.dumps({"action": "broadcast", "filler": "x" * (128 * 1024)})
    for _ in range(60):  # ~7.5 MiB: past the kernel's buffers and the hard bound
        await send(publisher, {"command": "message", "identifier": BENCH, "data": data})
        await read_n(publisher, 2)
    deadline = time.monotonic() + SLOW_CONSUMER_WAIT_S
    while not services.cable.slow_consumers:
        assert time.monotonic() < deadline, "never cut off"
        await asyncio.sleep(0.05)
    cut = time.monotonic()
    assert len(services.cable.connections) == 2  # closing, its goodbye still queued
    while len(services.cable.connections) == 2:
        assert time.monotonic() - cut < 1.0 + 2.0, "never dropped"
        await asyncio.sleep(0.05)
    assert time.monotonic() - cut >= 0.9  # not before the grace period
    await assert_echoes(publisher)
    await assert_node_serves(clients, base_url)


@pytest.mark.parametrize(
    "settings",
    [{"cable_slow_consumer_bytes": 4096, "cable_max_frame_bytes": 256 * 1024}],
    indirect=True,
    ids=["4KiB"],
)
@pytest.mark.gen_test(timeout=30)
async def test_a_burst_far_over_the_bound_does_not_cut_off_clients_that_read(
    settings: Settings, http_server: Any, base_url: str, clients: Clients, services: Services
) -> None:
    """Only sustained backlog makes a slow consumer: 6 MiB sent at once to clients that keep
    reading passes the 4 KiB soft bound many times over, and nobody is cut off."""
    watcher = await connect(clients, base_url)
    await subscribe(watcher)
    publisher = await connect(clients, base_url)
    await subscribe(publisher)
    count, filler = 48, "y" * (128 * 1024)
    # Both keep reading all along (the publisher gets each broadcast and its broadcastResult).
    reading = asyncio.gather(read_n(watcher, count), read_n(publisher, 2 * count))
    for n in range(count):  # all at once, no waiting in between
        data = json.dumps({"action": "broadcast", "n": n, "filler": filler})
        await send(publisher, {"command": "message", "identifier": BENCH, "data": data})
    received, _own = await reading
    assert [m["message"]["n"] for m in received] == list(range(count))
    assert services.cable.slow_consumers == 0
    await assert_echoes(watcher)


@pytest.mark.gen_test(timeout=30)
async def test_first_broadcast_on_a_fresh_node_reaches_its_subscribers(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    watcher = await connect(clients, base_url)
    await subscribe(watcher)  # the node's first subscription: it starts following Redis
    publisher = await connect(clients, base_url)
    await subscribe(publisher)
    await send(
        publisher,
        {"command": "message", "identifier": BENCH, "data": '{"action":"broadcast","n":0}'},
    )
    received = await read(watcher)
    assert received["message"]["n"] == 0
    assert received["message"]["offset"] == 1
    await assert_node_serves(clients, base_url)


@pytest.mark.gen_test(timeout=30)
async def test_broadcasts_from_one_connection_keep_their_order(
    http_server: Any, base_url: str, clients: Clients
) -> None:
    watcher = await connect(clients, base_url)
    await subscribe(watcher)
    publisher = await connect(clients, base_url)
    await subscribe(publisher)
    for n in range(30):
        data = json.dumps({"action": "broadcast", "n": n})
        await send(publisher, {"command": "message", "identifier": BENCH, "data": data})
    assert [m["message"]["n"] for m in await read_n(watcher, 30)] == list(range(30))


@pytest.mark.gen_test(timeout=30)
async def test_drain_tells_every_client_to_reconnect_and_closes_them(
    http_server: Any, base_url: str, clients: Clients, services: Services
) -> None:
    json_ws = await connect(clients, base_url)
    await subscribe(json_ws)
    msgpack_ws = await connect(clients, base_url, MSGPACK)
    await subscribe(msgpack_ws)
    idle_ws = await connect(clients, base_url)

    await services.cable.drain()

    restart = {"type": "disconnect", "reason": "server_restart", "reconnect": True}
    for ws in (json_ws, msgpack_ws, idle_ws):
        raw = await read_raw(ws)
        assert isinstance(raw, bytes if ws is msgpack_ws else str)
        assert decode(raw) == restart
        assert await read(ws) is None
        assert ws.close_code == 1001
    await assert_node_serves(clients, base_url)


@pytest.mark.parametrize(
    "settings", [{"cable_max_connections_per_ip": 3}], indirect=True, ids=["3-per-ip"]
)
@pytest.mark.gen_test(timeout=30)
async def test_connections_past_the_per_address_bound_get_429_and_a_freed_slot_is_reusable(
    settings: Settings, http_server: Any, base_url: str, clients: Clients
) -> None:
    held = [await connect(clients, base_url) for _ in range(3)]
    response = await expect_http_error(HTTPRequest(cable_url(base_url)), [JSON])
    assert response.code == 429 and int(response.headers["Retry-After"]) >= 1
    assert problem_of(response)["type"] == "/problems/too-many-connections"
    held[0].close()
    again = await connect_once_freed(clients, base_url)
    await subscribe(again)
    await assert_echoes(again)


@pytest.mark.parametrize(
    "settings", [{"cable_max_connections_per_ip": 3}], indirect=True, ids=["3-per-ip"]
)
@pytest.mark.gen_test(timeout=30)
async def test_concurrent_upgrades_never_exceed_the_per_address_bound_nor_leak_places(
    settings: Settings, http_server: Any, base_url: str, clients: Clients
) -> None:
    """The bound is checked as each handshake begins, and the handshake awaits before the
    connection opens: the place is counted at the check, so upgrades arriving together
    cannot all pass it; one whose handshake fails after the check gives its place back."""

    async def attempt() -> WebSocketClientConnection | int:
        try:
            return await connect(clients, base_url)
        except HTTPClientError as exc:
            return exc.code

    outcomes = await asyncio.gather(*(attempt() for _ in range(12)))
    held = [o for o in outcomes if not isinstance(o, int)]
    assert len(held) == 3 and sorted(o for o in outcomes if isinstance(o, int)) == [429] * 9
    held.pop().close()
    for _ in range(5):  # refused after the address check: the place goes back each time
        response = await expect_http_error(HTTPRequest(cable_url(base_url)), ["no-such-proto"])
        assert response.code == 400
    held.append(await connect_once_freed(clients, base_url))
    await subscribe(held[-1])
    await assert_echoes(held[-1])
